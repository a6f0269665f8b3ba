# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -fno-math-errno
"""Compiled loops of the Ewald summation (see kmlip/ewald.py for the public API).

The per-pair and per-k-vector mathematics lives in ``ewald_core.h`` (plain C, shared with a future
LAMMPS plugin); this module owns the OpenMP loops and the thread-local scratch memory, while every
output array is allocated by NumPy in the caller.

Every loop is written so that each output element is summed by one thread in a fixed order
(real space over a half pair list: each centre's sums in lanes whose partial sums are added in
order, the far ends of the pairs per fixed group of bins, the groups added in order; structure
factors summed per fixed chunk of atoms, the chunks added in order), so results are bitwise
identical for any number of threads.

Compiled with -fno-math-errno (the distutils line above) so that sqrt vectorises; nothing here
reads errno.
"""
from cython.parallel cimport prange

import numpy as np

from kmlip._ext.omp cimport omp_get_thread_num

# Candidate neighbours gathered per chunk in the real-space sum (tuned: the chunk and its
# scratch stay in the L2 cache while every centre atom of a bin runs over it).
_CHUNK = 1024

from libc.stdint cimport int64_t

cdef extern from "ewald_core.h" nogil:
    enum: KMLIP_EWALD_LANES
    enum: KMLIP_EWALD_NACC
    int64_t kmlip_ewald_real_atom(int64_t m, const double *cx, const double *cy,
                                  const double *cz, const double *cq, double xi, double yi,
                                  double zi, double qi, double alpha, double rc2, double *bx,
                                  double *by, double *bz, double *bq, double *be, double *bg,
                                  int64_t *keep, int64_t *idx, double *acc, double *cfx,
                                  double *cfy, double *cfz, double *ce)
    void kmlip_coulomb_pair(double qq, double r2, double *e, double *g)
    enum: KMLIP_EWALD_BLOCK
    void kmlip_ewald_phase_table(const double *s, int64_t n1, int64_t n2, int64_t n3,
                                 int64_t stride, double *tr, double *ti)
    void kmlip_ewald_sf_row(int64_t nj, int64_t ntab, int64_t h, int64_t o2, int64_t o3,
                            int64_t cnt, const double *q, const double *tr, const double *ti,
                            double *outr, double *outi)
    void kmlip_ewald_recip_block(int64_t nrows, const int64_t *rows, int64_t n1, int64_t n2,
                                 int64_t n3, const double *wsr, const double *wsi,
                                 const double *tr, const double *ti, double *g, double *phi)

# Pairs closer than this (Å^2) are coincident atoms: their energy is infinite.
cdef double _TINY_R2 = 1e-20
# Doubles per centre atom of the lane-wise partial sums (kmlip_ewald_real_atom's acc).
cdef int64_t _NSUM = KMLIP_EWALD_NACC * KMLIP_EWALD_LANES
# Doubles per candidate of the chunk buffer: x, y, z, q, then the other ends' fx, fy, fz, e.
cdef int64_t _NCAND = 8
# Fixed partition of the centre bins into at most this many groups: each group sums the
# other ends of its pairs into an array of its own, added in group order at the end, so the
# result is the same for any thread count (and more threads than groups would idle).
_NGROUPS = 16


cdef inline int64_t _floordiv(int64_t a, int64_t n) noexcept nogil:
    cdef int64_t d = a // n
    if (a % n != 0) and ((a < 0) != (n < 0)):
        d -= 1
    return d


