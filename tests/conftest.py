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
