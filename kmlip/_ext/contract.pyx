# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP loops around the C contraction kernels of ``contract_core.h``.

Every function here writes each output element from one thread only and accumulates it in a fixed
order, so results are bitwise identical for any thread count.
"""
import numpy as np

cimport cython
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer

from kmlip._ext.omp cimport kmlip_omp_get_max_threads


# BLAS GEMM of SciPy's bundled library, taken from scipy.linalg.cython_blas at import (no
# build-time dependency on SciPy). Called inside OpenMP regions on disjoint blocks, with the
# library's own threads limited to one by the caller (see kmlip._threads.serial_blas): one
# team of threads, no BLAS threads spinning beside it.
ctypedef void (*dgemm_t)(char *transa, char *transb, int *m, int *n, int *k, double *alpha,
                         double *a, int *lda, double *b, int *ldb, double *beta, double *c,
                         int *ldc) noexcept nogil
ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                         float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                         int *ldc) noexcept nogil
ctypedef void (*dtpqrt_t)(int *m, int *n, int *l, int *nb, double *a, int *lda, double *b,
                          int *ldb, double *t, int *ldt, double *work, int *info) noexcept nogil
cdef dgemm_t _dgemm = NULL
cdef sgemm_t _sgemm = NULL
cdef dtpqrt_t _dtpqrt = NULL


def _load_blas():
    global _dgemm, _sgemm, _dtpqrt
    from scipy.linalg import cython_blas

    caps = cython_blas.__pyx_capi__
    _dgemm = <dgemm_t>PyCapsule_GetPointer(caps["dgemm"], PyCapsule_GetName(caps["dgemm"]))
    _sgemm = <sgemm_t>PyCapsule_GetPointer(caps["sgemm"], PyCapsule_GetName(caps["sgemm"]))
    from scipy.linalg import cython_lapack

    caps = cython_lapack.__pyx_capi__
    _dtpqrt = <dtpqrt_t>PyCapsule_GetPointer(caps["dtpqrt"], PyCapsule_GetName(caps["dtpqrt"]))


_load_blas()


cdef extern from "contract_core.h" nogil:
    void kmlip_scatter_force_rows(
        const double *H, int64_t ldh, const double *A, const double *AC, const double *pv,
        const int64_t *cl, const int64_t *nb, const double *vec, int64_t n_e,
        int64_t m0, int64_t m1, int64_t col0, double *outF, double *outW, int64_t ldo)
    void kmlip_scatter_force_rows_f(
        const float *H, const double *hu, int64_t ldh, const double *A, const double *AC, const double *pv,
        const int64_t *cl, const int64_t *nb, const double *vec, int64_t n_e,
        int64_t m0, int64_t m1, int64_t col0, double *outF, double *outW, int64_t ldo)
    void kmlip_pair_forces(
        const double *values, const int64_t *centers, const double *v, int64_t n_features,
        int64_t e0, int64_t e1, double *f)
    void kmlip_forces_virial(
        const double *f, const int64_t *nb, const double *vec, int64_t n_e,
        double *forces, double *virial)
    double kmlip_centre_energy_grad(
        const double *p, const double *S_hat, const double *alpha, int64_t M, int64_t F,
        int64_t zeta, double scale, double *v)


cdef int _threads(n_threads):
    if n_threads is None:
        return max(1, kmlip_omp_get_max_threads())
    return max(1, int(n_threads))


# Columns per parallel task: wide enough for vectorised inner loops, small enough to balance.
cdef enum:
    COL_BLOCK = 64
    # Below this many inner-loop iterations, one thread is faster than waking a team.
    MIN_PARALLEL_WORK = 200000


cdef int _scatter_threads(n_threads, Py_ssize_t work):
    # a parallel region costs more than it saves on tiny blocks
    return 1 if work < MIN_PARALLEL_WORK else _threads(n_threads)


def _check_scatter(name, Py_ssize_t h_rows, Py_ssize_t Mz, const double[:, ::1] A,
                   const double[:, ::1] AC, const double[:, ::1] pv, const int64_t[::1] cl,
                   const int64_t[::1] nb, const double[:, ::1] vec, Py_ssize_t col0,
                   double[:, ::1] outF, double[:, ::1] outW):
    """Shape and index checks shared by the scatter kernels (they run without bounds checks)."""
    cdef Py_ssize_t n_e = pv.shape[0], k
    if h_rows != 3 * n_e or A.shape[1] != Mz or AC.shape[1] != Mz:
        raise ValueError(f"{name}: inconsistent H / A / AC / pv shapes")
    if cl.shape[0] != n_e or nb.shape[0] != n_e or vec.shape[0] != n_e or vec.shape[1] != 3:
        raise ValueError(f"{name}: inconsistent entry arrays")
    if col0 < 0 or col0 + Mz > outF.shape[1] or outW.shape[0] != 9 or outW.shape[1] != outF.shape[1]:
        raise ValueError(f"{name}: output shapes do not fit")
    for k in range(n_e):
        if cl[k] < 0 or cl[k] >= A.shape[0] or nb[k] < 0 or 3 * nb[k] + 2 >= outF.shape[0]:
            raise ValueError(f"{name}: centre or neighbour index out of range")


def scatter_force_rows(const double[:, ::1] H, const double[:, ::1] A, const double[:, ::1] AC,
                       const double[:, ::1] pv, const int64_t[::1] cl, const int64_t[::1] nb,
                       const double[:, ::1] vec, Py_ssize_t col0, double[:, ::1] outF,
                       double[:, ::1] outW, n_threads=None):
    """Accumulates force and virial rows of K_NM for one species block (see contract_core.h).

    Parameters
    ----------
    H : (3 n_e, M_z) float64
        ``values.reshape(3 n_e, F) @ S_hat.T`` for the entries of this chunk.
    A, AC : (n_c, M_z) float64
        ``zeta c^(zeta-1) / |p|`` and ``A * c`` per centre row.
    pv : (n_e, 3) float64
        ``p_hat . values[e, a]``.
    cl, nb : (n_e,) int64
        Centre row (into A) and neighbour atom of each entry.
    vec : (n_e, 3) float64
        Pair vectors.
    col0 : int
        First column of this species block in the outputs.
    outF : (3 n_atoms, M) float64, accumulated in place (force rows, minus sign applied).
    outW : (9, M) float64, accumulated in place (virial rows W_ab, unsymmetrised).
    """
    cdef Py_ssize_t n_e = pv.shape[0]
    cdef Py_ssize_t Mz = H.shape[1]
    _check_scatter("scatter_force_rows", H.shape[0], Mz, A, AC, pv, cl, nb, vec, col0, outF, outW)
    if n_e == 0 or Mz == 0:
        return
    cdef Py_ssize_t n_blocks = (Mz + COL_BLOCK - 1) // COL_BLOCK
    cdef Py_ssize_t b, m0, m1
    cdef int nt = _scatter_threads(n_threads, n_e * Mz)
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        m0 = b * COL_BLOCK
        m1 = min(m0 + COL_BLOCK, Mz)
        kmlip_scatter_force_rows(&H[0, 0], Mz, &A[0, 0], &AC[0, 0], &pv[0, 0], &cl[0], &nb[0],
                                 &vec[0, 0], n_e, m0, m1, col0, &outF[0, 0], &outW[0, 0],
                                 outF.shape[1])


def scatter_force_rows_f32(const float[:, ::1] H, const double[:, ::1] hu,
                           const double[:, ::1] A,
                           const double[:, ::1] AC, const double[:, ::1] pv,
                           const int64_t[::1] cl, const int64_t[::1] nb,
                           const double[:, ::1] vec, Py_ssize_t col0, double[:, ::1] outF,
                           double[:, ::1] outW, n_threads=None):
    """:func:`scatter_force_rows` with a float32 GEMM output on centred sparse points:
    ``values . s_hat = H + hu`` with ``hu`` (n_e, 3) in double (see contract_core.h)."""
    cdef Py_ssize_t n_e = pv.shape[0]
    cdef Py_ssize_t Mz = H.shape[1]
    _check_scatter("scatter_force_rows_f32", H.shape[0], Mz, A, AC, pv, cl, nb, vec, col0,
                   outF, outW)
    if hu.shape[0] != n_e or hu.shape[1] != 3:
        raise ValueError("scatter_force_rows_f32: hu must be (n_e, 3)")
    if n_e == 0 or Mz == 0:
        return
    cdef Py_ssize_t n_blocks = (Mz + COL_BLOCK - 1) // COL_BLOCK
    cdef Py_ssize_t b, m0, m1
    cdef int nt = _scatter_threads(n_threads, n_e * Mz)
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        m0 = b * COL_BLOCK
        m1 = min(m0 + COL_BLOCK, Mz)
        kmlip_scatter_force_rows_f(&H[0, 0], &hu[0, 0], Mz, &A[0, 0], &AC[0, 0], &pv[0, 0], &cl[0],
                                   &nb[0], &vec[0, 0], n_e, m0, m1, col0, &outF[0, 0],
                                   &outW[0, 0], outF.shape[1])


def pair_forces(const double[:, :, ::1] values, const int64_t[::1] centers,
                const double[:, ::1] v, n_threads=None):
    """Per-entry force contributions ``f[e] = values[e] @ v[centers[e]]``, shape (n_e, 3)."""
    cdef Py_ssize_t n_e = values.shape[0]
    cdef Py_ssize_t F = values.shape[2]
    if values.shape[1] != 3 or centers.shape[0] != n_e or v.shape[1] != F:
        raise ValueError("pair_forces: inconsistent shapes")
    cdef Py_ssize_t k
    for k in range(n_e):
        if centers[k] < 0 or centers[k] >= v.shape[0]:
            raise ValueError("pair_forces: centre index out of range")
    out = np.zeros((n_e, 3))
    cdef double[:, ::1] f = out
    if n_e == 0 or F == 0:
        return out
    cdef Py_ssize_t chunk = 256
    cdef Py_ssize_t n_chunks = (n_e + chunk - 1) // chunk
    cdef Py_ssize_t c, e0, e1
    cdef int nt = _threads(n_threads)
    if n_e * F < MIN_PARALLEL_WORK:
        nt = 1
    for c in prange(n_chunks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=4):
        e0 = c * chunk
        e1 = min(e0 + chunk, n_e)
        kmlip_pair_forces(&values[0, 0, 0], &centers[0], &v[0, 0], F, e0, e1, &f[0, 0])
    return out


def forces_virial(const double[:, ::1] f, const int64_t[::1] neighbors,
                  const double[:, ::1] vectors, Py_ssize_t n_atoms):
    """Forces (n_atoms, 3) ``-sum f_e`` over entries of each neighbour and virial (3, 3)
    ``sum_e f_e ⊗ r_e`` (= dE/d strain, unsymmetrised)."""
    cdef Py_ssize_t n_e = f.shape[0]
    if f.shape[1] != 3 or neighbors.shape[0] != n_e or vectors.shape[0] != n_e:
        raise ValueError("forces_virial: inconsistent shapes")
    cdef Py_ssize_t k
    for k in range(n_e):
        if neighbors[k] < 0 or neighbors[k] >= n_atoms:
            raise ValueError("forces_virial: neighbour index out of range")
    forces = np.zeros((n_atoms, 3))
    virial = np.zeros((3, 3))
    cdef double[:, ::1] fo = forces
    cdef double[:, ::1] vi = virial
    if n_e > 0:
        with nogil:
            kmlip_forces_virial(&f[0, 0], &neighbors[0], &vectors[0, 0], n_e, &fo[0, 0],
                                &vi[0, 0])
    return forces, virial


def centre_energy_grad(const double[:, ::1] X, const int64_t[::1] rows,
                       const double[:, ::1] S_hat, const double[::1] alpha, int zeta,
                       double scale, n_threads=None):
    """Local energies and gradients of the centres ``rows`` of X against one species block,
    with the per-centre C routine (the code path of a plugin). Returns (eps (n,), v (n, F))."""
    cdef Py_ssize_t n = rows.shape[0]
    cdef Py_ssize_t F = X.shape[1]
    cdef Py_ssize_t M = S_hat.shape[0]
    if S_hat.shape[1] != F or alpha.shape[0] != M:
        raise ValueError("centre_energy_grad: inconsistent shapes")
    if zeta < 1:
        raise ValueError("zeta must be >= 1")
    cdef Py_ssize_t k
    for k in range(n):
        if rows[k] < 0 or rows[k] >= X.shape[0]:
            raise ValueError("centre_energy_grad: row out of range")
    eps_a = np.zeros(n)
    v_a = np.zeros((n, F))
    cdef double[::1] eps = eps_a
    cdef double[:, ::1] v = v_a
    if n == 0 or F == 0:
        return eps_a, v_a
    cdef int nt = _threads(n_threads)
    cdef const double *sp = NULL
    cdef const double *ap = NULL
    if M > 0:
        sp = &S_hat[0, 0]
        ap = &alpha[0]
    for k in prange(n, nogil=True, num_threads=nt, schedule="static"):
        eps[k] = kmlip_centre_energy_grad(&X[rows[k], 0], sp, ap, M, F, zeta, scale, &v[k, 0])
    return eps_a, v_a


# Columns per GEMM + scatter task and rows per GEMM task: fixed (not derived from the thread
# count), so that every block is computed by the same BLAS call whatever the number of threads
# and results are bitwise identical for any thread count.
cdef enum:
    GEMM_ROW_BLOCK = 64
    # Pair-gradient rows per GEMM call of the training rows (each call packs S_hat once).
    GEMM_ROW_CHUNK = 1536


def gemm_scatter_force_rows(const double[:, ::1] V, const double[:, ::1] S_hat,
                            double[:, ::1] H, const double[:, ::1] A, const double[:, ::1] AC,
                            const double[:, ::1] pv, const int64_t[::1] cl,
                            const int64_t[::1] nb, const double[:, ::1] vec, Py_ssize_t col0,
                            double[:, ::1] outF, double[:, ::1] outW, n_threads=None):
    """:func:`scatter_force_rows` with the GEMM ``H = V @ S_hat.T`` done by kmlip's threads:
    fixed chunks of rows of V, one single-threaded BLAS call each (every call packs only the
    small S_hat), then the scatter by blocks of columns. GEMM and scatter share one team of
    threads (no BLAS pool spinning beside it), and the chunks do not depend on the thread
    count, so neither do the bits of H.

    Parameters
    ----------
    V : (3 n_e, F) float64
        Pair-gradient rows of the chunk (``values.reshape(3 n_e, F)``).
    S_hat : (M_z, F) float64
        Normalised sparse points of the species.
    H : (3 n_e, M_z) float64
        Workspace (overwritten).
    A, AC, pv, cl, nb, vec, col0, outF, outW, n_threads
        As :func:`scatter_force_rows`.

    BLAS must run single-threaded meanwhile (``kmlip._threads.serial_blas``).
    """
    cdef Py_ssize_t n_e = pv.shape[0]
    cdef Py_ssize_t Mz = S_hat.shape[0]
    cdef Py_ssize_t F = S_hat.shape[1]
    _check_scatter("gemm_scatter_force_rows", H.shape[0], Mz, A, AC, pv, cl, nb, vec, col0,
                   outF, outW)
    if V.shape[0] != 3 * n_e or V.shape[1] != F or H.shape[1] != Mz:
        raise ValueError("gemm_scatter_force_rows: inconsistent V / S_hat / H shapes")
    if n_e == 0 or Mz == 0:
        return
    if F == 0 or 3 * n_e > 2147483647:
        raise ValueError("gemm_scatter_force_rows: no features or too many entries")
    cdef int nt = _scatter_threads(n_threads, n_e * Mz * (F // 16 + 1))
    cdef Py_ssize_t n_rc = (3 * n_e + GEMM_ROW_CHUNK - 1) // GEMM_ROW_CHUNK
    cdef Py_ssize_t n_blocks = (Mz + COL_BLOCK - 1) // COL_BLOCK
    cdef Py_ssize_t b, r0, m0, m1
    cdef int gm = <int>Mz, gn, gk = <int>F, lda = <int>F, ldc = <int>Mz
    cdef double one = 1.0, zero = 0.0
    # 1. H = V S_hat^T by fixed chunks of rows: each call packs only S_hat (small), not V
    for b in prange(n_rc, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        r0 = b * GEMM_ROW_CHUNK
        gn = <int>(min(r0 + GEMM_ROW_CHUNK, 3 * n_e) - r0)
        # column-major: H^T[:, rows] = S_hat . V[rows]^T
        _dgemm("T", "N", &gm, &gn, &gk, &one, <double *>&S_hat[0, 0], &lda,
               <double *>&V[r0, 0], &lda, &zero, &H[r0, 0], &ldc)
    # 2. scatter by blocks of columns (each output element written by one thread)
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        m0 = b * COL_BLOCK
        m1 = min(m0 + COL_BLOCK, Mz)
        kmlip_scatter_force_rows(&H[0, 0], Mz, &A[0, 0], &AC[0, 0], &pv[0, 0], &cl[0], &nb[0],
                                 &vec[0, 0], n_e, m0, m1, col0, &outF[0, 0], &outW[0, 0],
                                 outF.shape[1])


def gemm_scatter_force_rows_f32(const float[:, ::1] V, const float[:, ::1] D,
                                float[:, ::1] H, const double[:, ::1] hu,
                                const double[:, ::1] A, const double[:, ::1] AC,
                                const double[:, ::1] pv, const int64_t[::1] cl,
                                const int64_t[::1] nb, const double[:, ::1] vec,
                                Py_ssize_t col0, double[:, ::1] outF, double[:, ::1] outW,
                                n_threads=None):
    """:func:`gemm_scatter_force_rows` in mixed precision: ``H = V @ D.T`` in float32 with
    ``D`` the sparse points centred on ``u`` and ``hu = values . u`` (n_e, 3) in double, as
    :func:`scatter_force_rows_f32`."""
    cdef Py_ssize_t n_e = pv.shape[0]
    cdef Py_ssize_t Mz = D.shape[0]
    cdef Py_ssize_t F = D.shape[1]
    _check_scatter("gemm_scatter_force_rows_f32", H.shape[0], Mz, A, AC, pv, cl, nb, vec, col0,
                   outF, outW)
    if V.shape[0] != 3 * n_e or V.shape[1] != F or H.shape[1] != Mz:
        raise ValueError("gemm_scatter_force_rows_f32: inconsistent V / D / H shapes")
    if hu.shape[0] != n_e or hu.shape[1] != 3:
        raise ValueError("gemm_scatter_force_rows_f32: hu must be (n_e, 3)")
    if n_e == 0 or Mz == 0:
        return
    if F == 0 or 3 * n_e > 2147483647:
        raise ValueError("gemm_scatter_force_rows_f32: no features or too many entries")
    cdef int nt = _scatter_threads(n_threads, n_e * Mz * (F // 16 + 1))
    cdef Py_ssize_t n_rc = (3 * n_e + GEMM_ROW_CHUNK - 1) // GEMM_ROW_CHUNK
    cdef Py_ssize_t n_blocks = (Mz + COL_BLOCK - 1) // COL_BLOCK
    cdef Py_ssize_t b, r0, m0, m1
    cdef int gm = <int>Mz, gn, gk = <int>F, lda = <int>F, ldc = <int>Mz
    cdef float one = 1.0, zero = 0.0
    for b in prange(n_rc, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        r0 = b * GEMM_ROW_CHUNK
        gn = <int>(min(r0 + GEMM_ROW_CHUNK, 3 * n_e) - r0)
        _sgemm("T", "N", &gm, &gn, &gk, &one, <float *>&D[0, 0], &lda,
               <float *>&V[r0, 0], &lda, &zero, &H[r0, 0], &ldc)
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        m0 = b * COL_BLOCK
        m1 = min(m0 + COL_BLOCK, Mz)
        kmlip_scatter_force_rows_f(&H[0, 0], &hu[0, 0], Mz, &A[0, 0], &AC[0, 0], &pv[0, 0],
                                   &cl[0], &nb[0], &vec[0, 0], n_e, m0, m1, col0, &outF[0, 0],
                                   &outW[0, 0], outF.shape[1])


def gemm(const double[:, ::1] A, const double[:, ::1] B, double[:, ::1] out, bint trans_b,
         n_threads=None):
    """``out = A @ B.T`` (``trans_b``) or ``A @ B`` in blocks of 64 rows of A, one BLAS call
    (single-threaded BLAS) per block inside an OpenMP loop: the block partition does not depend
    on the thread count, so neither do the bits of the result.

    Parameters
    ----------
    A : (n, K) float64
    B : (m, K) float64 if ``trans_b`` else (K, m)
    out : (n, m) float64, overwritten
    n_threads : int or None
        Upper bound on the threads; small products run on one.
    """
    cdef Py_ssize_t n = A.shape[0], K = A.shape[1]
    cdef Py_ssize_t m = B.shape[0] if trans_b else B.shape[1]
    if (B.shape[1] if trans_b else B.shape[0]) != K or out.shape[0] != n or out.shape[1] != m:
        raise ValueError("gemm: inconsistent shapes")
    if n == 0 or m == 0:
        return
    if K == 0:
        out[:, :] = 0.0
        return
    if n > 2147483647 or m > 2147483647 or K > 2147483647:
        raise ValueError("gemm: matrix too large")
    cdef Py_ssize_t n_blocks = (n + GEMM_ROW_BLOCK - 1) // GEMM_ROW_BLOCK
    cdef Py_ssize_t b, r0
    cdef int nt = _threads(n_threads)
    if n * m * K < 4 * MIN_PARALLEL_WORK or n_blocks < 2:
        nt = 1
    cdef int gm = <int>m, gr, gk = <int>K, lda = <int>K, ldb, ldc = <int>m
    cdef double one = 1.0, zero = 0.0
    cdef char *ta = "T" if trans_b else "N"
    ldb = <int>K if trans_b else <int>m
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        r0 = b * GEMM_ROW_BLOCK
        gr = <int>(min(r0 + GEMM_ROW_BLOCK, n) - r0)
        # column-major: out^T[:, rows] = op(B)^T . A[rows]^T
        _dgemm(ta, "N", &gm, &gr, &gk, &one, <double *>&B[0, 0], &ldb,
               <double *>&A[r0, 0], &lda, &zero, &out[r0, 0], &ldc)


def rowwise_dot(const double[:, ::1] A, const double[:, ::1] B, n_threads=None):
    """``sum(A * B, axis=1)`` in one pass (no temporary), shape (n,)."""
    cdef Py_ssize_t n = A.shape[0], K = A.shape[1], i, k
    if B.shape[0] != n or B.shape[1] != K:
        raise ValueError("rowwise_dot: inconsistent shapes")
    res = np.zeros(n)
    cdef double[::1] r = res
    cdef double s
    cdef int nt = _threads(n_threads)
    if n * K < MIN_PARALLEL_WORK:
        nt = 1
    for i in prange(n, nogil=True, num_threads=nt, schedule="dynamic", chunksize=64):
        s = 0.0
        for k in range(K):
            s = s + A[i, k] * B[i, k]
        r[i] = s
    return res


cdef enum:
    # Rows of K per task of tri_square_norms (a multiple of the GEMM register tile).
    TRI_ROW_BLOCK = 128


def tri_square_norms(const double[:, ::1] K, const double[:, ::1] P, Py_ssize_t block,
                     n_threads=None):
    """Squared norms ``|T_t k|^2`` of every row ``k`` of K for one or two lower triangular
    (M, M) matrices T_t packed by :func:`pack_lower`.

    The products skip the zero triangles: output column block j of ``K T^T`` needs only the
    first ``(j + 1) block`` columns of K, so each product costs about ``n M^2 (1 + block/M)``
    flops in GEMM calls (one single-threaded BLAS call per (row block, column block), fixed
    blocks: the same bits for any thread count), against ``n M^2`` for a triangular solve at a
    lower rate.

    Parameters
    ----------
    K : (n, M) float64
    P : (M, t M) float64, t = 1 or 2
        ``[T_1^T block 0 | T_2^T block 0 | T_1^T block 1 | ...]`` (column blocks of width
        ``block``, the last one narrower).
    block : int
        Column block width used in P.
    n_threads : int or None

    Returns
    -------
    ndarray, shape (t, n)
        ``|T_t k_i|^2``.
    """
    cdef Py_ssize_t n = K.shape[0], M = K.shape[1]
    cdef Py_ssize_t t = P.shape[1] // M if M else 1
    if P.shape[0] != M or t < 1 or t > 2 or P.shape[1] != t * M or block < 1:
        raise ValueError("tri_square_norms: inconsistent K / P shapes or block")
    res = np.zeros((t, n))
    if n == 0 or M == 0:
        return res
    if M > 2147483647 or n > 2147483647:
        raise ValueError("tri_square_norms: matrix too large")
    cdef double[:, ::1] sq = res
    cdef Py_ssize_t n_rb = (n + TRI_ROW_BLOCK - 1) // TRI_ROW_BLOCK
    cdef Py_ssize_t n_cb = (M + block - 1) // block
    cdef int nt = _threads(n_threads)
    if n * M * M < 2 * MIN_PARALLEL_WORK or n_rb < 2:
        nt = 1
    cdef double[:, ::1] buf = np.empty((nt, TRI_ROW_BLOCK * t * block))
    cdef Py_ssize_t rb, r0, r, j, c, c0, wdt, q
    cdef int tid, gm, gn, gk, ldk = <int>M, ldp = <int>(t * M), ldc
    cdef double one = 1.0, zero = 0.0, acc, x
    cdef double *out
    for rb in prange(n_rb, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        tid = threadid()
        r0 = rb * TRI_ROW_BLOCK
        gn = <int>(min(r0 + TRI_ROW_BLOCK, n) - r0)
        out = &buf[tid, 0]
        for j in range(n_cb):
            c0 = j * block
            wdt = min(block, M - c0)
            gm = <int>(t * wdt)
            gk = <int>(c0 + wdt)
            ldc = gm
            # column-major: out^T (t wdt x rows) = P[:gk, t c0 : t (c0 + wdt)]^T . K[rows, :gk]^T
            _dgemm("N", "N", &gm, &gn, &gk, &one, <double *>&P[0, t * c0], &ldp,
                   <double *>&K[r0, 0], &ldk, &zero, out, &ldc)
            for r in range(gn):
                for q in range(t):
                    acc = 0.0
                    for c in range(wdt):
                        x = out[r * gm + q * wdt + c]
                        acc = acc + x * x
                    sq[q, r0 + r] += acc
    return res


def pack_lower(mats, Py_ssize_t block):
    """Packs one or two lower triangular (M, M) matrices for :func:`tri_square_norms`."""
    mats = [np.asarray(T, dtype=np.float64) for T in mats]
    if not 1 <= len(mats) <= 2:
        raise ValueError("pack_lower: one or two matrices")
    cdef Py_ssize_t M = mats[0].shape[0], t = len(mats), j, c0, wdt, q
    if block < 1 or any(T.shape != (M, M) for T in mats):
        raise ValueError("pack_lower: matrices must be square of the same size")
    P = np.zeros((M, t * M))
    for j in range((M + block - 1) // block):
        c0 = j * block
        wdt = min(block, M - c0)
        for q in range(t):
            P[:, t * c0 + q * wdt:t * c0 + (q + 1) * wdt] = mats[q][c0:c0 + wdt, :].T
    return P


def tpqrt_many(list tops, list bottoms, list tri_rows, int nb, n_threads=None):
    """Triangular-pentagonal QR updates (LAPACK dtpqrt), several at once in an OpenMP loop:
    for each k, the upper triangular ``tops[k]`` (n, n) becomes the R factor of
    ``[tops[k]; bottoms[k]]`` (``bottoms[k]`` (m_k, n) is overwritten). Independent updates of
    a streaming QR run in parallel this way (SciPy's wrapper holds the GIL), each with
    single-threaded BLAS (the caller's ``serial_blas``).

    Parameters
    ----------
    tops : list of (n, n) float64 Fortran-ordered arrays, updated in place
    bottoms : list of (m_k, n) float64 Fortran-ordered arrays, overwritten
    tri_rows : list of int
        ``l`` of dtpqrt: the last ``l`` rows of ``bottoms[k]`` are upper trapezoidal (0 for a
        full block, n for an upper triangular one).
    nb : int
        Block size of dtpqrt.
    n_threads : int or None
    """
    cdef Py_ssize_t K = len(tops), k
    if len(bottoms) != K or len(tri_rows) != K:
        raise ValueError("tpqrt_many: tops, bottoms and tri_rows differ in length")
    if K == 0:
        return
    cdef int n = tops[0].shape[1]
    if nb < 1:
        raise ValueError("tpqrt_many: nb must be >= 1")
    nb = min(nb, max(n, 1))
    cdef int[::1] ms = np.empty(K, dtype=np.intc)
    cdef int[::1] ls = np.empty(K, dtype=np.intc)
    cdef int[::1] info = np.zeros(K, dtype=np.intc)
    ptr_a = np.empty(K, dtype=np.uintp)
    ptr_b = np.empty(K, dtype=np.uintp)
    for k in range(K):
        a, b = tops[k], bottoms[k]
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) \
                or a.dtype != np.float64 or b.dtype != np.float64 \
                or not a.flags.f_contiguous or not b.flags.f_contiguous or not a.flags.writeable \
                or not b.flags.writeable:
            raise ValueError("tpqrt_many: arrays must be writeable Fortran-ordered float64")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != n or a.shape[1] != n or b.shape[1] != n:
            raise ValueError("tpqrt_many: tops must be (n, n) and bottoms (m, n)")
        if b.shape[0] > 2147483647 or not 0 <= tri_rows[k] <= min(b.shape[0], n):
            raise ValueError("tpqrt_many: bad bottom block or tri_rows")
        ms[k] = b.shape[0]
        ls[k] = tri_rows[k]
        ptr_a[k] = a.ctypes.data
        ptr_b[k] = b.ctypes.data
    cdef size_t[::1] pa = ptr_a
    cdef size_t[::1] pb = ptr_b
    cdef int nt = _threads(n_threads)
    nt = min(nt, <int>K)
    cdef double[:, ::1] tbuf = np.empty((nt, nb * n + 1))
    cdef double[:, ::1] wbuf = np.empty((nt, nb * n + 1))
    cdef int tid, lda = n, ldt = nb, ldb
    for k in prange(K, nogil=True, num_threads=nt, schedule="dynamic", chunksize=1):
        tid = threadid()
        ldb = max(ms[k], 1)
        if ms[k] > 0:
            _dtpqrt(&ms[k], &n, &ls[k], &nb, <double *>pa[k], &lda, <double *>pb[k], &ldb,
                    &tbuf[tid, 0], &ldt, &wbuf[tid, 0], &info[k])
    for k in range(K):
        if info[k] != 0:
            raise np.linalg.LinAlgError(f"dtpqrt failed (info={info[k]})")


def row_prep(const double[:, :, ::1] values, const double[:, ::1] Xh,
             const int64_t[::1] centers, const double[::1] u, double[:, ::1] pv,
             double[:, ::1] hu, float[:, ::1] V32, n_threads=None):
    """One parallel pass over a chunk of pair gradients for the training rows:
    ``pv[e, a] = values[e, a] . Xh[centers[e]]`` and, when ``V32`` is given (mixed
    precision), ``hu[e, a] = values[e, a] . u`` and ``V32[3 e + a] = float32(values[e, a])``.

    Parameters
    ----------
    values : (n_e, 3, F) float64
    Xh : (n_atoms, F) float64
        Normalised features.
    centers : (n_e,) int64
        Row of Xh of every entry.
    u : (F,) float64
        Mean sparse direction (ignored without V32).
    pv, hu : (n_e, 3) float64, written
    V32 : (3 n_e, F) float32 or None, written
    n_threads : int or None
    """
    cdef Py_ssize_t n_e = values.shape[0], F = values.shape[2], e, a, k
    cdef bint mixed = V32 is not None
    if values.shape[1] != 3 or Xh.shape[1] != F or centers.shape[0] != n_e \
            or pv.shape[0] != n_e or pv.shape[1] != 3:
        raise ValueError("row_prep: inconsistent shapes")
    if mixed and (u.shape[0] != F or hu.shape[0] != n_e or hu.shape[1] != 3
                  or V32.shape[0] != 3 * n_e or V32.shape[1] != F):
        raise ValueError("row_prep: inconsistent mixed-precision shapes")
    for e in range(n_e):
        if centers[e] < 0 or centers[e] >= Xh.shape[0]:
            raise ValueError("row_prep: centre index out of range")
    if n_e == 0:
        return
    cdef int nt = _threads(n_threads)
    if n_e * F * 3 < MIN_PARALLEL_WORK:
        nt = 1
    cdef double s, t, x
    cdef const double *xp
    cdef const double *vp
    for e in prange(n_e, nogil=True, num_threads=nt, schedule="dynamic", chunksize=64):
        xp = &Xh[centers[e], 0]
        for a in range(3):
            vp = &values[e, a, 0]
            s = 0.0
            if mixed:
                t = 0.0
                for k in range(F):
                    x = vp[k]
                    s = s + x * xp[k]
                    t = t + x * u[k]
                    V32[3 * e + a, k] = <float>x
                hu[e, a] = t
            else:
                for k in range(F):
                    s = s + vp[k] * xp[k]
            pv[e, a] = s


def kernel_weights(const double[:, ::1] C, const double[::1] alpha, int zeta, double[:, ::1] K,
                   const int64_t[::1] rows, Py_ssize_t col0, double[:, ::1] w,
                   n_threads=None):
    """From the cosines ``C = X_hat S_hat^T`` of one species block, in one parallel pass:
    ``w = alpha * C^(zeta-1)``, the unit local energies ``e = sum_m w C`` (returned, shape
    (n,)) and, when K is given, the kernel rows ``K[rows[i], col0 + m] = C[i, m]^zeta``.

    Parameters
    ----------
    C : (n, M_z) float64
    alpha : (M_z,) float64
    zeta : int >= 1
    K : (n_atoms, M) float64 or None, written at ``rows`` and columns ``col0 .. col0 + M_z``
    rows : (n,) int64
        Row of K of every row of C (ignored without K).
    col0 : int
    w : (n, M_z) float64, written
    n_threads : int or None
    """
    cdef Py_ssize_t n = C.shape[0], M = C.shape[1], i, m
    cdef int t
    if alpha.shape[0] != M or w.shape[0] != n or w.shape[1] != M or zeta < 1:
        raise ValueError("kernel_weights: inconsistent shapes or zeta < 1")
    cdef bint want_k = K is not None
    if want_k:
        if rows.shape[0] != n or col0 < 0 or col0 + M > K.shape[1]:
            raise ValueError("kernel_weights: K, rows or col0 do not fit")
        for i in range(n):
            if rows[i] < 0 or rows[i] >= K.shape[0]:
                raise ValueError("kernel_weights: row index out of range")
    e_a = np.zeros(n)
    cdef double[::1] e = e_a
    if n == 0 or M == 0:
        return e_a
    cdef int nt = _threads(n_threads)
    if n * M < MIN_PARALLEL_WORK:
        nt = 1
    cdef double c, p, s, wm
    cdef double *kr
    for i in prange(n, nogil=True, num_threads=nt, schedule="dynamic", chunksize=16):
        s = 0.0
        kr = &K[rows[i], col0] if want_k else NULL
        for m in range(M):
            c = C[i, m]
            p = 1.0
            for t in range(zeta - 1):
                p = p * c
            if want_k:
                kr[m] = p * c
            wm = p * alpha[m]
            w[i, m] = wm
            s = s + wm * c
        e[i] = s
    return e_a
