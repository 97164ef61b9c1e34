#!/bin/sh
# Stage 2 of the shipped SmolLM2-135M-Instruct drafter (add --resume to continue a run):
# fine-tune the stage-1 drafter (train-smollm2.sh) on whole human chats as text (the target's
# argmax teaches; no generation, so ~3x more tokens per minute than self-distillation), with half
# of every batch replayed from stage 1's self-distilled activation shards (its local work dir).
# The result lands in the stage-2 work dir; it replaces the shipped drafter only if it is better
# on the held-out prompts (see drafters/README.md).
cd "$(dirname "$0")/.." && OMP_WAIT_POLICY=passive TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --init mtpspec/drafters/smollm2-135m-instruct --replay-from drafters/smollm2-135m-instruct.work \
  --data chitchat-text --no-self-distill \
  --out drafters/smollm2-135m-instruct.stage2.work/drafter --work-dir drafters/smollm2-135m-instruct.stage2.work \
  --draft-tokens 4 --layers 1 --clustered --centroid-top-k 16 \
  --max-len 320 --shard-size 64 --batch-size 8 --lr 5e-4 --epochs 1 --replay 0.5 \
  --eval-prompts drafters/heldout-chat.jsonl --eval-every 12 --checkpoint-every 4 --time-budget 95 --bf16 "$@"
