"""OpenMP driver of the SOAP kernel: the per-centre maths lives in soap_core.h."""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t
from libc.string cimport memset

import numpy as np

cdef extern from "soap_core.h" nogil:
    ctypedef struct kmlip_soap_params:
        int64_t n_max
        int64_t l_max
        int64_t n_species
        int64_t n_features
        double r_cut
        double cutoff_width
        double center_weight
        const double *A
        const double *B
        const int64_t *feat_index
        const double *feat_scale
        const double *ylm_norm
    int64_t kmlip_soap_work_size(const kmlip_soap_params *p, int64_t n_neigh)
    void kmlip_soap_centre(const kmlip_soap_params *p, int64_t center_species, int64_t n_neigh,
                           const double *vec, const int64_t *spec, double *work,
                           double *out_p, double *out_grad)
    void kmlip_soap_normalize(int64_t F, double *pv, int64_t n_entries, double *grad)
    void kmlip_soap_centre_vjp(const kmlip_soap_params *p, int64_t center_species,
                               int64_t n_neigh, const double *vec, const int64_t *spec,
                               const double *v, int64_t normalized, double *work,
                               double *out_f)
    int64_t kmlip_soap_mu1nu1_work_size(const kmlip_soap_params *p, int64_t n_neigh)
    void kmlip_soap_centre_mu1nu1(const kmlip_soap_params *p, int64_t center_species,
                                  int64_t n_neigh, const double *vec, const int64_t *spec,
                                  double *work, double *out_p, double *out_grad)
    void kmlip_soap_centre_vjp_mu1nu1(const kmlip_soap_params *p, int64_t center_species,
                                      int64_t n_neigh, const double *vec, const int64_t *spec,
                                      const double *v, int64_t normalized, double *work,
                                      double *out_f)


cdef kmlip_soap_params _params(const double[:, ::1] A, const double[:, :, ::1] B,
                               const int64_t[:, :, ::1] feat_index,
                               const double[:, :, ::1] feat_scale,
                               const double[::1] ylm_norm, int n_max, int l_max, int n_species,
                               int n_features, double r_cut, double cutoff_width,
                               double center_weight):
    """Plain-C view of the descriptor's tables (the arrays must outlive the call)."""
    cdef kmlip_soap_params p
    p.n_max = n_max
    p.l_max = l_max
    p.n_species = n_species
    p.n_features = n_features
    p.r_cut = r_cut
    p.cutoff_width = cutoff_width
    p.center_weight = center_weight
    p.A = &A[0, 0]
    p.B = &B[0, 0, 0]
    p.feat_index = &feat_index[0, 0, 0]
    p.feat_scale = &feat_scale[0, 0, 0]
    p.ylm_norm = &ylm_norm[0]
    return p


cdef double[:, ::1] _work(const kmlip_soap_params *p, const int64_t[::1] pair_offsets,
                          int n_threads, bint mu1nu1=False):
    """Per-thread scratch rows sized for the centre with the most neighbours."""
    cdef Py_ssize_t i, n, max_neigh = 0
    for i in range(pair_offsets.shape[0] - 1):
        n = pair_offsets[i + 1] - pair_offsets[i]
        if n > max_neigh:
            max_neigh = n
    if mu1nu1:
        return np.empty((max(n_threads, 1), kmlip_soap_mu1nu1_work_size(p, max_neigh)))
    return np.empty((max(n_threads, 1), kmlip_soap_work_size(p, max_neigh)))


