"""Which samples each training step sees.

Round r < n_shards trains on shard r: ceil(epochs * n_r / b_new) steps whose batches hold b_new
samples of the new shard (a seeded permutation) and B - b_new replayed from earlier shards and
other runs' shards (`replay` fraction). After the last shard, replay rounds over everything follow
until the run's step or time limit ends it (without a limit: ceil(epochs) - 1 of them). Every
batch is a pure function of (seed, round, step in round), so a resumed run takes exactly the steps
the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch

from .harvest import Activations
from .shards import ShardStore


class Schedule:
    def __init__(self, shards: ShardStore, *, batch_size: int, replay: float, epochs: float, seed: int,
                 limited: bool) -> None:
        """limited: a step count or time budget ends the run (replay rounds go on until it does)."""
        self.shards, self.batch_size, self.replay, self.epochs, self.seed = shards, batch_size, replay, epochs, seed
        self.limited = limited

    def round_plan(self, r: int) -> tuple[int, int]:
        """(steps in round r, new samples per batch)."""
        B = self.batch_size
        if r < self.shards.n_shards:
            n = len(self.shards[r])
            if n == 0:
                return 0, 0
            b_new = max(1, B - (int(round(B * self.replay)) if self.older_count(r) else 0))
            return max(1, math.ceil(self.epochs * n / b_new)), b_new
        total = self.older_count(self.shards.n_shards)
        return (max(1, math.ceil(total / B)) if total else 0), 0

    def has_round(self, r: int, n_steps: int) -> bool:
        """Whether round r (of n_steps steps) belongs to the run."""
        n = self.shards.n_shards
        if r < n:
            return True
        return n_steps > 0 and (self.limited or r < n + max(0, math.ceil(self.epochs) - 1))

    def older_count(self, r: int) -> int:
        """Samples available for replay before round r: external shards + this run's shards < r."""
        return sum(len(x) for x in self.shards.external) + sum(len(self.shards[i]) for i in range(r))

    def batch(self, r: int, s: int, b_new: int) -> list[Activations]:
        """Step s of round r: b_new new samples, the rest of the batch replayed."""
        items = []
        if b_new:
            shard = self.shards[r]
            perm = torch.randperm(len(shard), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + r))
            for j in range(b_new):
                items.append(shard[int(perm[(s * b_new + j) % len(shard)])])
        n_old = self.batch_size - b_new
        if n_old:
            pools = self.shards.external + [self.shards[i] for i in range(min(r, self.shards.n_shards))]
            sizes = [len(p) for p in pools]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + r) * 100_003 + s)
            for idx in torch.randint(sum(sizes), (n_old,), generator=g).tolist():
                for pool, n in zip(pools, sizes):
                    if idx < n:
                        items.append(pool[idx])
                        break
                    idx -= n
        return items
