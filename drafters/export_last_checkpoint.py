"""Write the last step of a training run (its work folder's checkpoint.pt) as a drafter folder, to
compare it with the step the run kept (its kept held-out evaluation).

    .venv/bin/python drafters/export_last_checkpoint.py KEPT_DRAFTER_DIR WORK_DIR OUT_DIR

KEPT_DRAFTER_DIR gives the drafter's config (the run's --out), WORK_DIR holds checkpoint.pt (the
run's --work-dir, by default OUT.work); the weights are written in float16 like the run's output."""

import json
import sys
from pathlib import Path

import torch

from mtpspec.drafter_checkpoint import read_drafter_config
from mtpspec.models.drafter import MTPDrafter
from mtpspec.train.checkpointing import write_drafter

kept, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
cfg, k = read_drafter_config(kept)
drafter = MTPDrafter(cfg)
drafter.load_state_dict(torch.load(work / "checkpoint.pt", weights_only=False)["drafter"])
info = json.loads((kept / "training.json").read_text())
info["exported_from"] = f"{work / 'checkpoint.pt'} (the run's last step)"
write_drafter(drafter, out, dtype=torch.float16, draft_tokens=k or info["config"]["draft_tokens"], info=info)
print(f"{out}: the last checkpointed step")
