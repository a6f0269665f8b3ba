"""Projected-process (DTC) sparse GP solve, as in GAP, by streaming QR.

Notation (all kernels *unit*: ``k = delta^2 k_hat``)::

    labels y_c of class c (energy, forces, virial), noise sigma_row = sigma_c * s_row
    K_hat_c   unit kernel rows of the labels of class c against the M sparse points
    L_hat L_hat^T = K_hat_MM + jitter I

Data pass: for each class c keep only ``T_c``, the (<= M+1) x (M+1) triangular factor of the
streaming QR of ``[K_hat_c / s | y_c / s]`` (rows divided by their relative noise ``s_row``),
updated block by block: ``T_c <- R([T_c; new block])``. Memory is O(M^2 + block) for any number
of labels and numerics are those of QR (never normal equations, never an inverse).
With ``R_c = T_c[:, :M]`` and ``z_c = T_c[:, M]``: ``R_c^T R_c = K_hat_c^T S^-2 K_hat_c``,
``R_c^T z_c = K_hat_c^T S^-2 y_c`` and ``|z_c|^2 = y_c^T S^-2 y_c``.

Solve for any (delta, sigma_E, sigma_F, sigma_V), O(M^3), no data pass: QR of the small stack ::

    [ delta^2 R_c / sigma_c | z_c / sigma_c ]   for every class c
    [ delta   L_hat^T       | 0             ]   =  Q [[R, q], [0, rho]]

gives ``alpha = R^-1 q`` (weights of the full kernel, ``eps_i = sum_m alpha_m k(p_i, s_m)``),
``R^T R = K_MM + K_MN Lambda^-1 K_NM`` (the posterior precision in the sparse basis) and
``rho^2 = y^T Lambda^-1 y - b^T Sigma b`` (Woodbury), so the log marginal likelihood is ::

    log p(y) = -1/2 [rho^2 + log|Lambda| + 2 sum log|R_ii| - 2 M log delta - 2 sum log L_hat_ii
                     + N log 2 pi]

(determinant lemma). Its gradient with respect to log delta and log sigma_c is analytic (see
:func:`solve_stack`), which makes hyperparameter optimisation cheap.

Classes whose noise was given per structure (``atoms.info['energy_sigma']`` etc., absolute as in
GAP) are kept apart with a fixed sigma of 1 (their rows are divided by the absolute sigma), so
optimising sigma_E never rescales them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

#: Label classes whose noise scale is a hyperparameter, and their fixed-noise counterparts.
FREE_CLASSES = ("energy", "forces", "virial")
FIXED_CLASSES = ("energy_fixed", "forces_fixed", "virial_fixed")


def _qr_r(A: np.ndarray) -> np.ndarray:
    """Upper-triangular factor of a QR, shape (min(m, n), n); A is overwritten."""
    m, n = A.shape
    if m == 0:
        return np.zeros((0, n))
    R = sla.qr(A, mode="r", overwrite_a=True, check_finite=False)[0]
    return np.triu(R[: min(m, n)])


@dataclass
class ClassFactor:
    """Streaming QR factor of one label class.

    Attributes
    ----------
    T : ndarray, shape (k, M + 1), k <= M + 1
        Triangular factor of ``[K_hat / s | y / s]``.
    n_rows : int
        Number of labels accumulated.
    log_scale_sum : float
        ``sum log s_row`` (for log|Lambda|).
    """

    T: np.ndarray
    n_rows: int = 0
    log_scale_sum: float = 0.0


@dataclass
class StreamingQR:
    """Accumulates label rows per class and folds them into triangular factors by blocks.

    Parameters
    ----------
    n_sparse : int
        Number of columns M.
    block_rows : int
        Rows buffered per class before a QR update (memory ~ 8 (block_rows + M) (M + 1) bytes).
    n_threads : int or None
        Threads of the QR updates (None: OMP_NUM_THREADS).

    Notes
    -----
    Once a class has M + 1 rows, a full buffer is split into two halves folded into two
    triangular accumulators at once (LAPACK dtpqrt in kmlip's OpenMP loop, single-threaded
    BLAS each); :meth:`finalize` merges the second into the first. The split does not depend
    on the thread count, so neither do the bits of the factors; threaded LAPACK would round
    differently for each thread count and, on a busy machine, wait on its spinning threads.
    """

    n_sparse: int
    block_rows: int = 8192
    n_threads: int | None = None
    factors: dict = field(default_factory=dict)
    _buf: dict = field(default_factory=dict)
    _buf_n: dict = field(default_factory=dict)
    _extra: dict = field(default_factory=dict)

    def add(self, cls: str, K_rows: np.ndarray, y: np.ndarray, scale: np.ndarray) -> None:
        """Adds labels of class ``cls``.

        Parameters
        ----------
        cls : str
            One of :data:`FREE_CLASSES` or :data:`FIXED_CLASSES`.
        K_rows : ndarray, shape (n, M)
            Unit kernel rows of the labels.
        y : ndarray, shape (n,)
            Label values (minus e0 and baseline).
        scale : ndarray, shape (n,)
            Noise of each row relative to its class sigma (absolute sigma for fixed classes).
        """
        if cls not in FREE_CLASSES + FIXED_CLASSES:
            raise ValueError(f"unknown label class {cls!r}")
        K_rows = np.asarray(K_rows, dtype=np.float64)
        n = K_rows.shape[0]
        if n == 0:
            return
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,))
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"noise levels of class {cls!r} must be finite and > 0")
        if cls not in self.factors:
            self.factors[cls] = ClassFactor(np.zeros((0, self.n_sparse + 1)))
        f = self.factors[cls]
        f.n_rows += n
        f.log_scale_sum += float(np.sum(np.log(scale)))
        y = np.asarray(y, dtype=np.float64)
        done = 0
        while done < n:
            buf = self._buf.get(cls)
            r = self._buf_n.get(cls, 0)
            need = min(self.block_rows, r + n - done)
            if buf is None or buf.shape[0] < need:
                # One Fortran-order buffer per class, written straight into the array LAPACK
                # factorises (no list of blocks, no stacked copy); it grows by doubling up to
                # block_rows, so a class with few rows (energies) stays small.
                cap = need if buf is None else min(self.block_rows,
                                                  max(need, 2 * buf.shape[0]))
                new = np.empty((cap, self.n_sparse + 1), order="F")
                if buf is not None and r:
                    new[:r] = buf[:r]
                buf = self._buf[cls] = new
                self._buf_n[cls] = r
            take = min(n - done, self.block_rows - r)
            sl = slice(done, done + take)
            buf[r:r + take, :-1] = K_rows[sl] / scale[sl, None]
            buf[r:r + take, -1] = y[sl] / scale[sl]
            self._buf_n[cls] = r + take
            done += take
            if self._buf_n[cls] == self.block_rows:
                self._flush(cls)

    #: Fewest rows per half for a split update (below, one update: the split would not pay).
    SPLIT_MIN_ROWS = 256

    def _flush(self, cls: str) -> None:
        from kmlip._ext import contract
        from kmlip._threads import serial_blas

        buf = self._buf.get(cls)
        r = self._buf_n.get(cls, 0)
        if buf is None or r == 0:
            return
        f = self.factors[cls]
        n1 = self.n_sparse + 1
        k = f.T.shape[0]
        B = buf if r == buf.shape[0] else np.asfortranarray(buf[:r])
        if k + r < n1:
            # a class with fewer labels than columns keeps a trapezoidal factor
            S = np.empty((k + r, n1), order="F")
            S[:k] = f.T
            S[k:] = B
            f.T = np.ascontiguousarray(_qr_r(S))
        else:
            # [T; B] with T upper triangular (zero-padded to n1 rows): LAPACK's
            # triangular-pentagonal QR (dtpqrt) updates T in place and skips its zeros.
            A = np.zeros((n1, n1), order="F")
            A[:k] = f.T
            if r >= 2 * self.SPLIT_MIN_ROWS:
                h = r // 2
                E = self._extra.get(cls)
                if E is None:
                    E = np.zeros((n1, n1), order="F")
                with serial_blas():
                    contract.tpqrt_many([A, E], [np.asfortranarray(B[:h]),
                                                 np.asfortranarray(B[h:])],
                                        [0, 0], 64, self.n_threads)
                self._extra[cls] = E
            else:
                with serial_blas():
                    contract.tpqrt_many([A], [B], [0], 64, 1)
            f.T = np.ascontiguousarray(np.triu(A))
        self._buf_n[cls] = 0  # the buffer (overwritten by dtpqrt) is reused for the next rows

    def finalize(self) -> dict:
        """Flushes all buffers, merges the accumulators, frees them and returns
        ``{class: ClassFactor}``."""
        from kmlip._ext import contract
        from kmlip._threads import serial_blas

        for cls in list(self._buf):
            self._flush(cls)
        for cls, E in self._extra.items():
            f = self.factors[cls]
            A = np.asfortranarray(f.T)
            with serial_blas():
                contract.tpqrt_many([A], [np.asfortranarray(np.triu(E))], [E.shape[0]], 64, 1)
            f.T = np.ascontiguousarray(np.triu(A))
        self._extra.clear()
        self._buf.clear()
        self._buf_n.clear()
        return self.factors


def cholesky_jitter(K: np.ndarray, jitter: float) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``K + jitter I``, raising jitter (×10, with a warning) if needed.

    Returns
    -------
    L : ndarray, shape (M, M)
    jitter : float
        The jitter actually used.
    """
    from kmlip._threads import serial_blas

    with serial_blas():  # the same bits for any thread count
        return _cholesky_jitter(K, jitter)


