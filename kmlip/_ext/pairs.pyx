"""Pair environments of Distance2b from a full neighbour list: the unordered pairs, their
distances and keys, and their gradients in the per-pair layout, in two OpenMP passes over the
list (a mask, then a fill at the mask's prefix sums)."""
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int64_t

import numpy as np


cdef inline bint _allowed(const int64_t[::1] allowed, int64_t key) noexcept nogil:
    cdef int64_t lo = 0, hi = allowed.shape[0] - 1, mid
    while lo <= hi:
        mid = (lo + hi) // 2
        if allowed[mid] == key:
            return True
        if allowed[mid] < key:
            lo = mid + 1
        else:
            hi = mid - 1
    return False


def half_pairs(const int64_t[::1] centers, const int64_t[::1] neighbors,
               const double[:, ::1] vectors, const double[::1] distances,
               const int64_t[::1] numbers, double r_cut, const int64_t[::1] allowed,
               int64_t key_base, bint gradients, int n_threads):
    """Unordered pairs within ``r_cut`` whose species-pair key is in ``allowed`` (sorted).

    A full list holds each pair twice: the copy with ``i < j`` is kept, and for an image of an
    atom with itself the copy whose vector's first non-zero component is positive.

    Returns
    -------
    i, j : int64 (n_env,)
    D : float64 (n_env, 3)
    d : float64 (n_env,)
    keys : int64 (n_env,)
    grad : None, or (values (2 n_env, 3, 1), neighbors (2 n_env,), vectors (2 n_env, 3)):
        entry 2e is ``(e, i, -r_hat, 0)``, entry 2e+1 ``(e, j, r_hat, r_ij)``.
    """
    cdef Py_ssize_t n = centers.shape[0], p, e, c
    cdef int8_t[::1] keep = np.zeros(n, dtype=np.int8)
    cdef int64_t a, b, za, zb, key
    cdef double first
    for p in prange(n, nogil=True, num_threads=n_threads, schedule="static"):
        a = centers[p]
        b = neighbors[p]
        if distances[p] >= r_cut:
            continue
        if a > b:
            continue
        if a == b:
            first = vectors[p, 0]
            if first == 0:
                first = vectors[p, 1]
            if first == 0:
                first = vectors[p, 2]
            if first <= 0:
                continue
        za = numbers[a]
        zb = numbers[b]
        if za <= zb:
            key = key_base * za + zb
        else:
            key = key_base * zb + za
        if _allowed(allowed, key):
            keep[p] = 1
    pos_np = np.cumsum(np.asarray(keep, dtype=np.int64)) - 1
    cdef int64_t[::1] pos = pos_np
    cdef Py_ssize_t m = int(pos_np[-1]) + 1 if n else 0
    i_np = np.empty(m, dtype=np.int64)
    j_np = np.empty(m, dtype=np.int64)
    D_np = np.empty((m, 3))
    d_np = np.empty(m)
    k_np = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] oi = i_np, oj = j_np, ok = k_np
    cdef double[:, ::1] oD = D_np
    cdef double[::1] od = d_np
    val_np = np.zeros((2 * m, 3, 1)) if gradients else np.zeros((0, 3, 1))
    nb_np = np.empty(2 * m if gradients else 0, dtype=np.int64)
    vec_np = np.zeros((2 * m, 3)) if gradients else np.zeros((0, 3))
    cdef double[:, :, ::1] gv = val_np
    cdef int64_t[::1] gn = nb_np
    cdef double[:, ::1] gvec = vec_np
    cdef double inv
    for p in prange(n, nogil=True, num_threads=n_threads, schedule="static"):
        if not keep[p]:
            continue
        e = pos[p]
        a = centers[p]
        b = neighbors[p]
        oi[e] = a
        oj[e] = b
        od[e] = distances[p]
        za = numbers[a]
        zb = numbers[b]
        if za <= zb:
            ok[e] = key_base * za + zb
        else:
            ok[e] = key_base * zb + za
        for c in range(3):
            oD[e, c] = vectors[p, c]
        if gradients:
            inv = 1.0 / distances[p]
            gn[2 * e] = a
            gn[2 * e + 1] = b
            for c in range(3):
                gv[2 * e, c, 0] = -vectors[p, c] * inv
                gv[2 * e + 1, c, 0] = vectors[p, c] * inv
                gvec[2 * e + 1, c] = vectors[p, c]
    grad = (val_np, nb_np, vec_np) if gradients else None
    return i_np, j_np, D_np, d_np, k_np, grad
