"""Does answering (self-distillation's decoding) slow down as a drafter-training run goes on?

Answers the same 64 `tasks` prompts again and again in one process, with training steps of a
drafter between the rounds and, optionally, shard-like tensors accumulating in memory (a run keeps
every shard it built). On the 2-core Xeon, runs slowed from ~517 to ~350 tok/s (the default model)
and 336 to ~200-250 (Gemma 3 270M); on a 2-core AVX2 EPYC (2026-12-06) this script saw no slowdown:
27.1, 30.6, 27.3, 27.8 s per round with 60 steps between, 22.7 -> 21.8 s with 40 shards' worth
(6 GB) held.

    .venv/bin/python docs/scripts/answer_slowdown.py [--steps 60] [--rounds 4] [--hold 10]
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time

import torch

from mtpspec.train.config import TrainConfig
from mtpspec.train.harvest import build_shard
from mtpspec.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None, help="default: the default model")
    ap.add_argument("--steps", type=int, default=60, help="training steps between answering rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--hold", type=int, default=0, help="shards' worth (~150 MB each) of tensors added per round")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="answer-slowdown-")
    cfg = TrainConfig(data=["tasks:256"], target=args.target, out=f"{work}/drafter", progress=False,
                      eval_every=None, eval_limit=0, shard_size=128)
    tr = Trainer(cfg)
    samples = tr.shards.samples[:64]
    layers = list(dict.fromkeys(tr.drafter.cfg.layer_types))
    items = tr.shards[0]
    held = []
    for r in range(args.rounds):
        t0 = time.time()
        acts = build_shard(tr.engine, samples, layers, max_new_tokens=128, max_len=384, slots=64)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"round {r}: answered {sum(len(a) for a in acts)} tokens in {time.time() - t0:.1f} s "
              f"(max RSS {rss:.2f} GB)", flush=True)
        held += [[(torch.randn(300, 576).half(), torch.randn(3, 300, 64).half(), torch.randn(3, 300, 64).half(),
                   torch.randint(0, 100, (300, 16))) for _ in range(128)] for _ in range(args.hold)]
        t0 = time.time()
        for _ in range(args.steps):
            tr._train_step(random.sample(items, cfg.batch_size))
            tr.state.step += 1
        print(f"  {args.steps} training steps in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