def _cholesky_jitter(K: np.ndarray, jitter: float) -> tuple[np.ndarray, float]:
    M = K.shape[0]
    jit = float(jitter)
    for _ in range(8):
        try:
            return np.linalg.cholesky(K + jit * np.eye(M)), jit
        except np.linalg.LinAlgError:
            new = max(jit * 10.0, 1e-10)
            warnings.warn(f"K_MM + {jit:g} I is not positive definite; raising jitter to {new:g}",
                          RuntimeWarning, stacklevel=4)
            jit = new
    raise np.linalg.LinAlgError("K_MM is not positive definite even with large jitter")


@dataclass
class Solution:
    """Result of :func:`solve_stack`.

    Attributes
    ----------
    alpha : ndarray, shape (M,)
        Weights of the full kernel ``k = delta^2 k_hat``.
    R : ndarray, shape (M, M)
        Upper triangular, ``R^T R = K_MM + K_MN Lambda^-1 K_NM``.
    log_marginal_likelihood : float
    gradient : dict or None
        ``d log p / d log(hyperparameter)`` for "delta" and each free class present.
    n_labels : int
    """

    alpha: np.ndarray
    R: np.ndarray
    log_marginal_likelihood: float
    gradient: dict | None
    n_labels: int


def solve_stack(factors: dict, L_hat: np.ndarray, delta, sigmas: dict,
                gradient: bool = False) -> Solution:
    """Weights, posterior factor and log marginal likelihood for given hyperparameters.

    Runs with single-threaded BLAS: its O(M^3) products then give the same bits for any thread
    count (threaded LAPACK rounds differently per thread count), and no BLAS threads are left
    spinning beside kmlip's OpenMP kernels. See :func:`_solve_stack` for the parameters.
    """
    from kmlip._threads import serial_blas

    with serial_blas():
        return _solve_stack(factors, L_hat, delta, sigmas, gradient)


