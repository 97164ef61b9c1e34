"""A training run's starting drafter: fresh (its head and projections taken from the target when
the widths allow, a clustered head's vocabulary clustered) or an existing drafter's weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..models.decoder import Decoder
from ..models.drafter import DrafterConfig, MTPDrafter
from .clustering import balanced_kmeans


@torch.no_grad()
def init_from_target(drafter: MTPDrafter, target: Decoder, seed: int = 0, std: float = 0.02) -> bool:
    """Random init, then (when the drafter is as wide as the target) the drafter's head := the
    target's output embedding, pre_projection passes the target hidden through, post_projection
    = identity and residual branches start small. Returns True when the head was copied."""
    drafter.init_random(seed, std=std)
    for name, p in drafter.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
    cfg = drafter.cfg
    h, ht = cfg.hidden_size, cfg.backbone_hidden_size
    if h != ht:
        return False
    lm = target.lm_head.unpacked_weight() if hasattr(target.lm_head, "unpacked_weight") else target.lm_head.weight
    if lm.shape != drafter.model.embed_tokens.weight.shape or target.cfg.final_softcap is not None:
        return False
    drafter.model.embed_tokens.weight.copy_(lm.to(drafter.dtype))
    w = drafter.pre_projection.weight
    w.mul_(0.5)
    w[:, ht:] += torch.eye(h, dtype=w.dtype)
    drafter.post_projection.weight.copy_(torch.eye(h, dtype=w.dtype))
    for layer in drafter.model.layers:
        layer.self_attn.o_proj.weight.mul_(0.1)
        layer.mlp.down_proj.weight.mul_(0.1)
    return True


@torch.no_grad()
def init_from_drafter(drafter: MTPDrafter, folder: Path, target: Decoder) -> None:
    """Load an existing drafter's weights (token ordering included). Same shape required, except
    that `drafter` may have more layers: the given drafter's layers come first and each extra
    layer starts as the identity (its post-attention and post-MLP norm weights are 0, so both
    residual branches add nothing until training grows them): the deeper drafter begins exactly
    where the given one is."""
    from ..drafter_checkpoint import load_drafter

    src = load_drafter(folder, target, dtype=torch.float32)
    mine, theirs = drafter.cfg, src.cfg
    for name in ("hidden_size", "intermediate_size", "n_heads", "clustered", "num_centroids", "centroid_top_k"):
        if getattr(mine, name) != getattr(theirs, name):
            raise InputError(f"--init {folder}: its {name} is {getattr(theirs, name)}, this run's is "
                             f"{getattr(mine, name)} (pass the same drafter shape options)")
    if theirs.n_layers > mine.n_layers or mine.layer_types[: theirs.n_layers] != theirs.layer_types:
        raise InputError(f"--init {folder}: its layers {list(theirs.layer_types)} are not a prefix of this run's "
                         f"{list(mine.layer_types)} (--layers must be at least {theirs.n_layers})")
    own = drafter.state_dict()
    own.update(src.state_dict())  # the extra layers keep their fresh init ...
    drafter.load_state_dict(own)
    for layer in drafter.model.layers[theirs.n_layers :]:  # ... as identity maps
        layer.post_attention_layernorm.weight.zero_()
        layer.post_feedforward_layernorm.weight.zero_()


def starting_drafter(cfg: DrafterConfig, target: Decoder, *, seed: int, train_head: bool | None,
                     init_from: str | None) -> MTPDrafter:
    """The drafter a run starts from. Its head (embed_tokens) is trained when train_head says so;
    by default only when it was not copied from the target."""
    drafter = MTPDrafter(cfg)
    copied = init_from_target(drafter, target, seed)
    drafter.model.embed_tokens.weight.requires_grad_(train_head if train_head is not None else not copied)
    if init_from:
        init_from_drafter(drafter, Path(init_from), target)
    elif cfg.clustered:
        order = balanced_kmeans(drafter.model.embed_tokens.weight.detach(), cfg.num_centroids, seed=seed)
        drafter.masked_embedding.token_ordering.copy_(order)
    return drafter
