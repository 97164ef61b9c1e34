#!/bin/sh
# The one command (issue 15 item 5) on the default model, from scratch, as a user runs it: no
# --data (the target writes its prompts and answers them), default layers, head, K, objective and
# held-out split. --resume continues a stopped run.
cd "$(dirname "$0")/.." && TQDM_MININTERVAL=30 exec .venv/bin/mtpspec train-drafter \
  --out drafters/smollm2-135m-instruct.onecmd.work/drafter --time-budget 60 "$@"
