#!/bin/sh
# The command that trains the shipped SmolLM2-135M-Instruct drafter (add --resume to continue a run).
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --data chitchat --data instructions --data humaneval --data python-stdlib:150 \
  --out mtpspec/drafters/smollm2-135m-instruct --work-dir drafters/smollm2-135m-instruct.work \
  --draft-tokens 4 --layers 1 --clustered --centroid-top-k 16 \
  --distill-tokens 160 --max-len 320 --shard-size 64 --batch-size 8 --lr 1e-3 --epochs 3 --replay 0.5 \
  --eval-prompts drafters/heldout-chat.jsonl --eval-every 12 --checkpoint-every 4 --time-budget 78 --bf16 "$@"
