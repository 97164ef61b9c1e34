"""Probe (issue 15): what raises the drafter's acceptance more, richer inputs or more capacity?

Arms, each fine-tuning the same starting drafter (--init) on the same token sequences (the
answers in --shards-from's shards, which the starting drafter never trained on) for the same
steps, batches in the same order:

    base     the drafter as it is (its first step reads the target's last normed hidden state)
    fused    EAGLE-3-style inputs: the first step reads h_last + W [rms(h_a); rms(h_b); ...], the
             residual streams after target layers a, b, ... (--mid-layers), W zero-initialised (so
             the arm starts exactly as `base`)
    layers3  one more drafter layer (starting as the identity, as `--layers 3 --init` does)

Scored without the decoding loop, exactly as greedy chains would run: the target's greedy answers
to the broad held-out benchmark (--per-category prompts per category, 64 new tokens), teacher-
forced through the target once (hidden states, K/V, mid-layer streams), then for each answer the
rounds of speculative decoding replayed: a round at anchor p drafts K tokens from h_{p-1} and
x_p, accepts the leading drafts equal to the greedy answer, and the next round starts after them
and the bonus token. Mean accepted length = tokens per round. Run the starting drafter through
the same scorer to compare with `eval-drafter --heldout` (the real loop).

    .venv/bin/python drafters/probe_features.py --init mtpspec/drafters/smollm2-135m-instruct \\
        --shards-from drafters/smollm2-135m-instruct.stage12.work --arms base,fused,layers3 \\
        --steps 140 --out docs/results/probe-features.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mtpspec  # noqa: E402
from mtpspec.bench.heldout import encode_prompt, load_heldout  # noqa: E402
from mtpspec.decoding.loop import Request, decode  # noqa: E402
from mtpspec.decoding.sampling import SamplingParams  # noqa: E402
from mtpspec.drafter_checkpoint import read_drafter_config  # noqa: E402
from mtpspec.kernels import bulk_matmuls  # noqa: E402
from mtpspec.models.drafter import DrafterConfig  # noqa: E402
from mtpspec.train import objective as objective_mod  # noqa: E402
from mtpspec.train.drafter_init import starting_drafter  # noqa: E402
from mtpspec.train.harvest import TOPK_STORED, Activations, _length_groups  # noqa: E402
from mtpspec.train.memory import release_freed_memory  # noqa: E402
from mtpspec.train.objective import Objective, collate, unroll  # noqa: E402
from mtpspec.train.optim import Optimiser  # noqa: E402
from mtpspec.train.shards import read_external_shards  # noqa: E402
from mtpspec.train.trainer import bf16_auto  # noqa: E402


# ---- harvest with mid-layer residual streams ---------------------------------------------------

@torch.inference_mode()
def harvest_mid(target, seqs: list[list[int]], loss_from: list[int], mid_layers: list[int],
                max_tokens: int = 2048) -> list[tuple[Activations, torch.Tensor]]:
    """(Activations as `harvest` gives, mid [T, n_mid, H] fp16) of each sequence: the residual
    stream after each of `mid_layers` (block outputs), captured with forward hooks."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [target.layers[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i in mid_layers]
    types = list(dict.fromkeys(s.attention_type for s in target.cfg.layers))
    last = {t: target.cfg.last_cache_layer(t) for t in types}
    out: list = [None] * len(seqs)
    try:
        for group in _length_groups([len(s) for s in seqs], max_tokens):
            longest = max(65, max(len(seqs[g]) for g in group))  # > 64 rows: the op-by-op path (hooks fire)
            toks = torch.zeros(len(group), longest, dtype=torch.long)
            for r, g in enumerate(group):
                toks[r, : len(seqs[g])] = torch.tensor(seqs[g])
            cache = target.new_cache(len(group), longest)
            captured.clear()
            res = target.forward(toks, cache)
            assert len(captured) == len(mid_layers), "mid-layer hooks did not fire (fused path?)"
            top_logits, top = res.logits.float().topk(TOPK_STORED, dim=-1)
            mids = torch.stack([captured[i] for i in mid_layers], dim=2)  # [B, L, n, H]
            for r, g in enumerate(group):
                n = len(seqs[g])
                own = lambda x: x[r, :, :n].to(torch.float16).clone()  # noqa: E731
                kv = {t: (own(cache.k[l]), own(cache.v[l])) for t, l in last.items()}
                acts = Activations(toks[r, :n].clone(), res.hidden[r, :n].to(torch.float16).clone(), kv,
                                   top[r, :n, 0].clone(), top[r, :n].to(torch.int32).clone(), loss_from[g],
                                   top_logits[r, :n].to(torch.float16).clone())
                out[g] = (acts, mids[r, :n].to(torch.float16).clone())
    finally:
        for h in hooks:
            h.remove()
    return out


