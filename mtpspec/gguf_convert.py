"""Convert a GGUF file into a plain Hugging Face checkpoint folder, once, and cache the result.

transformers can read a GGUF directly, but only by parsing and dequantizing the whole file on every
load (about 15 s for the 135M default model). We do that once and save an ordinary checkpoint:

    <out_dir>/config.json             no `quantization_config`: the folder is a plain dense model
    <out_dir>/model.safetensors       fp32, or bf16 when the GGUF's weight matrices are all BF16
    <out_dir>/generation_config.json  bos/eos/pad ids from the GGUF's tokenizer metadata
    <out_dir>/tokenizer.json, tokenizer_config.json, chat template
    <out_dir>/mtpspec_conversion.json which file was converted, how; written last

Dtype: a quantized GGUF (Q4_1, Q8_0, ...) dequantizes to values `scale * q + min` computed in fp32,
which bf16 or fp16 cannot hold exactly, so we keep fp32: the saved model is bit-for-bit the model
transformers builds from the GGUF. F16 and F32 sources are saved as fp32 too (fp16 -> fp32 is exact,
fp16 -> bf16 is not). Only when every weight matrix of the source is BF16 do we save bf16: that is
exact for the matrices, and halves the folder. The 1-D norm vectors of such files are F32 only
because llama.cpp's converter upcasts 1-D tensors, so casting them back is exact in practice.

Conversion is atomic: everything is written into a hidden temporary sibling folder, which is renamed
onto `out_dir` only once complete. An interrupted conversion leaves at most that temporary folder,
which is never mistaken for a checkpoint and is removed by the next conversion of the same target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError
from .processes import pid_alive

GGUF_MAGIC = b"GGUF"
MARKER_FILE = "mtpspec_conversion.json"
# Bump when the layout or content of converted folders changes: old cache entries are then unused.
CONVERTER_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Phase lines with timings on stderr (rich), or nothing."""

    def __init__(self, enabled: bool, title: str) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False, soft_wrap=True)
            self.console.print(f"[bold]mtpspec[/bold]: {title}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.console is not None:
            self.console.print(f"  [cyan]{name}[/cyan] ...")
        yield
        if self.console is not None:
            self.console.print(f"  [green]done[/green] {name} in {time.perf_counter() - t0:.1f} s")

    def finish(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"  [bold green]{message}[/bold green] in {time.perf_counter() - self.start:.1f} s total")


@contextlib.contextmanager
def _quiet_transformers(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when progress is off.

    The GGUF reader uses `tqdm.auto.tqdm` imported into its module, which the global
    `disable_progress_bar` switch does not reach, so that name is swapped for a disabled bar.
    """
    if not enabled:
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Checks


def check_gguf_file(gguf_path: str | Path) -> Path:
    """The resolved path of an existing file that starts with the GGUF magic; `CheckpointError` otherwise."""
    path = Path(gguf_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"GGUF path {str(path)!r} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot read GGUF file {str(path)!r}: {error}") from error
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, a GGUF starts with {GGUF_MAGIC!r}"
        )
    return path.resolve()


def _field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return field.contents()


def _supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names)


def _is_supported(architecture: str, supported: list[str]) -> bool:
    # Spellings transformers' GGUF loader normalises (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, ...).
    candidates = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    if architecture.startswith("t5"):
        candidates.add("t5")
    return bool(candidates & set(supported))


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` of the file; a file too short for one of its tensors is a
    `CheckpointError` naming that tensor."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # gguf 0.19's hook: check sizes first
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise CheckpointError(
                        f"GGUF file {str(path)!r} is truncated: tensor {bytes(name).decode()!r} ends at byte "
                        f"{end}, the file has {len(self.data)} bytes")
            return super()._build_tensors(start_offs, fields)

    try:
        return Reader(str(path), "r")
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt file fails here
        raise CheckpointError(f"cannot parse GGUF file {str(path)!r}: {error}") from error


# tensor name suffix -> (GGUF dimension, metadata key it must equal); GGUF lists a matrix's
# dimensions inputs first: attn_q [hidden, heads * head_dim], ffn_down [ffn, hidden]
_SHAPE_RULES = {
    "token_embd.weight": ((0, "embedding_length"),),
    "output.weight": ((0, "embedding_length"),),
    "attn_q.weight": ((0, "embedding_length"),),
    "attn_k.weight": ((0, "embedding_length"),),
    "attn_v.weight": ((0, "embedding_length"),),
    "attn_output.weight": ((1, "embedding_length"),),
    "ffn_gate.weight": ((0, "embedding_length"), (1, "feed_forward_length")),
    "ffn_up.weight": ((0, "embedding_length"), (1, "feed_forward_length")),
    "ffn_down.weight": ((1, "embedding_length"), (0, "feed_forward_length")),
}


def _check_shapes(reader, architecture: str, path: Path) -> None:
    """Matrix shapes against the widths the metadata declares (where it declares one number)."""
    for t in reader.tensors:
        rules = next((r for suffix, r in _SHAPE_RULES.items() if t.name.split(".", 2)[-1] == suffix
                      or t.name == suffix), ())
        for dim, key in rules:
            want = _field_value(reader, f"{architecture}.{key}")
            if isinstance(want, int) and len(t.shape) > dim and int(t.shape[dim]) != want:
                raise CheckpointError(
                    f"GGUF file {str(path)!r}: tensor {t.name!r} has shape {[int(x) for x in t.shape]}, but the "
                    f"metadata says {architecture}.{key} = {want}")


def _read_gguf_summary(path: Path) -> dict:
    """Architecture, tensor types and tokenizer presence, read from the header only."""
    reader = open_gguf(path)
    architecture = _field_value(reader, "general.architecture")
    if not architecture:
        raise CheckpointError(f"GGUF file {str(path)!r} has no general.architecture field")
    supported = _supported_architectures()
    if not _is_supported(architecture, supported):
        import transformers

        raise CheckpointError(
            f"GGUF file {str(path)!r} holds architecture {architecture!r}, which transformers "
            f"{transformers.__version__} cannot load from GGUF (supported: {', '.join(supported)})"
        )
    _check_shapes(reader, architecture, path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"GGUF file {str(path)!r} has no tokenizer (no tokenizer.ggml.tokens field)")
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    all_types = {t.tensor_type.name for t in reader.tensors}
    return {
        "architecture": architecture,
        "name": _field_value(reader, "general.name"),
        "n_tensors": len(reader.tensors),
        "tensor_types": sorted(all_types),
        "matrix_types": sorted(matrix_types),
    }


# ----------------------------------------------------------------------------------------------
# Temporary folders


def _temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def clean_stale_temps(out_dir: Path, *, all_owners: bool = False) -> list[Path]:
    """Remove leftover temporary folders of conversions into `out_dir`.

    A temporary folder is named `.<name>.tmp-<pid>-<random>`. Without `all_owners`, only those whose
    process is gone are removed; with it (the caller holds the conversion lock), all of them.
    """
    removed = []
    parent = out_dir.parent
    if not parent.is_dir():
        return removed
    prefix = _temp_prefix(out_dir)
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        if not all_owners:
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and pid_alive(int(pid_text)):
                continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------
# Conversion


def _load_dense_model(path: Path, dtype):
    """The model transformers builds from the GGUF, dequantized into dense `dtype` parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    with contextlib.suppress(ImportError):
        from transformers import GgufConfig

        # Never keep the weights packed in GGUF blocks (that happens when the `kernels` package is
        # installed): we want plain tensors to save.
        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs
        )
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"transformers cannot load GGUF file {str(path)!r} as a causal LM: {type(error).__name__}: {error}"
        ) from error
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise CheckpointError(
            f"GGUF file {str(path)!r} loaded with packed GGUF modules ({packed[0]}, ...), not dense weights"
        )
    for name, param in model.state_dict().items():
        if param.is_floating_point() and param.dtype != dtype:
            raise CheckpointError(f"GGUF file {str(path)!r}: tensor {name} loaded as {param.dtype}, expected {dtype}")
        if not isinstance(param, torch.Tensor) or param.device.type == "meta":
            raise CheckpointError(f"GGUF file {str(path)!r}: tensor {name} was not loaded")
    # Drop the GGUF quantizer so `save_pretrained` writes a plain dense checkpoint.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    return model


