"""Where a drafter training step's time goes: a drafter of the one command's shape (started from
INIT, a drafter folder, or fresh), batches drawn at random from a work dir's shards, the step as the
trainer runs it (objective, backward, optimiser update), timed over STEPS steps (median after one
warm-up) and then profiled by torch.profiler over 3 steps, ops grouped by input shape.

    .venv/bin/python docs/scripts/train_step_profile.py TARGET SHARDS_DIR [--init DRAFTER] [--batch 4]
"""
import argparse
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mtpspec
from mtpspec.models.drafter import DrafterConfig
from mtpspec.train.config import TrainConfig
from mtpspec.train.drafter_init import starting_drafter
from mtpspec.train.memory import release_freed_memory
from mtpspec.train.objective import Objective
from mtpspec.train.optim import Optimiser
from mtpspec.train.shards import read_external_shards
from mtpspec.train.trainer import bf16_auto

ap = argparse.ArgumentParser()
ap.add_argument("target")
ap.add_argument("shards")
ap.add_argument("--init", default=None)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--steps", type=int, default=8)
args = ap.parse_args()
target = mtpspec.load(args.target, drafter=None).model
cfg = TrainConfig(data=[], out="/tmp/unused")
dcfg = DrafterConfig.for_target(target.cfg, num_layers=cfg.num_layers, clustered=cfg.clustered_for(target.cfg.vocab_size))
drafter = starting_drafter(dcfg, target, seed=0, train_head=None, init_from=args.init)
items = [a for shard in read_external_shards([args.shards])[:3] for a in shard]
objective = Objective(cfg.draft_tokens, False, cfg.feature_weight, False, bf16_auto("cpu"), "cpu")
opt = Optimiser(drafter, lr=1e-4, weight_decay=0.0, warmup=20, grad_clip=1.0, max_steps=1000, time_budget=None)
rng = random.Random(0)
drafter.train()


def step() -> None:
    opt.zero_grad()
    loss, _ = objective(drafter, target, rng.sample(items, args.batch))
    loss.backward()
    opt.update(0, 0.0)
    release_freed_memory()


times = []
for _ in range(args.steps + 1):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(f"batch {args.batch}, sequences of mean length {sum(len(a) for a in items) / len(items):.0f}: "
      f"{statistics.median(times[1:]):.3f} s per step (median of {args.steps})")
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(3):
        step()
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                         max_name_column_width=40, max_shapes_column_width=70))
