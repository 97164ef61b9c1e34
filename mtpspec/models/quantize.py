"""Quantized target weights: a GGUF file's own quantized tensors, or load-time int8/int4.

`plan_gguf` reads the quantized matrices of a GGUF file as they are (`gguf_weights`), maps them to
the decoder's linear layers (q, k, v fused into one projection; gate and up likewise) and checks
each against the dense weight the converted checkpoint holds: they must be equal value for value
(this also undoes llama.cpp's row permutation of Llama's q/k, which is tried when the plain order
does not match). `plan_scheme` quantizes the decoder's dense linear weights with a scheme
("int8" | "int4"). `install` swaps the layers for `QuantLinear` / `QuantEmbedding` after the model
has its device and dtype. Whatever stays dense (an unsupported block type, a width that is not a
multiple of 32, MoE experts) is named in one log line.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..kernels import Linear
from ..kernels.quant import SCHEMES, QuantEmbedding, QuantizedWeight, QuantLinear, quantize_weight
from .config import ModelConfig
from .moe import MoE

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("auto", "none", "gguf") + SCHEMES


@dataclass
class QuantPlan:
    """Quantized weights by module path ("layers.3.attn.qkv", "lm_head", "embed"), and what stays dense."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    experts: dict[str, list[tuple[QuantizedWeight, QuantizedWeight]]] = field(default_factory=dict)  # MoE path ->
    source_types: Counter = field(default_factory=Counter)
    dense: list[str] = field(default_factory=list)

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.source_types.items()))
        experts = sum(len(v) for v in self.experts.values())
        # fused matrices (q/k/v, gate/up) count once; the source tensors by their type
        return (f"{len(self.weights)} quantized matrices{f' + {experts} experts' if experts else ''} "
                f"(from {sum(self.source_types.values())} tensors: {types})")


def check_quantize(quantize: str) -> str:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantization {quantize!r}; valid: {', '.join(QUANTIZE_CHOICES)}")
    return quantize


# ---- GGUF ---------------------------------------------------------------------------------------

_LAYER_TENSORS = {  # llama.cpp tensor name -> (our module under layers.i, part of a fused module)
    "attn_q": ("attn.qkv", 0), "attn_k": ("attn.qkv", 1), "attn_v": ("attn.qkv", 2),
    "attn_output": ("attn.o", None),
    "ffn_gate": ("mlp.gate_up", 0), "ffn_up": ("mlp.gate_up", 1), "ffn_down": ("mlp.down", None),
}


def _gguf_targets(name: str) -> tuple[str, int | None] | None:
    if name == "token_embd.weight":
        return "embed", None
    if name == "output.weight":
        return "lm_head", None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER_TENSORS:
        mod, part = _LAYER_TENSORS[m.group(2)]
        return f"layers.{m.group(1)}.{mod}", part
    return None


def _dense_weight(model: nn.Module, path: str) -> torch.Tensor:
    mod = model.get_submodule(path)
    return mod.weight.detach().float()


