"""One arm of an equal-steps A/B on stored activation shards: a fresh drafter trained for one pass
over an earlier run's shards (same shard order, same batches, same learning-rate schedule in
every arm), then written as a drafter folder to score with `mtpspec eval-drafter DIR --heldout`.

No target passes happen here (the answers and their activations are in the shards), and an arm's
result depends on its steps, not on its wall time: arms can run at once, beside anything else,
without a 2-core machine's contention changing what they learn (unlike the wall-time arms of
`compare_objectives.py`). Arms (--arm, joined with "+"):

    base             the one command's drafter (`TrainConfig` defaults: width = the target's, MLP
                     2x width, clustered head when the vocabulary is large)
    wide             MLP as wide as that of the target layer whose K/V the drafter reads
    target-layer     wide, and the drafter layer starts as the target's last layer of its
                     attention type (query, output, MLP and norm weights; the query norm absorbs
                     the target's attention scale, as the drafter attends with scale 1) and its
                     final norm as the target's. Gemma-style blocks only (sandwich norms, q norm)
    answers:N        each sequence cut N tokens after its prompt (shorter continuations)
    prompt           the prompt's positions are trained on too (from the first anchor on: the labels
                     are the target's argmax at every position, recorded in the shards anyway;
                     for a base model the prompt is the opening it sampled)
    shards:N         only the first N shards
    layers:N         N drafter layers (the one command's default is `TrainConfig.num_layers`), all of
                     the one command's layer's attention type: the shards hold only its K/V
    negatives:N      the drafter's own top N tokens per trained position join the sampled loss's
                     candidates (`Objective.hard_negatives`)
    feature:W        the feature term's weight (default `TrainConfig.feature_weight`; 0 = none)

--ema D[,D...] also keeps an exponential moving average of the trained weights per decay D (w_ema
<- D w_ema + (1 - D) w after every step, starting at the fresh drafter) and writes it beside the
arm's drafter as OUT-emaD: the same run scores the raw weights and their averages.

--replay F trains as the one command's schedule does (`mtpspec.train.schedule`): each shard in turn,
batches of (1 - F) new samples and F replayed from the shards before it, so each shard takes 1 / (1 - F)
times the steps. Without it (0) an arm is one plain pass, each shard's samples shuffled.

    .venv/bin/python drafters/ab_fixed_shards.py --target gemma-3-270m-q4_k_m.gguf \\
        --shards drafters/gemma3-270m.onecmd2h.work/drafter.work --arm base --out /tmp/ab-base
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mtpspec  # noqa: E402
from mtpspec.models.drafter import DrafterConfig  # noqa: E402
from mtpspec.train.checkpointing import write_drafter  # noqa: E402
from mtpspec.train.config import TrainConfig  # noqa: E402
from mtpspec.train.drafter_init import starting_drafter  # noqa: E402
from mtpspec.train.harvest import _cut  # noqa: E402
from mtpspec.train.objective import Objective  # noqa: E402
from mtpspec.train.optim import Optimiser  # noqa: E402
from mtpspec.train.schedule import Schedule  # noqa: E402


@torch.no_grad()
def copy_target_layer(drafter, target) -> int:
    """The drafter's last layer := the target's last layer of that attention type, whose K/V it
    reads (module docstring); the drafter's final norm := the target's. Returns that layer's index."""
    tc = target.cfg
    src = tc.last_cache_layer(drafter.cfg.layer_types[-1])
    dense = lambda lin: lin.unpacked_weight().float()  # noqa: E731  (packed or quantized target weights)
    blk, lay = target.layers[src], drafter.model.layers[-1]
    if blk.attn_out_norm is None or blk.attn.q_norm is None:
        raise SystemExit("target-layer: the target's blocks have no sandwich norms / q norm (not Gemma-style)")
    norm = lambda n: n.weight.float() + tc.norm_offset  # noqa: E731  (the drafter's norms are x * w)
    qkv, a = dense(blk.attn.qkv), lay.self_attn
    a.q_proj.weight.copy_(qkv[: blk.attn.q_size])
    a.q_norm.weight.copy_(norm(blk.attn.q_norm) * tc.attn_scale)
    a.o_proj.weight.copy_(dense(blk.attn.o))
    for mine, theirs in ((lay.input_layernorm, blk.attn_norm), (lay.post_attention_layernorm, blk.attn_out_norm),
                         (lay.pre_feedforward_layernorm, blk.mlp_norm), (lay.post_feedforward_layernorm, blk.mlp_out_norm)):
        mine.weight.copy_(norm(theirs))
    gate_up, n = dense(blk.mlp.gate_up), blk.mlp.intermediate
    lay.mlp.gate_proj.weight.copy_(gate_up[:n])
    lay.mlp.up_proj.weight.copy_(gate_up[n:])
    lay.mlp.down_proj.weight.copy_(dense(blk.mlp.down))
    drafter.model.norm.weight.copy_(norm(target.norm))
    return src


