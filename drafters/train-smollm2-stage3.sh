#!/bin/sh
# Stage 3 of the SmolLM2-135M-Instruct drafter (add --resume to continue a run): grow the stage-1
# drafter (train-smollm2.sh, the shipped step 2101) to 2 layers (the new layer starts as the
# identity) and train on replayed activations: stage 1's self-distilled shards (its local work
# dir) plus one new chat-text shard; no target passes after that shard. (Stage 2's chat-text
# fine-tuning, train-smollm2-stage2.sh, lowered held-out acceptance and is not used.)
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --layers 2 --replay-from drafters/smollm2-135m-instruct.work \
  --data chitchat-text:64 --no-self-distill --seed 1 \
  --out drafters/smollm2-135m-instruct.stage3.work/drafter --work-dir drafters/smollm2-135m-instruct.stage3.work \
  --draft-tokens 4 --clustered --centroid-top-k 16 \
  --max-len 320 --shard-size 64 --batch-size 8 --lr 5e-4 --epochs 1 --replay 0.5 \
  --eval-prompts drafters/heldout-chat.jsonl --eval-every 10 --checkpoint-every 4 --time-budget 50 --bf16 "$@"
