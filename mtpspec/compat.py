"""Workarounds needed to run the transformers 5.23 reference implementation next to ours
(interop tests, benchmarks). Nothing in mtpspec's own decoding path depends on this module."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def transformers_gemma4_assistant() -> Iterator[None]:
    """transformers 5.23: `Gemma4TextConfig.kv_sharing_modes` raises when every layer is KV-shared,
    which a `gemma4_assistant` config requires, so `Gemma4AssistantForCausalLM` cannot even be
    built. Inside this context such configs report 'reuse' on every layer."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    orig = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return orig.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4TextConfig.kv_sharing_modes = orig
