"""Normalised dot-product kernel, its derivatives, and their contraction with pair gradients.

Kernel between two local environments whose centres share a species (zero otherwise)::

    k(p, s) = delta^2 (p_hat . s_hat)^zeta,        p_hat = p / |p|
    dk/dp   = delta^2 zeta c^(zeta-1) (s_hat - c p_hat) / |p|,   c = p_hat . s_hat

Everything in this module uses the *unit* kernel ``k_hat = k / delta^2``; the model multiplies by
``delta^2``. A feature vector of zero norm (an atom with nothing in its cutoff) has ``p_hat = 0``
and a zero kernel row and gradient.

Training needs the rows of K_NM for every label (total energy, force components, virial
components); :class:`SparseBasis` computes them per structure, streaming the per-pair gradient
blocks through one BLAS GEMM per chunk and a Cython scatter (``kmlip._ext.contract``), never a
dense (n_atoms, n_atoms, 3, F) array. Memory per structure: the pair gradients
(n_entries × 3 × F doubles) plus one GEMM chunk (bounded by ``max_chunk_bytes``) plus the
output rows (3 n_atoms + 9) × M.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from kmlip._threads import serial_blas  # first: it sets the OpenMP wait policy

# isort: split
from kmlip._ext import contract as _contract

#: "auto" precision runs the training GEMM in float32 only for species whose normalised sparse
#: points lie within this distance of their mean direction (fcc Cu MD data: 0.15; a random
#: Cu–Al alloy: 0.9, so double).
MIXED_MAX_SPREAD = 0.2


def normalize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised features and inverse norms.

    Parameters
    ----------
    X : ndarray, shape (n, F)

    Returns
    -------
    X_hat : ndarray, shape (n, F)
        ``X / |X|`` row-wise (zero rows stay zero).
    inv_norm : ndarray, shape (n,)
        ``1 / |X_i|`` (0 for zero rows, so that gradients vanish there).
    """
    X = np.asarray(X, dtype=np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", X, X))
    inv = np.zeros_like(norm)
    nz = norm > 0
    inv[nz] = 1.0 / norm[nz]
    return np.ascontiguousarray(X * inv[:, None]), inv


def _ipow(c: np.ndarray, k: int) -> np.ndarray:
    """c**k for a small non-negative integer k by repeated products (exact and fast)."""
    if k == 0:
        return np.ones_like(c)
    out = c.copy()
    for _ in range(k - 1):
        out *= c
    return out


def kernel(A_hat: np.ndarray, B_hat: np.ndarray, zeta: int) -> np.ndarray:
    """Unit kernel matrix ``(A_hat @ B_hat.T) ** zeta`` between normalised features.

    Parameters
    ----------
    A_hat : ndarray, shape (n, F)
    B_hat : ndarray, shape (m, F)
    zeta : int

    Returns
    -------
    ndarray, shape (n, m)
    """
    return _ipow(A_hat @ B_hat.T, zeta)


def kernel_gradient(p: np.ndarray, S_hat: np.ndarray, zeta: int) -> np.ndarray:
    """Gradient of the unit kernel with respect to the raw features ``p``.

    Parameters
    ----------
    p : ndarray, shape (F,)
        Raw (unnormalised) features of one environment.
    S_hat : ndarray, shape (m, F)
        Normalised sparse points.
    zeta : int

    Returns
    -------
    ndarray, shape (m, F)
        ``d k_hat(p, s_m) / d p``.
    """
    nrm = float(np.linalg.norm(p))
    if nrm == 0.0:
        return np.zeros_like(S_hat)
    ph = p / nrm
    c = S_hat @ ph
    return zeta * _ipow(c, zeta - 1)[:, None] * (S_hat - c[:, None] * ph[None, :]) / nrm


def virial_voigt(W9: np.ndarray) -> np.ndarray:
    """Symmetrised virial rows in Voigt order xx yy zz yz xz xy from (9, ...) rows W_ab."""
    W = W9.reshape((3, 3) + W9.shape[1:])
    return np.stack([W[0, 0], W[1, 1], W[2, 2], 0.5 * (W[1, 2] + W[2, 1]),
                     0.5 * (W[0, 2] + W[2, 0]), 0.5 * (W[0, 1] + W[1, 0])])


class SparseBasis:
    """Sparse environments per centre species and the kernel rows against them.

    Columns are ordered by species (in ``species_z`` order), then by sparse point; the kernel
    between different species is zero, so K_MM is block diagonal.

    Parameters
    ----------
    points : mapping int -> ndarray (M_z, F)
        Raw descriptor vectors of the sparse points of each centre species (atomic number).
    zeta : int
        Kernel exponent (>= 1).
    species_z : sequence of int, optional
        Column order of the species; default sorted atomic numbers.
    """

    def __init__(self, points: Mapping[int, np.ndarray], zeta: int, species_z=None):
        zeta = int(zeta)
        if zeta < 1:
            raise ValueError(f"zeta must be an integer >= 1, got {zeta}")
        self.zeta = zeta
        order = tuple(sorted(points)) if species_z is None else tuple(int(z) for z in species_z)
        self.species_z = tuple(z for z in order if z in points and len(points[z]) > 0)
        self.points = {z: np.ascontiguousarray(points[z], dtype=np.float64)
                       for z in self.species_z}
        F = {p.shape[1] for p in self.points.values()}
        if len(F) > 1:
            raise ValueError("sparse points of different species have different feature counts")
        self.n_features = F.pop() if F else 0
        self.points_hat = {}
        self.offsets = {}
        col = 0
        for z in self.species_z:
            self.points_hat[z] = normalize(self.points[z])[0]
            self.offsets[z] = col
            col += self.points[z].shape[0]
        self.n_sparse = col

    def spread(self, z: int) -> float:
        """Largest distance of a normalised sparse point of species z from their mean."""
        # cached like _centred32: training asks once per structure, and the norms of all M_z
        # points were a serial pass of 2% of a fit
        cache = self.__dict__.setdefault("_spread", {})
        if z not in cache:
            u = self._centred32(z)[0]
            cache[z] = float(np.max(np.linalg.norm(self.points_hat[z] - u, axis=1)))
        return cache[z]

    def _scratch(self, name: str, shape: tuple[int, int], dtype) -> np.ndarray:
        """A C-contiguous array view of a buffer kept between calls (grown when too small).

        Training calls :meth:`derivative_rows` once per structure; reusing its GEMM buffers
        saves faulting in fresh pages every time, which costs as much as the GEMM itself on
        some machines. :meth:`release_scratch` frees them.
        """
        # one set of buffers per thread: training may compute several structures at once
        cache = self.__dict__.setdefault("_scratch_bufs", {}).setdefault(
            threading.get_ident(), {})
        n = int(shape[0]) * int(shape[1])
        buf = cache.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = cache[name] = np.empty(max(n, 1), dtype=dtype)
        return buf[:n].reshape(shape)

    def release_scratch(self) -> None:
        """Frees the buffers kept by :meth:`_scratch`."""
        self.__dict__.pop("_scratch_bufs", None)

    def _centred32(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(u, float32 S_hat - u) of species z, u the mean sparse direction (mixed precision:
        the float32 GEMM then only carries the spread of the sparse points around u)."""
        cache = self.__dict__.setdefault("_c32", {})
        if z not in cache:
            u = np.ascontiguousarray(self.points_hat[z].mean(axis=0))
            cache[z] = (u, np.ascontiguousarray(self.points_hat[z] - u, dtype=np.float32))
        return cache[z]

    def columns(self, z: int) -> slice:
        """Column range of species ``z``."""
        o = self.offsets[z]
        return slice(o, o + self.points[z].shape[0])

    def column_species(self) -> np.ndarray:
        """Atomic number of the centre of every column, shape (M,)."""
        out = np.empty(self.n_sparse, dtype=np.int64)
        for z in self.species_z:
            out[self.columns(z)] = z
        return out

    def kmm(self) -> np.ndarray:
        """Unit kernel among sparse points, shape (M, M) (block diagonal by species)."""
        K = np.zeros((self.n_sparse, self.n_sparse))
        with serial_blas():  # the same bits for any thread count
            for z in self.species_z:
                s = self.columns(z)
                K[s, s] = kernel(self.points_hat[z], self.points_hat[z], self.zeta)
        return K

    def local_rows(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Unit kernel of every atom's environment with every sparse point, shape (n_atoms, M)."""
        Xh, _ = normalize(X)
        out = np.zeros((X.shape[0], self.n_sparse))
        for z in self.species_z:
            rows = np.flatnonzero(Z == z)
            if rows.size:
                out[rows, self.columns(z)] = kernel(Xh[rows], self.points_hat[z], self.zeta)
        return out

    def energy_row(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Unit kernel row of a total energy: sum over atoms of :meth:`local_rows`, shape (M,)."""
        Xh, _ = normalize(X)
        out = np.zeros(self.n_sparse)
        with serial_blas():  # no BLAS threads left spinning beside the OpenMP kernels
            for z in self.species_z:
                rows = np.flatnonzero(Z == z)
                if rows.size:
                    out[self.columns(z)] = kernel(Xh[rows], self.points_hat[z],
                                                  self.zeta).sum(0)
        return out

    def derivative_rows(self, X: np.ndarray, Z: np.ndarray, G, n_threads: int | None = None,
                        max_chunk_bytes: int = 64 << 20, precision: str = "double",
                        n_atoms: int | None = None):
        """Unit kernel rows of force components and virial components.

        Parameters
        ----------
        X : ndarray, shape (n_atoms, F)
        Z : ndarray of int, shape (n_atoms,)
        G : PairGradients
        n_threads : int or None
            OpenMP threads of the scatter (BLAS threads are the caller's business).
        max_chunk_bytes : int
            Bound on the GEMM output buffer (3 entries × M_z doubles per entry).
        precision : {"double", "mixed", "auto"}
            "mixed" runs the GEMM ``values @ S_hat^T`` in float32 on sparse points centred on
            their mean direction u (about twice as fast; see contract_core.h); every
            accumulation stays in double. "auto" uses "mixed" for a species whose sparse points
            all lie within ``MIXED_MAX_SPREAD`` of u (then the float32 rounding is at most that
            fraction of a plain float32 GEMM's), "double" otherwise.
        n_atoms : int, optional
            Atoms of the structure (default: one environment per atom, ``len(X)``).

        Returns
        -------
        force_rows : ndarray, shape (3 n_atoms, M)
            Row ``3 j + a`` is the unit kernel row of the force component ``F_{j,a}``
            (``-d/dr_{j,a}`` of the total-energy row).
        virial_rows : ndarray, shape (9, M)
            Row ``3 a + b`` is ``d/d eps_ab`` of the total-energy row (unsymmetrised; see
            :func:`virial_voigt`).
        """
        n = X.shape[0]
        Xh, inv = normalize(X)
        outF = np.zeros((3 * (n if n_atoms is None else int(n_atoms)), self.n_sparse))
        outW = np.zeros((9, self.n_sparse))
        if self.n_sparse == 0 or G.n_entries == 0:
            return outF, outW
        centers = np.asarray(G.centers, dtype=np.int64)
        neighbors = np.asarray(G.neighbors, dtype=np.int64)
        vectors = np.asarray(G.vectors, dtype=np.float64)
        values = G.values
        F = values.shape[2]
        zeta = self.zeta
        if precision not in ("double", "mixed", "auto"):
            raise ValueError(f"precision must be 'double', 'mixed' or 'auto', got {precision!r}")
        Zc = Z[centers]
        for z in self.species_z:
            rows = np.flatnonzero(Z == z)
            if rows.size == 0:
                continue
            Sh = self.points_hat[z]
            mixed = precision == "mixed" or (precision == "auto"
                                             and self.spread(z) <= MIXED_MAX_SPREAD)
            cl_map = np.full(n, -1, dtype=np.int64)
            cl_map[rows] = np.arange(rows.size)
            C = np.empty((rows.size, Sh.shape[0]))
            with serial_blas():
                _contract.gemm(np.ascontiguousarray(Xh[rows]), Sh, C, True, n_threads)
            A = zeta * _ipow(C, zeta - 1) * inv[rows, None]
            AC = A * C
            idx = np.flatnonzero(Zc == z)
            if idx.size == 0:
                continue
            contiguous = idx[-1] - idx[0] + 1 == idx.size
            step = max(1, int(max_chunk_bytes // ((12 if mixed else 24) * Sh.shape[0])))
            for s0 in range(0, idx.size, step):
                if contiguous:
                    sl = slice(idx[0] + s0, idx[0] + min(s0 + step, idx.size))
                    vals = values[sl]
                    ce, nb, vec = centers[sl], neighbors[sl], vectors[sl]
                else:
                    part = idx[s0:s0 + step]
                    vals = values[part]
                    ce, nb, vec = centers[part], neighbors[part], vectors[part]
                vals = np.ascontiguousarray(vals)
                ce = np.ascontiguousarray(ce)
                V2 = vals.reshape(-1, F)
                pv = np.empty((ce.size, 3))
                # pv (and in mixed precision hu and the float32 copy) in one parallel pass
                if mixed:
                    u, D32 = self._centred32(z)
                    hu = np.empty((ce.size, 3))
                    V32 = self._scratch("v32", V2.shape, np.float32)
                    _contract.row_prep(vals, Xh, ce, u, pv, hu, V32, n_threads)
                else:
                    _contract.row_prep(vals, Xh, ce, None, pv, None, None, n_threads)
                args = (A, AC, pv, np.ascontiguousarray(cl_map[ce]), np.ascontiguousarray(nb),
                        np.ascontiguousarray(vec), self.offsets[z], outF, outW, n_threads)
                # GEMM and scatter in one OpenMP loop over blocks of sparse points, each block
                # multiplied by a single-threaded BLAS call (fixed blocks: the same bits for
                # any thread count; no BLAS threads spinning beside the OpenMP team).
                with serial_blas():
                    if mixed:
                        H = self._scratch("h32", (V2.shape[0], Sh.shape[0]), np.float32)
                        _contract.gemm_scatter_force_rows_f32(V32, D32, H, hu, *args)
                    else:
                        H = self._scratch("h64", (V2.shape[0], Sh.shape[0]), np.float64)
                        _contract.gemm_scatter_force_rows(V2, Sh, H, *args)
                del H
        return outF, outW

    def local_energy_grad(self, X: np.ndarray, Z: np.ndarray, alpha: np.ndarray):
        """Unit local energies ``sum_m alpha_m k_hat(p_i, s_m)`` and their feature gradients.

        Parameters
        ----------
        X : ndarray, shape (n_atoms, F)
        Z : ndarray of int, shape (n_atoms,)
        alpha : ndarray, shape (M,)

        Returns
        -------
        eps : ndarray, shape (n_atoms,)
        v : ndarray, shape (n_atoms, F)
            ``d eps_i / d X_i``.
        """
        Xh, inv = normalize(X)
        eps = np.zeros(X.shape[0])
        v = np.zeros_like(Xh)
        for z in self.species_z:
            rows = np.flatnonzero(Z == z)
            if rows.size == 0:
                continue
            Sh = self.points_hat[z]
            C = Xh[rows] @ Sh.T
            w = _ipow(C, self.zeta - 1) * alpha[self.columns(z)][None, :]
            e = np.einsum("ij,ij->i", w, C)
            eps[rows] = e
            v[rows] = (self.zeta * inv[rows])[:, None] * (w @ Sh - e[:, None] * Xh[rows])
        return eps, v

    def evaluate(self, X: np.ndarray, Z: np.ndarray, alpha: np.ndarray, grad: bool = True,
                 rows: bool = False, n_threads: int | None = None):
        """Local energies, optionally their gradients and the kernel rows, from one product
        ``X_hat @ S_hat^T`` per species (what a prediction needs).

        The two products per species run in kmlip's OpenMP loop over fixed row blocks
        (:func:`kmlip._ext.contract.gemm`), so they use ``n_threads`` threads whatever BLAS is
        limited to, and give the same bits for any thread count.

        Parameters
        ----------
        X : ndarray, shape (n_atoms, F)
        Z : ndarray of int, shape (n_atoms,)
        alpha : ndarray, shape (M,)
        grad : bool
            Also return ``d eps_i / d X_i``.
        rows : bool
            Also return the unit kernel rows.
        n_threads : int or None
            Threads of the products (None: OMP_NUM_THREADS; small products use one).

        Returns
        -------
        eps : ndarray, shape (n_atoms,)
            Unit local energies ``sum_m alpha_m k_hat(p_i, s_m)``.
        v : ndarray, shape (n_atoms, F), or None
            ``d eps_i / d X_i`` when ``grad``.
        K : ndarray, shape (n_atoms, M), or None
            Unit kernel rows (as :meth:`local_rows`) when ``rows``.
        """
        Xh, inv = normalize(X)
        n = X.shape[0]
        eps = np.zeros(n)
        v = np.zeros_like(Xh) if grad else None
        K = np.zeros((n, self.n_sparse)) if rows else None
        alpha = np.asarray(alpha, dtype=np.float64)
        with serial_blas():  # the blocked products call BLAS from every OpenMP thread
            for z in self.species_z:
                self._evaluate_species(z, Xh, inv, Z, alpha, eps, v, K, n_threads)
        return eps, v, K

    def _evaluate_species(self, z, Xh, inv, Z, alpha, eps, v, K, n_threads):
        """One species block of :meth:`evaluate`: fills eps, v (if not None), K (if not None)
        in place."""
        idx = np.flatnonzero(Z == z)
        if idx.size == 0:
            return
        every = idx.size == Xh.shape[0]
        Xz = Xh if every else np.ascontiguousarray(Xh[idx])
        Sh = self.points_hat[z]
        cols = self.columns(z)
        C = np.empty((idx.size, Sh.shape[0]))
        _contract.gemm(Xz, Sh, C, True, n_threads)
        # w = alpha C^(zeta-1), e = sum w C and the rows C^zeta in one parallel pass
        w = np.empty_like(C)
        e = _contract.kernel_weights(C, np.ascontiguousarray(alpha[cols]), self.zeta, K,
                                     idx.astype(np.int64), cols.start, w, n_threads)
        eps[idx] = e
        if v is not None:
            G = np.empty_like(Xz)
            _contract.gemm(w, Sh, G, False, n_threads)
            G -= e[:, None] * Xz
            G *= (self.zeta * inv[idx])[:, None]
            v[idx] = G

    def local_energies(self, X: np.ndarray, Z: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """Unit local energies only, shape (n_atoms,)."""
        return self.local_rows(X, Z) @ alpha

    # -- prior variances (the interface shared with kmlip.pair_kernel.PairSEBasis) ----------
    def cross(self, XA, ZA, XB, ZB) -> np.ndarray:
        """Unit kernel between two sets of environments, (n_A, n_B)."""
        Ah, _ = normalize(XA)
        Bh, _ = normalize(XB)
        out = np.zeros((XA.shape[0], XB.shape[0]))
        for z in np.intersect1d(ZA, ZB):
            a, b = np.flatnonzero(ZA == z), np.flatnonzero(ZB == z)
            out[np.ix_(a, b)] = kernel(Ah[a], Bh[b], self.zeta)
        return out

    def self_kernel(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Unit prior variance of each local energy: 1, or 0 for an empty environment."""
        Xh, _ = normalize(X)
        return np.einsum("ij,ij->i", Xh, Xh)

    def energy_prior(self, X: np.ndarray, Z: np.ndarray) -> float:
        """Unit prior variance of the sum of the local energies."""
        return energy_prior_variance(X, Z, self.zeta)

    def gradient_weights(self, X: np.ndarray, centers: np.ndarray, D: np.ndarray) -> np.ndarray:
        """Isotropic factor of the local-energy gradient's prior covariance, spread by pair
        gradient blocks: ``zeta |P_i D_k|^2 / |p_i|^2`` (``P_i = I - p_hat p_hat^T``) for block
        ``D_k = d p_i / d r_j`` (k, 3, F) of centre ``i = centers[k]``; see
        :func:`kmlip.uncertainty.force_variance_diag`. Returns (k,)."""
        Xh, inv = normalize(X)
        along = np.einsum("kaf,kf->ka", D, Xh[centers])
        w = np.einsum("kaf,kaf->k", D, D) - np.einsum("ka,ka->k", along, along)
        return self.zeta * np.maximum(w, 0.0) * inv[centers] ** 2

    def force_prior_variance(self, X: np.ndarray, Z: np.ndarray, G,
                             n_atoms: int) -> np.ndarray:
        """Unit prior variance of every force component, (n_atoms, 3)."""
        return force_prior_variance(X, Z, G, self.zeta)


def contract_forces(G, v: np.ndarray, n_atoms: int, n_threads: int | None = None):
    """Forces and virial of an energy ``sum_i eps_i(X_i)`` from ``v_i = d eps_i / d X_i``.

    Parameters
    ----------
    G : PairGradients
    v : ndarray, shape (n_atoms, F)
    n_atoms : int
    n_threads : int or None

    Returns
    -------
    forces : ndarray, shape (n_atoms, 3)
        ``-dE/dr`` (eV/Å if eps is in eV).
    virial : ndarray, shape (3, 3)
        ``dE/d eps_ab`` (eV), unsymmetrised; stress = sym(virial) / V.
    """
    if G.n_entries == 0:
        return np.zeros((n_atoms, 3)), np.zeros((3, 3))
    f = _contract.pair_forces(np.ascontiguousarray(G.values, dtype=np.float64),
                              np.ascontiguousarray(G.centers, dtype=np.int64),
                              np.ascontiguousarray(v, dtype=np.float64), n_threads)
    return _contract.forces_virial(f, np.ascontiguousarray(G.neighbors, dtype=np.int64),
                                   np.ascontiguousarray(G.vectors, dtype=np.float64), n_atoms)


def energy_prior_variance(X: np.ndarray, Z: np.ndarray, zeta: int, chunk: int = 1024) -> float:
    """Unit prior variance of a total energy: sum over same-species atom pairs of k_hat.

    O(n_atoms^2 F) time, computed in row chunks so that memory stays O(chunk × n_atoms).
    """
    Xh, _ = normalize(X)
    total = 0.0
    for z in np.unique(Z):
        A = Xh[Z == z]
        for s in range(0, A.shape[0], chunk):
            total += float(kernel(A[s:s + chunk], A, zeta).sum())
    return total


def force_prior_variance(X: np.ndarray, Z: np.ndarray, G, zeta: int) -> np.ndarray:
    """Unit prior variance of every force component, shape (n_atoms, 3).

    ``Var F_{j,a} = sum_{i, i'} g_{ija}^T H(p_i, p_i') g_{i'ja}`` over centres i, i' of the same
    species whose environments contain j, with ``g_{ija} = d p_i / d r_{j,a}`` (images summed)
    and the mixed second derivative of the unit kernel::

        H(p, q) = zeta / (|p||q|) [(zeta-1) c^(zeta-2) (P_p q_hat)(P_q p_hat)^T
                                    + c^(zeta-1) P_p P_q],   P_p = I - p_hat p_hat^T.

    Exact; costs sum_j n_j^2 × 3 × F for n_j centres seeing atom j.
    """
    n = X.shape[0]
    Xh, inv = normalize(X)
    out = np.zeros((n, 3))
    if G.n_entries == 0:
        return out
    key = np.asarray(G.neighbors, dtype=np.int64) * n + np.asarray(G.centers, dtype=np.int64)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    agg = np.add.reduceat(G.values[order], starts, axis=0)  # (n_pairs, 3, F), images summed
    uk = ks[starts]
    jj, ii = uk // n, uk % n
    bounds = np.searchsorted(jj, np.arange(n + 1))
    for j in range(n):
        lo, hi = bounds[j], bounds[j + 1]
        if lo == hi:
            continue
        I_all = ii[lo:hi]
        U_all = agg[lo:hi]
        for z in np.unique(Z[I_all]):
            m = Z[I_all] == z
            I, U = I_all[m], U_all[m]
            P = Xh[I]
            c = P @ P.T
            w = inv[I]
            ww = np.outer(w, w)
            up = np.einsum("iaf,if->ia", U, P)
            Pu = U - P[:, None, :] * up[:, :, None]
            cz1 = _ipow(c, zeta - 1)
            for a in range(3):
                Ua = U[:, a, :]
                UP = Ua @ P.T  # [i, i'] = u_i . p_hat_i'
                tot = cz1 * (Pu[:, a, :] @ Pu[:, a, :].T)
                if zeta > 1:
                    T1 = UP - c * up[:, a][:, None]
                    T2 = UP.T - c * up[:, a][None, :]
                    tot = tot + (zeta - 1) * _ipow(c, zeta - 2) * T1 * T2
                out[j, a] += zeta * float(np.sum(ww * tot))
    return out


def structure_kernel(XA: np.ndarray, ZA: np.ndarray, XB: np.ndarray, ZB: np.ndarray,
                     zeta: int) -> float:
    """Unit kernel between the total energies of two structures (for tests and full GPs)."""
    Ah, _ = normalize(XA)
    Bh, _ = normalize(XB)
    total = 0.0
    for z in np.intersect1d(ZA, ZB):
        total += float(kernel(Ah[ZA == z], Bh[ZB == z], zeta).sum())
    return total
