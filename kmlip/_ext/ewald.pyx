# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -fno-math-errno
"""Compiled loops of the Ewald summation (see kmlip/ewald.py for the public API).

The per-pair and per-k-vector mathematics lives in ``ewald_core.h`` (plain C, shared with a future
LAMMPS plugin); this module owns the OpenMP loops and the thread-local scratch memory, while every
output array is allocated by NumPy in the caller.

Every loop is written so that each output element is summed by one thread in a fixed order
(per-centre sums over a full pair list, in lanes whose partial sums are added in order; structure
factors summed per fixed chunk of atoms, the chunks added in order), so results are bitwise
identical for any number of threads.

Compiled with -fno-math-errno (the distutils line above) so that sqrt vectorises; nothing here
reads errno.
"""
from cython.parallel cimport prange

import numpy as np

from kmlip._ext.omp cimport omp_get_thread_num

ctypedef Py_ssize_t intp

cdef extern from "ewald_core.h" nogil:
    enum: KMLIP_LANES
    enum: KMLIP_NACC
    void kmlip_ewald_real_gather(long m, const double *xs, const double *ys, const double *zs,
                                 const double *qj, double xi, double yi, double zi, double *bx,
                                 double *by, double *bz, double *bq)
    long kmlip_ewald_real_flush(long m, double *bx, double *by, double *bz, double *bq,
                                double alpha, double rc2, double *be, double *bg, long *keep,
                                double *acc)
    void kmlip_coulomb_pair(double qq, double r2, double *e, double *g)
    enum: KMLIP_RECIP_LANES
    void kmlip_ewald_phase_table(const double *s, long n1, long n2, long n3, long stride,
                                 double *tr, double *ti)
    void kmlip_ewald_sf_row(long nj, long ntab, long h, long o2, long o3, long cnt,
                            const double *q, const double *tr, const double *ti, double *outr,
                            double *outi)
    void kmlip_ewald_recip_group(long nrows, const intp *rows, long n1, long n2, long n3,
                                 const double *wsr, const double *wsi, const double *tr,
                                 const double *ti, double *g, double *phi)

# Pairs closer than this (Å^2) are coincident atoms: their energy is infinite.
cdef double _TINY_R2 = 1e-20


cdef inline intp _floordiv(intp a, intp n) noexcept nogil:
    cdef intp d = a // n
    if (a % n != 0) and ((a < 0) != (n < 0)):
        d -= 1
    return d


