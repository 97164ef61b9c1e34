"""Load / save MTP drafters in the transformers `gemma4_assistant` format.

A drafter folder holds:
- config.json: `model_type: gemma4_assistant`, `backbone_hidden_size`, `use_ordered_embeddings`,
  `num_centroids`, `centroid_intermediate_top_k`, `tie_word_embeddings: true`, and `text_config`
  (a `gemma4_text` config with `num_kv_shared_layers == num_hidden_layers`). The attended K/V
  layout is the text config's: sliding layers `num_key_value_heads` x `head_dim`, full layers
  `global_head_dim` x (`num_global_key_value_heads` when `attention_k_eq_v`, else
  `num_key_value_heads`), as transformers' `per_layer_config` resolves them.
- *.safetensors: `pre_projection.weight`, `post_projection.weight`, `model.*`,
  `masked_embedding.centroids.weight`, `masked_embedding.token_ordering` (int64); `lm_head` is
  tied to `model.embed_tokens` and not stored.
- generation_config.json (optional): `num_assistant_tokens` = the draft length K.

Non-Gemma-4 targets need no new field: a Llama-family target is described by `layer_types` all
`full_attention` with `global_head_dim` = the target's head dim; a Gemma 3 target by its
`sliding_window` and per-type layouts. One field is ours, optional and ignored by transformers:
`mtpspec_target_model_type` (the target's model_type when the drafter was made by mtpspec;
informational, used in error messages). Deliberate differences from transformers when RUNNING a
drafter (not the format): the query RoPE is the target's RoPE of the attended layer (identical
for Gemma 4 targets with the published/default rope parameters; `text_config.rope_parameters` is
kept for round trips but not used), and visibility is each row's valid cache entries (see
models/drafter.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .models.decoder import Decoder
from .cache import CacheLayout
from .models.drafter import ATTENTION_TYPES, DrafterConfig, MTPDrafter, check_compatible

_OWN_TEXT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "layer_types",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
    "sliding_window", "rms_norm_eps", "hidden_activation", "attention_bias", "num_kv_shared_layers",
    "per_layer_config", "hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block",
    "use_double_wide_mlp", "model_type", "tie_word_embeddings",
}
_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}
_ACT_BACK = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def _text_config(raw: dict, where: str):
    """Parse the `gemma4_text` sub-config with transformers (for its defaults and per-layer dims)."""
    import transformers as tf

    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config is missing")
    if text.get("model_type", "gemma4_text") != "gemma4_text":
        raise CheckpointError(f"{where}: text_config.model_type is {text.get('model_type')!r}, expected 'gemma4_text'")
    for f in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        if text.get(f):
            raise CheckpointError(f"{where}: text_config.{f} must be 0 for a drafter, got {text[f]!r}")
    for f in ("enable_moe_block", "use_double_wide_mlp"):
        if text.get(f):
            raise CheckpointError(f"{where}: text_config.{f} must be false for a drafter")
    kwargs = {k: v for k, v in text.items() if k not in ("model_type", "transformers_version")}
    if isinstance(kwargs.get("per_layer_config"), dict):
        kwargs["per_layer_config"] = {int(k): v for k, v in kwargs["per_layer_config"].items()}
    try:
        return tf.Gemma4TextConfig(**kwargs)
    except Exception as e:
        raise CheckpointError(f"{where}: invalid text_config ({str(e).splitlines()[0]})") from None


def config_from_dict(raw: dict, where: str = "config.json") -> DrafterConfig:
    """Our `DrafterConfig` from a gemma4_assistant config.json dict (raises CheckpointError)."""
    if raw.get("model_type") != "gemma4_assistant":
        raise CheckpointError(f"{where}: model_type is {raw.get('model_type')!r}, expected 'gemma4_assistant'")
    c = _text_config(raw, where)
    n = c.num_hidden_layers
    layer_types = list(c.layer_types)
    if len(layer_types) != n:
        raise CheckpointError(f"{where}: text_config.layer_types has {len(layer_types)} entries for {n} layers")
    kv = {}
    for i, t in enumerate(layer_types):
        if t not in ATTENTION_TYPES:
            raise CheckpointError(f"{where}: text_config.layer_types[{i}] = {t!r} is not supported")
        per = c.per_layer_config[i]
        lay = CacheLayout(per.num_key_value_heads, per.head_dim)
        if kv.setdefault(t, lay) != lay:
            raise CheckpointError(f"{where}: {t} layers have different K/V layouts")
    act = _ACT.get(c.hidden_activation)
    if act is None:
        raise CheckpointError(f"{where}: unsupported hidden_activation {c.hidden_activation!r}")
    clustered = bool(raw.get("use_ordered_embeddings", False))
    extra = {k: v for k, v in raw["text_config"].items() if k not in _OWN_TEXT_FIELDS}
    try:
        cfg = DrafterConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            backbone_hidden_size=int(raw.get("backbone_hidden_size", 1536)),
            intermediate_size=c.intermediate_size,
            n_heads=c.num_attention_heads,
            layer_types=tuple(layer_types),
            kv_layout=tuple(kv.items()),
            sliding_window=c.sliding_window if "sliding_attention" in layer_types else None,
            norm_eps=c.rms_norm_eps,
            activation=act,
            attention_bias=bool(c.attention_bias),
            clustered=clustered,
            num_centroids=int(raw.get("num_centroids", 2048)) if clustered else 0,
            centroid_top_k=int(raw.get("centroid_intermediate_top_k", 32)) if clustered else 0,
            extra_text_config=extra,
        )
        cfg.check()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def config_to_dict(cfg: DrafterConfig, target_model_type: str | None = None) -> dict:
    """The gemma4_assistant config.json dict for `cfg` (written through transformers' config
    classes so it reloads there unchanged)."""
    import transformers as tf

    types = list(cfg.layer_types)
    sliding = cfg.kv("sliding_attention") if "sliding_attention" in types else None
    full = cfg.kv("full_attention") if "full_attention" in types else None
    base = sliding or full
    text = dict(cfg.extra_text_config)
    text.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.n_heads, num_hidden_layers=cfg.n_layers, layer_types=types,
        num_key_value_heads=base.n_kv_heads, head_dim=base.head_dim,
        global_head_dim=(full or base).head_dim, rms_norm_eps=cfg.norm_eps,
        hidden_activation=_ACT_BACK[cfg.activation], attention_bias=cfg.attention_bias,
        num_kv_shared_layers=cfg.n_layers, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        enable_moe_block=False, use_double_wide_mlp=False, tie_word_embeddings=True,
    )
    if full is not None and full.n_kv_heads != base.n_kv_heads:
        text.update(attention_k_eq_v=True, num_global_key_value_heads=full.n_kv_heads)
    else:
        text.update(attention_k_eq_v=False)
    if cfg.sliding_window:
        text["sliding_window"] = cfg.sliding_window
    text.pop("per_layer_config", None)
    tc = tf.Gemma4TextConfig(**text)
    tc.layer_types = types  # (transformers forces the last layer to full: keep ours as given)
    out = {
        "architectures": ["Gemma4AssistantForCausalLM"],
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": cfg.backbone_hidden_size,
        "use_ordered_embeddings": cfg.clustered,
        "num_centroids": cfg.num_centroids if cfg.clustered else 2048,
        "centroid_intermediate_top_k": cfg.centroid_top_k if cfg.clustered else 32,
        "tie_word_embeddings": True,
        "text_config": tc.to_dict(),
    }
    if target_model_type:
        out["mtpspec_target_model_type"] = target_model_type
    out["text_config"]["num_kv_shared_layers"] = cfg.n_layers
    return out


def _expected_shapes(drafter: MTPDrafter) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in drafter.state_dict().items()}


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (drafter weights missing)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = sf.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def read_drafter_config(path: str | Path) -> tuple[DrafterConfig, int | None]:
    """(config, num_assistant_tokens or None) of a drafter folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: drafter folder not found")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a drafter folder needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_dict(raw, str(cfg_path))
    k = None
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            k = json.loads(gen.read_text()).get("num_assistant_tokens")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e})") from None
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise CheckpointError(f"{gen}: num_assistant_tokens must be a positive integer, got {k!r}")
    return cfg, k


