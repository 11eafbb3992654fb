"""Per-module adapter energies e = ‖ΔW x‖², with error bounds, and the float64 re-check.

Input forms per module (DESIGN §3): ``activations`` x (T, d); ``projected`` z = A_m·x (T, r),
shared-A adapters only; ``moments`` G = ZᵀZ/T (r, r), shared-A, token-mean energy only.

``seqr_energies`` runs in float32 and returns, beside e, a rigorous bound on |e − e_f64|
(seqr_core.bounds), so routing can re-check in float64 exactly the candidates whose order the
bound leaves in doubt. ``recheck_f64`` is that re-check: e = ‖Rᵢz‖² in float64 from the index
(the QR factor of s·B, never B itself; see bounds for why it is interchangeable with
‖s·B·A·x‖²). The batched multi-module paths live in seqr_core.batched; this module serves
everything else (general adapters, nonlinear transforms, calibration, baselines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bounds as bd
from .bounds import Bound
from .errors import InvalidArgumentError
from .qr_index import LibraryIndex
from .tables import GeneralBlock

FORMS = ("activations", "projected", "moments")


@dataclass(frozen=True)
class ModuleInput:
    """One module's request input. ``tokens`` is T (for moments: the T they were taken over)."""

    form: str
    data: np.ndarray
    tokens: int

    @property
    def pooled(self) -> bool:
        return self.form == "moments"


@dataclass(frozen=True)
class Energies:
    """Energies of adapters ``ids`` on one module: e (T, n), or (1, n) token means if pooled.

    ``bounds`` lists (start, stop, Bound) column blocks; empty when not tracked (baselines,
    float64 re-checks) — then the values are taken as they are.
    """

    ids: np.ndarray            # (n,) int64
    e: np.ndarray              # (T, n) float32 or float64
    pooled: bool
    bounds: tuple = ()

    @property
    def tracked(self) -> bool:
        return bool(self.bounds)

    def bound_dense(self) -> np.ndarray:
        out = np.zeros(self.e.shape)
        for lo, hi, b in self.bounds:
            out[:, lo:hi] = b.dense(self.e[:, lo:hi].astype(np.float64))
        return out

    def bound_mean(self, e_sum: np.ndarray) -> np.ndarray:
        out = np.zeros(self.e.shape[1])
        for lo, hi, b in self.bounds:
            out[lo:hi] = b.mean(e_sum[lo:hi], self.e.shape[0])
        return out

    def take(self, keep: np.ndarray) -> "Energies":
        """The columns where ``keep`` (bool, (n,)) is set; bounds are re-sliced."""
        if keep.all():
            return self
        out, pos = [], 0
        for lo, hi, b in self.bounds:
            k = keep[lo:hi]
            n = int(k.sum())
            if n:
                out.append((pos, pos + n, b.take(k)))
            pos += n
        return Energies(ids=self.ids[keep], e=self.e[:, keep], pooled=self.pooled, bounds=tuple(out))


@dataclass(frozen=True)
class ModuleView:
    """One module of a snapshot as the per-module scorers read it."""

    name: str
    row: int
    d: int
    shared_a: np.ndarray | None      # (r, d) float32
    group: int                       # -1: no shared A
    j: int                           # row within the group's table
    slots: np.ndarray                # (Ns,) slots of the shared-path adapters, library order
    shared_ids: np.ndarray           # (Ns,)
    general: GeneralBlock | None

    @property
    def rank(self) -> int:
        return 0 if self.shared_a is None else int(self.shared_a.shape[0])


def module_view(index: LibraryIndex, module: str) -> ModuleView:
    def build():
        lay = index.layout
        row = lay.row[module]
        g, j = lay.group_of.get(module, (-1, -1))
        slots = index.slots[index.table("shared")[row, index.slots]]
        return ModuleView(name=module, row=row, d=lay.d_in[module], shared_a=index.shared_a.get(module),
                          group=g, j=j, slots=slots, shared_ids=index.columns.view("ids")[slots],
                          general=index.general.get(module))
    return index.memo(("view", module), build)


