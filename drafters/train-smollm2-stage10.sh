#!/bin/sh
# Stage 10 of the SmolLM2-135M-Instruct drafter (issue 15; add --resume to continue a run):
# fine-tune the shipped drafter (stage 9) on data no earlier stage saw: a new draw of the
# `tasks` recipe (seed 10: new fillings of the translate / summarize / extract / passage-QA / math /
# role-play / writing / rewriting / reasoning / code templates, from the training split only), 1000
# new prompts the target writes itself (self-instruct, seed 10) and chit-chat, all answered by the
# Q4_1 target with their activations recorded while it answers. Same recipe otherwise as stage 8;
# the best checkpoint is chosen on drafters/heldout-tasks.jsonl, never on the broad benchmark.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data tasks --data self-instruct:1000 --data chitchat:300 --seed 10 \
  --out drafters/smollm2-135m-instruct.stage10.work/drafter --work-dir drafters/smollm2-135m-instruct.stage10.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 512 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 \
  --eval-prompts drafters/heldout-tasks.jsonl --eval-limit 30 --eval-every 10 --checkpoint-every 4 --time-budget 80 "$@"
