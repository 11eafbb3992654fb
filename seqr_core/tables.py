"""The per-slot tables of a LibraryIndex: layout, one adapter's columns, general blocks, calibration.

Every column is computed from one adapter's index object alone (the same arithmetic whether
it is added on upload, in bulk at startup or to a test index), so an index built one adapter
at a time equals one built in bulk, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .adapter_index import AdapterIndex
from .errors import InvalidArgumentError
from .signature import BaseModelSignature
from .slots import Columns

_TRANSFORMS = 3          # e, sqrt, log (seqr_core.calibration.TRANSFORMS)


@dataclass(frozen=True)
class Group:
    """Shared-A modules of one rank: their W is one (modules, K, slots) table."""

    rank: int
    rows: np.ndarray              # (Mg,) signature rows
    modules: tuple[str, ...]

    @property
    def K(self) -> int:
        return self.rank * (self.rank + 1) // 2


@dataclass(frozen=True)
class Layout:
    modules: tuple[str, ...]                       # signature order = table rows
    row: Mapping[str, int]
    d_in: Mapping[str, int]
    groups: tuple[Group, ...]
    group_of: Mapping[str, tuple[int, int]]        # shared-A module -> (group, row in group)
    shared_gram: Mapping[str, np.ndarray]          # A·Aᵀ (r, r) float64
    a_norm: Mapping[str, float]                    # ‖A‖_F
    _interned: dict = field(default_factory=dict, compare=False, repr=False)

    def intern(self, value):
        """One shared object per distinct module tuple/set: thousands of adapters usually
        target the same modules, and their entries need not hold a copy each."""
        hit = self._interned.get(value)
        if hit is None:
            canon = tuple(self.modules[self.row[m]] for m in value) if isinstance(value, tuple) else value
            hit = self._interned.setdefault(value, canon)
        return hit

    @classmethod
    def build(cls, signature: BaseModelSignature, shared_a: Mapping[str, np.ndarray]) -> "Layout":
        names = signature.names
        by_rank: dict[int, list[str]] = {}
        for m in names:
            if m in shared_a:
                by_rank.setdefault(int(shared_a[m].shape[0]), []).append(m)
        row = {m: k for k, m in enumerate(names)}
        groups = tuple(Group(r, np.array([row[m] for m in ms]), tuple(ms)) for r, ms in sorted(by_rank.items()))
        group_of = {m: (g, j) for g, grp in enumerate(groups) for j, m in enumerate(grp.modules)}
        a64 = {m: A.astype(np.float64) for m, A in shared_a.items()}
        return cls(modules=names, row=MappingProxyType(row),
                   d_in=MappingProxyType({s.name: s.d_in for s in signature.modules}), groups=groups,
                   group_of=MappingProxyType(group_of),
                   shared_gram=MappingProxyType({m: A @ A.T for m, A in a64.items()}),
                   a_norm=MappingProxyType({m: float(np.linalg.norm(A)) for m, A in a64.items()}))

    def rank(self, module: str) -> int:
        g = self.group_of.get(module)
        return 0 if g is None else self.groups[g[0]].rank

    def check(self, ai: AdapterIndex) -> None:
        """An index object fits this library (stored objects are re-checked on load). Checked
        once per distinct (modules, ranks, own-A shapes): adapters of one fleet share it."""
        key = ("fits", ai.modules, ai.ranks, tuple(sorted((m, A.shape) for m, (_, A) in ai.own.items())))
        if key in self._interned:
            return
        for m, r in zip(ai.modules, ai.ranks):
            if m not in self.row:
                raise InvalidArgumentError("module not in the library's signature",
                                           field=f"adapter.{m}", actual=m)
            own = ai.own.get(m)
            if (own is None and r != self.rank(m)) or \
                    (own is not None and (own[0].shape != (r, r) or own[1].shape != (r, self.d_in[m]))):
                raise InvalidArgumentError("index object does not fit the library's module",
                                           field=f"adapter.{m}", limit=(self.rank(m), self.d_in[m]), actual=r)
        self._interned[key] = True

    def plan(self, ai: AdapterIndex):
        """(rows of its modules, per shared-A group: (group, positions among the adapter's
        shared modules, rows in the group's table, signature rows)) — cached per module set."""
        key = ("plan", ai.modules, frozenset(ai.own))
        hit = self._interned.get(key)
        if hit is None:
            rows = np.array([self.row[m] for m in ai.modules])
            groups: dict[int, tuple[list, list, list]] = {}
            shared = [k for k, m in enumerate(ai.modules) if m not in ai.own]
            for s, k in enumerate(shared):
                g, j = self.group_of[ai.modules[k]]
                grp = groups.setdefault(g, ([], [], []))
                grp[0].append(s), grp[1].append(j), grp[2].append(rows[k])
            hit = self._interned.setdefault(key, (rows, tuple(
                (g, slice(None) if sp == list(range(len(shared))) else np.array(sp), np.array(js), np.array(rs))
                for g, (sp, js, rs) in sorted(groups.items()))))
        return hit


def empty_columns(layout: Layout) -> Columns:
    M = len(layout.modules)
    spec = {"ids": ((), np.int64), "present": ((M,), bool), "shared": ((M,), bool),
            "frob2": ((M,), np.float64), "rf2": ((M,), np.float64), "wnorm": ((M,), np.float64)}
    derive = {}
    for g, grp in enumerate(layout.groups):
        spec[f"W{g}"] = ((grp.rows.size, grp.K), np.float64)
        derive[f"G{g}"] = (f"W{g}", lambda w: w.astype(np.float32))
    return Columns.empty(spec, derive)


def adapter_columns(layout: Layout, items) -> dict[str, np.ndarray]:
    """The columns of (AdapterIndex, adapter_id) pairs, computed adapter by adapter."""
    M, k = len(layout.modules), len(items)
    out = {"ids": np.array([i for _, i in items], np.int64), "present": np.zeros((M, k), bool),
           "shared": np.zeros((M, k), bool), "frob2": np.zeros((M, k)), "rf2": np.zeros((M, k)),
           "wnorm": np.zeros((M, k))}
    for g, grp in enumerate(layout.groups):
        out[f"W{g}"] = np.zeros((grp.rows.size, grp.K, k))
    by_plan: dict[int, tuple] = {}
    for c, (ai, _) in enumerate(items):
        plan = layout.plan(ai)
        out["present"][plan[0], c] = True
        out["frob2"][plan[0], c] = ai.frob2
        by_plan.setdefault(id(plan), (plan, []))[1].append(c)
    # Adapters with the same modules: their stored Gram weights land in one assignment per group.
    for (_, groups), cs in by_plan.values():
        cs = np.array(cs)
        for g, sp, js, rows in groups:
            w = np.stack([items[c][0].gram_of(sp) for c in cs])            # (C, m, K)
            out[f"W{g}"][js[:, None], :, cs[None, :]] = w.transpose(1, 0, 2)
            sel = (rows[:, None], cs[None, :])
            out["shared"][sel] = True
            out["wnorm"][sel] = np.linalg.norm(w, axis=2).T
            out["rf2"][sel] = w[:, :, _diagonal(layout.groups[g].rank)].sum(axis=2).T    # tr(RᵀR)
    return out


def _diagonal(r: int) -> np.ndarray:
    """Positions of the diagonal of RᵀR among its packed upper-triangle weights."""
    iu, ju = np.triu_indices(r)
    return np.flatnonzero(iu == ju)


# --- general (own-A) adapters: per module, copied on change (work ∝ that module's rows) ---

@dataclass(frozen=True)
class GeneralBlock:
    ids: np.ndarray            # (ng,) int64, ascending
    M: np.ndarray              # (Σr, d) float32 rows of R_i·A_i
    offsets: np.ndarray        # (ng+1,) int64
    R: tuple                   # per adapter (r, r) float64
    A: tuple                   # per adapter (r, d) float32
    mnorm: np.ndarray          # (ng,) ‖M_i‖_F of the fp32 rows, in float64

    @property
    def nbytes(self) -> int:
        return self.M.nbytes + sum(r.nbytes for r in self.R) + sum(a.nbytes for a in self.A)

    @property
    def rmax(self) -> int:
        return int(np.diff(self.offsets).max()) if self.ids.size else 0


def _general_block(ids, Rs, As) -> GeneralBlock:
    Ms = [(R @ A.astype(np.float64)).astype(np.float32) for R, A in zip(Rs, As)]
    M = np.concatenate(Ms) if Ms else np.zeros((0, 0), np.float32)
    M.setflags(write=False)
    return GeneralBlock(ids=np.asarray(ids, np.int64), M=M,
                        offsets=np.concatenate([[0], np.cumsum([m.shape[0] for m in Ms])]).astype(np.int64),
                        R=tuple(Rs), A=tuple(As),
                        mnorm=np.array([float(np.sqrt((m.astype(np.float64) ** 2).sum())) for m in Ms]))


def general_add(general: Mapping[str, GeneralBlock], layout: Layout, items) -> Mapping[str, GeneralBlock]:
    adds: dict[str, list] = {}
    for ai, i in items:
        for m, (R, A) in ai.own.items():
            adds.setdefault(m, []).append((int(i), R, A))
    if not adds:
        return general
    out = dict(general)
    for m, new in adds.items():
        old = general.get(m)
        new_block = _general_block([i for i, _, _ in new], [R for _, R, _ in new], [A for _, _, A in new])
        if old is None:
            out[m] = new_block
            continue
        out[m] = GeneralBlock(ids=np.concatenate([old.ids, new_block.ids]),
                              M=np.concatenate([old.M, new_block.M]),
                              offsets=np.concatenate([old.offsets, old.offsets[-1] + new_block.offsets[1:]]),
                              R=old.R + new_block.R, A=old.A + new_block.A,
                              mnorm=np.concatenate([old.mnorm, new_block.mnorm]))
        out[m].M.setflags(write=False)
    return MappingProxyType(out)


def general_insert(general: Mapping[str, GeneralBlock], layout: Layout, ai: AdapterIndex,
                   adapter_id: int) -> Mapping[str, GeneralBlock]:
    """``general`` with one adapter's own-A modules inserted at its id's place (a replace keeps
    its id, so it may land before later adapters)."""
    if not ai.own:
        return general
    out = dict(general)
    for m, (R, A) in ai.own.items():
        one = _general_block([adapter_id], [R], [A])
        old = general.get(m)
        if old is None:
            out[m] = one
            continue
        k = int(np.searchsorted(old.ids, adapter_id))
        at, rows = int(old.offsets[k]), int(one.offsets[-1])
        M = np.concatenate([old.M[:at], one.M, old.M[at:]])
        M.setflags(write=False)
        out[m] = GeneralBlock(ids=np.insert(old.ids, k, adapter_id), M=M,
                              offsets=np.concatenate([old.offsets[: k + 1], old.offsets[k:] + rows]),
                              R=old.R[:k] + one.R + old.R[k:], A=old.A[:k] + one.A + old.A[k:],
                              mnorm=np.insert(old.mnorm, k, one.mnorm[0]))
    return MappingProxyType(out)


def general_remove(general: Mapping[str, GeneralBlock], entry) -> Mapping[str, GeneralBlock]:
    mods = [m for m in entry.modules if m not in entry.shared_modules and m in general]
    if not mods:
        return general
    out = dict(general)
    for m in mods:
        b = general[m]
        k = int(np.flatnonzero(b.ids == entry.adapter_id)[0])
        if b.ids.size == 1:
            del out[m]
            continue
        lo, hi = int(b.offsets[k]), int(b.offsets[k + 1])
        M = np.delete(b.M, np.s_[lo:hi], 0)
        M.setflags(write=False)
        out[m] = replace(b, ids=np.delete(b.ids, k), M=M,
                         offsets=np.concatenate([b.offsets[: k + 1], b.offsets[k + 2:] - (hi - lo)]),
                         R=b.R[:k] + b.R[k + 1:], A=b.A[:k] + b.A[k + 1:], mnorm=np.delete(b.mnorm, k))
    return MappingProxyType(out)


# --- calibration constants per slot ---------------------------------------------------------

def _cal_spec(M: int) -> dict:
    t = _TRANSFORMS
    return {"has": ((M,), bool), "mod_mean": ((t, M), np.float64), "mod_std": ((t, M), np.float64),
            "seq_mean": ((t,), np.float64), "seq_std": ((t,), np.float64),
            "tok_mean": ((t,), np.float64), "tok_std": ((t,), np.float64), "calibrated": ((), bool)}


def empty_cal(layout: Layout, k: int) -> dict[str, np.ndarray]:
    """Columns of k uncalibrated adapters (never read: routing falls back before it would)."""
    out = {key: np.zeros(lead + (k,), dt) for key, (lead, dt) in _cal_spec(len(layout.modules)).items()}
    for key in ("mod_std", "seq_std", "tok_std"):
        out[key][...] = 1e-30
    return out


def _std(n, mean, m2):
    sd = np.where(n > 1, np.sqrt(np.maximum(m2, 0) / np.maximum(n - 1, 1)), 0.0)
    return np.maximum(sd, 1e-12 * np.abs(mean) + 1e-30)


def _write_cal(cols: dict[str, np.ndarray], layout: Layout, s: int, st) -> None:
    """Write one adapter's AdapterStats ``st`` into column ``s`` of calibration columns ``cols``."""
    cols["calibrated"][s] = True
    mods = [m for m in st.module_stats if m in layout.row]
    if mods:
        rows = np.array([layout.row[m] for m in mods])
        arr = np.stack([np.asarray(st.module_stats[m]) for m in mods])      # (m, 3 transforms, 3 stats)
        cols["has"][rows, s] = True
        cols["mod_mean"][:, rows, s] = arr[:, :, 1].T
        cols["mod_std"][:, rows, s] = _std(arr[:, :, 0], arr[:, :, 1], arr[:, :, 2]).T
    for key, src in (("seq", st.seq_stats), ("tok", st.tok_stats)):
        a = np.asarray(src)                                                  # (3 transforms, 3 stats)
        cols[f"{key}_mean"][:, s] = a[:, 1]
        cols[f"{key}_std"][:, s] = _std(a[:, 0], a[:, 1], a[:, 2])


def cal_for(layout: Layout, stats: list) -> dict[str, np.ndarray]:
    """Calibration columns of k added adapters: their AdapterStats, or None (uncalibrated)."""
    cols = empty_cal(layout, len(stats))
    for s, st in enumerate(stats):
        if st is not None:
            _write_cal(cols, layout, s, st)
    return cols


def cal_columns(index, stats) -> Columns:
    """The calibration columns of every slot of ``index`` for ``stats`` (CalibrationStats)."""
    layout, n = index.layout, index.columns.n
    cols = empty_cal(layout, n)
    slot_of = {e.name: int(s) for e, s in zip(index.adapters, index.slots)}
    for name, st in stats.adapters.items():
        s = slot_of.get(name)
        if s is not None:
            _write_cal(cols, layout, s, st)
    empty = Columns.empty(_cal_spec(len(layout.modules)))
    return empty.append(cols) if n else empty
