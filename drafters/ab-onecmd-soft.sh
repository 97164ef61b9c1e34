#!/bin/sh
# Equal-time A/B of the one command's teacher (issue 15 item 4) on the default model, from scratch:
# "hard" = the default (cross-entropy to the target's argmax); "soft" = --soft-labels
# (cross-entropy to the target's top-8 distribution, which the shards hold anyway). Same seed, so
# the same prompts, answers and batches. Both run at once, one core each (OMP_NUM_THREADS=1), so
# the machine is shared symmetrically; --time-budget is each whole run.
cd "$(dirname "$0")/.." || exit 1
MIN=${MIN:-55}
for v in hard soft; do
  if [ "$v" = soft ]; then OPT="--soft-labels"; else OPT=""; fi
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive TQDM_MININTERVAL=60 .venv/bin/mtpspec train-drafter $OPT \
    --prompts 1200 --out drafters/ab-soft-$v.work/drafter --time-budget "$MIN" > drafters/ab-onecmd-soft-$v.log 2>&1 &
done
wait
# then, both drafters on the broad benchmark (never trained on):
#   .venv/bin/mtpspec eval-drafter drafters/ab-soft-$v.work/drafter --heldout --per-category 10 -k 4 --json