cdef int64_t _real_chunk(int64_t cnt, int64_t first, const double *xs, const double *ys,
                         const double *zs, const double *q, int64_t i0, int64_t i1,
                         double alpha, double rc2, double *cand, const int64_t *cidx,
                         int64_t cap, double *scr, int64_t *iscr, double *acc,
                         double *other) noexcept nogil:
    """Pairs of the centre atoms i0..i1 with the cnt gathered candidates of ``cand``.

    ``first``: whether the chunk starts with the centre bin's own atoms (candidate p is atom
    i0 + p), of which each centre takes only those after itself (half list). The candidates'
    sums (the other ends of the pairs) are added to ``other`` (n, 4) at the atom indices
    ``cidx`` and cleared."""
    cdef int64_t i, c, j, p = 0, tiny = 0
    cdef double *cf = cand + 4 * cap
    for c in range(cnt):
        cf[c] = 0.0
        cf[cap + c] = 0.0
        cf[2 * cap + c] = 0.0
        cf[3 * cap + c] = 0.0
    for i in range(i0, i1):
        p = i - i0 + 1 if first else 0
        tiny += kmlip_ewald_real_atom(cnt - p, cand + p, cand + cap + p, cand + 2 * cap + p,
                                      cand + 3 * cap + p, xs[i], ys[i], zs[i], q[i], alpha,
                                      rc2, scr, scr + cap, scr + 2 * cap, scr + 3 * cap,
                                      scr + 4 * cap, scr + 5 * cap, iscr, iscr + cap,
                                      acc + (i - i0) * _NSUM, cf + p, cf + cap + p,
                                      cf + 2 * cap + p, cf + 3 * cap + p)
    for c in range(cnt):
        j = cidx[c]
        other[4 * j] += cf[c]
        other[4 * j + 1] += cf[cap + c]
        other[4 * j + 2] += cf[2 * cap + c]
        other[4 * j + 3] += cf[3 * cap + c]
    return tiny


cdef int64_t _real_bin(int64_t b, const double *x, const double *q, int64_t n,
                       const int64_t *bin_start, int64_t na, int64_t nb, int64_t nc,
                       const int64_t *stencil, int64_t ns, const double *cell, double alpha,
                       double rc2, int64_t cap, double *cand, int64_t *cidx, double *scr,
                       int64_t *iscr, double *acc, double *forces, double *energies,
                       double *virial, double *other) noexcept nogil:
    """Real-space sum for the atoms of centre bin ``b`` over the half stencil.

    ``x`` is (3, n) (SoA). The atoms of the stencil bins, shifted to the images the stencil
    names, are gathered once per centre bin into ``cand`` (``_NCAND * cap`` doubles; in chunks
    of at most ``cap`` atoms, ``cidx`` their indices), and every centre atom of the bin runs over
    each chunk with the vectorised loop of ``kmlip_ewald_real_atom`` (``scr``: 6 * cap doubles,
    ``iscr``: 2 * cap int64 of scratch; ``acc``: the centre atoms' partial sums, _NSUM doubles
    each), so the bookkeeping per neighbour bin is paid once per centre bin, not once per centre
    atom. The stencil is a half stencil starting with (0, 0, 0): each pair is met once, and
    the neighbour's end of it goes to ``other`` (n, 4: force, energy).
    Returns the number of pairs closer than 1e-10 Å."""
    cdef int64_t ia = b // (nb * nc), ib = (b // nc) % nb, ic = b % nc
    cdef int64_t s, ja, jb, jc, sa, sb, sc, i, j, j0, m, k, l, cnt = 0
    cdef int64_t i0 = bin_start[b], i1 = bin_start[b + 1]
    cdef double qi, sx, sy, sz, t
    cdef const double *xs = x
    cdef const double *ys = x + n
    cdef const double *zs = x + 2 * n
    cdef int64_t tiny = 0
    cdef bint first = True
    cdef double *a
    if i0 == i1:
        return 0
    for k in range((i1 - i0) * _NSUM):
        acc[k] = 0.0
    for s in range(ns):
        ja = ia + stencil[3 * s]
        jb = ib + stencil[3 * s + 1]
        jc = ic + stencil[3 * s + 2]
        sa = _floordiv(ja, na)
        sb = _floordiv(jb, nb)
        sc = _floordiv(jc, nc)
        ja -= sa * na
        jb -= sb * nb
        jc -= sc * nc
        k = (ja * nb + jb) * nc + jc
        j0 = bin_start[k]
        m = bin_start[k + 1] - j0
        if m == 0:
            continue
        if cnt + m > cap:
            tiny += _real_chunk(cnt, first, xs, ys, zs, q, i0, i1, alpha, rc2, cand, cidx, cap,
                                scr, iscr, acc, other)
            first = False
            cnt = 0
        # image shift: d = x_j + shift - x_i
        sx = sa * cell[0] + sb * cell[3] + sc * cell[6]
        sy = sa * cell[1] + sb * cell[4] + sc * cell[7]
        sz = sa * cell[2] + sb * cell[5] + sc * cell[8]
        for j in range(m):
            cand[cnt + j] = xs[j0 + j] + sx
            cand[cap + cnt + j] = ys[j0 + j] + sy
            cand[2 * cap + cnt + j] = zs[j0 + j] + sz
            cand[3 * cap + cnt + j] = q[j0 + j]
            cidx[cnt + j] = j0 + j
        cnt += m
    if cnt:
        tiny += _real_chunk(cnt, first, xs, ys, zs, q, i0, i1, alpha, rc2, cand, cidx, cap,
                            scr, iscr, acc, other)
    # reduce the lanes in a fixed order; half list: the whole strain derivative of each pair
    # and the centre's half of its energy
    for i in range(i0, i1):
        qi = q[i]
        a = acc + (i - i0) * _NSUM
        for k in range(KMLIP_EWALD_NACC):
            t = 0.0
            for l in range(KMLIP_EWALD_LANES):
                t += a[k * KMLIP_EWALD_LANES + l]
            if k == 0:
                energies[i] += 0.5 * qi * t
            elif k < 4:
                forces[3 * i + k - 1] += qi * t
            else:
                virial[6 * i + k - 4] += qi * t
    return tiny


