#!/bin/sh
# Stage 9 of the SmolLM2-135M-Instruct drafter (issue 15; add --resume to continue a run):
# fine-tune the shipped drafter (stage 8 continued) on data no earlier stage saw: a new draw of the
# `tasks` recipe (seed 9: new fillings of the translate / summarize / extract / passage-QA / math /
# role-play / writing / rewriting / reasoning / code templates, from the training split only), 1000
# new prompts the target writes itself (self-instruct, seed 9) and chit-chat, all answered by the
# Q4_1 target with their activations recorded while it answers. Same recipe otherwise as stage 8;
# the best checkpoint is chosen on drafters/heldout-tasks.jsonl, never on the broad benchmark.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data tasks --data self-instruct:1000 --data chitchat:300 --seed 9 \
  --out drafters/smollm2-135m-instruct.stage9.work/drafter --work-dir drafters/smollm2-135m-instruct.stage9.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 512 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 \
  --eval-prompts drafters/heldout-tasks.jsonl --eval-limit 30 --eval-every 10 --checkpoint-every 4 --time-budget 95 "$@"
