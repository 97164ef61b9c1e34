"""Drafter training step time: this tree's objective (mtpspec/train/objective.py) against the one
at git revision REV, alternated in one process on the same batches and drafter: a fresh drafter
of the one command's shape (LAYERS layers, clustered head, K = 4, batch 8, bf16 autocast where
native), batches drawn at random from a work dir's shards (default: stage 12's, local), 11 timed
steps each after one warm-up pair; medians.

    .venv/bin/python docs/scripts/train_step_ab.py REV [LAYERS=1] [SHARDS_DIR]
"""
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mtpspec
import mtpspec.train.objective as this_objective
from mtpspec.models.drafter import DrafterConfig
from mtpspec.train.config import TrainConfig
from mtpspec.train.drafter_init import starting_drafter
from mtpspec.train.memory import release_freed_memory
from mtpspec.train.optim import Optimiser
from mtpspec.train.shards import read_external_shards
from mtpspec.train.trainer import bf16_auto

rev = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
shards_dir = sys.argv[3] if len(sys.argv) > 3 else "drafters/smollm2-135m-instruct.stage12.work"
source = subprocess.run(["git", "show", f"{rev}:mtpspec/train/objective.py"], capture_output=True, text=True, check=True).stdout
path = Path(tempfile.mkdtemp()) / "objective_at_rev.py"
path.write_text(source)
spec = importlib.util.spec_from_file_location("mtpspec.train.objective_at_rev", path)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # dataclasses look their module up
spec.loader.exec_module(old)

cfg = TrainConfig(data=[], out="/tmp/unused", num_layers=layers)
target = mtpspec.load(drafter=None).model
dcfg = DrafterConfig.for_target(target.cfg, num_layers=layers, clustered=cfg.clustered_for(target.cfg.vocab_size))
drafter = starting_drafter(dcfg, target, seed=0, train_head=None, init_from=None)
items = []
for shard in read_external_shards([shards_dir]):
    items += [a for a in shard if len(a) <= cfg.max_len]
    if len(items) > 400:
        break
bf16 = bf16_auto("cpu")
objectives = {rev: old.Objective(cfg.draft_tokens, False, cfg.feature_weight, False, bf16, "cpu"),
              "this tree": this_objective.Objective(cfg.draft_tokens, False, cfg.feature_weight, False, bf16, "cpu")}
opt = Optimiser(drafter, lr=1e-4, weight_decay=0.0, warmup=20, grad_clip=1.0, max_steps=1000, time_budget=None)
rng = random.Random(0)
drafter.train()
times = {k: [] for k in objectives}
for rep in range(12):
    batch = rng.sample(items, cfg.batch_size)
    for name, objective in objectives.items():
        opt.zero_grad()
        t0 = time.time()
        loss, _ = objective(drafter, target, batch)
        loss.backward()
        opt.update(0, 0.0)
        release_freed_memory()
        if rep:
            times[name].append(time.time() - t0)
print(f"{layers} layer(s), batch {cfg.batch_size}, {len(items)} sequences of mean length "
      f"{sum(len(a) for a in items) / len(items):.0f}: " + ", ".join(f"{k} {statistics.median(v):.3f} s/step" for k, v in times.items()))