cdef int _real_bin(intp b, const double *x, const double *q, const double *u, intp n,
                   const intp *bin_start, intp na, intp nb, intp nc, const intp *stencil,
                   intp ns, const double *cell, const double *metric, double alpha, double rc2,
                   intp cap, intp *nbr, double *shift, double *buf, long *keep,
                   double *forces, double *energies, double *virial) noexcept nogil:
    """Real-space sum for the atoms of centre bin ``b`` over all stencil bins (full list).

    ``x`` is (3, n) (SoA), ``u`` (n, 3) the position of each atom inside its bin in bin units
    (each in [0, 1)), ``metric`` = (lambda_min, w_a^2, w_b^2, w_c^2) of the bin lattice (see
    ``real_space``). Per atom, neighbour bins that cannot hold a pair closer than rc are
    skipped; the candidates of the others are gathered into a buffer of ``cap`` pairs (pair
    vector, charge), then evaluated with masks in one vectorised batch (``ewald_core.h``) and
    summed in a fixed order. ``buf`` holds 6 * cap + KMLIP_NACC * KMLIP_LANES doubles; ``nbr``
    (ns) and ``shift`` (ns, 6) are scratch for this centre bin's neighbour bins.
    Returns the number of pairs closer than 1e-10 Å, the atom with itself included."""
    cdef intp ia = b // (nb * nc), ib = (b // nc) % nb, ic = b % nc
    cdef intp s, ja, jb, jc, sa, sb, sc, i, j0, m, k, l, cnt, nnb = 0
    cdef intp i0 = bin_start[b], i1 = bin_start[b + 1]
    cdef double qi, g0, g1, g2, lb, da, db, dc
    cdef double sums[KMLIP_NACC]
    cdef double *acc = buf + 6 * cap
    cdef const double *xs = x
    cdef const double *ys = x + n
    cdef const double *zs = x + 2 * n
    cdef double *bx = buf
    cdef double *by = buf + cap
    cdef double *bz = buf + 2 * cap
    cdef double *bq = buf + 3 * cap
    cdef double *be = buf + 4 * cap
    cdef double *bg = buf + 5 * cap
    cdef double lam = metric[0], wa2 = metric[1], wb2 = metric[2], wc2 = metric[3]
    cdef int tiny = 0
    if i0 == i1:
        return 0
    # neighbour bins of this centre bin: index, image shift (d = x_j + shift - x_i), offset
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
        if bin_start[k] == bin_start[k + 1]:
            continue
        nbr[nnb] = k
        shift[6 * nnb] = sa * cell[0] + sb * cell[3] + sc * cell[6]
        shift[6 * nnb + 1] = sa * cell[1] + sb * cell[4] + sc * cell[7]
        shift[6 * nnb + 2] = sa * cell[2] + sb * cell[5] + sc * cell[8]
        shift[6 * nnb + 3] = stencil[3 * s]
        shift[6 * nnb + 4] = stencil[3 * s + 1]
        shift[6 * nnb + 5] = stencil[3 * s + 2]
        nnb += 1
    for i in range(i0, i1):
        for k in range(KMLIP_NACC * KMLIP_LANES):
            acc[k] = 0.0
        cnt = 0
        for s in range(nnb):
            # gaps (bin units) from atom i to the neighbour bin's box [d, d + 1]^3; a lower
            # bound of their distance is max(lambda_min |gap|^2, max_a w_a^2 gap_a^2)
            da = shift[6 * s + 3]
            db = shift[6 * s + 4]
            dc = shift[6 * s + 5]
            g0 = max(0.0, max(da - u[3 * i], u[3 * i] - da - 1.0))
            g1 = max(0.0, max(db - u[3 * i + 1], u[3 * i + 1] - db - 1.0))
            g2 = max(0.0, max(dc - u[3 * i + 2], u[3 * i + 2] - dc - 1.0))
            lb = max(lam * (g0 * g0 + g1 * g1 + g2 * g2),
                     max(wa2 * g0 * g0, max(wb2 * g1 * g1, wc2 * g2 * g2)))
            if lb >= rc2:
                continue
            j0 = bin_start[nbr[s]]
            m = bin_start[nbr[s] + 1] - j0
            if cnt + m > cap:
                tiny += kmlip_ewald_real_flush(cnt, bx, by, bz, bq, alpha, rc2, be, bg, keep, acc)
                cnt = 0
            kmlip_ewald_real_gather(m, xs + j0, ys + j0, zs + j0, q + j0, xs[i] - shift[6 * s],
                                    ys[i] - shift[6 * s + 1], zs[i] - shift[6 * s + 2],
                                    bx + cnt, by + cnt, bz + cnt, bq + cnt)
            cnt += m
        tiny += kmlip_ewald_real_flush(cnt, bx, by, bz, bq, alpha, rc2, be, bg, keep, acc)
        # reduce the lanes in a fixed order; full list: half of each pair's energy and virial
        # belongs to this centre
        qi = q[i]
        for k in range(KMLIP_NACC):
            sums[k] = 0.0
            for l in range(KMLIP_LANES):
                sums[k] += acc[k * KMLIP_LANES + l]
        energies[i] += 0.5 * qi * sums[0]
        forces[3 * i] += qi * sums[1]
        forces[3 * i + 1] += qi * sums[2]
        forces[3 * i + 2] += qi * sums[3]
        for k in range(6):
            virial[6 * i + k] += 0.5 * qi * sums[4 + k]
    return tiny


def real_space(const double[:, ::1] x, const double[::1] q, const double[:, ::1] u,
               const intp[::1] bin_start, intp na, intp nb, intp nc,
               const intp[:, ::1] stencil, const double[:, ::1] cell, double alpha, double rc,
               int n_threads, double[:, ::1] forces, double[::1] energies,
               double[:, ::1] virial) -> int:
    """Screened real-space sum over all pairs closer than ``rc`` (linked cells, full list).

    Parameters
    ----------
    x : (3, n) wrapped Cartesian positions (Å), coordinate-major, atoms sorted by bin.
    q : (n,) charges (e) in the same order.
    u : (n, 3) position of each atom inside its bin, in bin units (frac * nbin - bin index).
    bin_start : (na*nb*nc + 1,) CSR start of each bin's atoms, bins in C order (a, b, c).
    na, nb, nc : number of bins along each cell vector.
    stencil : (ns, 3) bin offsets to visit (already pruned to those that can hold a pair < rc);
        must include (0, 0, 0).
    cell : (3, 3) cell vectors as rows (Å).
    alpha : splitting parameter (1/Å); rc : cutoff (Å).
    forces, energies, virial : (n, 3), (n,), (n, 6) outputs in e^2/Å units, *added to*.

    Returns
    -------
    int : number of coincident pairs (distance < 1e-10 Å); the caller raises on > 0.
    """
    cdef intp n = q.shape[0], nbins = na * nb * nc, ns = stencil.shape[0], b, cap, occ
    cdef int tiny = 0, tid
    cdef double rc2 = rc * rc
    cdef intp[:, ::1] nbr
    cdef double[:, ::1] shift, buf
    cdef long[:, ::1] keep
    cdef double[::1] metric
    if n == 0:
        return 0
    assert x.shape[0] == 3 and x.shape[1] == n and u.shape[0] == n and u.shape[1] == 3
    assert bin_start.shape[0] == nbins + 1 and stencil.shape[1] == 3
    assert forces.shape[0] == n and energies.shape[0] == n and virial.shape[0] == n
    assert virial.shape[1] == 6 and forces.shape[1] == 3
    # bin lattice h_a = cell_a / n_a: |sum_a t_a h_a|^2 >= lambda_min(h h^T) |t|^2, and the
    # distance between the planes of bin a is w_a = V / |h_b x h_c|
    h = np.asarray(cell) / np.array([na, nb, nc], dtype=np.float64)[:, None]
    gram = h @ h.T
    vol = abs(np.linalg.det(h))
    w = vol / np.linalg.norm(np.cross(h[[1, 2, 0]], h[[2, 0, 1]]), axis=1)
    metric = np.array([max(np.linalg.eigvalsh(gram)[0] * (1.0 - 1e-12), 0.0),
                       *(w * w * (1.0 - 1e-12))])
    occ = int(np.diff(np.asarray(bin_start)).max())
    cap = max(256, 2 * occ)
    # per-thread scratch, owned by NumPy: neighbour bins, shifts, and the pair buffer
    nt = max(n_threads, 1)
    nbr = np.empty((nt, ns), dtype=np.intp)
    shift = np.empty((nt, 6 * ns))
    buf = np.empty((nt, 6 * cap + KMLIP_NACC * KMLIP_LANES))
    keep = np.empty((nt, cap), dtype=np.dtype("l"))
    with nogil:
        for b in prange(nbins, schedule="dynamic", num_threads=n_threads):
            tid = omp_get_thread_num()
            tiny += _real_bin(b, &x[0, 0], &q[0], &u[0, 0], n, &bin_start[0], na, nb, nc,
                              &stencil[0, 0], ns, &cell[0, 0], &metric[0], alpha, rc2,
                              cap, &nbr[tid, 0], &shift[tid, 0], &buf[tid, 0], &keep[tid, 0],
                              &forces[0, 0], &energies[0], &virial[0, 0])
    # every atom meets itself once (zero shift); anything more is a coincident pair
    return tiny - n


