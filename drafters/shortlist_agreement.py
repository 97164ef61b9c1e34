"""How often a run's recorded answer labels differ from a separate full-LM-head pass over the same
sequences: shards answered with the full head (numerics alone: a decode step against a prefill)
against shards answered with the shortlist head (train/shortlist.py).

    .venv/bin/python drafters/shortlist_agreement.py --target gemma-3-270m-q4_k_m.gguf \
        --shards /tmp/sl-run/drafter.work/shards --shard 1 --shard 2 --limit 64
"""

from __future__ import annotations

import argparse

import torch

import mtpspec
from mtpspec.kernels import bulk_matmuls
from mtpspec.train.harvest import harvest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--shards", required=True, help="a run's shards/ folder")
    ap.add_argument("--shard", type=int, action="append", required=True, help="shard number, 1-based (repeatable)")
    ap.add_argument("--limit", type=int, default=64, help="sequences per shard")
    args = ap.parse_args()
    model = mtpspec.load(args.target, drafter=None).model
    types = list(dict.fromkeys(t.attention_type for t in model.cfg.layers))
    for r in args.shard:
        acts = torch.load(f"{args.shards}/shard_{r - 1:05d}.pt", weights_only=False)[: args.limit]
        with bulk_matmuls():  # as build_shard runs the target
            ref = harvest(model, [a.ids.tolist() for a in acts], [a.loss_from for a in acts], types)
        n = differ = 0
        for a, b in zip(acts, ref):
            start = a.loss_from - 1
            n += len(a) - start
            differ += int((a.labels[start:] != b.labels[start : len(a)]).sum())
        print(f"shard {r}: recorded labels differ from a separate full-head pass at {differ}/{n} = {differ / n:.2%} "
              f"of answer positions")


if __name__ == "__main__":
    main()
