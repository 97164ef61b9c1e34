"""Shared fixtures: tiny random transformers models of each family, saved as checkpoint folders."""

from __future__ import annotations

import pytest
from tiny_models import FAMILIES, tiny_hf_model


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
