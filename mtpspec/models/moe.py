"""Sparse mixture of experts run beside the dense MLP (Gemma 4 26B-A4B).

    x (the block's residual stream, before the MLP's pre-norm)
    router:  w = softmax(proj(rmsnorm(x) * scale / sqrt(hidden)))       (fp32)
             top-k of w, renormalised to sum 1, times per_expert_scale[expert]
    experts: y = sum_k w_k * down_e(act(gate_e(x')) * up_e(x'))   with x' = in_norm(x)
    out = out_norm(y)

The block adds `out` to the (separately post-normed) dense MLP output. Expert weights are stored
as transformers does, one 3-D tensor each: gate_up [E, 2I, H] (gate rows first), down [E, H, I].

Cost accounting: which experts a forward touched is the cost of reading their weights, so each
MoE layer can report how many distinct experts its tokens selected (`MoEStats`). The router
already groups tokens by expert, so counting costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import Linear
from .config import MoESpec


@dataclass
class MoEStats:
    """Filled by a forward given `moe_stats=`: for each MoE layer (by index), the number of distinct
    experts the forward's tokens were routed to, and how many tokens went through it."""

    experts_touched: dict[int, int] = field(default_factory=dict)
    tokens: int = 0

    def total(self) -> int:
        """Expert weight sets read in this forward, summed over layers."""
        return sum(self.experts_touched.values())


class Router(nn.Module):
    def __init__(self, hidden: int, spec: MoESpec, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.top_k = spec.top_k
        self.root = hidden**-0.5
        self.scale = nn.Parameter(torch.ones(hidden))
        self.proj = Linear(hidden, spec.n_experts, bias=False)
        self.expert_scale = nn.Parameter(torch.ones(spec.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
        xf = x.float()
        normed = (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).to(x.dtype)
        scores = self.proj(normed * self.scale * self.root)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.expert_scale[ids], ids


class MoE(nn.Module):
    """Router + experts + the expert branch's own pre- and post-norms (see module docstring)."""

    def __init__(self, hidden: int, spec: MoESpec, eps: float, norm_cls, act) -> None:
        super().__init__()
        self.spec = spec
        self.router = Router(hidden, spec, eps)
        self.in_norm = norm_cls()
        self.out_norm = norm_cls()
        self.gate_up = nn.Parameter(torch.empty(spec.n_experts, 2 * spec.intermediate_size, hidden))
        self.down = nn.Parameter(torch.empty(spec.n_experts, hidden, spec.intermediate_size))
        self.act = act
        # set by models/quantize.py: per expert a (gate_up, down) pair of QuantLinear, replacing
        # the dense parameters above (then empty)
        self.quantized: nn.ModuleList | None = None

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's gated MLP on rows x [n, H]."""
        if self.quantized is None:
            gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
            return F.linear(self.act(gate) * up, self.down[e])
        gate_up, down = self.quantized[e]
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(self.act(gate) * up)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x [B, T, H] -> (output [B, T, H], number of distinct experts used)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.router(flat)
        xin = self.in_norm(flat)
        out = torch.zeros_like(xin)
        k = ids.shape[1]
        # group (token, slot) pairs by expert: one sort, one bincount, one host sync
        order = torch.argsort(ids.reshape(-1), stable=True)
        counts = torch.bincount(ids.reshape(-1), minlength=self.spec.n_experts).tolist()
        tokens = order // k
        slot_w = weights.reshape(-1)[order]
        start = 0
        used = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            used += 1
            rows = tokens[start : start + c]
            y = self._expert(e, xin[rows]) * slot_w[start : start + c, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += c
        return self.out_norm(out.reshape(shape)), used
