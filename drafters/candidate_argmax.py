"""How often a drafter's argmax leaves the sampled loss's candidates, on stored shards it never
trained on: first-draft accuracy (the target's argmax) over three heads of the same drafter, at
every answer position of the first --rows sequences of a shard:

    candidates  argmax over the batch's candidate tokens only, as the training loss sees them
                (every target top-8 id and label of the batch of 4)
    full        argmax over the whole vocabulary
    clustered   the clustered head as drafting runs it (its top clusters' tokens)

and the share of positions where the candidates' argmax is not the full head's.

    .venv/bin/python drafters/candidate_argmax.py /tmp/ab-base --target gemma-3-270m-q4_k_m.gguf \\
        --shards drafters/gemma3-270m.onecmd-sl.work/drafter.work --shard 25
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mtpspec  # noqa: E402
from mtpspec.drafter_checkpoint import load_drafter  # noqa: E402
from mtpspec.train.objective import collate, unroll  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafter")
    ap.add_argument("--target", required=True)
    ap.add_argument("--shards", required=True, help="a training work dir (or its shards/ folder)")
    ap.add_argument("--shard", type=int, required=True, help="index of a shard the drafter never trained on")
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args(argv)
    target = mtpspec.load(args.target).model
    drafter = load_drafter(args.drafter, target, dtype=torch.float32)
    me = drafter.masked_embedding
    if me is None:
        raise SystemExit("the drafter has no clustered head")
    w = torch.empty_like(drafter.model.embed_tokens.weight)  # prepared drafters hold it cluster-major
    w[me.token_ordering] = drafter.model.embed_tokens.weight
    folder = Path(args.shards) / "shards" if (Path(args.shards) / "shards").is_dir() else Path(args.shards)
    shard = torch.load(folder / f"shard_{args.shard:05d}.pt", weights_only=False)[: args.rows]
    n = hits_cand = hits_full = hits_clus = differ = 0
    with torch.no_grad():
        for b in range(0, len(shard) - 3, 4):
            batch = collate(shard[b : b + 4])
            o = unroll(drafter, target, batch, 1)[0]
            s, lab = o.s[o.mask], o.labels[o.mask]
            cand = torch.unique(torch.cat([batch.topk.flatten(), batch.labels.flatten()]))
            by_cand = cand[F.linear(s, w[cand]).argmax(-1)]
            by_full = torch.cat([F.linear(s[i : i + 128], w).argmax(-1) for i in range(0, len(s), 128)])
            n += len(lab)
            hits_cand += int((by_cand == lab).sum())
            hits_full += int((by_full == lab).sum())
            hits_clus += int((drafter.argmax(s) == lab).sum())
            differ += int((by_cand != by_full).sum())
    print(json.dumps({"drafter": args.drafter, "shard": args.shard, "positions": n,
                      "accuracy_candidates": round(hits_cand / n, 4), "accuracy_full": round(hits_full / n, 4),
                      "accuracy_clustered": round(hits_clus / n, 4), "candidates_argmax_not_full": round(differ / n, 4)}))


if __name__ == "__main__":
    main()
