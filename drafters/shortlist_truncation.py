"""How much of the target's sampling distribution the answers' shortlist LM head leaves out, at the
positions of prompts the target wrote with its full head: what sampling later prompts from the
shortlist (a run's chunks of more data, train/trainer.py) truncates.

The shortlist is fitted as the run fitted it (`shortlist.fit_on_answers` on the run's first
shard, the drafter's token clusters). Over each prompt (openings of documents, or user messages
after the pre-query template) the target's full softmax p is computed at every position; reported:
the mean probability outside the shortlist (what a sample from the shortlist renormalises away),
the share of positions whose written token (a sample from the full distribution) lies outside, and
the share of positions whose argmax does.

    .venv/bin/python drafters/shortlist_truncation.py --target gemma-3-270m-q4_k_m.gguf \
        --work drafters/gemma3-270m.onecmd-sl.work/drafter.work --limit 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import mtpspec
from mtpspec.train import self_instruct
from mtpspec.train.shortlist import fit_on_answers


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--work", required=True, help="a run's work dir (shards/, the written prompts, drafter/)")
    ap.add_argument("--drafter", help="the run's drafter folder (default: <work>/../<name without .work>)")
    ap.add_argument("--prompts", help="written prompts (.jsonl; default: the work dir's first self-text/self-instruct file)")
    ap.add_argument("--limit", type=int, default=200, help="prompts measured")
    args = ap.parse_args()
    work = Path(args.work)
    drafter = Path(args.drafter) if args.drafter else work.with_name(work.name.removesuffix(".work"))
    sd = load_file(str(drafter / "model.safetensors"))
    order = sd["masked_embedding.token_ordering"].long()
    n_clusters = sd["masked_embedding.centroids.weight"].shape[0]
    eng = mtpspec.load(args.target, drafter=None)
    model, tok = eng.model, eng.tokenizer
    first = torch.load(work / "shards" / "shard_00000.pt", weights_only=False)
    path = Path(args.prompts) if args.prompts else min(
        [p for p in work.glob("self-*-seed*.jsonl")], key=lambda p: p.stat().st_mtime)
    documents = path.name.startswith("self-text")
    turn = (self_instruct.document_turn(tok, eng.eos_ids) if documents
            else self_instruct.user_turn(tok, eng.eos_ids))
    stops = sorted(set(eng.eos_ids) | set(turn.stop_ids))  # as the trainer's `_stop_tokens`
    sl = fit_on_answers(model, order, first, n_clusters=n_clusters, seed=0, always=stops)
    print(f"shortlist: top {sl.top_k} of {n_clusters} clusters, held-out argmax recall {sl.recall:.2%} (shard 1)")
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()][: args.limit]
    out_mass = written_out = argmax_out = 0.0
    n = 0
    for text in prompts:
        ids = turn.prefix_ids + tok.encode(text, add_special_tokens=False)
        toks = torch.tensor([ids], device=model.device)
        res = model.forward(toks, model.new_cache(1, len(ids)))
        start = len(turn.prefix_ids) - 1  # positions predicting the prompt's tokens
        logits = res.logits[0, start:-1].float()
        hidden = res.hidden[0, start:-1]
        short_ids, _ = sl.candidates(hidden)
        p = torch.softmax(logits, dim=-1)
        inside = torch.zeros_like(p, dtype=torch.bool).scatter_(1, short_ids, True)
        nxt = toks[0, start + 1 :]
        out_mass += float((p * ~inside).sum())
        written_out += float((~inside.gather(1, nxt[:, None])).sum())
        argmax_out += float((~inside.gather(1, logits.argmax(-1, keepdim=True))).sum())
        n += logits.shape[0]
    print(f"{path.name}: {len(prompts)} prompts, {n} positions: probability outside the shortlist {out_mass / n:.2%} "
          f"(mean), written tokens outside {written_out / n:.2%}, argmax outside {argmax_out / n:.2%}")


if __name__ == "__main__":
    main()