def real_space(const double[:, ::1] x, const double[::1] q, const int64_t[::1] bin_start,
               int64_t na, int64_t nb, int64_t nc, const int64_t[:, ::1] stencil,
               const double[:, ::1] cell, double alpha, double rc, int n_threads,
               double[:, ::1] forces, double[::1] energies, double[:, ::1] virial) -> int:
    """Screened real-space sum over all pairs closer than ``rc`` (linked cells, half list).

    Parameters
    ----------
    x : (3, n) wrapped Cartesian positions (Å), coordinate-major, atoms sorted by bin.
    q : (n,) charges (e) in the same order.
    bin_start : (na*nb*nc + 1,) CSR start of each bin's atoms, bins in C order (a, b, c).
    na, nb, nc : number of bins along each cell vector.
    stencil : (ns, 3) bin offsets to visit: (0, 0, 0) first, then one of each pair of opposite
        offsets (pruned to those that can hold a pair < rc).
    cell : (3, 3) cell vectors as rows (Å).
    alpha : splitting parameter (1/Å); rc : cutoff (Å).
    forces, energies, virial : (n, 3), (n,), (n, 6) outputs in e^2/Å units, *added to*
        (virial: each pair's whole strain derivative at one of its ends; only the sum over
        atoms has a meaning).

    Returns
    -------
    int : number of coincident pairs (distance < 1e-10 Å); the caller raises on > 0.

    Memory: per thread, ``_CHUNK`` candidates (16 doubles each) and the partial sums of one
    bin's atoms; for the other ends of the pairs, min(16, bins) arrays of 4 n doubles.
    """
    cdef int64_t n = q.shape[0], nbins = na * nb * nc, ns = stencil.shape[0], b, cap, occ
    cdef int64_t tiny = 0, ngrp, grp, b0, b1, j, g
    cdef int tid
    cdef double rc2 = rc * rc
    cdef double[:, ::1] cand, scr, acc
    cdef int64_t[:, ::1] iscr, cidx
    cdef double[:, :, ::1] other
    if n == 0:
        return 0
    assert x.shape[0] == 3 and x.shape[1] == n
    assert bin_start.shape[0] == nbins + 1 and stencil.shape[1] == 3
    assert stencil[0, 0] == 0 and stencil[0, 1] == 0 and stencil[0, 2] == 0
    assert forces.shape[0] == n and energies.shape[0] == n and virial.shape[0] == n
    assert virial.shape[1] == 6 and forces.shape[1] == 3
    occ = int(np.diff(np.asarray(bin_start)).max())
    cap = max(_CHUNK, occ)
    nt = max(n_threads, 1)
    ngrp = min(_NGROUPS, nbins)
    cand = np.empty((nt, _NCAND * cap))
    cidx = np.empty((nt, cap), dtype=np.int64)
    scr = np.empty((nt, 6 * cap))
    iscr = np.empty((nt, 2 * cap), dtype=np.int64)
    acc = np.empty((nt, occ * _NSUM))
    other = np.zeros((ngrp, n, 4))
    with nogil:
        for grp in prange(ngrp, schedule="dynamic", num_threads=n_threads):
            tid = omp_get_thread_num()
            b0 = grp * nbins // ngrp
            b1 = (grp + 1) * nbins // ngrp
            for b in range(b0, b1):
                tiny += _real_bin(b, &x[0, 0], &q[0], n, &bin_start[0], na, nb, nc,
                                  &stencil[0, 0], ns, &cell[0, 0], alpha, rc2, cap,
                                  &cand[tid, 0], &cidx[tid, 0], &scr[tid, 0], &iscr[tid, 0],
                                  &acc[tid, 0], &forces[0, 0], &energies[0], &virial[0, 0],
                                  &other[grp, 0, 0])
        for j in prange(n, schedule="static", num_threads=n_threads):
            for g in range(ngrp):
                forces[j, 0] += other[g, j, 0]
                forces[j, 1] += other[g, j, 1]
                forces[j, 2] += other[g, j, 2]
                energies[j] += other[g, j, 3]
    return tiny


