"""GAP's two-body kernel: a squared exponential on pair distances, weighted by a smooth cutoff.

Unit kernel (the model multiplies by its term's ``delta^2``) between two pair environments of
the same species pair, distances ``r`` and ``s`` (Å)::

    k_hat(r, s) = fc(r) fc(s) exp(-(r - s)^2 / (2 theta^2)),

``fc`` a cosine going from 1 at ``r_cut - cutoff_width`` to 0 at ``r_cut`` (so a pair's energy
vanishes smoothly as it leaves the cutoff); zero between different species pairs.
:class:`PairSEBasis` offers the interface of :class:`kmlip.kernels.SparseBasis` (kernel rows of
energies, forces and virials against the sparse points, evaluation, prior variances), so the GP
treats both alike. Features are one column, the distance; everything is O(n_pairs × M).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp


class PairSEBasis:
    """Sparse pair distances per species pair and the kernel rows against them.

    Parameters
    ----------
    points : mapping int -> ndarray (M_k, 1)
        Sparse distances (Å) of each species-pair key.
    theta : float
        Length scale, Å.
    r_cut, cutoff_width : float
        Cutoff and width of its cosine transition, Å.
    keys : sequence of int, optional
        Column order of the keys (default sorted).
    """

    zeta = None

    def __init__(self, points: Mapping[int, np.ndarray], theta: float, r_cut: float,
                 cutoff_width: float, keys=None):
        order = tuple(sorted(points)) if keys is None else tuple(int(k) for k in keys)
        self.species_z = tuple(k for k in order if k in points and len(points[k]) > 0)
        self.points = {k: np.ascontiguousarray(np.reshape(points[k], (-1, 1)), dtype=np.float64)
                       for k in self.species_z}
        self.theta, self.r_cut, self.cutoff_width = float(theta), float(r_cut), \
            float(cutoff_width)
        self.n_features = 1
        self.offsets = {}
        col = 0
        for k in self.species_z:
            self.offsets[k] = col
            col += self.points[k].shape[0]
        self.n_sparse = col

    # -- layout -------------------------------------------------------------------------------
    def columns(self, key: int) -> slice:
        o = self.offsets[key]
        return slice(o, o + self.points[key].shape[0])

    def column_species(self) -> np.ndarray:
        out = np.empty(self.n_sparse, dtype=np.int64)
        for k in self.species_z:
            out[self.columns(k)] = k
        return out

    def release_scratch(self) -> None:
        """Nothing is kept between calls."""

    # -- kernel pieces ------------------------------------------------------------------------
    def cutoff(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fc(r) and fc'(r)."""
        r = np.asarray(r, dtype=np.float64)
        r0 = self.r_cut - self.cutoff_width
        x = np.clip((r - r0) / self.cutoff_width, 0.0, 1.0)
        fc = 0.5 * (1.0 + np.cos(np.pi * x))
        dfc = np.where((r > r0) & (r < self.r_cut),
                       -0.5 * np.pi / self.cutoff_width * np.sin(np.pi * x), 0.0)
        return fc, dfc

    def _pieces(self, r: np.ndarray, s: np.ndarray):
        """k_hat (n, m), d k_hat / d r (n, m) for distances r (n,) and sparse distances s (m,)."""
        fr, dfr = self.cutoff(r)
        fs, _ = self.cutoff(s)
        u = r[:, None] - s[None, :]
        e = np.exp(-0.5 * u * u / self.theta**2) * fs[None, :]
        K = fr[:, None] * e
        dK = dfr[:, None] * e - K * u / self.theta**2
        return K, dK

    def kmm(self) -> np.ndarray:
        """Unit kernel among the sparse points, (M, M), block diagonal by key."""
        K = np.zeros((self.n_sparse, self.n_sparse))
        for k in self.species_z:
            s = self.columns(k)
            p = self.points[k][:, 0]
            K[s, s] = self._pieces(p, p)[0]
        return K

    def _blocks(self, keys: np.ndarray):
        for k in self.species_z:
            idx = np.flatnonzero(keys == k)
            if idx.size:
                yield k, idx

    def local_rows(self, X: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Unit kernel rows of every environment, (n_env, M)."""
        out = np.zeros((X.shape[0], self.n_sparse))
        for k, idx in self._blocks(keys):
            out[idx, self.columns(k)] = self._pieces(X[idx, 0], self.points[k][:, 0])[0]
        return out

    def energy_row(self, X: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Unit kernel row of the total energy, (M,)."""
        out = np.zeros(self.n_sparse)
        for k, idx in self._blocks(keys):
            out[self.columns(k)] = self._pieces(X[idx, 0], self.points[k][:, 0])[0].sum(0)
        return out

    def _row_derivatives(self, X, keys) -> np.ndarray:
        dK = np.zeros((X.shape[0], self.n_sparse))
        for k, idx in self._blocks(keys):
            dK[idx, self.columns(k)] = self._pieces(X[idx, 0], self.points[k][:, 0])[1]
        return dK

    def derivative_rows(self, X: np.ndarray, keys: np.ndarray, G, n_threads=None,
                        max_chunk_bytes: int = 0, precision: str = "double",
                        n_atoms: int | None = None):
        """Unit kernel rows of force components (3 n_atoms, M) and virial components (9, M),
        as :meth:`kmlip.kernels.SparseBasis.derivative_rows`."""
        n_atoms = X.shape[0] if n_atoms is None else int(n_atoms)
        outF = np.zeros((3 * n_atoms, self.n_sparse))
        outW = np.zeros((9, self.n_sparse))
        if self.n_sparse == 0 or G.n_entries == 0:
            return outF, outW
        dK = self._row_derivatives(X, keys)
        P = G.values[:, :, 0]
        ce, nb = np.asarray(G.centers), np.asarray(G.neighbors)
        n_env = X.shape[0]
        rows = (3 * nb[:, None] + np.arange(3)[None, :]).ravel()
        S = sp.csr_matrix((-P.ravel(), (rows, np.repeat(ce, 3))), shape=(3 * n_atoms, n_env))
        outF = np.asarray(S @ dK)
        Wv = (P[:, :, None] * G.vectors[:, None, :]).reshape(-1, 9)
        T = sp.csr_matrix((Wv.ravel(), (np.tile(np.arange(9), len(ce)), np.repeat(ce, 9))),
                          shape=(9, n_env))
        outW = np.asarray(T @ dK)
        return outF, outW

    def evaluate(self, X: np.ndarray, keys: np.ndarray, alpha: np.ndarray, grad: bool = True,
                 rows: bool = False, n_threads=None):
        """Unit local energies (n_env,), their derivatives by the distance (n_env, 1) and the
        unit kernel rows (n_env, M), as :meth:`kmlip.kernels.SparseBasis.evaluate`."""
        n = X.shape[0]
        eps = np.zeros(n)
        v = np.zeros((n, 1)) if grad else None
        K = np.zeros((n, self.n_sparse)) if rows else None
        alpha = np.asarray(alpha, dtype=np.float64)
        for k, idx in self._blocks(keys):
            cols = self.columns(k)
            Kk, dKk = self._pieces(X[idx, 0], self.points[k][:, 0])
            eps[idx] = Kk @ alpha[cols]
            if grad:
                v[idx, 0] = dKk @ alpha[cols]
            if rows:
                K[idx, cols] = Kk
        return eps, v, K

    # -- prior variances ----------------------------------------------------------------------
    def cross(self, XA, kA, XB, kB) -> np.ndarray:
        """Unit kernel between two sets of environments, (n_A, n_B)."""
        out = np.zeros((XA.shape[0], XB.shape[0]))
        for k in self.species_z:
            a, b = np.flatnonzero(kA == k), np.flatnonzero(kB == k)
            if a.size and b.size:
                out[np.ix_(a, b)] = self._pieces(XA[a, 0], XB[b, 0])[0]
        return out

    def self_kernel(self, X: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Unit prior variance of each environment's local energy, fc(r)^2, (n_env,)."""
        fc = self.cutoff(X[:, 0])[0]
        return np.where(np.isin(keys, self.species_z), fc * fc, 0.0)

    def energy_prior(self, X: np.ndarray, keys: np.ndarray) -> float:
        """Unit prior variance of the sum of all local energies."""
        return float(self.cross(X, keys, X, keys).sum())

    def gradient_weights(self, X: np.ndarray, centers: np.ndarray, D: np.ndarray) -> np.ndarray:
        """Isotropic factor of a pair's local-energy gradient at the prior, spread by its
        gradient blocks: ``|D_k|^2 (1/theta^2 + (fc'/fc)^2)``, the ratio of
        ``d^2 k / dr dr'`` at ``r = r'`` to ``k(r, r)``; see
        :func:`kmlip.uncertainty.force_variance_diag`. Returns (k,)."""
        fc, dfc = self.cutoff(X[:, 0])
        ratio = np.divide(dfc, fc, out=np.zeros_like(fc), where=fc > 0)
        return np.einsum("kaf,kaf->k", D, D) * (1.0 / self.theta ** 2 + ratio[centers] ** 2)

    def force_prior_variance(self, X: np.ndarray, keys: np.ndarray, G,
                             n_atoms: int) -> np.ndarray:
        """Unit prior variance of every force component, (n_atoms, 3): ``sum_{e,e'}
        g_e g_e' d^2 k_hat(r_e, r_e') / dr dr'`` over the pairs containing the atom."""
        out = np.zeros((n_atoms, 3))
        if G.n_entries == 0:
            return out
        r = X[:, 0]
        fc, dfc = self.cutoff(r)
        ce, nb = np.asarray(G.centers), np.asarray(G.neighbors)
        P = G.values[:, :, 0]
        t2 = self.theta**2
        order = np.argsort(nb, kind="stable")
        bounds = np.searchsorted(nb[order], np.arange(n_atoms + 1))
        for j in range(n_atoms):
            ent = order[bounds[j]:bounds[j + 1]]
            if ent.size == 0:
                continue
            e = ce[ent]
            ke = keys[e]
            u = r[e][:, None] - r[e][None, :]
            ex = np.exp(-0.5 * u * u / t2) * (ke[:, None] == ke[None, :]) \
                * np.isin(ke, self.species_z)[:, None]
            a, da = fc[e], dfc[e]
            H = (np.outer(da, da) + np.outer(da, a) * (u / t2) - np.outer(a, da) * (u / t2)
                 + np.outer(a, a) * (1.0 / t2 - u * u / t2**2)) * ex
            Pj = P[ent]
            out[j] = np.einsum("ka,kl,la->a", Pj, H, Pj)
        return out


__all__ = ["PairSEBasis"]
