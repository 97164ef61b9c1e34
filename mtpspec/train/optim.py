"""The optimiser of a drafter's trainable weights and its learning-rate schedule."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, total: int | None, warmup: int, base: float, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from base to floor * base at `total`
    (constant base when total is unknown)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not total:
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


class Optimiser:
    """AdamW over the parameters that require grad, with gradient clipping and a cosine schedule
    over max_steps, or over the time budget when only that bounds the run."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, warmup: int, grad_clip: float,
                 max_steps: int | None, time_budget: float | None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.base_lr, self.warmup, self.grad_clip = lr, warmup, grad_clip
        self.max_steps, self.time_budget = max_steps, time_budget

    def lr(self, step: int, elapsed: float) -> float:
        if step >= self.warmup and self.max_steps is None and self.time_budget:
            return cosine_lr(int(1000 * min(1.0, elapsed / self.time_budget)), 1000, 0, self.base_lr)
        return cosine_lr(step, self.max_steps, self.warmup, self.base_lr)

    def step(self, loss: torch.Tensor, step: int, elapsed: float) -> None:
        """Backward of loss and one update at the scheduled learning rate of (step, elapsed seconds)."""
        self.zero_grad()
        loss.backward()
        self.update(step, elapsed)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def update(self, step: int, elapsed: float) -> None:
        """One update from the gradients accumulated since `zero_grad` (clipped), at the scheduled
        learning rate of (step, elapsed seconds)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr(step, elapsed)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