cdef int _direct_atom(int64_t i, int64_t n, const double *x, const double *q, double *forces,
                      double *energies) noexcept nogil:
    cdef int64_t j
    cdef double dx, dy, dz, r2, e, g, en = 0.0, fx = 0.0, fy = 0.0, fz = 0.0
    cdef int bad = 0
    for j in range(n):
        if j == i:
            continue
        dx = x[3 * j] - x[3 * i]
        dy = x[3 * j + 1] - x[3 * i + 1]
        dz = x[3 * j + 2] - x[3 * i + 2]
        r2 = dx * dx + dy * dy + dz * dz
        if r2 < _TINY_R2:
            bad += 1
            continue
        kmlip_coulomb_pair(q[i] * q[j], r2, &e, &g)
        en = en + e
        fx = fx + g * dx
        fy = fy + g * dy
        fz = fz + g * dz
    energies[i] = 0.5 * en
    forces[3 * i] = fx
    forces[3 * i + 1] = fy
    forces[3 * i + 2] = fz
    return bad


def direct_sum(const double[:, ::1] x, const double[::1] q, int n_threads,
               double[:, ::1] forces, double[::1] energies) -> int:
    """Bare Coulomb sum over all pairs of a non-periodic system (full list, O(n^2)).

    Writes forces (n, 3) and per-atom energies (n,) in e^2/Å units; returns the number of
    coincident pairs."""
    cdef int64_t n = x.shape[0], i
    cdef int bad = 0
    if n == 0:
        return 0
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            bad += _direct_atom(i, n, &x[0, 0], &q[0], &forces[0, 0], &energies[0])
    return bad


