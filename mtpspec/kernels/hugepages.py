"""Packed weights on transparent huge pages (Linux).

A decode step streams every weight from memory once. With 4 KB pages a 30 MB matrix spans 7,500
pages: TLB misses, and hardware prefetchers that stop at page boundaries, cost part of the
bandwidth. On our 2-core EPYC the int8 49152x576 LM head at one row ran 10.3 GB/s on 4 KB pages and
12.2 GB/s on 2 MB pages (1.18x; int4 1.05x; `docs/benchmarks.md`). Where the kernel's THP mode is
`madvise` (a common default), anonymous memory gets huge pages only when asked, and torch's
allocator never asks. `to_hugepages` copies tensors into one 2 MB-aligned anonymous mapping
advised MADV_HUGEPAGE and returns views of it; `move_packed_weights` does that for a module's
packed linear weights (the C++ kernels' inputs). Values are unchanged, so outputs are too.

Off with MTPSPEC_HUGEPAGES=0, off the CPU, off Linux, and when THP is `never`.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

HUGE = 2 << 20  # bytes of a transparent huge page (x86-64, arm64 with 4 KB base pages)
ALIGN = 64  # each tensor starts on a cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"), or None where it cannot be read."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    chosen = [w for w in text.split() if w.startswith("[")]
    return chosen[0].strip("[]") if chosen else None


def available() -> bool:
    """Whether weights should be placed on huge pages here."""
    if os.environ.get("MTPSPEC_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def to_hugepages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (CPU, contiguous) in one anonymous mapping advised MADV_HUGEPAGE, each
    starting on a 64-byte boundary; the mapping lives as long as any of the returned views."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    padded = [-(-s // ALIGN) * ALIGN for s in sizes]
    length = -(-sum(padded) // HUGE) * HUGE + HUGE  # room to start on a 2 MB boundary
    area = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive
    start = (-raw.data_ptr()) % HUGE
    area.madvise(mmap.MADV_HUGEPAGE, start, length - start)  # before the first touch: faults map 2 MB pages
    out, off = [], start
    for t, s, p in zip(tensors, sizes, padded):
        view = raw[off : off + s].view(t.dtype).view(t.shape)
        view.copy_(t)
        view._on_hugepages = True  # move_packed_weights leaves it where it is
        out.append(view)
        off += p
    return out


def move_packed_weights(module: nn.Module) -> int:
    """Move the packed weights of `module`'s quantized and dense kernel layers (CPU) onto huge
    pages, keeping tensors shared between layers shared and leaving those already moved. Returns
    the bytes moved (0 when not `available()`). Call before anything keeps raw pointers to them
    (`Decoder.fuse_blocks`)."""
    from . import Linear
    from .quant import QuantLinear

    if not available():
        return 0
    slots = []  # (layer, attribute, tensor)
    for m in module.modules():
        if isinstance(m, QuantLinear):
            slots.append((m, "packed", m.packed))
        elif isinstance(m, Linear) and m.is_packed:
            slots.append((m, "_packed", m._packed))
    key = lambda t: (t.data_ptr(), t.numel(), t.dtype)  # noqa: E731  (the same tensor, not just the same start)
    unique: dict[tuple, torch.Tensor] = {}
    for _, _, t in slots:
        if t.device.type == "cpu" and t.is_contiguous() and t.numel() and not getattr(t, "_on_hugepages", False):
            unique.setdefault(key(t), t)
    if not unique:
        return 0
    moved = dict(zip(unique, to_hugepages(list(unique.values()))))
    for m, name, t in slots:
        if key(t) in moved:
            setattr(m, name, moved[key(t)])
    return sum(t.numel() * t.element_size() for t in unique.values())
