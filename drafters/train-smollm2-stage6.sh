#!/bin/sh
# Stage 6 of the SmolLM2-135M-Instruct drafter (issue 15 item 6; add --resume to continue a run):
# fine-tune the stage-5 drafter (the one shipped until 2026-12-02) on broad data: 1200 prompts the
# target writes itself (self-instruct, Magpie) mixed with instruction, chit-chat and code prompts,
# all answered by the target (greedy self-distillation through the quantized Q4_1 engine, the one
# users run). The best checkpoint is chosen on 24 more generated prompts held out of training
# (not on the broad benchmark, which stays unseen). The first 7 steps (14 minutes) ran with --bf16, which
# on this AVX2-only CPU trains ~18x slower (train-drafter now ignores it there); the run was resumed
# without it and the budget raised from 65 to 80 minutes to make up for them.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data self-instruct:1200 --data instructions:500 --data chitchat:200 --data humaneval --seed 6 \
  --out drafters/smollm2-135m-instruct.stage6.work/drafter --work-dir drafters/smollm2-135m-instruct.stage6.work \
  --draft-tokens 4 --distill-tokens 160 --max-len 384 --shard-size 64 --batch-size 8 --lr 4e-4 --epochs 2 --replay 0.5 \
  --eval-limit 24 --eval-every 15 --checkpoint-every 4 --time-budget 80 "$@"