def _solve_stack(factors: dict, L_hat: np.ndarray, delta, sigmas: dict,
                 gradient: bool = False) -> Solution:
    """Weights, posterior factor and log marginal likelihood for given hyperparameters.

    Parameters
    ----------
    factors : dict
        ``{class: ClassFactor}`` from :meth:`StreamingQR.finalize`.
    L_hat : ndarray, shape (M, M)
        Cholesky factor of the unit ``K_hat_MM + jitter I``.
    delta : float or ndarray, shape (M,)
        Kernel scale (eV); a vector gives every column its own scale (a sum of kernels: the
        columns of term t carry ``delta_t``, and K_MM is block diagonal by term, so
        ``K_MM = D K_hat D`` has the Cholesky factor ``D L_hat``).
    sigmas : dict
        Noise scale of each free class present (``"energy"``, ``"forces"``, ``"virial"``).
    gradient : bool
        Also compute the analytic gradient of the log marginal likelihood (with a vector
        ``delta``, ``gradient["delta"]`` is per column; sum it over a term's columns).

    Returns
    -------
    Solution
    """
    M = L_hat.shape[0]
    vector = np.ndim(delta) > 0
    if vector:
        delta = np.asarray(delta, dtype=np.float64)
        if delta.shape != (M,):
            raise ValueError(f"delta must be a scalar or have shape ({M},), got {delta.shape}")
    d2 = delta * delta
    scales, n_labels, log_lambda = {}, 0, 0.0
    used = [(cls, f) for cls, f in factors.items() if f.n_rows > 0]
    n_rows = sum(f.T.shape[0] for _, f in used) + M
    # The small stack, built in Fortran order in place (LAPACK factorises it without a copy).
    S = np.zeros((n_rows, M + 1), order="F")
    r = 0
    for cls, f in used:
        s = 1.0 if cls in FIXED_CLASSES else float(sigmas[cls])
        scales[cls] = s
        k = f.T.shape[0]
        S[r:r + k, :M] = f.T[:, :M] * (d2 / s)
        S[r:r + k, M] = f.T[:, M] / s
        r += k
        n_labels += f.n_rows
        log_lambda += 2.0 * f.n_rows * math.log(s) + 2.0 * f.log_scale_sum
    S[r:, :M] = L_hat.T * delta if vector else delta * L_hat.T
    T = _qr_r(S)
    R = np.ascontiguousarray(T[:M, :M])
    q = T[:M, M]
    rho2 = float(T[M, M] ** 2) if T.shape[0] > M else 0.0
    diag = np.abs(np.diag(R))
    if np.any(diag == 0):
        raise np.linalg.LinAlgError("singular posterior factor R")
    alpha = sla.solve_triangular(R, q, lower=False, check_finite=False)
    logdet_P = 2.0 * float(np.sum(np.log(diag)))
    log_delta = 2.0 * float(np.sum(np.log(delta))) if vector else 2.0 * M * math.log(delta)
    logdet_K = log_delta + 2.0 * float(np.sum(np.log(np.diag(L_hat))))
    lml = -0.5 * (rho2 + log_lambda + logdet_P - logdet_K + n_labels * math.log(2 * math.pi))
    grad = None
    if gradient:
        Rinv = sla.solve_triangular(R, np.eye(M), lower=False, check_finite=False)
        grad = {}
        for cls, f in factors.items():
            if f.n_rows == 0 or cls in FIXED_CLASSES:
                continue
            s = scales[cls]
            Rc, zc = f.T[:, :M], f.T[:, M]
            if vector:
                res = zc - Rc @ (d2 * alpha)
                tr = float(np.sum(((Rc * d2) @ Rinv) ** 2))
                g = -2.0 / s**2 * float(res @ res) + 2.0 * f.n_rows - 2.0 / s**2 * tr
            else:
                res = zc - d2 * (Rc @ alpha)
                tr = float(np.sum((Rc @ Rinv) ** 2))
                # d(-2 log p)/d log sigma_c
                g = -2.0 / s**2 * float(res @ res) + 2.0 * f.n_rows - 2.0 * d2 * d2 / s**2 * tr
            grad[cls] = -0.5 * g
        if vector:
            # per column m: d(-2 log p)/d log delta_m = 2 - 2 (xi_m^2 + Sigma_xi,mm), with
            # xi = L_hat^T D alpha the whitened weights and Sigma_xi their posterior covariance
            xi = L_hat.T @ (delta * alpha)
            sig = np.sum((L_hat.T @ (delta[:, None] * Rinv)) ** 2, axis=1)
            grad["delta"] = -0.5 * (2.0 - 2.0 * (xi * xi + sig))
        else:
            Ka = L_hat.T @ alpha
            tr_k = float(np.sum((L_hat.T @ Rinv) ** 2))
            grad["delta"] = -0.5 * (2.0 * M - 2.0 * d2 * (float(Ka @ Ka) + tr_k))
    return Solution(alpha=alpha, R=R, log_marginal_likelihood=lml, gradient=grad,
                    n_labels=n_labels)


