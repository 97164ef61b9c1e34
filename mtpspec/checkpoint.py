"""Reading Hugging Face checkpoint folders into our models, with clear errors.

A checkpoint folder holds `config.json` and one or several `*.safetensors` files (optionally with
`model.safetensors.index.json`). A `.gguf` file is converted once to such a folder (see
gguf_convert.py). Tensor names are mapped from the transformers layout to ours here, and only here.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .models.config import ModelConfig, from_hf_config
from .models.decoder import Decoder

# transformers name (after the prefix is stripped) -> our name. Sandwich-norm models (Gemma) put
# post_attention_layernorm on the attention output; Llama-style models use it before the MLP.
_LAYER_RENAMES = {
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_out_norm",
    "self_attn.o_proj": "attn.o",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.down_proj": "mlp.down",
}
# Gemma 4 additions: per-layer inputs (PLE), MoE branch, layer scalars.
_LAYER_RENAMES.update({
    "per_layer_input_gate": "ple.gate",
    "per_layer_projection": "ple.proj",
    "post_per_layer_input_norm": "ple.norm",
    "post_feedforward_layernorm_1": "dense_out_norm",
    "pre_feedforward_layernorm_2": "moe.in_norm",
    "post_feedforward_layernorm_2": "moe.out_norm",
    "router.proj": "moe.router.proj",
})
# parameters stored without a .weight suffix: transformers name -> ours
_LAYER_PARAMS = {
    "layer_scalar": "layer_scalar",
    "router.scale": "moe.router.scale",
    "router.per_expert_scale": "moe.router.expert_scale",
    "experts.gate_up_proj": "moe.gate_up",
    "experts.down_proj": "moe.down",
}
_TOP_RENAMES = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "embed_tokens_per_layer.weight": "embed_per_layer.weight",
    "per_layer_model_projection.weight": "per_layer_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
# multimodal wrappers (gemma3 / gemma4): towers and projectors we do not run
_MULTIMODAL_PARTS = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.",
                     "vision_model.", "audio_model.")
log = logging.getLogger(__name__)
_FUSED = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj")}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def read_config(folder: Path) -> tuple[dict, ModelConfig]:
    """Parse `folder/config.json` (raw dict and our typed config)."""
    from transformers import AutoConfig

    path = folder / "config.json"
    if not folder.exists():
        raise CheckpointError(f"{folder}: model folder does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder or a .gguf file")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a checkpoint folder needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CheckpointError(f"{path}: no model_type field")
    from .models.config import SUPPORTED_MODEL_TYPES, check_gemma4_fields

    if raw["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unsupported model_type {raw['model_type']!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if raw["model_type"] in ("gemma4", "gemma4_text"):
        text = raw.get("text_config") if raw["model_type"] == "gemma4" else raw
        if not isinstance(text, dict):
            raise CheckpointError(f"{path}: a gemma4 config needs a text_config object")
        try:  # our checks first: they name the field (transformers' validators often do not)
            check_gemma4_fields(text)
        except CheckpointError as e:
            where = "text_config." if raw["model_type"] == "gemma4" else ""
            raise CheckpointError(f"{path}: {where}{str(e).removeprefix('config.json: ')}") from None
    try:
        hf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers validation errors: surface them as one line
        raise CheckpointError(f"{path}: invalid config ({str(e).splitlines()[0]})") from None
    try:
        return raw, from_hf_config(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


def _open_tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """Map every tensor name in the folder's safetensors files to (file, name)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    index: dict[str, tuple[Path, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    index[name] = (f, name)
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return index


def _strip_prefix(name: str) -> str | None:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    if name.startswith("lm_head."):
        return name
    return None


