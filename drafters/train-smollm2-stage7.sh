#!/bin/sh
# Stage 7 of the SmolLM2-135M-Instruct drafter (issue 15 item 6; add --resume to continue a run):
# fine-tune the stage-6 drafter on more broad data than any earlier stage, made affordable by
# bulk mode (kernels.bulk_matmuls: the target's self-distillation and activation passes in
# bfloat16 GEMMs on this AMX CPU, ~600 tok/s answers and ~2000 tok/s activations against ~400 /
# ~600 in the decoding kernels): 1500 prompts the target writes itself (self-instruct, new seed)
# mixed with instruction, chit-chat and code prompts, all answered by the Q4_1 target; shards of
# 128 answered 128 at a time, one pass per new shard with half of each batch replayed, bf16
# autocast. The best checkpoint is chosen on 24 generated prompts held out of training (not on
# the broad benchmark, which stays unseen).
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data self-instruct:1500 --data instructions:1500 --data chitchat:300 --data humaneval --seed 7 \
  --out drafters/smollm2-135m-instruct.stage7.work/drafter --work-dir drafters/smollm2-135m-instruct.stage7.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 384 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 --bf16 \
  --eval-limit 24 --eval-every 10 --checkpoint-every 4 --time-budget 70 "$@"
