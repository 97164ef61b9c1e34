#!/bin/sh
# Stage 5 of the SmolLM2-135M-Instruct drafter: continue the stage-4 run (same data order, so the
# next shards are prompts stage 4 never reached) on fresh data only once (--epochs 1, less replay),
# with the time budget raised from 70 to 145 minutes (the cosine learning-rate schedule picks up at
# the half-way point). Add --resume again to continue an interrupted stage 5.
cd "$(dirname "$0")/.." && exec sh drafters/train-smollm2-stage4.sh --resume --epochs 1 --replay 0.3 --time-budget 145 "$@"