def _our_name(hf_name: str, cfg: ModelConfig) -> str | None:
    """Map a stripped transformers tensor name to ours (None: not a tensor of our text model)."""
    if hf_name in _TOP_RENAMES:
        return _TOP_RENAMES[hf_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _LAYER_PARAMS:
        return f"layers.{m.group(1)}.{_LAYER_PARAMS[m.group(2)]}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if not m:
        return None
    i, mod, kind = m.groups()
    if int(i) < cfg.n_layers and cfg.is_kv_shared(int(i)) and mod in (
        "self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm", "self_attn.v_norm"
    ):
        return None  # KV-shared layers have no K/V projections (some checkpoints still carry them)
    if mod == "post_attention_layernorm":
        return f"layers.{i}.{'attn_out_norm' if cfg.sandwich_norm else 'mlp_norm'}.{kind}"
    if mod in _LAYER_RENAMES:
        return f"layers.{i}.{_LAYER_RENAMES[mod]}.{kind}"
    for ours, parts in _FUSED.items():
        if mod in parts:
            return f"layers.{i}.{ours}.{kind}#{parts.index(mod)}"
    return None


def load_state_dict(folder: Path, cfg: ModelConfig, model: Decoder) -> dict[str, torch.Tensor]:
    """Read the folder's tensors, renamed and fused to our layout, checked against `model`'s shapes."""
    index = _open_tensors(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    sd: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    skipped_multimodal = 0
    try:
        for hf_name, (f, name) in index.items():
            stripped = _strip_prefix(hf_name)
            if stripped is not None and stripped.startswith(_MULTIMODAL_PARTS):
                skipped_multimodal += 1
                continue
            ours = _our_name(stripped, cfg) if stripped is not None else None
            if ours is None:
                continue
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            tensor = handles[f].get_tensor(name)
            if "#" in ours:
                key, j = ours.split("#")
                parts.setdefault(key, {})[int(j)] = tensor
            else:
                sd[ours] = tensor
    finally:
        handles.clear()
    if skipped_multimodal:
        log.info("%s: running the text model only; ignoring %d vision/audio tensors", folder, skipped_multimodal)
    for key, pieces in parts.items():
        spec_i = int(key.split(".")[1])
        n_needed = 2 if key.endswith(("gate_up.weight", "gate_up.bias")) else _n_qkv(cfg, spec_i)
        missing = [j for j in range(n_needed) if j not in pieces]
        if missing:
            names = _FUSED["mlp.gate_up" if "gate_up" in key else "attn.qkv"]
            raise CheckpointError(
                f"{folder}: missing tensor for layer {spec_i}: {names[missing[0]]}.{key.rsplit('.', 1)[1]}"
            )
        sd[key] = torch.cat([pieces[j] for j in range(n_needed)], dim=0)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        if "embed.weight" in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
    for key, shape in expected.items():
        if key not in sd:
            raise CheckpointError(f"{folder}: missing tensor {_hf_hint(key)} (for {key})")
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(
                f"{folder}: tensor {_hf_hint(key)} has shape {tuple(sd[key].shape)}, expected {shape}"
            )
    return sd


def _n_qkv(cfg: ModelConfig, layer: int) -> int:
    spec = cfg.layers[layer]
    if spec.kv_source != layer:
        return 1
    return 2 if spec.k_eq_v else 3


def _hf_hint(ours: str) -> str:
    """Best-effort transformers name for an error message."""
    rev = {v: k for k, v in _LAYER_RENAMES.items()}
    top = {v: k for k, v in _TOP_RENAMES.items()}
    if ours in top:
        return ours if ours == "lm_head.weight" else f"model.{top[ours]}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    params = {v: k for k, v in _LAYER_PARAMS.items()}
    if m and m.group(2) in params:
        return f"model.layers.{m.group(1)}.{params[m.group(2)]}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", ours)
    if not m:
        return ours
    i, mod, kind = m.groups()
    if mod in _FUSED:
        return "/".join(f"model.layers.{i}.{p}.{kind}" for p in _FUSED[mod])
    return f"model.layers.{i}.{rev.get(mod, mod)}.{kind}"


def load_decoder(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 quantize: str = "none", gguf: str | Path | None = None) -> Decoder:
    """Build our decoder for a checkpoint folder and load its weights (checked, renamed, fused).

    quantize: "none" (dense, in `dtype`), "gguf" (the quantized matrices of the GGUF file `gguf`
    that `folder` was converted from, kept as they are in the file), or "int8" / "int4" (weights
    quantized at load time). Quantized layers compute in `dtype` with int8 activations
    (models/quantize.py, kernels/quant.py); norms, attention and the KV cache stay in `dtype`."""
    from .models import quantize as q

    folder = Path(folder)
    q.check_quantize(quantize)
    _, cfg = read_config(folder)
    with torch.device("meta"):
        model = Decoder(cfg)
    sd = load_state_dict(folder, cfg, model)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    plan = None
    if quantize == "gguf":
        if gguf is None:
            raise ValueError('quantize="gguf" needs the GGUF file the checkpoint was converted from')
        plan = q.plan_gguf(model, cfg, gguf)
    elif quantize in q.SCHEMES:
        plan = q.plan_scheme(model, cfg, quantize)
    model = model.to(device=device, dtype=dtype)
    if plan is not None and plan.weights:
        q.install(model, plan, dtype)
        model.quantization = plan.summary()
    return model.prepare()
