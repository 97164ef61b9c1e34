"""Drafter training objectives at equal wall time (issue 15, item 4), scored on the broad held-out
benchmark.

Arms (--arms, comma-separated; default ce,soft,acceptance:0.5):

    ce                   cross-entropy to the target's argmax (hard labels; the current default)
    soft                 cross-entropy to the target's top-8 distribution (--soft-labels)
    acceptance[:W[:V]]   the acceptance objective with share W of the loss (default 0.5; 1 = alone)
                         and per-step acceptance V, greedy (default) or sampled
                         (--acceptance-weight W --acceptance-verify V)

Every arm starts from the same initial drafter (same seed) and trains on the same activation
shards in the same batch order; the shards are built once, before any arm's clock starts (all of
them, or --shards N: an arm that goes past them builds the next ones on its own clock, and later
arms find them built), and shared through each arm's work dir. Each arm trains for --minutes of
wall time (or --max-steps steps), then its final drafter is scored with
`mtpspec.train.evaluate.evaluate_drafter_heldout` (greedy, fixed K, the drafter alone, without
prompt lookup: the numbers `mtpspec eval-drafter DRAFTER --heldout` gives). Prints a table and writes OUT/compare_objectives.json.

    .venv/bin/python drafters/compare_objectives.py --data chitchat:512 --data instructions:256 \\
        --minutes 30 --out drafters/compare-objectives

Wall-time arms on a shared machine are noisy: compare the steps each arm got, and rerun
(`--seed`) before trusting a small difference. The table's loss column is each arm's own
objective (not comparable across arms); the training argmax accuracy per step is. The output
folder must be fresh (an arm whose checkpoint exists is refused).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mtpspec  # noqa: E402
from mtpspec.bench.heldout import load_heldout  # noqa: E402
from mtpspec.errors import InputError, MtpspecError  # noqa: E402
from mtpspec.train import TrainConfig, Trainer  # noqa: E402
from mtpspec.train.evaluate import evaluate_drafter_heldout  # noqa: E402


def parse_arm(spec: str) -> tuple[str, dict]:
    """(arm name, TrainConfig options) of an --arms entry."""
    parts = spec.strip().split(":")
    kind = parts[0]
    if kind == "ce" and len(parts) == 1:
        return "ce", {"soft_labels": False, "acceptance_weight": 0.0}
    if kind == "soft" and len(parts) == 1:
        return "soft", {"soft_labels": True, "acceptance_weight": 0.0}
    if kind == "acceptance" and len(parts) <= 3:
        try:
            w = float(parts[1]) if len(parts) > 1 else 0.5
        except ValueError:
            raise InputError(f"arm {spec!r}: the weight {parts[1]!r} is not a number") from None
        verify = parts[2] if len(parts) > 2 else "greedy"
        if not 0 < w <= 1 or verify not in ("greedy", "sampled"):
            raise InputError(f"arm {spec!r}: expected acceptance[:W[:greedy|sampled]] with 0 < W <= 1")
        name = f"acceptance-{w:g}" + ("-sampled" if verify == "sampled" else "")
        return name, {"soft_labels": False, "acceptance_weight": w, "acceptance_verify": verify}
    raise InputError(f"unknown arm {spec!r}: expected ce, soft or acceptance[:W[:greedy|sampled]]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", "-d", action="append", required=True, help="training data, as train-drafter --data (repeatable)")
    ap.add_argument("--out", "-o", required=True, help="output folder (arms' drafters, work dirs, shared shards, JSON)")
    ap.add_argument("--target", "-m", default=None, help="target (default: the default model)")
    ap.add_argument("--arms", default="ce,soft,acceptance:0.5", help="comma-separated arms (module docstring)")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall time of training per arm")
    budget.add_argument("--max-steps", type=int, help="training steps per arm (instead of --minutes)")
    ap.add_argument("--shards", type=int, default=None, help="activation shards built up front (default: all)")
    ap.add_argument("--init", default=None, help="a drafter folder every arm starts from (fine-tuning; default: a fresh drafter)")
    ap.add_argument("--shards-from", default=None,
                    help="an earlier run's work dir whose activation shards the arms train on (linked, from "
                         "--first-shard on) instead of building them; --data must still yield at least as many "
                         "samples as the linked shards hold (it only sizes the run's shard plan)")
    ap.add_argument("--first-shard", type=int, default=0, help="with --shards-from: the first of its shards to use")
    ap.add_argument("--draft-tokens", "-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--clustered", action="store_true")
    ap.add_argument("--num-centroids", type=int, default=None)
    ap.add_argument("--centroid-top-k", type=int, default=None)
    ap.add_argument("--distill-tokens", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--replay", type=float, default=0.5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--full-vocab-loss", action="store_true")
    ap.add_argument("--categories", default=None, help="held-out categories, comma-separated (default: all)")
    ap.add_argument("--per-category", type=int, default=None, help="first N held-out prompts per category (default: all)")
    ap.add_argument("--max-new-tokens", "-n", type=int, default=64)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true", help="no training progress bars")
    return ap.parse_args(argv)


def _share(shared: Path, work: Path) -> None:
    """Give an arm's work dir the prepared shards (and self-instruct prompts) by symlinks."""
    work.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir():
        if entry.name.startswith("checkpoint"):
            continue
        link = work / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def _link_shards(src: str, first: int, shared: Path) -> int:
    """Link an earlier run's shards first, first+1, ... into shared/shards as 0, 1, ...; the count."""
    folder = Path(src) / "shards" if (Path(src) / "shards").is_dir() else Path(src)
    files = sorted(folder.glob("shard_*.pt"))[first:]
    if not files:
        raise InputError(f"--shards-from {src}: no shard_*.pt files from shard {first} on")
    dest = shared / "shards"
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        for src_file, suffix in ((f, ".pt"), (f.with_suffix(".json"), ".json")):
            link = dest / f"shard_{i:05d}{suffix}"
            if src_file.is_file() and not link.exists():
                link.symlink_to(src_file.resolve())
    return len(files)


