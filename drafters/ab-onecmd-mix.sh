#!/bin/sh
# Equal-time A/B of the one command's default data (issue 15 items 2/5) on the default model, from
# scratch: "default" = no --data (self-instruct:2000, held-out split of 16 of its prompts);
# "tasks" = 1400 self-instruct prompts + 600 `tasks` prompts. Both run at once, one core each
# (OMP_NUM_THREADS=1), 75 minutes of training each: the machine is shared symmetrically.
cd "$(dirname "$0")/.." || exit 1
for v in default tasks; do
  if [ "$v" = default ]; then DATA=""; else DATA="--data self-instruct:1400 --data tasks:600"; fi
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive TQDM_MININTERVAL=60 .venv/bin/mtpspec train-drafter $DATA \
    --out drafters/ab-$v.work/drafter --time-budget 75 > drafters/ab-onecmd-$v.log 2>&1 &
done
wait
# then, both drafters on the broad benchmark (never trained on):
#   .venv/bin/mtpspec eval-drafter drafters/ab-$v.work/drafter --heldout --per-category N -k 4 --json