def _fix_generation_config(model, tokenizer) -> None:
    """bos/eos/pad ids in generation_config.json: from the GGUF, else from the tokenizer."""
    gen = model.generation_config
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, attr, None) is None:
            value = getattr(model.config, attr, None)
            if value is None:
                value = getattr(tokenizer, attr, None)
            if value is not None:
                setattr(gen, attr, value)
    tok_eos = tokenizer.eos_token_id
    if tok_eos is not None:
        eos = gen.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        if tok_eos not in eos_list:
            raise CheckpointError(
                f"GGUF tokenizer's eos token {tokenizer.eos_token!r} (id {tok_eos}) differs from the model's "
                f"eos_token_id {eos}"
            )


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file transformers supports into a Hugging Face checkpoint folder at `out_dir`.

    Returns `out_dir`. Raises `CheckpointError` if the file is missing, is not a GGUF, holds an
    architecture transformers cannot load from GGUF, or `out_dir` already exists and is not empty.
    """
    import torch

    path = check_gguf_file(gguf_path)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"output folder {str(out_dir)!r} already exists and is not empty")

    size_mb = path.stat().st_size / 2**20
    report = _Progress(progress, f"converting {path.name} ({size_mb:.0f} MiB) into {out_dir}")

    with report.phase("reading GGUF"):
        summary = _read_gguf_summary(path)
    bf16_source = summary["matrix_types"] == ["BF16"]
    dtype = torch.bfloat16 if bf16_source else torch.float32

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    tmp = out_dir.parent / f"{_temp_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _quiet_transformers(not progress):
            with report.phase(f"dequantizing {summary['n_tensors']} tensors ({', '.join(summary['tensor_types'])}) to {dtype}"):
                model = _load_dense_model(path, dtype)

            with report.phase("loading tokenizer"):
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                except Exception as error:
                    raise CheckpointError(
                        f"transformers cannot build a tokenizer from GGUF file {str(path)!r}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
                _fix_generation_config(model, tokenizer)

            with report.phase("writing safetensors"):
                model.save_pretrained(str(tmp), safe_serialization=True)
            del model

            with report.phase("saving tokenizer"):
                tokenizer.save_pretrained(str(tmp))

        # Sanity: the saved config must describe a plain model.
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise CheckpointError(f"converting {str(path)!r}: saved config.json still has a quantization_config")
        import transformers

        stat = path.stat()
        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": str(path),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "architecture": summary["architecture"],
            "source_tensor_types": summary["tensor_types"],
            "dtype": str(dtype).removeprefix("torch."),
            "transformers_version": transformers.__version__,
            "seconds": round(time.perf_counter() - report.start, 2),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory otherwise
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.finish(f"wrote {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------------------------
# Cache


def gguf_cache_key(gguf_path: str | Path) -> str:
    """A hash of the file's resolved path, size and mtime (and the converter version)."""
    path = check_gguf_file(gguf_path)
    stat = path.stat()
    material = f"v{CONVERTER_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def is_converted_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a complete conversion (its marker is written last, before the rename)."""
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock, so concurrent processes convert a file once. No-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_gguf_checkpoint(
    gguf_path: str | Path, cache_dir: str | Path | None = None, *, progress: bool = True
) -> Path:
    """The converted checkpoint folder of `gguf_path`, converting it on first use.

    Lives at `<cache_dir>/gguf/<file stem>-<key>` where key hashes the GGUF's resolved path, size and
    mtime; `cache_dir` defaults to `mtpspec.default_model.cache_dir()`.
    """
    path = check_gguf_file(gguf_path)
    if cache_dir is None:
        from .default_model import cache_dir as default_cache_dir

        root = default_cache_dir()
    else:
        root = Path(cache_dir).expanduser()
    folder = (root / "gguf" / f"{path.stem}-{gguf_cache_key(path)}").absolute()
    if is_converted_checkpoint(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the cache folder {str(folder.parent)!r}: {error}") from error
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if is_converted_checkpoint(folder):  # another process finished it while we waited
            return folder
        # Holding the lock, no one else is converting into this folder: every temp is stale.
        clean_stale_temps(folder, all_owners=True)
        if folder.exists():  # not a complete conversion (renames only ever move complete ones)
            shutil.rmtree(folder)
        return convert_gguf(path, folder, progress=progress)