# ---- the fused input ---------------------------------------------------------------------------

class Fuse(nn.Module):
    """h_last + W [rms(m_1); ...; rms(m_n)]: W zero at the start (the drafter unchanged)."""

    def __init__(self, hidden: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n * hidden, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h_last: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        m = mid.float()
        m = m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h_last + self.proj(m.flatten(-2).to(self.proj.weight.dtype)).to(h_last.dtype)


_MID: torch.Tensor | None = None  # the batch's mid streams [B, L, n, H], set around each loss call


def unroll_fused(drafter, target, batch, k, first: int = 1):
    """objective.unroll with the first step's hidden input fused with the mid-layer streams (the
    `fused` arm); anchors p = first .. L-1 (scoring skips the prompt's anchors)."""
    fuse = getattr(drafter, "fuse", None)
    first_hidden = fuse(batch.hidden[:, first - 1 : -1], _MID[:, first - 1 : -1]) if fuse is not None else None
    return unroll(drafter, target, batch, k, first, first_hidden)


def collate_mid(mids: list[torch.Tensor], dtype) -> torch.Tensor:
    L = max(m.shape[0] for m in mids)
    out = torch.zeros(len(mids), L, *mids[0].shape[1:], dtype=dtype)
    for r, m in enumerate(mids):
        out[r, : m.shape[0]] = m.to(dtype)
    return out


# ---- scoring: greedy rounds replayed on teacher-forced answers ---------------------------------

@torch.inference_mode()
def score(drafter, target, evalset: list[dict], k: int, chunk: int = 8) -> dict:
    """Mean accepted length per category (and their mean), replaying greedy chain rounds."""
    global _MID
    drafter.eval()
    per_cat: dict[str, list[int]] = {}
    depth_hits = [0] * k
    evalset = sorted(evalset, key=lambda e: e["prompt_len"])
    for c0 in range(0, len(evalset), chunk):
        part = evalset[c0 : c0 + chunk]
        batch = collate([e["acts"] for e in part], drafter.dtype)
        _MID = collate_mid([e["mid"] for e in part], drafter.dtype)
        first = min(e["prompt_len"] for e in part)
        outs = unroll_fused(drafter, target, batch, k, first)
        L = batch.ids.shape[1]
        ids = F.pad(batch.ids, (0, k + 1))
        for r, e in enumerate(part):
            n = len(e["acts"])
            correct = []
            for i, o in enumerate(outs, start=1):
                draft = drafter.argmax(o.s[r].reshape(-1, o.s.shape[-1]))  # [T] anchors p = first..L-1
                truth = ids[r, first + i : first + i + L - first]  # x_{p+i}
                ok = (draft == truth) & (torch.arange(first, L) + i < n)
                correct.append(ok)
            rounds = emitted = 0
            p = e["prompt_len"]
            while p < n - 1:
                a = 0
                while a < k and bool(correct[a][p - first]):
                    a += 1
                for d in range(a):
                    depth_hits[d] += 1
                rounds += 1
                emitted += a + 1
                p += a + 1
            c = per_cat.setdefault(e["category"], [0, 0])
            c[0] += rounds
            c[1] += emitted
    _MID = None
    cats = {c: round(v[1] / v[0], 4) for c, v in per_cat.items()}
    rounds = sum(v[0] for v in per_cat.values())
    return {"mean_over_categories": round(sum(cats.values()) / len(cats), 4), "per_category": cats,
            "acceptance_per_position": [round(h / rounds, 4) for h in depth_hits], "rounds": rounds}


def eval_set(engine, mid_layers: list[int], per_category: int, max_new: int) -> list[dict]:
    heldout = load_heldout(per_category=per_category)
    prompts = [p for ps in heldout.values() for p in ps]
    ids = [encode_prompt(engine, p) for p in prompts]
    reqs = [Request(i, max_new, SamplingParams(), engine.eos_ids) for i in ids]
    done = decode(engine.model, reqs, None, slots=16)
    seqs = [i + d.new_ids for i, d in zip(ids, done)]
    harvested = harvest_mid(engine.model, seqs, [len(i) for i in ids], mid_layers)
    return [{"category": p.category, "prompt_len": len(i), "acts": a, "mid": m}
            for p, i, (a, m) in zip(prompts, ids, harvested)]


def train_set(target, shard_dirs: list[str], mid_layers: list[int], limit: int | None) -> list[tuple]:
    seqs, froms = [], []
    for shard in read_external_shards(shard_dirs):
        for a in shard:
            seqs.append(a.ids.tolist())
            froms.append(int(a.loss_from))
    if limit:
        seqs, froms = seqs[:limit], froms[:limit]
    t0 = time.time()
    with bulk_matmuls():
        out = harvest_mid(target, seqs, froms, mid_layers)
    n = sum(len(s) for s in seqs)
    print(f"harvested {len(seqs)} sequences, {n} tokens in {time.time() - t0:.0f}s ({n / (time.time() - t0):.0f} tok/s)",
          flush=True)
    return out


def make_drafter(arm: str, init: str, target, mid_layers: list[int], seed: int):
    base, _ = read_drafter_config(init)
    layers = base.n_layers + (1 if arm == "layers3" else 0)
    dcfg = DrafterConfig.for_target(target.cfg, num_layers=layers, hidden_size=base.hidden_size,
                                    clustered=base.clustered, intermediate_size=base.intermediate_size,
                                    num_centroids=base.num_centroids, centroid_top_k=base.centroid_top_k)
    d = starting_drafter(dcfg, target, seed=seed, train_head=None, init_from=init)
    if arm == "fused":
        d.fuse = Fuse(target.cfg.hidden_size, len(mid_layers))
    return d


def train(arm: str, drafter, target, data: list[tuple], *, steps: int, batch_size: int, lr: float, seed: int,
          bf16: bool, k: int) -> dict:
    global _MID
    obj = Objective(k, False, 0.2, False, bf16, "cpu")
    opt = Optimiser(drafter, lr=lr, weight_decay=0.0, warmup=20, grad_clip=1.0, max_steps=steps, time_budget=None)
    rng = random.Random(seed)
    order: list[int] = []
    drafter.train()
    t0 = time.time()
    log = []
    for step in range(steps):
        while len(order) < batch_size:
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        items = [data[i][0] for i in idx]
        _MID = collate_mid([data[i][1] for i in idx], drafter.dtype)
        loss, stats = obj(drafter, target, items)
        opt.step(loss, step, time.time() - t0)
        release_freed_memory()
        if step % 10 == 0 or step == steps - 1:
            acc = "/".join(f"{c / max(1, n):.2f}" for n, c, _ in stats)
            print(f"{arm} step {step}: loss {float(loss):.3f} acc {acc} ({time.time() - t0:.0f}s)", flush=True)
            log.append({"step": step, "loss": round(float(loss), 4), "acc": acc})
    _MID = None
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True)
    ap.add_argument("--shards-from", action="append", required=True)
    ap.add_argument("--arms", default="base,fused,layers3")
    ap.add_argument("--mid-layers", default="2,14,26")
    ap.add_argument("--steps", type=int, default=140)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--limit", type=int, default=None, help="training sequences (default: all)")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    mids = [int(x) for x in a.mid_layers.split(",")]
    engine = mtpspec.load(prompt_lookup=False)
    target = engine.model
    bf16 = bf16_auto("cpu")
    t0 = time.time()
    evalset = eval_set(engine, mids, a.per_category, a.max_new_tokens)
    print(f"eval set: {len(evalset)} answers ({time.time() - t0:.0f}s)", flush=True)
    objective_mod.unroll = unroll_fused
    result = {"init": a.init, "shards_from": a.shards_from, "mid_layers": mids, "steps": a.steps,
              "batch_size": a.batch_size, "lr": a.lr, "k": a.k, "per_category": a.per_category, "arms": {}}
    start = make_drafter("base", a.init, target, mids, a.seed)
    result["start"] = score(start, target, evalset, a.k)
    print("start:", json.dumps(result["start"]), flush=True)
    del start
    data = train_set(target, a.shards_from, mids, a.limit)
    for arm in a.arms.split(","):
        d = make_drafter(arm, a.init, target, mids, a.seed)
        run = train(arm, d, target, data, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    bf16=bf16, k=a.k)
        run["score"] = score(d, target, evalset, a.k)
        print(f"{arm}:", json.dumps(run["score"]), flush=True)
        result["arms"][arm] = run
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
