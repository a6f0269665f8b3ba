"""OpenMP driver of the ACSF kernel: the per-centre maths lives in acsf_core.h."""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t

import numpy as np

cdef extern from "acsf_core.h" nogil:
    ctypedef struct kmlip_acsf_params:
        int64_t n_species
        int64_t n_g2
        int64_t n_g3
        int64_t n_g4
        int64_t n_g5
        int64_t n_features
        double r_cut
        const double *g2
        const double *g3
        const double *g4
        const double *g5
        const int64_t *radial_block
        const int64_t *angular_block
    int64_t kmlip_acsf_work_size(const kmlip_acsf_params *p, int64_t n_neigh)
    void kmlip_acsf_centre(const kmlip_acsf_params *p, int64_t n_neigh, const double *vec,
                           const int64_t *spec, double *work, double *out_x, double *out_grad)
    void kmlip_acsf_centre_vjp(const kmlip_acsf_params *p, int64_t n_neigh, const double *vec,
                               const int64_t *spec, const double *v, double *work,
                               double *out_x, double *out_f)


cdef double _dummy_prm[3]
_dummy_prm[0] = _dummy_prm[1] = _dummy_prm[2] = 0.0


cdef kmlip_acsf_params _params(const double[:, ::1] g2, const double[::1] g3,
                               const double[:, ::1] g4, const double[:, ::1] g5,
                               const int64_t[::1] radial_block,
                               const int64_t[:, ::1] angular_block, double r_cut,
                               int n_features):
    """Plain-C view of the descriptor's tables (the arrays must outlive the call); an empty
    family points at a dummy row, its count is 0."""
    cdef kmlip_acsf_params p
    p.n_species = radial_block.shape[0]
    p.n_g2 = g2.shape[0]
    p.n_g3 = g3.shape[0]
    p.n_g4 = g4.shape[0]
    p.n_g5 = g5.shape[0]
    p.n_features = n_features
    p.r_cut = r_cut
    p.g2 = &g2[0, 0] if p.n_g2 else _dummy_prm
    p.g3 = &g3[0] if p.n_g3 else _dummy_prm
    p.g4 = &g4[0, 0] if p.n_g4 else _dummy_prm
    p.g5 = &g5[0, 0] if p.n_g5 else _dummy_prm
    p.radial_block = &radial_block[0]
    p.angular_block = &angular_block[0, 0]
    return p


cdef Py_ssize_t _max_neigh(const int64_t[::1] pair_offsets):
    cdef Py_ssize_t i, n, m = 0
    for i in range(pair_offsets.shape[0] - 1):
        n = pair_offsets[i + 1] - pair_offsets[i]
        if n > m:
            m = n
    return m


def compute(const double[:, ::1] g2, const double[::1] g3, const double[:, ::1] g4,
            const double[:, ::1] g5, const int64_t[::1] radial_block,
            const int64_t[:, ::1] angular_block, double r_cut, int n_features,
            const int64_t[::1] pair_offsets, const double[:, ::1] pair_vectors,
            const int64_t[::1] pair_species, double[:, ::1] out_X, double[:, :, ::1] out_grad,
            int n_threads):
    """Fills out_X (n_atoms, F) and, if out_grad is not None, out_grad (n_atoms + n_pairs, 3, F).

    Entries of centre i in out_grad start at pair_offsets[i] + i: the self term, then its pairs.
    """
    cdef kmlip_acsf_params p = _params(g2, g3, g4, g5, radial_block, angular_block, r_cut,
                                       n_features)
    cdef Py_ssize_t n_atoms = out_X.shape[0]
    cdef Py_ssize_t i, start, n_neigh
    cdef double[:, ::1] work = np.empty((max(n_threads, 1),
                                         kmlip_acsf_work_size(&p, _max_neigh(pair_offsets))))
    cdef bint grads = out_grad is not None
    cdef double *gptr
    cdef const double *vptr
    cdef const int64_t *sptr
    cdef double dummy_v[3]
    cdef int64_t dummy_s[1]
    cdef int tid

    for i in prange(n_atoms, nogil=True, schedule="dynamic", chunksize=1,
                    num_threads=n_threads):
        tid = threadid()
        start = pair_offsets[i]
        n_neigh = pair_offsets[i + 1] - start
        if n_neigh > 0:
            vptr = &pair_vectors[start, 0]
            sptr = &pair_species[start]
        else:
            vptr = dummy_v
            sptr = dummy_s
        if grads:
            gptr = &out_grad[start + i, 0, 0]
        else:
            gptr = NULL
        kmlip_acsf_centre(&p, n_neigh, vptr, sptr, &work[tid, 0], &out_X[i, 0], gptr)


def vjp(const double[:, ::1] g2, const double[::1] g3, const double[:, ::1] g4,
        const double[:, ::1] g5, const int64_t[::1] radial_block,
        const int64_t[:, ::1] angular_block, double r_cut, int n_features,
        const int64_t[::1] pair_offsets, const double[:, ::1] pair_vectors,
        const int64_t[::1] pair_species, const double[:, ::1] V, double[:, ::1] out_f,
        int n_threads):
    """out_f[k] = dE/dr_ij of pair k (n_pairs, 3), given V[i] = dE/dX_i (n_atoms, F)."""
    cdef kmlip_acsf_params p = _params(g2, g3, g4, g5, radial_block, angular_block, r_cut,
                                       n_features)
    cdef Py_ssize_t n_atoms = V.shape[0]
    cdef Py_ssize_t i, start, n_neigh
    cdef double[:, ::1] work = np.empty((max(n_threads, 1),
                                         kmlip_acsf_work_size(&p, _max_neigh(pair_offsets))))
    cdef double[:, ::1] scratch_x = np.empty((max(n_threads, 1), max(n_features, 1)))
    cdef int tid
    for i in prange(n_atoms, nogil=True, schedule="dynamic", chunksize=1,
                    num_threads=n_threads):
        tid = threadid()
        start = pair_offsets[i]
        n_neigh = pair_offsets[i + 1] - start
        if n_neigh > 0:
            kmlip_acsf_centre_vjp(&p, n_neigh, &pair_vectors[start, 0], &pair_species[start],
                                  &V[i, 0], &work[tid, 0], &scratch_x[tid, 0], &out_f[start, 0])
