#!/bin/sh
# Stage 8 of the SmolLM2-135M-Instruct drafter (issue 15; add --resume to continue a run):
# fine-tune the stage-7 drafter on the kinds of requests the earlier stages never saw: the `tasks`
# recipe (translate, summarize / extract / answer about a given text, math, role-play, writing,
# rewriting, reasoning, code; templates filled with chitchat and standard-library material)
# mixed with new prompts the target writes itself and chit-chat, all answered by the Q4_1 target
# in bulk mode. Longer samples than stage 7 (--max-len 512: passages to summarize). The best
# checkpoint is chosen on drafters/heldout-tasks.jsonl (the recipe's held-out split: no prompt and
# no passage of it is trained on), never on the broad benchmark.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --clustered --centroid-top-k 16 \
  --data tasks --data self-instruct:500 --data chitchat:300 --seed 8 \
  --out drafters/smollm2-135m-instruct.stage8.work/drafter --work-dir drafters/smollm2-135m-instruct.stage8.work \
  --draft-tokens 4 --distill-tokens 192 --max-len 512 --shard-size 128 --distill-batch 128 --batch-size 16 \
  --lr 4e-4 --epochs 1 --replay 0.5 --bf16 \
  --eval-prompts drafters/heldout-tasks.jsonl --eval-limit 30 --eval-every 10 --checkpoint-every 4 --time-budget 65 "$@"