class _Stored(list):
    """Loaded shards as the schedule reads them (a ShardStore without building)."""
    external: list = []

    @property
    def n_shards(self) -> int:
        return len(self)


def batches(shards: list[list], bs: int, seed: int, replay: float):
    """Every step's batch, in order (module docstring)."""
    if replay:
        sched = Schedule(_Stored(shards), batch_size=bs, replay=replay, epochs=1.0, seed=seed, limited=False)
        for r in range(len(shards)):
            n_steps, b_new = sched.round_plan(r)
            for s in range(n_steps):
                yield sched.batch(r, s, b_new)
        return
    rng = random.Random(seed)
    for shard in shards:
        order = list(range(len(shard)))
        rng.shuffle(order)
        for b in range(0, len(order) - bs + 1, bs):
            yield [shard[i] for i in order[b : b + bs]]


def parse_arm(spec: str) -> dict:
    arm = {"wide": False, "target_layer": False, "prompt": False, "answers": None, "shards": None,
           "layers": None, "feature": None, "negatives": 0}
    for part in spec.split("+"):
        kind, _, value = part.partition(":")
        if kind == "base" and not value:
            continue
        if kind in ("wide", "target-layer") and not value:
            arm["wide"] = True
            arm["target_layer"] |= kind == "target-layer"
        elif kind == "prompt" and not value:
            arm["prompt"] = True
        elif kind in ("answers", "shards", "layers", "negatives") and value.isdigit() and int(value) > 0:
            arm[kind] = int(value)
        elif kind == "feature" and value.replace(".", "", 1).isdigit():
            arm["feature"] = float(value)
        else:
            raise SystemExit(f"unknown arm part {part!r} (base, wide, target-layer, prompt, answers:N, shards:N, "
                             "layers:N, negatives:N, feature:W)")
    return arm


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--shards", required=True, help="a training work dir (or its shards/ folder)")
    ap.add_argument("--arm", required=True, help="arm parts joined with + (module docstring)")
    ap.add_argument("--out", required=True, help="the arm's drafter folder (and OUT.history.json)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="8, as in the arms recorded before the one command's default became 4")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", type=float, default=0.0, help="fraction of each batch replayed (module docstring)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop (and end the schedule) after this many steps")
    ap.add_argument("--ema", default="", help="decays of weight averages also written (module docstring), e.g. 0.99,0.998")
    args = ap.parse_args(argv)
    decays = [float(d) for d in args.ema.split(",") if d]
    if any(not 0 < d < 1 for d in decays):
        raise SystemExit(f"--ema decays must be in (0, 1), got {args.ema}")
    arm = parse_arm(args.arm)
    if not 0 <= args.replay < 1:
        raise SystemExit(f"--replay must be in [0, 1), got {args.replay}")

    target = mtpspec.load(args.target).model
    tc, cfg = target.cfg, TrainConfig(data=[], out=args.out)
    folder = Path(args.shards) / "shards" if (Path(args.shards) / "shards").is_dir() else Path(args.shards)
    files = sorted(folder.glob("shard_*.pt"))[: arm["shards"]]
    if not files:
        raise SystemExit(f"no shard_*.pt in {folder}")
    shards = []
    for f in files:
        shard = torch.load(f, weights_only=False)
        if arm["answers"]:
            shard = [_cut(a, a.loss_from + arm["answers"]) for a in shard]
        if arm["prompt"]:
            shard = [replace(a, loss_from=1) for a in shard]
        shards.append(shard)
    bs = args.batch_size
    steps = sum(1 for _ in batches([range(len(s)) for s in shards], bs, args.seed, args.replay))
    steps = min(steps, args.max_steps or steps)

    dcfg = DrafterConfig.for_target(tc, num_layers=cfg.num_layers, clustered=cfg.clustered_for(tc.vocab_size))
    if arm["layers"]:
        dcfg = DrafterConfig.for_target(tc, num_layers=arm["layers"], clustered=dcfg.num_centroids > 0,
                                        layer_types=[dcfg.layer_types[-1]] * arm["layers"])
    if arm["wide"]:  # as wide as the layer it reads (the one target-layer copies)
        dcfg = replace(dcfg, intermediate_size=tc.layers[tc.last_cache_layer(dcfg.layer_types[-1])].intermediate_size)
    drafter = starting_drafter(dcfg, target, seed=args.seed, train_head=None, init_from=None)
    if arm["target_layer"]:
        print(f"drafter layer := target layer {copy_target_layer(drafter, target)}", flush=True)
    feature = cfg.feature_weight if arm["feature"] is None else arm["feature"]
    objective = Objective(cfg.draft_tokens, cfg.full_vocab_loss, feature, False, False, "cpu",
                          hard_negatives=arm["negatives"])
    opt = Optimiser(drafter, lr=args.lr, weight_decay=0.0, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                    max_steps=steps, time_budget=None)
    step, t0, history = 0, time.time(), []
    params = [p for p in drafter.parameters() if p.requires_grad]
    averages = {d: [p.detach().clone() for p in params] for d in decays}
    drafter.train()
    for batch in batches(shards, bs, args.seed, args.replay):
        if step == steps:
            break
        opt.zero_grad()
        loss, stats = objective(drafter, target, batch)
        loss.backward()
        opt.update(step, 0.0)
        with torch.no_grad():
            for d, avg in averages.items():
                torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - d)
        acc = [round(c / max(n, 1), 4) for n, c, _ in stats]
        history.append({"step": step, "loss": round(float(loss.detach()), 4), "accuracy": acc,
                        "positions": [n for n, _, _ in stats]})
        if step % 20 == 0:
            print(f"{args.arm} step {step}/{steps} {time.time() - t0:.0f}s loss {float(loss.detach()):.3f} "
                  f"accuracy {acc}", flush=True)
        step += 1
    drafter.eval()
    info = {"arm": args.arm, "shards": str(folder), "steps": step, "seconds": round(time.time() - t0),
            "lr": args.lr, "batch_size": bs, "replay": args.replay}
    write_drafter(drafter, Path(args.out), dtype=torch.float16, draft_tokens=cfg.draft_tokens, info=info)
    for d, avg in averages.items():  # the raw weights are written: the drafter now takes each average in turn
        with torch.no_grad():
            torch._foreach_copy_(params, avg)
        write_drafter(drafter, Path(f"{args.out}-ema{d}"), dtype=torch.float16, draft_tokens=cfg.draft_tokens,
                      info={**info, "ema": d})
    Path(args.out + ".history.json").write_text(json.dumps(history))
    print(f"{args.arm}: {step} steps in {time.time() - t0:.0f}s; drafter in {args.out}")


if __name__ == "__main__":
    main()
