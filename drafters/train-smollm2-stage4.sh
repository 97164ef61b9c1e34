#!/bin/sh
# Stage 4 of the SmolLM2-135M-Instruct drafter (add --resume to continue a run): fine-tune the
# stage-3 drafter (2 layers) on NEW self-distilled data (the stage-1 recipes in another seeded
# order, so mostly prompts stage 1 never reached), replaying stage 1's shards alongside.
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --replay-from drafters/smollm2-135m-instruct.work \
  --data chitchat --data instructions --data humaneval --data python-stdlib:150 --seed 4 \
  --out drafters/smollm2-135m-instruct.stage4.work/drafter --work-dir drafters/smollm2-135m-instruct.stage4.work \
  --draft-tokens 4 --clustered --centroid-top-k 16 \
  --distill-tokens 160 --max-len 320 --shard-size 64 --batch-size 8 --lr 4e-4 --epochs 2 --replay 0.5 \
  --eval-prompts drafters/heldout-chat.jsonl --eval-every 15 --checkpoint-every 4 --time-budget 70 --bf16 "$@"