def optimize_hyperparameters(factors: dict, L_hat: np.ndarray, delta, sigmas: dict,
                             optimize_delta: bool = True, bounds: dict | None = None,
                             maxiter: int = 200, groups=None):
    """Maximises the log marginal likelihood over log delta and log sigma_c (L-BFGS-B).

    Parameters
    ----------
    factors, L_hat : as in :func:`solve_stack`
    delta : float, or sequence of float with ``groups``
        Starting kernel scale(s).
    sigmas : dict
        Starting noise scales of the free classes to optimise.
    optimize_delta : bool
        Optimise delta as well.
    bounds : dict, optional
        ``{name: (low, high)}`` in natural units; defaults delta in [1e-4, 1e3] eV (the bound
        of "delta" applies to every term's), sigmas in [1e-7, 1e2].
    maxiter : int
    groups : sequence of slice, optional
        Columns of each kernel term (a sum of kernels: one delta per term).

    Returns
    -------
    delta : float, or tuple of float with ``groups``
    sigmas : dict
    result : scipy.optimize.OptimizeResult
    """
    from scipy.optimize import minimize

    M = L_hat.shape[0]
    n_d = 0 if not optimize_delta else (1 if groups is None else len(groups))
    d_names = ["delta"] if groups is None else [f"delta_{t}" for t in range(len(groups))]
    names = d_names[:n_d] + [c for c in sigmas if c in factors and factors[c].n_rows > 0]
    start = [delta] if groups is None else list(delta)
    defaults = {"delta": (1e-4, 1e3)}
    bounds = dict(bounds or {})

    def bound(n):
        key = "delta" if n.startswith("delta") else n
        return bounds.get(n, bounds.get(key, defaults.get(key, (1e-7, 1e2))))

    x0 = np.log([start[d_names.index(n)] if n in d_names else sigmas[n] for n in names])
    bnds = [tuple(np.log(bound(n))) for n in names]
    x0 = np.clip(x0, [b[0] for b in bnds], [b[1] for b in bnds])

    def unpack(x):
        d = list(start)
        s = dict(sigmas)
        for n, v in zip(names, np.exp(x), strict=True):
            if n in d_names:
                d[d_names.index(n)] = float(v)
            else:
                s[n] = float(v)
        return d, s

    def columns(d):
        if groups is None:
            return d[0]
        col = np.empty(M)
        for g, v in zip(groups, d, strict=True):
            col[g] = v
        return col

    def fun(x):
        d, s = unpack(x)
        try:
            sol = solve_stack(factors, L_hat, columns(d), s, gradient=True)
        except np.linalg.LinAlgError:
            return 1e300, np.zeros_like(x)
        g = []
        for n in names:
            if n in d_names and groups is not None:
                g.append(float(np.sum(sol.gradient["delta"][groups[d_names.index(n)]])))
            else:
                g.append(sol.gradient["delta" if n in d_names else n])
        return -sol.log_marginal_likelihood, -np.array(g)

    if not names:
        raise ValueError("nothing to optimise")
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bnds,
                   options={"maxiter": maxiter})
    d, s = unpack(res.x)
    return (d[0] if groups is None else tuple(d)), s, res


