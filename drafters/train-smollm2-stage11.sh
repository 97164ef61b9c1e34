#!/bin/sh
# Stage 11 of the SmolLM2-135M-Instruct drafter (issue 15; add --resume to continue a run): the
# shipped drafter (stage 10) fine-tuned with bfloat16 autocast (train-drafter's default now on CPUs
# with AVX512_BF16 / AMX: ~2.8x faster steps than stage 10's fp32 on a 2-core Xeon) on activation
# shards already answered by the Q4_1 target: 64 shards stage 10 never saw (the two equal-time A/B
# runs of the one command, `ab-onecmd-mix.sh`: 2000 self-written prompts; 1400 self-written + 600
# `tasks`), stage 10's own 30 shards, and one new shard of `tasks` (seed 11, training split only).
# Those work dirs are local (drafters/*.work is not committed): ab-onecmd-mix.sh and
# train-smollm2-stage10.sh rebuild them. The best checkpoint is chosen on drafters/heldout-tasks.jsonl,
# never on the broad benchmark.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data tasks:128 --seed 11 \
  --replay-from drafters/ab-default.work/drafter.work --replay-from drafters/ab-tasks.work/drafter.work \
  --replay-from drafters/smollm2-135m-instruct.stage10.work \
  --out drafters/smollm2-135m-instruct.stage11.work/drafter --work-dir drafters/smollm2-135m-instruct.stage11.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 512 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 --bf16 \
  --eval-prompts drafters/heldout-tasks.jsonl --eval-limit 30 --eval-every 10 --checkpoint-every 4 --time-budget 70 "$@"
