"""What the drafter learns from: the target's own responses to the data's prompts
(self-distillation) and the target's activations over each training sequence."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from ..models.decoder import Decoder
from .data import Sample

TOPK_STORED = 8  # target top-k ids kept per position (the hard negatives of the sampled loss)


@dataclass
class Activations:
    """One sequence's target activations (fp16 on disk/in memory): ids [T], hidden [T, H] (final
    normed), kv {attention_type: (k, v) each [kv_heads, T, head_dim]}, labels [T] (target argmax
    at each position = its next token), topk [T, TOPK_STORED] ids and topk_logits [T, TOPK_STORED]
    their logits (the soft teacher; None: the argmax is the only teacher), loss_from."""

    ids: torch.Tensor
    hidden: torch.Tensor
    kv: dict
    labels: torch.Tensor
    topk: torch.Tensor
    loss_from: int
    topk_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _length_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, a group's padded size within max_tokens (or one sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, i = [], 0
    while i < len(order):
        j = i
        while j < len(order) and (j - i + 1) * lengths[order[j]] <= max(max_tokens, lengths[order[j]]):
            j += 1
        j = max(j, i + 1)
        groups.append(order[i:j])
        i = j
    return groups


@torch.inference_mode()
def harvest(target: Decoder, seqs: list[list[int]], loss_from: list[int], attention_types, store_dtype=torch.float16,
            max_tokens_per_batch: int = 2048) -> list[Activations]:
    """Run the target over each sequence (batched by similar length) and keep what the drafter
    training needs."""
    out: list[Activations | None] = [None] * len(seqs)
    layers = {t: target.cfg.last_cache_layer(t) for t in attention_types}
    for group in _length_groups([len(s) for s in seqs], max_tokens_per_batch):
        longest = max(len(seqs[g]) for g in group)
        toks = torch.zeros(len(group), longest, dtype=torch.long, device=target.device)
        for r, g in enumerate(group):
            toks[r, : len(seqs[g])] = torch.tensor(seqs[g])
        cache = target.new_cache(len(group), longest)
        res = target.forward(toks, cache)
        top_logits, top = res.logits.float().topk(TOPK_STORED, dim=-1)
        for r, g in enumerate(group):
            n = len(seqs[g])
            own = lambda x: x[r, :, :n].to(store_dtype).clone().cpu()  # noqa: E731  (not a view of the cache)
            kv = {t: (own(cache.k[l]), own(cache.v[l])) for t, l in layers.items()}
            out[g] = Activations(toks[r, :n].clone().cpu(), res.hidden[r, :n].to(store_dtype).cpu(), kv,
                                 top[r, :n, 0].cpu(), top[r, :n].to(torch.int32).cpu(), loss_from[g],
                                 top_logits[r, :n].to(torch.float16).cpu())
    return out  # type: ignore[return-value]


def distill(engine, prompts: list[list[int]], max_new_tokens: int, max_len: int, slots: int) -> list[list[int]]:
    """The target's greedy responses to `prompts` (our plain decoding loop, `slots` sequences at a
    time, each slot refilled as soon as its response ends), each within max_len tokens in all."""
    from ..decoding.loop import Request, decode
    from ..decoding.sampling import SamplingParams

    limit = min(max_len, engine.model.cfg.max_position)
    reqs = [Request(p, max(1, min(max_new_tokens, limit - len(p))), SamplingParams(0.0, 0, 1.0, None),
                    engine.eos_ids) for p in prompts]
    return [list(s.new_ids) for s in decode(engine.model, reqs, None, slots=slots)]


def training_sequences(samples: list[Sample], responses: list[list[int]], max_len: int) -> tuple[list, list]:
    """(token ids, first trained index) of each sample that has something to predict: prompts
    completed by their response (in order; a response under 2 tokens drops its prompt), cut to
    max_len tokens."""
    seqs, froms = [], []
    resp = iter(responses)
    for s in samples:
        ids = list(s.ids)
        if s.needs_response:
            ids = ids + next(resp)
            if len(ids) - len(s.ids) < 2:
                continue
        ids = ids[:max_len]
        if len(ids) >= 2:
            seqs.append(ids)
            froms.append(min(s.loss_from, len(ids) - 1))
    return seqs, froms


def build_shard(engine, samples: list[Sample], attention_types, *, max_new_tokens: int, max_len: int, slots: int,
                label: str | None = None) -> list[Activations]:
    """The activations of one shard of samples (prompts self-distilled first); with a label, one
    line of progress on stderr."""
    prompts = [s.ids for s in samples if s.needs_response]
    t0 = time.time()
    responses = distill(engine, prompts, max_new_tokens, max_len, slots) if prompts else []
    t1 = time.time()
    seqs, froms = training_sequences(samples, responses, max_len)
    acts = harvest(engine.model, seqs, froms, attention_types) if seqs else []
    if label is not None:
        n_gen = sum(len(x) for x in responses)
        print(f"{label}: {len(seqs)} sequences, {sum(len(x) for x in seqs)} tokens ({n_gen} generated in "
              f"{t1 - t0:.0f}s, {n_gen / max(t1 - t0, 1e-9):.0f} tok/s; activations in {time.time() - t1:.0f}s)",
              file=sys.stderr, flush=True)
    return acts