#: Round-off floor of the negative-variance check, as a fraction of ``delta^2 max(k**, 1)``:
#: a clipped value counts as round-off when it is above ``-NEGATIVE_TOLERANCE`` times that.
#: The absolute part (``delta^2``, the prior variance of one local energy) matters where the
#: prior variance itself vanishes (a force component of a perfect crystal is 0 by symmetry).
NEGATIVE_TOLERANCE = 1e-8


def _clip_negative(var: np.ndarray, k_ss: np.ndarray, d2: float, what: str) -> np.ndarray:
    """``max(var, 0)``, warning when a clipped value is beyond round-off (see
    :data:`NEGATIVE_TOLERANCE`)."""
    scale = d2 * np.maximum(np.abs(np.asarray(k_ss, dtype=np.float64)), 1.0)
    bad = var < -NEGATIVE_TOLERANCE * scale
    if np.any(bad):
        k = int(np.argmin(var / scale))
        warnings.warn(f"clipped {int(bad.sum())} negative {what} variance(s) to 0 (worst "
                      f"{var[k]:.2e}, prior variance {d2 * float(np.ravel(k_ss)[k]):.2e}, "
                      f"delta^2 {d2:.2e}): round-off beyond the usual; consider a larger jitter",
                      RuntimeWarning, stacklevel=3)
    return np.maximum(var, 0.0)


