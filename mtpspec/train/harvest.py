"""What the drafter learns from: the target's own responses to the data's prompts
(self-distillation) and the target's activations over each training sequence."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import bulk_matmuls
from ..models.decoder import Decoder
from .data import Sample

TOPK_STORED = 8  # target top-k ids kept per position (the hard negatives of the sampled loss)


def top_k(logits: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest logits of each row of `logits` [..., V], largest first: what
    `logits.topk(k, dim=-1)` gives, ~4x faster over a large vocabulary on a CPU. Each of the k
    largest values lies in a block (of `block` consecutive ids) whose maximum is at least that
    value, so the k blocks with the largest maxima hold all of them: top-k over the block maxima
    (one vectorised pass over the row), then over those k blocks' logits. Equal logits may come
    out in another order than torch.topk's. Falls back to torch.topk when V is not a multiple of
    `block` or the row has fewer than k blocks."""
    v = logits.shape[-1]
    if v % block or v // block < k:
        return logits.topk(k, dim=-1)
    lead = logits.shape[:-1]
    blocks = logits.reshape(-1, v // block, block)
    _, best = blocks.amax(dim=-1).topk(k, dim=-1)  # [N, k] block indices
    cand = blocks.gather(1, best[:, :, None].expand(-1, -1, block)).reshape(blocks.shape[0], k * block)
    vals, j = cand.topk(k, dim=-1)
    ids = (best[:, :, None] * block + torch.arange(block, device=logits.device)).reshape(blocks.shape[0], -1).gather(1, j)
    return vals.reshape(*lead, k), ids.reshape(*lead, k)


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
        top_logits, top = top_k(res.logits.float(), TOPK_STORED)
        for r, g in enumerate(group):
            n = len(seqs[g])
            own = lambda x: x[r, :, :n].to(store_dtype).clone().cpu()  # noqa: E731  (not a view of the cache)
            kv = {t: (own(cache.k[l]), own(cache.v[l])) for t, l in layers.items()}
            out[g] = Activations(toks[r, :n].clone().cpu(), res.hidden[r, :n].to(store_dtype).cpu(), kv,
                                 top[r, :n, 0].cpu(), top[r, :n].to(torch.int32).cpu(), loss_from[g],
                                 top_logits[r, :n].to(torch.float16).cpu())
    return out  # type: ignore[return-value]


def response_budgets(engine, prompts: list[list[int]], max_new_tokens: int, max_len: int) -> list[int]:
    """Max response tokens of each prompt: max_new_tokens, within max_len tokens in all (and the
    target's context), at least 1."""
    limit = min(max_len, engine.model.cfg.max_position)
    return [max(1, min(max_new_tokens, limit - len(p))) for p in prompts]


def distill(engine, prompts: list[list[int]], max_new_tokens: int, max_len: int, slots: int,
            recorder=None) -> list[list[int]]:
    """The target's greedy responses to `prompts` (our plain decoding loop, `slots` sequences at a
    time, each slot refilled as soon as its response ends), each within max_len tokens in all.
    Prompts are decoded shortest first, so the prompts that join together have similar lengths and
    their prefill pads little; the responses come back in the order of `prompts`. recorder: a
    `decoding.loop.Recorder` the loop reports its work to (`ActivationRecorder`)."""
    from ..decoding.loop import Request, decode
    from ..decoding.sampling import SamplingParams

    budgets = response_budgets(engine, prompts, max_new_tokens, max_len)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    reqs = [Request(prompts[i], budgets[i], SamplingParams(0.0, 0, 1.0, None), engine.eos_ids) for i in order]
    out: list[list[int]] = [[] for _ in prompts]
    for i, s in zip(order, decode(engine.model, reqs, None, slots=slots, recorder=recorder)):
        out[i] = list(s.new_ids)
    return out


class ActivationRecorder:
    """Keeps what `harvest` would compute while the target answers (a `decoding.loop.Recorder`):
    the prompt's hidden states from its prefill, each answer token's hidden state and top-k logits
    from the decode step that fed it, and the K/V of the attention types' last cache layers when the
    sequence ends. A sequence of T tokens yields T - 1 positions (its last token is never fed), each
    labelled with the token the target chose next; positions before the prompt's last have no label
    (0) and no top-k (never trained: drafting starts after the prompt). The same quantities as a
    separate pass over the finished sequence, minus that pass, and taken from the decode steps the
    drafter reads at inference (a separate pass disagrees with ~2% of greedy answer tokens). A
    sequence ended by EOS (not kept in its tokens) had all its tokens fed: all its positions, the
    last labelled with the EOS the target chose (as a separate pass gives it)."""

    def __init__(self, target: Decoder, attention_types, store_dtype=torch.float16) -> None:
        self.layers = {t: target.cfg.last_cache_layer(t) for t in attention_types}
        self.store_dtype = store_dtype
        self._rows: dict[int, tuple] = {}  # slot -> (hidden rows, topk rows, topk logit rows, prompt length)
        self.done: dict[tuple, Activations] = {}  # prompt ids -> its answer's activations (greedy: one per prompt)

    def _topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, ids = top_k(logits.float(), TOPK_STORED)
        return ids.to(torch.int32).cpu(), vals.to(torch.float16).cpu()

    def prompt(self, slot: int, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        ids, vals = self._topk(logits)
        self._rows[slot] = ([hidden.to(self.store_dtype).cpu().clone()], [ids[None]], [vals[None]], hidden.shape[0])

    def step(self, slots: list[int], hidden: torch.Tensor, logits: torch.Tensor) -> None:
        ids, vals = self._topk(logits)
        h = hidden.to(self.store_dtype).cpu()
        for b in slots:
            rows = self._rows[b]
            rows[0].append(h[b : b + 1].clone())
            rows[1].append(ids[b : b + 1])
            rows[2].append(vals[b : b + 1])

    def finished(self, slot: int, seq, cache) -> None:
        hidden, topk, topl, n_prompt = self._rows.pop(slot)
        tokens = list(seq.request.prompt_ids) + list(seq.new_ids)
        hidden = torch.cat(hidden)
        n = hidden.shape[0]  # positions fed to the target: all tokens but the last, or all if EOS ended it
        if n != len(tokens) - 1 and not (n == len(tokens) and seq.finish_reason == "stop"):
            raise RuntimeError(f"recorded {n} positions of a {len(tokens)}-token sequence ({seq.finish_reason})")
        top = torch.zeros(n, TOPK_STORED, dtype=torch.int32)
        top_logits = torch.zeros(n, TOPK_STORED, dtype=torch.float16)
        top[n_prompt - 1 :] = torch.cat(topk)
        top_logits[n_prompt - 1 :] = torch.cat(topl)
        labels = torch.zeros(n, dtype=torch.long)
        # the tokens the target chose; after the last kept one it chose EOS (dropped from the output)
        labels[n_prompt - 1 :] = torch.tensor(tokens[n_prompt:] + ([int(top[-1, 0])] if n == len(tokens) else []))
        own = lambda x: x[slot, :, :n].to(self.store_dtype).clone().cpu()  # noqa: E731  (not a view of the cache)
        kv = {t: (own(cache.k[l]), own(cache.v[l])) for t, l in self.layers.items()}
        self.done[tuple(seq.request.prompt_ids)] = Activations(torch.tensor(tokens[:n]), hidden, kv, labels, top, n_prompt, top_logits)


def _cut(a: Activations, n: int) -> Activations:
    """The first n positions of a (loss_from kept inside them)."""
    if len(a) <= n:
        return a
    kv = {t: (k[:, :n], v[:, :n]) for t, (k, v) in a.kv.items()}
    return Activations(a.ids[:n], a.hidden[:n], kv, a.labels[:n], a.topk[:n], min(a.loss_from, n - 1),
                       None if a.topk_logits is None else a.topk_logits[:n])


def distill_recorded(engine, prompts: list[list[int]], max_new_tokens: int, max_len: int, slots: int,
                     attention_types, shortlist=None) -> tuple[list[list[int]], list[Activations]]:
    """`distill`, recording each prompt + response's activations while the target answers
    (`ActivationRecorder`): (responses, activations) in the order of `prompts`. shortlist: a
    `shortlist.Shortlist` the target's logits come from instead of its full LM head."""
    from .shortlist import shortlisted

    rec = ActivationRecorder(engine.model, attention_types)
    with shortlisted(engine.model, shortlist):
        responses = distill(engine, prompts, max_new_tokens, max_len, slots, rec)
    return responses, [_cut(rec.done[tuple(p)], max_len) for p in prompts]


def training_sequences(samples: list[Sample], responses: list[list[int]], max_len: int) -> tuple[list, list]:
    """(token ids, first trained index) of each sample that has something to predict: prompts
    completed by their response (in order; a response under 2 tokens drops its prompt), cut to
    max_len tokens."""
    seqs = _sequences(samples, responses, max_len)
    return [t[0] for t in seqs], [t[1] for t in seqs]


def _sequences(samples: list[Sample], responses: list[list[int]], max_len: int) -> list[tuple]:
    """`training_sequences` with, for a prompt + response, where the response starts (else None),
    and the sample's index."""
    out = []
    resp = iter(responses)
    for i, s in enumerate(samples):
        ids = list(s.ids)
        if s.needs_response:
            ids = ids + next(resp)
            if len(ids) - len(s.ids) < 2:
                continue
        ids = ids[:max_len]
        if len(ids) >= 2:
            out.append((ids, min(s.loss_from, len(ids) - 1), len(s.ids) if s.needs_response else None, i))
    return out


def answer_agreement(acts: list[Activations], starts: list[int | None]) -> tuple[int, int]:
    """(answer tokens, those the target's own greedy choice differs from): over the responses
    (tokens from `starts[i]` on in acts[i]; None: no response), the target's argmax at the position
    before each token (the harvest's labels) against the token."""
    n = differ = 0
    for a, start in zip(acts, starts):
        if start is None or start >= len(a):
            continue
        n += len(a) - start
        differ += int((a.labels[start - 1 : -1] != a.ids[start:]).sum())
    return n, differ


def build_shard(engine, samples: list[Sample], attention_types, *, max_new_tokens: int, max_len: int, slots: int,
                label: str | None = None, report: dict | None = None,
                respond: Callable[[list[list[int]], list[int]], list[list[int]]] | None = None,
                record: bool = True, shortlist=None) -> list[Activations]:
    """The activations of one shard of samples (prompts self-distilled first; the local target's
    passes in `kernels.bulk_matmuls` mode, bfloat16 GEMMs where the CPU has them); with a label, one
    line of progress on stderr. respond(prompts, max tokens of each): the responses (default: the
    local target's greedy ones, `distill`; with `record`, their activations are recorded while the
    target answers, `distill_recorded`, instead of a second pass over them). report: filled with
    the shard's responses, their tokens and how many of those differ from the target's greedy
    choice (`answer_agreement`). shortlist: the recorded answers' logits come from this
    `shortlist.Shortlist` instead of the full LM head."""
    prompts = [s.ids for s in samples if s.needs_response]
    recorded: list[Activations] = []
    with bulk_matmuls():  # one context: each weight's dense copy serves both the answers and the harvest
        t0 = time.time()
        if not prompts:
            responses = []
        elif respond is not None:
            responses = respond(prompts, response_budgets(engine, prompts, max_new_tokens, max_len))
        elif record:
            responses, recorded = distill_recorded(engine, prompts, max_new_tokens, max_len, slots, attention_types,
                                                   shortlist)
        else:
            responses = distill(engine, prompts, max_new_tokens, max_len, slots)
        t1 = time.time()
        triples = _sequences(samples, responses, max_len)
        seqs, froms = [t[0] for t in triples], [t[1] for t in triples]
        rest: list[int] = []
        if recorded:  # the answered prompts' activations are already there; the rest is harvested
            answered = dict(zip((i for i, s in enumerate(samples) if s.needs_response), recorded))
            rest = [j for j, t in enumerate(triples) if t[3] not in answered]
            harvested = iter(harvest(engine.model, [seqs[j] for j in rest], [froms[j] for j in rest], attention_types)
                             if rest else [])
            acts = [answered[t[3]] if t[3] in answered else next(harvested) for t in triples]
        else:
            acts = harvest(engine.model, seqs, froms, attention_types) if seqs else []
    n_ans, differ = answer_agreement(acts, [t[2] for t in triples])
    if report is not None:
        report.update(responses=len(responses), answer_tokens=n_ans, differ=differ)
    if label is not None:
        n_gen = sum(len(x) for x in responses)
        how = "received" if respond is not None else "generated"
        what = f"activations in {time.time() - t1:.0f}s"
        if recorded:
            what = ("answers' activations recorded while answering" + (" with the shortlist LM head" if shortlist else "")
                    + (f", the rest's in {time.time() - t1:.0f}s" if rest else ""))
        # recorded labels are the answer tokens themselves: only a second pass can disagree with them
        agree = (f"; the target's greedy choice differs from {differ / n_ans:.1%} of the answer tokens"
                 if n_ans and not recorded else "")
        print(f"{label}: {len(seqs)} sequences, {sum(len(x) for x in seqs)} tokens ({n_gen} {how} in "
              f"{t1 - t0:.0f}s, {n_gen / max(t1 - t0, 1e-9):.0f} tok/s; {what}{agree})",
              file=sys.stderr, flush=True)
    return acts
