#!/bin/sh
# Stage 12 of the SmolLM2-135M-Instruct drafter (issue 15; add --resume to continue a run):
# fine-tune the shipped drafter (stage 11) on fresh data: a new draw of the `tasks` recipe
# (seed 12, training split only), 1500 new prompts the target writes itself (self-instruct,
# seed 12) and chit-chat, answered by the Q4_1 target with their activations recorded while it
# answers; half of every batch replayed from stages 10 and 11 and the one-command A/B runs' shards.
# bfloat16 autocast (the default on CPUs with native bf16). The best checkpoint is chosen on
# drafters/heldout-tasks.jsonl, never on the broad benchmark.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data tasks --data self-instruct:1500 --data chitchat:300 --seed 12 \
  --replay-from drafters/smollm2-135m-instruct.stage10.work --replay-from drafters/smollm2-135m-instruct.stage11.work \
  --replay-from drafters/ab-default.work/drafter.work --replay-from drafters/ab-tasks.work/drafter.work \
  --out drafters/smollm2-135m-instruct.stage12.work/drafter --work-dir drafters/smollm2-135m-instruct.stage12.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 512 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 \
  --eval-prompts drafters/heldout-tasks.jsonl --eval-limit 30 --eval-every 10 --checkpoint-every 4 --time-budget 55 "$@"