def predictive_variance(K_star: np.ndarray, k_ss: np.ndarray, L_hat: np.ndarray, R: np.ndarray,
                        delta: float, what: str = "prediction") -> np.ndarray:
    """Epistemic posterior variance ``k** - |L^-1 k*|^2 + |R^-T k*|^2`` (clipped at 0).

    Parameters
    ----------
    K_star : ndarray, shape (n, M)
        *Unit* kernel rows of the predicted quantities.
    k_ss : ndarray, shape (n,)
        *Unit* prior variances of the predicted quantities (with a vector ``delta``: the full
        prior variances, eV², since each term has its own scale).
    L_hat, R : as in :class:`Solution`
    delta : float or ndarray, shape (M,)
    what : str
        Name used in the warning when a clearly negative value is clipped.

    Returns
    -------
    ndarray, shape (n,)
        Variances in (eV)^2 (or the squared unit of the quantity).
    """
    K_star = np.atleast_2d(np.asarray(K_star, dtype=np.float64))
    k_ss = np.asarray(k_ss, dtype=np.float64)
    if np.ndim(delta) > 0:
        # a sum of kernels: delta per column, k_ss already the full prior variance (eV²)
        d = np.asarray(delta, dtype=np.float64)
        if K_star.shape[1] == 0:
            return k_ss
        A = sla.solve_triangular(L_hat, (K_star * d).T, lower=True, check_finite=False)
        B = sla.solve_triangular(R, (K_star * (d * d)).T, trans="T", lower=False,
                                 check_finite=False)
        var = k_ss - np.sum(A * A, axis=0) + np.sum(B * B, axis=0)
        return _clip_negative(var, k_ss, 1.0, what)
    d2 = delta * delta
    if K_star.shape[1] == 0:
        return d2 * k_ss
    A = sla.solve_triangular(L_hat, K_star.T, lower=True, check_finite=False)
    B = sla.solve_triangular(R, d2 * K_star.T, trans="T", lower=False, check_finite=False)
    var = d2 * k_ss - d2 * np.sum(A * A, axis=0) + np.sum(B * B, axis=0)
    return _clip_negative(var, k_ss, d2, what)


def _triangular_inverse(T: np.ndarray, lower: bool) -> np.ndarray:
    """Inverse of a triangular matrix (LAPACK dtrtri), C-contiguous."""
    if T.shape[0] == 0:
        return np.zeros((0, 0))
    inv, info = sla.lapack.dtrtri(np.asfortranarray(T), lower=int(lower))
    if info != 0:
        raise np.linalg.LinAlgError(f"singular triangular factor (dtrtri info={info})")
    return np.ascontiguousarray(np.tril(inv) if lower else np.triu(inv))


