"""A run's activation shards: the samples cut into shards of `shard_size`, each harvested when
training first reaches it and kept under <work_dir>/shards (a resumed or repeated run reuses it);
plus other runs' shards, replayed alongside."""

from __future__ import annotations

import json
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
    """Shard r of `samples`, loaded from `folder` or built by `build(samples of shard r, label)`.
    build may return (activations, meta): meta (a JSON object, e.g. how the shard's answers agree
    with the target) is kept beside the shard as shard_NNNNN.json and in `self.meta[r]`. `extend`
    appends shards of more samples (the shards before keep theirs)."""

    def __init__(self, samples: list[Sample], shard_size: int, folder: Path,
                 build: Callable[[list[Sample], str], list[Activations] | tuple[list[Activations], dict]],
                 external: list[list[Activations]]) -> None:
        self.samples, self.shard_size, self.folder, self._build = [], shard_size, folder, build
        self.bounds: list[tuple[int, int]] = []  # shard r = samples[start:end]
        self.extend(samples)
        self.loaded: list[list[Activations]] = []
        self.meta: dict[int, dict] = {}
        self.external = external

    @property
    def n_shards(self) -> int:
        return len(self.bounds)

    def extend(self, samples: list[Sample]) -> None:
        """More samples, cut into shards after the existing ones."""
        start = len(self.samples)
        self.samples += samples
        self.bounds += [(i, min(i + self.shard_size, len(self.samples)))
                        for i in range(start, len(self.samples), self.shard_size)]

    def __getitem__(self, r: int) -> list[Activations]:
        while len(self.loaded) <= r:
            self.loaded.append(self._load_or_build(len(self.loaded)))
        return self.loaded[r]

    def path(self, r: int) -> Path:
        return self.folder / f"shard_{r:05d}.pt"

    def read(self, r: int) -> list[Activations]:
        """Shard r from the folder (its meta too, if it has one)."""
        meta = self.path(r).with_suffix(".json")
        if meta.is_file():
            self.meta[r] = json.loads(meta.read_text())
        return torch.load(self.path(r), weights_only=False)

    def build(self, r: int) -> tuple[list[Activations], dict | None]:
        """Shard r built (not stored)."""
        start, end = self.bounds[r]
        out = self._build(self.samples[start:end], f"shard {r + 1}/{self.n_shards}")
        return out if isinstance(out, tuple) else (out, None)

    def store(self, r: int, acts: list[Activations], meta: dict | None) -> None:
        """Shard r (and its meta) written to the folder."""
        if meta is not None:
            self.meta[r] = meta
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path(r).with_suffix(".json").write_text(json.dumps(meta) + "\n")
        save_atomic(acts, self.path(r))

    def _load_or_build(self, r: int) -> list[Activations]:
        if self.path(r).is_file():
            return self.read(r)
        acts, meta = self.build(r)
        self.store(r, acts, meta)
        return acts
