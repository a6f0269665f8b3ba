# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP loops around the C contraction kernels of ``contract_core.h``.

Every function here writes each output element from one thread only and accumulates it in a fixed
order, so results are bitwise identical for any thread count.
"""
import numpy as np

cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from kmlip._ext.omp cimport kmlip_omp_get_max_threads


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
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="static"):
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
    for b in prange(n_blocks, nogil=True, num_threads=nt, schedule="static"):
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
    for c in prange(n_chunks, nogil=True, num_threads=nt, schedule="static"):
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