def compute(const double[:, ::1] A, const double[:, :, ::1] B,
            const int64_t[:, :, ::1] feat_index, const double[:, :, ::1] feat_scale,
            const double[::1] ylm_norm, int n_max, int l_max, int n_species, int n_features,
            double r_cut, double cutoff_width, double center_weight, bint normalize,
            const int64_t[::1] center_species, const int64_t[::1] pair_offsets,
            const double[:, ::1] pair_vectors, const int64_t[::1] pair_species,
            double[:, ::1] out_X, double[:, :, ::1] out_grad, int n_threads,
            bint mu1nu1=False):
    """Fills out_X (n_atoms, F) and, if out_grad is not None, out_grad (n_atoms + n_pairs, 3, F).

    Entries of centre i in out_grad start at pair_offsets[i] + i: the self term, then its pairs.
    out_grad may hold garbage (np.empty). With several species the kernel skips the species
    blocks a pair cannot move, so the thread that computes a centre zeroes its entries first
    (first touch and zeroing in parallel, on the thread that then writes them); with one species
    and in mu1nu1 every value is written and nothing is zeroed.
    mu1nu1: the species-compressed spectrum (tables in the layout of soap_core.h's mu1nu1).
    """
    cdef kmlip_soap_params p = _params(A, B, feat_index, feat_scale, ylm_norm, n_max, l_max,
                                       n_species, n_features, r_cut, cutoff_width,
                                       center_weight)
    cdef Py_ssize_t n_atoms = out_X.shape[0]
    cdef Py_ssize_t i, n_neigh, start
    cdef double[:, ::1] work = _work(&p, pair_offsets, n_threads, mu1nu1)
    cdef bint grads = out_grad is not None
    cdef bint zero_grad = grads and not mu1nu1 and n_species > 1
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
            if zero_grad:
                memset(gptr, 0, sizeof(double) * (n_neigh + 1) * 3 * out_grad.shape[2])
        else:
            gptr = NULL
        if mu1nu1:
            kmlip_soap_centre_mu1nu1(&p, center_species[i], n_neigh, vptr, sptr,
                                     &work[tid, 0], &out_X[i, 0], gptr)
        else:
            kmlip_soap_centre(&p, center_species[i], n_neigh, vptr, sptr, &work[tid, 0],
                              &out_X[i, 0], gptr)
        if normalize:
            kmlip_soap_normalize(n_features, &out_X[i, 0], (n_neigh + 1) if grads else 0, gptr)


def vjp(const double[:, ::1] A, const double[:, :, ::1] B,
        const int64_t[:, :, ::1] feat_index, const double[:, :, ::1] feat_scale,
        const double[::1] ylm_norm, int n_max, int l_max, int n_species, int n_features,
        double r_cut, double cutoff_width, double center_weight, bint normalize,
        const int64_t[::1] center_species, const int64_t[::1] pair_offsets,
        const double[:, ::1] pair_vectors, const int64_t[::1] pair_species,
        const double[:, ::1] V, double[:, ::1] out_f, int n_threads, bint mu1nu1=False):
    """out_f[k] = dE/dr_ij of pair k, given V[i] = dE/dX_i (n_atoms, F)."""
    cdef kmlip_soap_params p = _params(A, B, feat_index, feat_scale, ylm_norm, n_max, l_max,
                                       n_species, n_features, r_cut, cutoff_width,
                                       center_weight)
    cdef Py_ssize_t n_atoms = V.shape[0]
    cdef Py_ssize_t i, n_neigh, start
    cdef double[:, ::1] work = _work(&p, pair_offsets, n_threads, mu1nu1)
    cdef int tid
    for i in prange(n_atoms, nogil=True, schedule="dynamic", chunksize=1,
                    num_threads=n_threads):
        tid = threadid()
        start = pair_offsets[i]
        n_neigh = pair_offsets[i + 1] - start
        if n_neigh > 0 and mu1nu1:
            kmlip_soap_centre_vjp_mu1nu1(&p, center_species[i], n_neigh,
                                         &pair_vectors[start, 0], &pair_species[start],
                                         &V[i, 0], normalize, &work[tid, 0], &out_f[start, 0])
        elif n_neigh > 0:
            kmlip_soap_centre_vjp(&p, center_species[i], n_neigh, &pair_vectors[start, 0],
                                  &pair_species[start], &V[i, 0], normalize, &work[tid, 0],
                                  &out_f[start, 0])