def _llama_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Rows of llama.cpp's rotary permutation of a q/k weight, undone: ours[i] = file[order[i]]."""
    perm = torch.arange(n_rows).view(n_heads, 2, n_rows // n_heads // 2).transpose(1, 2).reshape(-1)
    return torch.argsort(perm)


def _matching(w: QuantizedWeight, dense: torch.Tensor, heads: int | None) -> QuantizedWeight | None:
    """w, or w with the Llama q/k row permutation undone, if it equals `dense` exactly; else None."""
    if tuple(w.shape) != tuple(dense.shape):
        return None
    if torch.equal(w.dequantize(), dense):
        return w
    if heads and w.shape[0] % (2 * heads) == 0:
        p = w.rows(_llama_row_order(w.shape[0], heads))
        if torch.equal(p.dequantize(), dense):
            return p
    return None


def plan_gguf(model: nn.Module, cfg: ModelConfig, gguf_path: str | Path) -> QuantPlan:
    """The GGUF's quantized matrices for `model`'s layers (weights loaded dense, fp32)."""
    from ..gguf_convert import open_gguf
    from ..gguf_weights import SUPPORTED_TYPES, decode_tensor

    plan = QuantPlan()
    reader = open_gguf(gguf_path)
    parts: dict[str, dict[int, tuple[QuantizedWeight, str]]] = {}
    dense_types: Counter = Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        target = _gguf_targets(t.name)
        if kind in ("F32", "F16", "BF16"):
            continue
        if target is None or kind not in SUPPORTED_TYPES:
            dense_types[f"{t.name} ({kind})" if target else kind] += 1
            continue
        path, part = target
        cols, rows = (int(x) for x in t.shape[:2])
        try:
            w = decode_tensor(kind, t.data, rows, cols)
        except ValueError as e:
            raise CheckpointError(f"{gguf_path}: tensor {t.name}: {e}") from None
        if part is None:
            _add_checked(model, plan, path, w, kind, t.name)
        else:
            parts.setdefault(path, {})[part] = (w, kind)
    for path, pieces in parts.items():
        _add_fused(model, cfg, plan, path, pieces)
    if cfg.tie_embeddings and "embed" in plan.weights:
        plan.weights["lm_head"] = plan.weights.pop("embed")
    plan.dense += [f"{n}x {k}" for k, n in dense_types.items()]
    return plan


def _heads_for(cfg: ModelConfig, path: str, part: int | None) -> int | None:
    m = re.fullmatch(r"layers\.(\d+)\.attn\.qkv", path)
    if not m or part not in (0, 1):
        return None
    spec = cfg.layers[int(m.group(1))]
    return spec.n_heads if part == 0 else spec.n_kv_heads


def _add_checked(model, plan: QuantPlan, path: str, w: QuantizedWeight, kind: str, name: str) -> None:
    try:
        dense = _dense_weight(model, path)
    except AttributeError:
        plan.dense.append(f"{name} (no such layer)")
        return
    ok = _matching(w, dense, None)
    if ok is None:
        plan.dense.append(f"{name} (does not match the dense weight)")
        return
    plan.weights[path] = ok
    plan.source_types[kind] += 1


def _add_fused(model, cfg, plan: QuantPlan, path: str, pieces: dict[int, tuple[QuantizedWeight, str]]) -> None:
    try:
        dense = _dense_weight(model, path)
    except AttributeError:
        plan.dense.append(f"{path} (no such layer)")
        return
    if sorted(pieces) != list(range(len(pieces))):
        plan.dense.append(f"{path} (not all parts quantized)")
        return
    rows, start = [], 0
    for i in range(len(pieces)):
        w, _ = pieces[i]
        ok = _matching(w, dense[start : start + w.shape[0]], _heads_for(cfg, path, i))
        if ok is None:
            plan.dense.append(f"{path} part {i} (does not match the dense weight)")
            return
        rows.append(ok)
        start += w.shape[0]
    if start != dense.shape[0]:
        plan.dense.append(f"{path} (parts cover {start} of {dense.shape[0]} rows)")
        return
    plan.weights[path] = QuantizedWeight.cat(rows)
    plan.source_types.update(kind for _, kind in pieces.values())


# ---- load-time quantization ---------------------------------------------------------------------


def plan_scheme(model: nn.Module, cfg: ModelConfig, scheme: str, block: int = 32) -> QuantPlan:
    """Quantize every dense linear weight of the decoder (and an untied embedding table) with `scheme`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    plan = QuantPlan()
    for path, mod in model.named_modules():
        is_table = path == "embed" and not cfg.tie_embeddings
        if not (isinstance(mod, Linear) or is_table) or path.endswith("router.proj"):
            continue
        w = (mod.unpacked_weight() if isinstance(mod, Linear) and mod.is_packed else mod.weight).detach()
        if w.shape[1] % block:
            plan.dense.append(f"{path} ({w.shape[1]} inputs, not a multiple of {block})")
            continue
        plan.weights[path] = quantize_weight(w, scheme, block)
        plan.source_types[scheme] += 1
    for path, mod in model.named_modules():
        if isinstance(mod, MoE):
            _plan_experts(plan, path, mod, scheme, block)
    return plan


def _plan_experts(plan: QuantPlan, path: str, moe: MoE, scheme: str, block: int) -> None:
    n_in = (moe.gate_up.shape[2], moe.down.shape[2])
    if any(n % block for n in n_in):
        plan.dense.append(f"{path} experts ({n_in[0]}/{n_in[1]} inputs, not multiples of {block})")
        return
    plan.experts[path] = [(quantize_weight(moe.gate_up[e], scheme, block), quantize_weight(moe.down[e], scheme, block))
                          for e in range(moe.gate_up.shape[0])]
    plan.source_types[scheme] += 2 * moe.gate_up.shape[0]


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize a loaded decoder's linear layers (and an untied embedding table) in place with
    `scheme` ("int8" | "int4"); returns the model. `load_decoder(..., quantize=)` does this at load."""
    plan = plan_scheme(model, model.cfg, scheme)
    install(model, plan, model.dtype)
    model.quantization = plan.summary()
    if hasattr(model, "fuse_blocks"):
        model.fuse_blocks()
    return model


def install(model: nn.Module, plan: QuantPlan, dtype: torch.dtype) -> None:
    """Swap the planned layers for quantized ones (model already on its device, in its dtype)."""
    device = next(model.parameters()).device
    for path, w in plan.weights.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding(w, dtype)
        else:
            bias = getattr(old, "bias", None)
            new = QuantLinear(w, bias)
            new.rows_dtype = dtype
        setattr(parent, attr, new.to(device))
    for path, pairs in plan.experts.items():
        moe = model.get_submodule(path)
        moe.quantized = nn.ModuleList(nn.ModuleList([QuantLinear(gu), QuantLinear(dn)]) for gu, dn in pairs).to(device)
        moe.gate_up = nn.Parameter(moe.gate_up.new_empty(0), requires_grad=False)
        moe.down = nn.Parameter(moe.down.new_empty(0), requires_grad=False)
    if plan.dense:
        log.info("quantized weights: %s; kept dense: %s", plan.summary(), "; ".join(plan.dense))
    else:
        log.info("quantized weights: %s", plan.summary())