def a64(index: LibraryIndex, module: str) -> np.ndarray:
    return index.memo(("A64", module), lambda: index.shared_a[module].astype(np.float64))


def _select(ids_all: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    if allowed is None:
        return np.arange(ids_all.size)
    return np.flatnonzero(np.isin(ids_all, allowed))


def weights(index: LibraryIndex, v: ModuleView, slots: np.ndarray, *, fp32: bool):
    """(K, n) Gram weights of ``slots`` on the module: a view of the table when that is most
    of it (the product runs over every slot, the caller selects), else a gathered copy.
    Returns (weights, columns of the product to keep, or None for all)."""
    table = index.table(f"{'G' if fp32 else 'W'}{v.group}")[v.j]            # (K, slots)
    if slots.size == table.shape[1] and (slots.size == 0 or slots[-1] == slots.size - 1):
        return table, None
    if 4 * slots.size < table.shape[1]:
        return table[:, slots], None
    return table, slots


def sym_feat_tokens(z: np.ndarray) -> np.ndarray:
    iu, ju = np.triu_indices(z.shape[-1])
    return z[..., iu] * z[..., ju]                                         # (..., T, K)


def sym_feat_matrix(G: np.ndarray) -> np.ndarray:
    iu, ju = np.triu_indices(G.shape[-1])
    Gs = 0.5 * (G + np.swapaxes(G, -1, -2))
    return Gs[..., iu, ju]                                                 # (..., K)


def module_moment(index: LibraryIndex, module: str, inp: ModuleInput, *, x64: np.ndarray | None = None):
    """(G, err): G = ZᵀZ/T (r, r) in float64 for the module's shared A, and a bound on ‖Ĝ − G‖_F."""
    if inp.form == "moments":
        return inp.data.astype(np.float64), 0.0
    dz = None
    if inp.form == "projected":
        z = inp.data.astype(np.float64)                                    # (T, r)
    else:
        x64 = inp.data.astype(np.float64) if x64 is None else x64
        z = x64 @ a64(index, module).T                                     # (T, d)·(d, r) -> (T, r)
        dz = bd.gamma64(x64.shape[1]) * index.layout.a_norm[module] * np.sqrt(np.einsum("td,td->t", x64, x64))
    zn2 = np.einsum("tr,tr->t", z, z)                                      # (T,)
    return z.T @ z / z.shape[0], bd.moment_error(zn2, z.shape[0], dz)


def seqr_energies(index: LibraryIndex, module: str, inp: ModuleInput, *, allowed: np.ndarray | None = None,
                  field: str = "inputs", token_mean: bool = False, precise: bool = True,
                  bounds: bool = True) -> Energies:
    """SEQR energies of the allowed adapters on one module, with rigorous error bounds.

    ``token_mean``: only mean_t e is wanted (sequence routing, linear normalisation): the
    shared-A part becomes tr(RᵢᵀRᵢ·ZᵀZ/T) — O(T·r² + K·N) in float64 instead of a T×N GEMM.
    ``precise``: z = A·x (and M·x) in float64, so the bound is set by the float32 Gram GEMM
    alone; False is the all-float32 kernel (bounds then carry γ_d·‖A‖·‖x‖ and are looser).
    ``bounds=False`` (with precise=False): the bare kernel, e only — for benchmarks.
    """
    v = module_view(index, module)
    if not bounds and not precise and not token_mean and inp.form == "activations":
        return _bare_kernel(index, v, inp, allowed)
    g_sel = _select(v.general.ids, allowed) if v.general is not None else np.zeros(0, int)
    if inp.form != "activations" and g_sel.size:
        raise InvalidArgumentError(
            f"module {module} has adapters with their own A (general path) that need "
            f"activations; send activations or restrict candidates", field=f"{field}.{inp.form}",
            actual=int(g_sel.size))
    s_slots = v.slots[_select(v.shared_ids, allowed)] if v.slots.size else v.slots
    pooled = inp.pooled or token_mean
    parts_e, parts_b, parts_ids = [], [], []
    x64 = inp.data.astype(np.float64) if inp.form == "activations" and (precise or token_mean) else None
    if s_slots.size:
        K = v.rank * (v.rank + 1) // 2
        wn, rf2 = index.table("wnorm")[v.row, s_slots], index.table("rf2")[v.row, s_slots]
        if pooled:
            G, gerr = module_moment(index, module, inp, x64=x64)
            feat = sym_feat_matrix(G)[None, :]                                 # (1, K)
            w, keep = weights(index, v, s_slots, fp32=False)
            e = feat @ w                                                       # (1, K)·(K, n) -> (1, n)
            parts_e.append(e if keep is None else e[:, keep])
            parts_b.append(bd.pooled(bd.gram_f64_columns(K, float(np.linalg.norm(feat)), gerr, wn, rf2)))
        else:
            z, delta = _token_z(index, v, inp, x64, precise)
            feat = sym_feat_tokens(z)                                          # (T, K)
            gram, keep = weights(index, v, s_slots, fp32=True)
            e = feat @ gram                                                    # (T, K)·(K, n) -> (T, n)
            parts_e.append(e if keep is None else e[:, keep])
            fz = np.sqrt(np.einsum("tk,tk->t", feat, feat, dtype=np.float64))  # (T,) ‖feat‖
            g, h = bd.gram_token_columns(K, wn, rf2)
            parts_b.append(Bound(a=fz, g=g, c=fz, h=h, delta=delta, rho=np.sqrt(rf2)))
        parts_ids.append(index.columns.view("ids")[s_slots])
    if g_sel.size:
        e, b = _general(index, v.general, g_sel, inp, x64, precise=precise or token_mean)
        if pooled:
            T = e.shape[0]
            e_sum = e.sum(axis=0, dtype=np.float64)
            e, b = (e_sum / T)[None, :], bd.pooled(b.mean(e_sum, T))
        parts_e.append(e)
        parts_b.append(b)
        parts_ids.append(v.general.ids[g_sel])
    return _merge(parts_ids, parts_e, parts_b, inp, pooled=pooled)


def _token_z(index: LibraryIndex, v: ModuleView, inp: ModuleInput, x64, precise: bool):
    """(z (T, r) float32, ‖δz_t‖ (T,)): the projection the fp32 Gram GEMM reads, and its error."""
    T = inp.data.shape[0]
    if inp.form == "projected":
        return inp.data.astype(np.float32), np.zeros(T)
    af = index.layout.a_norm[v.name]
    if precise:
        z64 = x64 @ a64(index, v.name).T                                       # (T, d)·(d, r) -> (T, r)
        return z64.astype(np.float32), bd.z_delta_precise(
            np.sqrt(np.einsum("tr,tr->t", z64, z64)), np.sqrt(np.einsum("td,td->t", x64, x64)), v.d, af)
    xn2 = np.einsum("td,td->t", inp.data, inp.data).astype(np.float64)
    return inp.data @ v.shared_a.T, bd.z_delta_fp32(xn2, v.d, af)             # (T, d)·(d, r) -> (T, r)


def _general(index: LibraryIndex, blk: GeneralBlock, g_sel: np.ndarray, inp: ModuleInput, x64,
             *, precise: bool):
    """(e (T, n), Bound) of own-A adapters: ‖M_i·x‖² with M rank-blocked rows."""
    if g_sel.size == blk.ids.size:
        rows, offs = None, blk.offsets
    else:
        rows = np.concatenate([np.arange(blk.offsets[k], blk.offsets[k + 1]) for k in g_sel])
        offs = np.concatenate([[0], np.cumsum(np.diff(blk.offsets)[g_sel])])
    T, d = inp.data.shape
    rmax = int(np.diff(offs).max())
    if precise:
        M = index.memo(("M64", id(blk)), lambda: blk.M.astype(np.float64))
        x, xn = x64, np.sqrt(np.einsum("td,td->t", x64, x64))
    else:
        M, x = blk.M, inp.data
        xn = np.sqrt(np.einsum("td,td->t", x, x).astype(np.float64) * (1 + bd.gamma(d)))
    y = x @ (M if rows is None else M[rows]).T                                 # (T, d)·(d, Σr) -> (T, Σr)
    e = np.add.reduceat(y * y, offs[:-1], axis=1)                              # (T, n)
    return e, bd.general_bound(xn, blk.mnorm[g_sel], d=d, rmax=rmax, precise=precise)


def _bare_kernel(index: LibraryIndex, v: ModuleView, inp: ModuleInput, allowed) -> Energies:
    """float32 e only: z = A·x, features of z·zᵀ, one GEMM; general adapters as ‖M·x‖²."""
    es, ids = [], []
    s_slots = v.slots[_select(v.shared_ids, allowed)] if v.slots.size else v.slots
    if s_slots.size:
        gram, keep = weights(index, v, s_slots, fp32=True)
        z = inp.data @ v.shared_a.T                                        # (T, d)·(d, r) -> (T, r)
        e = sym_feat_tokens(z) @ gram                                      # (T, K)·(K, n) -> (T, n)
        es.append(e if keep is None else e[:, keep])
        ids.append(v.shared_ids if allowed is None else index.columns.view("ids")[s_slots])
    blk = v.general
    if blk is not None:
        g_sel = _select(blk.ids, allowed)
        y = inp.data @ blk.M.T                                             # (T, d)·(d, Σr) -> (T, Σr)
        es.append(np.add.reduceat(y * y, blk.offsets[:-1], axis=1)[:, g_sel])
        ids.append(blk.ids[g_sel])
    e = es[0] if len(es) == 1 else np.concatenate(es, axis=1)
    return Energies(ids=np.concatenate(ids), e=e, pooled=False)


def _merge(ids, es, bs, inp: ModuleInput, *, pooled: bool) -> Energies:
    if not ids:
        T = 1 if pooled else inp.data.shape[0]
        return Energies(ids=np.zeros(0, np.int64), e=np.zeros((T, 0), np.float32), pooled=pooled)
    out, pos = [], 0
    for e, b in zip(es, bs):
        out.append((pos, pos + e.shape[1], b))
        pos += e.shape[1]
    e = es[0] if len(es) == 1 else np.concatenate([x.astype(np.float64) for x in es], axis=1)
    return Energies(ids=np.concatenate(ids), e=e, pooled=pooled, bounds=tuple(out))


def recheck_f64(index: LibraryIndex, module: str, inp: ModuleInput, ids: np.ndarray, *,
                tokens: np.ndarray | None = None, token_mean: bool = False) -> np.ndarray:
    """The float64 re-check: e = ‖Rᵢz‖² for adapters ``ids`` (in that order). Returns (T, n),
    (1, n) for moments or ``token_mean``. Shared-A: feat(z)·wᵢ with wᵢ the float64 Gram weights
    of Rᵢ; own A: ‖Rᵢ(Aᵢx)‖². ``tokens``: only those rows of a per-token input."""
    v = module_view(index, module)
    data = inp.data if tokens is None or inp.pooled else inp.data[tokens]
    data = data.astype(np.float64)
    pooled = inp.pooled or token_mean
    out = np.zeros((1 if pooled else data.shape[0], ids.size))
    is_sh = np.isin(ids, v.shared_ids)
    if is_sh.any():
        slots = index.slots_of(ids[is_sh])
        w = index.table(f"W{v.group}")[v.j][:, slots]                      # (K, n)
        if inp.form == "moments":
            feat = sym_feat_matrix(data)[None, :]
        else:
            z = data if inp.form == "projected" else data @ a64(index, module).T   # (T, r)
            feat = sym_feat_matrix(z.T @ z / z.shape[0])[None, :] if token_mean else sym_feat_tokens(z)
        out[:, is_sh] = feat @ w
    blk = v.general
    for c in np.flatnonzero(~is_sh):
        k = int(np.flatnonzero(blk.ids == ids[c])[0])
        y = (data @ blk.A[k].astype(np.float64).T) @ blk.R[k].T               # (T, r)·(r, r) -> (T, r)
        e = np.einsum("tr,tr->t", y, y)
        out[:, c] = e.mean() if token_mean else e
    return out