def _train_acc(history: list[dict], last: int = 20) -> list[float]:
    """Per drafting step: the argmax accuracy over the last `last` steps (positions pooled)."""
    tail = history[-last:]
    k = max((len(h["positions"]) for h in tail), default=0)
    out = []
    for i in range(k):
        n = sum(h["positions"][i] for h in tail)
        c = sum(h["acc"][i] * h["positions"][i] for h in tail)
        out.append(round(c / n, 4) if n else 0.0)
    return out


def run(args: argparse.Namespace) -> dict:
    arms = [parse_arm(a) for a in args.arms.split(",") if a.strip()]
    names = [n for n, _ in arms]
    if not arms or len(set(names)) != len(names):
        raise InputError(f"--arms: give distinct arms, got {args.arms!r}")
    selection = load_heldout(args.categories, args.per_category)  # bad names fail before any training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(data=list(args.data), target=args.target, draft_tokens=args.draft_tokens, num_layers=args.layers,
                hidden_size=args.hidden_size, clustered=args.clustered, num_centroids=args.num_centroids,
                centroid_top_k=args.centroid_top_k, distill_max_new_tokens=args.distill_tokens,
                max_len=args.max_len, shard_size=args.shard_size, batch_size=args.batch_size, lr=args.lr,
                epochs=args.epochs, replay=args.replay, bf16=args.bf16, full_vocab_loss=args.full_vocab_loss,
                max_steps=args.max_steps, time_budget=args.minutes * 60 if args.minutes else None, seed=args.seed,
                device=args.device, progress=not args.quiet, eval_prompts=None, checkpoint_every=1e9,
                init_from=args.init)
    engine = mtpspec.load(args.target, drafter=None, device=args.device)

    # the shared shards, built before any arm's clock starts
    t0 = time.time()
    shared = out / "shared.work"
    if args.shards_from:
        linked = _link_shards(args.shards_from, args.first_shard, shared)
        args.shards = linked if args.shards is None else min(args.shards, linked)
    prep = Trainer(TrainConfig(**base, out=str(out / "shared"), work_dir=str(shared)), engine)
    n_shards = prep.shards.n_shards if args.shards is None else min(args.shards, prep.shards.n_shards)
    n_seqs = sum(len(prep.shards[r]) for r in range(n_shards))
    prep_seconds = round(time.time() - t0, 1)
    print(f"{n_shards} shards ({n_seqs} sequences) ready in {prep_seconds}s", file=sys.stderr, flush=True)
    del prep
    # a few untimed steps first, so that no arm pays for first-use costs (lazy init, allocator, caches)
    _share(shared, out / "warmup.work")
    warm = {**base, "max_steps": 2, "time_budget": None, "progress": False}
    Trainer(TrainConfig(**warm, out=str(out / "warmup"), work_dir=str(out / "warmup.work")), engine).run()

    results = []
    for name, opts in arms:
        work = out / f"{name}.work"
        _share(shared, work)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        cfg = TrainConfig(**base, **opts, out=str(out / name), work_dir=str(work))
        print(f"arm {name}: {opts}", file=sys.stderr, flush=True)
        res = Trainer(cfg, engine).run()
        losses = [h["loss"] for h in res.history]
        ev = evaluate_drafter_heldout(res.out, selection, target=args.target, k=args.draft_tokens,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                      engine=mtpspec.load(args.target, drafter=str(res.out),
                                                          draft_tokens=args.draft_tokens, draft_tree=None,
                                                          device=args.device, prompt_lookup=False))
        results.append({"arm": name, "options": opts, "drafter": str(res.out), "steps": res.steps,
                        "train_seconds": round(res.seconds, 1),
                        "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4) if losses else None,
                        "train_acc_per_position": _train_acc(res.history),
                        "heldout_tau": ev["heldout"]["mean_over_categories"],
                        "mean_accepted_length": ev["mean_accepted_length"],
                        "acceptance_per_position": ev["acceptance_per_position"],
                        "heldout": ev["heldout"], "eval_seconds": ev["seconds"]})
    scored = [r for r in results if r["heldout_tau"] is not None]
    best = max(scored, key=lambda r: r["heldout_tau"])["arm"] if scored else None
    report = {"config": {k: v for k, v in vars(args).items()}, "shards": n_shards, "sequences": n_seqs,
              "prep_seconds": prep_seconds, "arms": results, "best": best}
    (out / "compare_objectives.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    """The comparison as text: one row per arm, then tau per category (a column per arm)."""
    rows = report["arms"]
    w = max([len("arm")] + [len(r["arm"]) for r in rows])
    lines = [f"{'arm':<{w}} {'steps':>6} {'train s':>8} {'loss':>8}  {'held-out tau':>12} {'pooled':>7}  "
             f"acceptance per position     train argmax acc per position"]
    f = lambda x, s="{:.3f}": "-" if x is None else s.format(x)  # noqa: E731
    for r in rows:
        acc = " ".join(f(a, "{:.2f}") for a in r["acceptance_per_position"])
        tacc = " ".join(f"{a:.2f}" for a in r["train_acc_per_position"])
        lines.append(f"{r['arm']:<{w}} {r['steps']:>6} {r['train_seconds']:>8} {f(r['last_loss'], '{:.4f}'):>8}  "
                     f"{f(r['heldout_tau']):>12} {f(r['mean_accepted_length']):>7}  [{acc}]  [{tacc}]")
    cats = list(rows[0]["heldout"]["categories"]) if rows else []
    cw = max([len("category")] + [len(c) for c in cats])
    lines += ["", "held-out tau per category:", f"  {'category':<{cw}} " + " ".join(f"{r['arm']:>{max(8, len(r['arm']))}}" for r in rows)]
    for c in cats:
        lines.append(f"  {c:<{cw}} " + " ".join(f"{f(r['heldout']['categories'][c]['mean_accepted_length']):>{max(8, len(r['arm']))}}"
                                                  for r in rows))
    lines.append(f"best (held-out tau, mean over categories): {report['best']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    print(f"written {Path(args.out) / 'compare_objectives.json'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    try:
        main()
    except MtpspecError as e:
        print(f"compare_objectives: error: {e}", file=sys.stderr)
        sys.exit(2)
