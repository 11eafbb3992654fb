"""Per-adapter columns that grow in place and are shared by a lineage of immutable snapshots.

A snapshot sees the first ``n`` columns (slots) of a set of buffers whose last axis has spare
capacity. Appending k columns to the newest snapshot of a lineage writes them into the spare
capacity — cost proportional to the k columns — and hands back a snapshot that sees n + k;
older snapshots still see their first n, which never change. Appending to an older snapshot
(a branch) or past the capacity copies into a fresh lineage with capacity for growth (amortised
O(1) per column). Removing an adapter leaves its slot in place (a tombstone the snapshot
masks out); ``take`` compacts when tombstones pile up.

Derived buffers (e.g. an fp32 copy of the float64 Gram weights for the fp32 kernel) are built
on first use for the whole lineage and then extended on every append.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

GROWTH = 1.25
MIN_CAPACITY = 16


class _Lineage:
    """Mutable buffers behind a family of snapshots; only columns >= ``used`` are ever written."""

    def __init__(self, arrays: dict[str, np.ndarray], used: int,
                 derive: Mapping[str, tuple[str, Callable]]):
        self.arrays = arrays
        self.used = used
        self.derive = dict(derive)          # derived key -> (source key, fn(columns) -> columns)
        self.lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[-1]


def _capacity(n: int) -> int:
    return max(MIN_CAPACITY, int(n * GROWTH) + 1)


@dataclass(frozen=True)
class Columns:
    """The first ``n`` slots of a lineage's buffers (see the module docstring)."""

    lineage: _Lineage
    n: int

    @classmethod
    def empty(cls, layout: Mapping[str, tuple[tuple[int, ...], type]],
              derive: Mapping[str, tuple[str, Callable]] = ()) -> "Columns":
        arrays = {k: np.zeros(lead + (MIN_CAPACITY,), dt) for k, (lead, dt) in layout.items()}
        return cls(_Lineage(arrays, 0, dict(derive)), 0)

    def keys(self):
        return self.lineage.arrays.keys()

    def view(self, key: str) -> np.ndarray:
        v = self.lineage.arrays[key][..., : self.n]
        v.flags.writeable = False
        return v

    def derived(self, key: str) -> np.ndarray:
        """A derived buffer's view, building it for the whole lineage on first use."""
        lin = self.lineage
        if key not in lin.arrays:
            with lin.lock:
                if key not in lin.arrays:
                    src, fn = lin.derive[key]
                    buf = lin.arrays[src]
                    out = np.zeros(buf.shape, fn(buf[..., :0]).dtype)
                    out[..., : lin.used] = fn(buf[..., : lin.used])
                    lin.arrays[key] = out
        return self.view(key)

    def append(self, cols: Mapping[str, np.ndarray]) -> "Columns":
        """A snapshot with ``cols`` (each (..., k), every base key given) after the n slots."""
        k = next(iter(cols.values())).shape[-1]
        lin, n = self.lineage, self.n
        with lin.lock:
            if lin.used == n and n + k <= lin.capacity:
                for key, buf in lin.arrays.items():
                    buf[..., n:n + k] = self._column(lin, key, cols)
                lin.used = n + k
                return Columns(lin, n + k)
            return self._fork(np.arange(n), cols, k)

    def reserve(self, total: int) -> "Columns":
        """The same slots, in a lineage with room for ``total`` and a margin of 1/16 beyond it:
        a bulk load appends in place, and the puts after it do not copy every column soon (at
        10,000 adapters such a copy is 1.4 GB and seconds). The margin is resident memory
        (numpy asks for huge pages on large buffers, so untouched tails are backed too): 1/16
        rather than the growth quarter keeps RSS near the index's own size."""
        lin = self.lineage
        with lin.lock:
            if lin.used == self.n and total <= lin.capacity:
                return self
            return self._fork(np.arange(self.n), None, 0, cap=max(total, self.n) + max(MIN_CAPACITY, total // 16))

    def take(self, slots: np.ndarray) -> "Columns":
        """A fresh lineage holding only ``slots`` (compaction)."""
        with self.lineage.lock:
            return self._fork(np.asarray(slots), None, 0)

    def _fork(self, keep: np.ndarray, cols, k: int, cap: int = 0) -> "Columns":
        lin = self.lineage
        n = keep.size + k
        cap = max(cap, n) if cap else _capacity(n)
        prefix = bool(np.array_equal(keep, np.arange(keep.size)))
        out = {}
        for key, buf in lin.arrays.items():
            new = np.zeros(buf.shape[:-1] + (cap,), buf.dtype)
            new[..., : keep.size] = buf[..., : keep.size] if prefix else buf[..., keep]
            if k:
                new[..., keep.size:n] = self._column(lin, key, cols)
            out[key] = new
        return Columns(_Lineage(out, n, lin.derive), n)

    @staticmethod
    def _column(lin: _Lineage, key: str, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        if key in cols:
            return cols[key]
        src, fn = lin.derive[key]
        return fn(cols[src])