cdef int _direct_atom(intp i, intp n, const double *x, const double *q, double *forces,
                      double *energies) noexcept nogil:
    cdef intp j
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
    cdef intp n = x.shape[0], i
    cdef int bad = 0
    if n == 0:
        return 0
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            bad += _direct_atom(i, n, &x[0, 0], &q[0], &forces[0, 0], &energies[0])
    return bad


def structure_factors(const double[:, ::1] frac, const double[::1] q, const intp[:, ::1] rows,
                      intp n1, intp n2, intp n3, int n_threads, double[::1] s_re,
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
    cdef intp n = frac.shape[0], nrows = rows.shape[0], ntab = n1 + 2 * n2 + 2 * n3 + 3
    cdef intp nk = s_re.shape[0], nchunk, chunk, c, j0, j1, jb, nb, j, r, k, blk = 256
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


def recip_atoms(const double[:, ::1] frac, const intp[:, ::1] rows, intp n1, intp n2, intp n3,
                const double[::1] wsr, const double[::1] wsi, int n_threads, double[:, ::1] g,
                double[::1] phi):
    """Per-atom reciprocal-space force coefficients and potentials.

    For each atom j: g[j] = sum_k a_k (h, k, l) and phi[j] = sum_k p_k over the half-space k
    vectors (see ``kmlip_ewald_recip_group``; wsr, wsi = w_k S(k)); the caller turns them into
    F_j = (8 pi / V) q_j g[j] @ B (B the reciprocal vectors as rows, 2 pi included) and
    phi_j = (8 pi / V) phi[j]. Parallel over groups of KMLIP_RECIP_LANES atoms (the lanes of
    the vectorised loops); O(threads * n_tab) scratch."""
    cdef intp n = frac.shape[0], nrows = rows.shape[0], ntab = n1 + 2 * n2 + 2 * n3 + 3
    cdef intp grp, ngrp, j, l, a
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
    ngrp = (n + KMLIP_RECIP_LANES - 1) // KMLIP_RECIP_LANES
    # per thread: interleaved tables of one group, then its outputs g (3, L) and phi (L)
    scratch = np.empty((max(n_threads, 1), (2 * ntab + 4) * KMLIP_RECIP_LANES))
    with nogil:
        for grp in prange(ngrp, schedule="static", num_threads=n_threads):
            tid = omp_get_thread_num()
            tr = &scratch[tid, 0]
            ti = tr + ntab * KMLIP_RECIP_LANES
            out = ti + ntab * KMLIP_RECIP_LANES
            for l in range(KMLIP_RECIP_LANES):
                j = grp * KMLIP_RECIP_LANES + l
                if j >= n:
                    j = n - 1  # pad the last group; its extra lanes are discarded
                kmlip_ewald_phase_table(&frac[j, 0], n1, n2, n3, KMLIP_RECIP_LANES, tr + l,
                                        ti + l)
            kmlip_ewald_recip_group(nrows, &rows[0, 0], n1, n2, n3, &wsr[0], &wsi[0], tr, ti,
                                    out, out + 3 * KMLIP_RECIP_LANES)
            for l in range(KMLIP_RECIP_LANES):
                j = grp * KMLIP_RECIP_LANES + l
                if j < n:
                    for a in range(3):
                        g[j, a] = out[a * KMLIP_RECIP_LANES + l]
                    phi[j] = out[3 * KMLIP_RECIP_LANES + l]
