"""A run's activation shards: the samples cut into shards of `shard_size`, each harvested when
training first reaches it and kept under <work_dir>/shards (a resumed or repeated run reuses it);
plus other runs' shards, replayed alongside."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from .data import Sample
from .harvest import Activations


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file: `path` holds the old or the new object, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_external_shards(dirs: list[str]) -> list[list[Activations]]:
    """The non-empty shards of other runs: each dir is a training work dir or its shards/ folder."""
    out = []
    for d in dirs:
        p = Path(d)
        folder = p / "shards" if (p / "shards").is_dir() else p
        files = sorted(folder.glob("shard_*.pt"))
        if not files:
            raise InputError(f"--replay-from {d}: no shard_*.pt files (expected a training work dir or its shards/)")
        out += [torch.load(f, weights_only=False) for f in files]
    return [s for s in out if s]


class ShardStore:
    """Shard r of `samples`, loaded from `folder` or built by `build(samples of shard r, label)`."""

    def __init__(self, samples: list[Sample], shard_size: int, folder: Path,
                 build: Callable[[list[Sample], str], list[Activations]], external: list[list[Activations]]) -> None:
        self.samples, self.shard_size, self.folder, self._build = samples, shard_size, folder, build
        self.n_shards = math.ceil(len(samples) / shard_size)
        self.loaded: list[list[Activations]] = []
        self.external = external

    def __getitem__(self, r: int) -> list[Activations]:
        while len(self.loaded) <= r:
            self.loaded.append(self._load_or_build(len(self.loaded)))
        return self.loaded[r]

    def _load_or_build(self, r: int) -> list[Activations]:
        path = self.folder / f"shard_{r:05d}.pt"
        if path.is_file():
            return torch.load(path, weights_only=False)
        acts = self._build(self.samples[r * self.shard_size : (r + 1) * self.shard_size], f"shard {r + 1}/{self.n_shards}")
        save_atomic(acts, path)
        return acts