def structure_factors(const double[:, ::1] frac, const double[::1] q, const int64_t[:, ::1] rows,
                      int64_t n1, int64_t n2, int64_t n3, int n_threads, double[::1] s_re,
                      double[::1] s_im):
    """S(k) = sum_j q_j exp(i k.r_j) for the half-space k vectors listed by ``rows``.

    Parameters
    ----------
    frac : (n, 3) fractional coordinates; k.r_j = 2 pi (h s1 + k s2 + l s3).
    q : (n,) charges.
    rows : (n_rows, 5) int: h, k, first l, number of l, offset into the flat k list.
    n1, n2, n3 : largest |h|, |k|, |l|.
    s_re, s_im : (n_k,) outputs, overwritten.

    The atoms are cut into at most 64 chunks, a partition fixed by n alone; each chunk sums its
    own partial S(k) (in atom order, from phase tables of 256 atoms at a time), and the partial
    sums are added in chunk order. One parallel region, and the result is the same for any
    number of threads. Scratch: 64 n_k complex numbers plus 256 n_tab per thread.
    """
    cdef int64_t n = frac.shape[0], nrows = rows.shape[0], ntab = n1 + 2 * n2 + 2 * n3 + 3
    cdef int64_t nk = s_re.shape[0], nchunk, chunk, c, j0, j1, jb, nb, j, r, k, blk = 256
    cdef int tid
    cdef double[:, :, ::1] part
    cdef double[:, ::1] tab
    cdef double *tr
    cdef double *ti
    cdef double acc_r, acc_i
    s_re[:] = 0.0
    s_im[:] = 0.0
    if n == 0 or nrows == 0:
        return
    assert rows.shape[1] == 5 and frac.shape[1] == 3 and s_im.shape[0] == nk
    nchunk = min(64, (n + blk - 1) // blk)
    chunk = (n + nchunk - 1) // nchunk
    part = np.zeros((nchunk, 2, nk))
    tab = np.empty((max(n_threads, 1), 2 * blk * ntab))
    with nogil:
        for c in prange(nchunk, schedule="dynamic", num_threads=n_threads):
            tid = omp_get_thread_num()
            tr = &tab[tid, 0]
            ti = tr + blk * ntab
            j0 = c * chunk
            j1 = min(j0 + chunk, n)
            jb = j0
            while jb < j1:
                nb = min(blk, j1 - jb)
                for j in range(nb):
                    kmlip_ewald_phase_table(&frac[jb + j, 0], n1, n2, n3, 1, tr + j * ntab,
                                            ti + j * ntab)
                for r in range(nrows):
                    kmlip_ewald_sf_row(nb, ntab, rows[r, 0], n1 + 1 + n2 + rows[r, 1],
                                       n1 + 2 + 2 * n2 + n3 + rows[r, 2], rows[r, 3], &q[jb],
                                       tr, ti, &part[c, 0, rows[r, 4]], &part[c, 1, rows[r, 4]])
                jb = jb + nb
        for k in prange(nk, schedule="static", num_threads=n_threads):
            acc_r = 0.0
            acc_i = 0.0
            for c in range(nchunk):
                acc_r = acc_r + part[c, 0, k]
                acc_i = acc_i + part[c, 1, k]
            s_re[k] = acc_r
            s_im[k] = acc_i


def recip_atoms(const double[:, ::1] frac, const int64_t[:, ::1] rows, int64_t n1, int64_t n2,
                int64_t n3, const double[::1] wsr, const double[::1] wsi, int n_threads,
                double[:, ::1] g, double[::1] phi):
    """Per-atom reciprocal-space force coefficients and potentials.

    For each atom j: g[j] = sum_k a_k (h, k, l) and phi[j] = sum_k p_k over the half-space k
    vectors (see ``kmlip_ewald_recip_block``; wsr, wsi = w_k S(k)); the caller turns them into
    F_j = (8 pi / V) q_j g[j] @ B (B the reciprocal vectors as rows, 2 pi included) and
    phi_j = (8 pi / V) phi[j]. Parallel over blocks of KMLIP_EWALD_BLOCK atoms (the vectorised
    loops run over a block's atoms); O(threads * n_tab) scratch."""
    cdef int64_t n = frac.shape[0], nrows = rows.shape[0], ntab = n1 + 2 * n2 + 2 * n3 + 3
    cdef int64_t blk, nblk, j, l, a, B = KMLIP_EWALD_BLOCK
    cdef int tid
    cdef double[:, ::1] scratch
    cdef double *tr
    cdef double *ti
    cdef double *out
    if n == 0:
        return
    if nrows == 0:
        g[:, :] = 0.0
        phi[:] = 0.0
        return
    assert rows.shape[1] == 5 and g.shape[0] == n and phi.shape[0] == n
    nblk = (n + B - 1) // B
    # per thread: interleaved tables of one block, and its outputs g (3, B) and phi (B)
    scratch = np.empty((max(n_threads, 1), (2 * ntab + 4) * B))
    with nogil:
        for blk in prange(nblk, schedule="static", num_threads=n_threads):
            tid = omp_get_thread_num()
            tr = &scratch[tid, 0]
            ti = tr + ntab * B
            out = ti + ntab * B
            for l in range(B):
                j = blk * B + l
                if j >= n:
                    j = n - 1  # pad the last block; its extra atoms are discarded
                kmlip_ewald_phase_table(&frac[j, 0], n1, n2, n3, B, tr + l, ti + l)
            kmlip_ewald_recip_block(nrows, &rows[0, 0], n1, n2, n3, &wsr[0], &wsi[0], tr, ti,
                                    out, out + 3 * B)
            for l in range(B):
                j = blk * B + l
                if j < n:
                    for a in range(3):
                        g[j, a] = out[a * B + l]
                    phi[j] = out[3 * B + l]