def block_variance_factors(L_hat: np.ndarray, Rinv: np.ndarray, delta: float,
                           sl: slice) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the local-energy variance of one column block (see
    :class:`PosteriorVariance`).

    Parameters
    ----------
    L_hat : ndarray, shape (M, M)
        Cholesky factor of the unit K_MM (block diagonal).
    Rinv : ndarray, shape (M, M)
        Inverse of the posterior factor R (upper triangular).
    delta : float
    sl : slice
        The block's columns.

    Returns
    -------
    H : ndarray, shape (M_z, M_z)
        Lower triangular, ``H^T H = W^T W - delta^2 Sigma_zz``.
    W : ndarray, shape (M_z, M_z)
        ``L_hat_zz^-1`` (lower triangular; the novelty term).
    """
    M = L_hat.shape[0]
    s0, s1 = sl.start, sl.stop
    L_z = L_hat[s0:s1, s0:s1]
    W = _triangular_inverse(L_z, lower=True)
    # G: lower triangular, G^T G = Sigma_zz. (R^-1)[z, :] is zero left of the block; for the
    # last block G = (R^-1)_zz^T, else a QR of A = (R^-1)[z, s0:]^T with its columns
    # reversed, A P = Q U, gives Sigma_zz = P U^T U P, G = P U P.
    if s1 == M:
        G = Rinv[s0:, s0:].T
    else:
        U = _qr_r(np.asfortranarray(Rinv[s0:s1, s0:].T[:, ::-1]))[: s1 - s0]
        G = U[::-1, ::-1]
    Y = delta * (G @ L_z)
    lam, V = np.linalg.eigh(Y.T @ Y)
    J = np.sqrt(np.clip(1.0 - lam, 0.0, None))[:, None] * V.T
    Hu = _qr_r(np.asfortranarray((J @ W)[:, ::-1]))[: s1 - s0]
    return np.ascontiguousarray(Hu[::-1, ::-1]), W


class PosteriorVariance:
    """Epistemic variances of a fitted model from one precomputed factor per species.

    K_MM (and so ``L_hat``) is block diagonal by species, and the kernel row of an atom's local
    energy is non-zero only in its species' columns. For such a row ``k`` (block z) ::

        var = delta^2 (k** - k^T Q_z k),   Q_z = W_z^T W_z - delta^2 G_z^T G_z,

    with ``W_z = L_hat_zz^-1`` (``|W_z k|^2 = k^T K_zz^-1 k``, the novelty term) and
    ``G_z^T G_z`` the (z, z) block of ``(R^T R)^-1`` (the weights' uncertainty). ``Q_z`` is
    positive semi-definite, and is stored as one lower triangular factor ``H_z`` with
    ``H_z^T H_z = Q_z``, built without squaring anything ill-conditioned: with
    ``Y = delta G_z W_z^-1`` (lower triangular, singular values <= 1),
    ``Q_z = W_z^T (I - Y^T Y) W_z``, ``I - Y^T Y = V diag(1 - s^2) V^T`` from the eigenvectors
    of ``Y^T Y`` (only ``1 - s^2`` is used, which needs absolute, not relative, accuracy), and
    ``H_z`` is the triangular factor of a QR of ``diag(sqrt(1 - s^2)) V^T W_z``. A variance then
    costs one product with a triangular matrix, ``n M_z^2`` flops as GEMM calls that skip the
    zero triangle (:func:`kmlip._ext.contract.tri_square_norms`, kmlip's OpenMP loop), half of
    the two triangular solves of :func:`predictive_variance` at a higher rate. On training
    environments, where the variance is a small difference (~1e-5 of the prior), both agree to
    ~1e-13 of the prior variance.

    Build it once per fitted model: O(M_z^3) per species (~1 s for M_z = 1000); it holds
    M_z^2 doubles per species.

    Parameters
    ----------
    L_hat : ndarray, shape (M, M)
        Cholesky factor of the unit ``K_MM + jitter I`` (block diagonal by species).
    R : ndarray, shape (M, M)
        Upper triangular posterior factor, ``R^T R = K_MM + K_MN Lambda^-1 K_NM`` (full
        kernel units, as :attr:`Solution.R`).
    delta : float
        Kernel scale (eV).
    column_blocks : mapping key -> slice
        Columns of each species block (e.g. ``{z: basis.columns(z)}``); the blocks must not
        overlap and K_MM must be zero between them.
    """

    #: Column block width of the packed factors (GEMM panel width).
    BLOCK = 128

    def __init__(self, L_hat: np.ndarray, R: np.ndarray, delta: float, column_blocks):
        from kmlip._ext import contract

        L_hat = np.asarray(L_hat, dtype=np.float64)
        R = np.asarray(R, dtype=np.float64)
        M = L_hat.shape[0]
        if L_hat.ndim != 2 or L_hat.shape != (M, M) or R.shape != (M, M):
            raise ValueError(f"L_hat and R must be square of the same size, got {L_hat.shape} "
                             f"and {R.shape}")
        delta = float(delta)
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be a positive finite number, got {delta!r}")
        self.delta = delta
        self.n_sparse = M
        self.blocks = {}
        for key, sl in dict(column_blocks).items():
            s0, s1, step = sl.indices(M)
            if step != 1 or s1 <= s0:
                raise ValueError(f"column block {key!r} must be a non-empty contiguous slice")
            self.blocks[key] = slice(s0, s1)
        cols = sorted((b.start, b.stop) for b in self.blocks.values())
        for (_, a1), (b0, _) in zip(cols[:-1], cols[1:], strict=True):
            if b0 < a1:
                raise ValueError("column blocks overlap")
        from kmlip._threads import serial_blas

        with serial_blas():  # ~0.4 s for M = 1000; BLAS threads cost more than they save here
            self._packed = self._factors(L_hat, R, contract)

    def _factors(self, L_hat, R, contract) -> dict:
        """Packed triangular factor ``H_z`` of every block (see the class docstring)."""
        Rinv = _triangular_inverse(R, lower=False)
        return {key: contract.pack_lower([block_variance_factors(L_hat, Rinv, self.delta,
                                                                 sl)[0]], self.BLOCK)
                for key, sl in self.blocks.items()}

    def local(self, K: np.ndarray, keys, k_ss=None, n_threads: int | None = None,
              what: str = "local energy") -> np.ndarray:
        """Variances of local energies from their unit kernel rows.

        Parameters
        ----------
        K : ndarray, shape (n, M)
            Unit kernel rows (non-zero only in the columns of each row's block), e.g. from
            :meth:`kmlip.kernels.SparseBasis.evaluate` with ``rows=True``.
        keys : array, shape (n,)
            Block key of every row (e.g. the atomic numbers); a key without a block (a
            species with no sparse points) gives the prior variance.
        k_ss : array, shape (n,), optional
            Unit prior variances (1 for a normalised environment, 0 for an empty one);
            default 1.
        n_threads : int or None
        what : str
            Name used in the negative-variance warning.

        Returns
        -------
        ndarray, shape (n,)
            Variances in eV².
        """
        from kmlip._ext import contract
        from kmlip._threads import serial_blas

        K = np.asarray(K, dtype=np.float64)
        if K.ndim != 2 or K.shape[1] != self.n_sparse:
            raise ValueError(f"K must have shape (n, {self.n_sparse}), got {K.shape}")
        n = K.shape[0]
        keys = np.asarray(keys)
        if keys.shape != (n,):
            raise ValueError(f"keys must have shape ({n},), got {keys.shape}")
        k_ss = np.ones(n) if k_ss is None else np.broadcast_to(
            np.asarray(k_ss, dtype=np.float64), (n,))
        d2 = self.delta * self.delta
        explained = np.zeros(n)
        for key, sl in self.blocks.items():
            idx = np.flatnonzero(keys == key)
            if idx.size == 0:
                continue
            Kz = np.ascontiguousarray(K[:, sl] if idx.size == n else K[idx, sl])
            with serial_blas():  # BLAS is called from every OpenMP thread
                explained[idx] = contract.tri_square_norms(Kz, self._packed[key], self.BLOCK,
                                                           n_threads)[0]
        return _clip_negative(d2 * (k_ss - explained), k_ss, d2, what)