def load_drafter(
    path: str | Path, target: Decoder, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> MTPDrafter:
    """Load a gemma4_assistant drafter for `target`, checking it fits BEFORE any generation:
    vocabulary size, backbone hidden size, attended K/V layout (kv heads / head dim), sliding
    window, tensor names and shapes, token_ordering. Raises CheckpointError naming the mismatch.
    `drafter.draft_tokens` is the checkpoint's num_assistant_tokens (or None)."""
    folder = Path(path)
    cfg, k = read_drafter_config(folder)
    try:
        check_compatible(cfg, target.cfg)
    except ValueError as e:
        raise CheckpointError(f"{folder}: drafter does not fit the target: {e}") from None
    tensors = _read_tensors(folder)
    with torch.device("meta"):
        drafter = MTPDrafter(cfg)
    expected = _expected_shapes(drafter)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    sd = {}
    for name, (shape, _) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        sd[name] = t
    if cfg.clustered:
        order = sd["masked_embedding.token_ordering"].long()
        if not torch.equal(torch.sort(order).values, torch.arange(cfg.vocab_size)):
            raise CheckpointError(f"{folder}: masked_embedding.token_ordering is not a permutation of the vocabulary")
        sd["masked_embedding.token_ordering"] = order
    unexpected = [n for n in tensors if n not in expected and n != "lm_head.weight"
                  and not any(s in n for s in (".k_proj.", ".v_proj.", ".k_norm.", ".v_norm."))]
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])} (not a gemma4_assistant drafter?)")
    if "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
        raise CheckpointError(f"{folder}: lm_head.weight differs from model.embed_tokens.weight (the format ties them)")
    dtype = dtype or target.dtype
    float_sd = {n: (t if n.endswith("token_ordering") else t.to(dtype)) for n, t in sd.items()}
    drafter.load_state_dict(float_sd, strict=True, assign=True)
    drafter = drafter.to(device=device or target.device)
    drafter.draft_tokens = k
    return drafter.prepare()


def save_drafter(drafter: MTPDrafter, folder: str | Path, draft_tokens: int | None = None,
                 target_model_type: str | None = None) -> Path:
    """Write `drafter` as a gemma4_assistant folder (config.json, model.safetensors,
    generation_config.json with num_assistant_tokens = draft_tokens if given). A drafter
    quantized for inference (`MTPDrafter.quantize`) is refused: save the dense one."""
    if drafter.quantization is not None:
        raise ValueError(f"this drafter was quantized ({drafter.quantization}) for inference and would be saved "
                         "without its exact weights; save the dense drafter (load it with drafter_quantize='none')")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = config_to_dict(drafter.cfg, target_model_type)
    raw["dtype"] = str(drafter.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    sd = {n: t.detach().contiguous().cpu() for n, t in drafter.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    gen = {"num_assistant_tokens": int(draft_tokens)} if draft_tokens else {}
    gen["_from_model_config"] = False
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw["text_config"].get(key) is not None:
            gen[key] = raw["text_config"][key]
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return folder


__all__ = ["load_drafter", "save_drafter", "read_drafter_config", "config_from_dict", "config_to_dict"]
