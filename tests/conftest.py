"""Shared fixtures: tiny random transformers models of each family, saved as checkpoint folders."""

from __future__ import annotations

import pytest
from tiny_models import FAMILIES, save_tiny_tokenizer, tiny_hf_model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> (folder, transformers model)."""
    out = {}
    for fam in FAMILIES:
        hf = tiny_hf_model(fam)
        folder = tmp_path_factory.mktemp(fam)
        hf.save_pretrained(folder)
        out[fam] = (folder, hf)
    return out


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny Llama checkpoint folder that also has a tokenizer with a chat template."""
    folder = tmp_path_factory.mktemp("llama-tok")
    tiny_hf_model("llama").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def small_vocab_target(tmp_path_factory):
    """A tiny Llama with a 12-token vocabulary (exact output distributions are enumerable)."""
    from mtpspec.checkpoint import load_decoder
    from sampling_helpers import SMALL_V

    folder = tmp_path_factory.mktemp("small-vocab")
    tiny_hf_model("llama", vocab_size=SMALL_V).save_pretrained(folder)
    return load_decoder(folder)


def check_batch_consistency(batch) -> None:
    """What must hold after every prefill and round of the decoding loop, for every occupied slot:
    the KV cache holds exactly the row's history minus its pending last token (the next forward
    processes it), the pending token is the history's last, and the output is the history after
    the prompt (cut at a stop string or EOS, never altered)."""
    lengths, pending = batch.cache.lengths.tolist(), batch.last_tokens.tolist()
    for b, s in enumerate(batch.seqs):
        if s is None:
            continue
        h, prompt = batch.history[b], s.request.prompt_ids
        assert lengths[b] == len(h) - 1, f"slot {b}: cache holds {lengths[b]} tokens, history {len(h)} (+1 pending)"
        assert pending[b] == h[-1], f"slot {b}: pending token is not the history's last"
        assert h[: len(prompt)] == prompt and s.new_ids == h[len(prompt) : len(prompt) + len(s.new_ids)], (
            f"slot {b}: output is not the history after the prompt")


@pytest.fixture(autouse=True)
def _decode_batch_invariants(monkeypatch):
    """Every test that drives the decoding loop checks `check_batch_consistency` after every
    prefill and every round (greedy and sampled rows, chains and trees, plain and speculative)."""
    from mtpspec.decoding.loop import DecodeBatch

    real_add, real_step = DecodeBatch.add, DecodeBatch.step

    def add(self, *args, **kwargs):
        events = real_add(self, *args, **kwargs)
        check_batch_consistency(self)
        return events

    def step(self):
        events = real_step(self)
        check_batch_consistency(self)
        return events

    monkeypatch.setattr(DecodeBatch, "add", add)
    monkeypatch.setattr(DecodeBatch, "step", step)
