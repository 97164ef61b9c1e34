"""Progress of a training run on stderr: a progress bar with smoothed loss and per-step accuracy,
and messages (evaluations) written above it."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool, total: int | None, initial: int, n_shards: int, silent: bool = False) -> None:
        """enabled: the bar (else messages only); silent: not even messages (the ranks of a
        distributed run other than rank 0)."""
        self.bar = None
        self.silent = silent
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, desc="train-drafter")
        self.n_shards = n_shards
        self.ema: dict | None = None

    def step(self, rec: dict, round_: int, tau: float | None) -> None:
        """One training step's record (loss, acc per step, cluster_hit); tau: the last evaluation's
        mean accepted length."""
        ema = self.ema
        self.ema = rec if ema is None else {"loss": 0.9 * ema["loss"] + 0.1 * rec["loss"],
                                            "acc": [0.9 * a + 0.1 * b for a, b in zip(ema["acc"], rec["acc"])]}
        if self.bar is None:
            return
        post = {"loss": f"{self.ema['loss']:.3f}", "acc": "/".join(f"{a:.2f}" for a in self.ema["acc"]),
                "shard": f"{min(round_ + 1, self.n_shards)}/{self.n_shards}"}
        if "cluster_hit" in rec:
            post["clu"] = f"{rec['cluster_hit']:.2f}"
        if tau is not None:
            post["tau"] = tau
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
