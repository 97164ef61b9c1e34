"""Static KV cache: preallocated K/V per layer, one length per batch row.

Layout: for every layer that owns K/V, `k[i]` and `v[i]` are [batch, kv_heads, capacity, head_dim],
allocated once. Row b holds valid entries at positions 0 .. lengths[b]-1; a forward of T new tokens
writes positions lengths[b] .. lengths[b]+T-1 of each row (rows may differ: ragged batches) and then
advances the lengths. Entries past a row's length are stale but never read: attention masks every
key position greater than the query position (and, in sliding-window layers, every key that is
`window` or more positions behind it). So rolling back n tokens of a row is just
`lengths[b] -= n`: the stale entries are overwritten by the next write at those positions.

Sliding-window layers keep the full capacity too (no ring buffer). That costs memory on long
contexts but keeps rollback exact for any draft length; attention only reads the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class CacheLayout:
    """The shape of one layer's K/V: (kv_heads, head_dim)."""

    n_kv_heads: int
    head_dim: int


class KVCache:
    """Preallocated K/V for a batch of rows, with per-row lengths (see module docstring)."""

    def __init__(
        self,
        layouts: dict[int, CacheLayout],
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.batch_size = batch_size
        self.capacity = capacity
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # layers of one layout share one [n_layers, batch, kv_heads, capacity, head_dim] tensor
        # (k[layer] is a view of it), so `compact` moves every layer's entries in one op
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        for lay in dict.fromkeys(layouts.values()):
            members = [layer for layer, l2 in layouts.items() if l2 == lay]
            shape = (len(members), batch_size, lay.n_kv_heads, capacity, lay.head_dim)
            kg = torch.zeros(shape, dtype=dtype, device=device)
            vg = torch.zeros(shape, dtype=dtype, device=device)
            self.groups.append((kg, vg))
            for i, layer in enumerate(members):
                self.k[layer], self.v[layer] = kg[i], vg[i]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def rows(self, start: int, end: int) -> "KVCache":
        """A view of rows start..end-1: same storage, so writes and length changes show through.
        Views are kept (the decoding loop asks for rows 0..n-1 every round); a view knows its `base`
        cache and first row `row0`."""
        if start == 0 and end == self.batch_size:
            return self
        views = self.__dict__.setdefault("_views", {})
        if (view := views.get((start, end))) is not None:
            return view
        view = object.__new__(KVCache)
        view.batch_size = end - start
        view.capacity = self.capacity
        view.k = {i: t[start:end] for i, t in self.k.items()}
        view.v = {i: t[start:end] for i, t in self.v.items()}
        view.groups = [(kg[:, start:end], vg[:, start:end]) for kg, vg in self.groups]
        view.lengths = self.lengths[start:end]
        view.base, view.row0 = getattr(self, "base", None) or self, getattr(self, "row0", 0) + start
        views[(start, end)] = view
        return view

    # ---- positions ---------------------------------------------------------------------------
    def positions(self, n_new: int) -> torch.Tensor:
        """Positions [batch, n_new] that the next `n_new` tokens of each row will occupy."""
        steps = torch.arange(n_new, device=self.lengths.device)
        pos = self.lengths[:, None] + steps
        return pos

    def check_room(self, n_new: int) -> None:
        longest = int(self.lengths.max()) + n_new
        if longest > self.capacity:
            raise InputError(
                f"KV cache capacity exceeded: a row needs {longest} positions, the cache holds {self.capacity}"
            )

    # ---- writes ------------------------------------------------------------------------------
    def write(
        self, layer: int, positions: torch.Tensor, start: int | None, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store k, v ([batch, kv_heads, T, head_dim]) of `layer` at `positions` ([batch, T]).

        `start` is the common first position when every row is at the same length (a contiguous
        slice write); None means rows differ and each row is scattered to its own positions.
        """
        kc, vc = self.k[layer], self.v[layer]
        k, v = k.to(kc.dtype), v.to(vc.dtype)  # a bfloat16 cache under an fp32 model (Decoder.new_cache)
        if start is not None:
            t = positions.shape[1]
            kc[:, :, start : start + t] = k
            vc[:, :, start : start + t] = v
        else:
            rows = torch.arange(self.batch_size, device=positions.device)[:, None]
            kc[rows, :, positions] = k.transpose(1, 2)
            vc[rows, :, positions] = v.transpose(1, 2)

    def snapshot_row(self, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of row b's valid entries in every layer (for `restore_row`)."""
        n = int(self.lengths[b])
        return [(kg[:, b, :, :n].clone(), vg[:, b, :, :n].clone()) for kg, vg in self.groups]

    def restore_row(self, b: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make row b hold what `snapshot_row` saved (entries and length)."""
        n = 0
        for (kg, vg), (ks, vs) in zip(self.groups, saved):
            n = ks.shape[2]
            kg[:, b, :, :n] = ks
            vg[:, b, :, :n] = vs
        self.lengths[b] = n

    # ---- lengths -----------------------------------------------------------------------------
    def advance(self, n: int | torch.Tensor) -> None:
        """Commit n new tokens per row (an int for all rows, or a [batch] tensor)."""
        self.lengths += n

    def set_lengths(self, lengths: torch.Tensor | list[int]) -> None:
        self.lengths.copy_(torch.as_tensor(lengths, dtype=torch.long))

    def rollback(self, n: int | torch.Tensor) -> None:
        """Forget the last n tokens of each row (an int for all rows, or a [batch] tensor)."""
        n_t = torch.as_tensor(n, dtype=torch.long, device=self.lengths.device)
        if bool((n_t < 0).any()) or bool((n_t > self.lengths).any()):
            raise ValueError("rollback: n must be between 0 and the row's length")
        self.lengths -= n_t

    def compact(self, base: torch.Tensor, keep: list[list[int]]) -> None:
        """Keep, per row b, the entries at slots base[b] + keep[b][j] (increasing offsets) as slots
        base[b] + j, and set the row's length to base[b] + len(keep[b]). This is how a draft
        tree's accepted path (scattered over the tree's slots) becomes a contiguous sequence; it
        copies only the rows whose path is not already in place (a chain never copies)."""
        dev = self.lengths.device
        starts = base.tolist()
        for b, ks in enumerate(keep):
            # offsets increase and start at 0, so entries stay in place up to the first that moves
            j0 = next((j for j, k in enumerate(ks) if k != j), len(ks))
            if j0 == len(ks):
                continue
            lo = starts[b]
            src = torch.tensor(ks[j0:], device=dev) + lo
            for group in self.groups:  # every layer of a layout at once
                for cache in group:
                    cache[:, b, :, lo + j0 : lo + len(ks)] = cache[:, b].index_select(2, src)  # a copy: overlap is safe
        self.lengths.copy_(base.to(dev) + torch.tensor([len(k) for k in keep], device=dev))
