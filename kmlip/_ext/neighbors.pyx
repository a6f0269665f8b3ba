# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Linked-cell neighbour-list kernel (O(N), OpenMP over centres).

The Python wrapper (:mod:`kmlip.neighbors`) validates the input, bins the atoms and passes
arrays already sorted by bin; this module only searches pairs. Everything below the ``def``
is C-level code over raw pointers that touches no Python object.

Binning contract (all arrays in bin order, index ``p`` = position in the sorted order):

* ``order[p]``       original atom index of the ``p``-th binned atom,
* ``pos_s[p]``       its original Cartesian position (Å),
* ``pw_s[p]``        its wrapped Cartesian position ``pos - wrap @ cell`` (Å),
* ``wrap_s[p]``      integer wrap ``W`` (zero along non-periodic directions),
* ``bin_s[p]``       its bin coordinates ``(b0, b1, b2)``,
* ``bin_start[b]``   first sorted index of linear bin ``b = (b0 * nb1 + b1) * nb2 + b2``.

A pair (i, j, S) is reported when ``|r_j + S @ cell - r_i| < cutoff`` computed from the
*original* positions, ``S = I + W_i - W_j`` with ``I`` the periodic image of the neighbour
bin, excluding ``(i, i, 0)``.
"""
import numpy as np

cimport cython
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

ctypedef int64_t i64


cdef struct Grid:
    i64 nb[3]          # bins per direction
    i64 m[3]           # neighbour-bin search half-width per direction
    int periodic[3]    # 1 when the direction is periodic
    double cell[9]     # row-major cell (Å); rows of non-periodic directions unused
    double cutoff      # Å, strict
    double cut2_loose  # squared prefilter radius on wrapped positions (Å²)


cdef struct Binned:
    const i64* order
    const double* pos
    const double* pw
    const i64* wrap
    const i64* bins
    const i64* bin_start


cdef struct Out:
    i64 cap            # capacity of the buffers (pairs)
    i64* j
    i64* s
    double* v
    double* d


cdef inline void _floordiv(i64 c, i64 n, i64* q, i64* r) noexcept nogil:
    """Python-style divmod for n > 0: c = q * n + r, 0 <= r < n."""
    cdef i64 qq
    if c >= 0:
        qq = c // n
    else:
        qq = -((-c - 1) // n) - 1
    q[0] = qq
    r[0] = c - qq * n


cdef i64 _search_centre(Grid* g, Binned* b, i64 p, Out* out) noexcept nogil:
    """Pairs of the centre at sorted index ``p``; stores them in ``out`` unless it is NULL.

    Returns the number of pairs; at most ``out.cap`` are stored, in search order (unsorted).
    """
    cdef i64 i = b.order[p]
    cdef i64 lo[3]
    cdef i64 hi[3]
    cdef i64 k, c0, c1, c2, c2end, q0, q1, q2, r0, r1, r2, r2end, bin01, q, qend, j
    cdef i64 s0, s1, s2
    cdef double ix, iy, iz, dx, dy, dz, d2, vx, vy, vz, d
    cdef const double* pw = b.pw
    cdef const double* pos = b.pos
    cdef const i64* wrap = b.wrap
    cdef const i64* order = b.order
    cdef const i64* bin_start = b.bin_start
    cdef double pwx = pw[3 * p], pwy = pw[3 * p + 1], pwz = pw[3 * p + 2]
    cdef double px = pos[3 * p], py = pos[3 * p + 1], pz = pos[3 * p + 2]
    cdef i64 w0 = wrap[3 * p], w1 = wrap[3 * p + 1], w2 = wrap[3 * p + 2]
    cdef double a00 = g.cell[0], a01 = g.cell[1], a02 = g.cell[2]
    cdef double a10 = g.cell[3], a11 = g.cell[4], a12 = g.cell[5]
    cdef double a20 = g.cell[6], a21 = g.cell[7], a22 = g.cell[8]
    cdef double cut = g.cutoff, cut2 = g.cut2_loose
    cdef i64 count = 0
    cdef i64 nb1 = g.nb[1], nb2 = g.nb[2]

    for k in range(3):
        lo[k] = b.bins[3 * p + k] - g.m[k]
        hi[k] = b.bins[3 * p + k] + g.m[k]
        if not g.periodic[k]:
            if lo[k] < 0:
                lo[k] = 0
            if hi[k] > g.nb[k] - 1:
                hi[k] = g.nb[k] - 1

    for c0 in range(lo[0], hi[0] + 1):
        _floordiv(c0, g.nb[0], &q0, &r0)
        for c1 in range(lo[1], hi[1] + 1):
            _floordiv(c1, nb1, &q1, &r1)
            bin01 = (r0 * nb1 + r1) * nb2
            # Along the last direction, consecutive bins of one periodic image are contiguous
            # in the sorted order: scan each such run of bins as one range.
            c2 = lo[2]
            while c2 <= hi[2]:
                _floordiv(c2, nb2, &q2, &r2)
                c2end = (q2 + 1) * nb2 - 1
                if c2end > hi[2]:
                    c2end = hi[2]
                r2end = r2 + (c2end - c2)
                c2 = c2end + 1
                # Cartesian offset of this periodic image of the neighbour bins.
                ix = q0 * a00 + q1 * a10 + q2 * a20
                iy = q0 * a01 + q1 * a11 + q2 * a21
                iz = q0 * a02 + q1 * a12 + q2 * a22
                qend = bin_start[bin01 + r2end + 1]
                for q in range(bin_start[bin01 + r2], qend):
                    dx = pw[3 * q] + ix - pwx
                    dy = pw[3 * q + 1] + iy - pwy
                    dz = pw[3 * q + 2] + iz - pwz
                    d2 = dx * dx + dy * dy + dz * dz
                    if d2 >= cut2:
                        continue
                    j = order[q]
                    s0 = q0 + w0 - wrap[3 * q]
                    s1 = q1 + w1 - wrap[3 * q + 1]
                    s2 = q2 + w2 - wrap[3 * q + 2]
                    if j == i and s0 == 0 and s1 == 0 and s2 == 0:
                        continue
                    # Exact vector from the original positions, as ASE forms it.
                    vx = (pos[3 * q] - px) + (s0 * a00 + s1 * a10 + s2 * a20)
                    vy = (pos[3 * q + 1] - py) + (s0 * a01 + s1 * a11 + s2 * a21)
                    vz = (pos[3 * q + 2] - pz) + (s0 * a02 + s1 * a12 + s2 * a22)
                    d = sqrt(vx * vx + vy * vy + vz * vz)
                    if not (d < cut):
                        continue
                    if out != NULL and count < out.cap:
                        out.j[count] = j
                        out.s[3 * count] = s0
                        out.s[3 * count + 1] = s1
                        out.s[3 * count + 2] = s2
                        out.v[3 * count] = vx
                        out.v[3 * count + 1] = vy
                        out.v[3 * count + 2] = vz
                        out.d[count] = d
                    count += 1
    return count


cdef inline bint _less(const i64* j, const i64* s, i64 a, i64 b) noexcept nogil:
    """Lexicographic (j, s0, s1, s2) order of local pairs a and b."""
    if j[a] != j[b]:
        return j[a] < j[b]
    if s[3 * a] != s[3 * b]:
        return s[3 * a] < s[3 * b]
    if s[3 * a + 1] != s[3 * b + 1]:
        return s[3 * a + 1] < s[3 * b + 1]
    return s[3 * a + 2] < s[3 * b + 2]


cdef void _sort_perm(i64* perm, i64 lo, i64 hi, const i64* j, const i64* s) noexcept nogil:
    """Sorts perm[lo:hi] by (j, s) of the pairs it indexes; keys are distinct."""
    cdef i64 a, b, t, x, mid, pivot, lt, gt
    while hi - lo > 16:
        # Median of three as pivot.
        mid = lo + (hi - lo) // 2
        if _less(j, s, perm[mid], perm[lo]):
            t = perm[mid]; perm[mid] = perm[lo]; perm[lo] = t
        if _less(j, s, perm[hi - 1], perm[lo]):
            t = perm[hi - 1]; perm[hi - 1] = perm[lo]; perm[lo] = t
        if _less(j, s, perm[hi - 1], perm[mid]):
            t = perm[hi - 1]; perm[hi - 1] = perm[mid]; perm[mid] = t
        pivot = perm[mid]
        # Hoare partition.
        lt = lo - 1
        gt = hi
        while True:
            lt += 1
            while _less(j, s, perm[lt], pivot):
                lt += 1
            gt -= 1
            while _less(j, s, pivot, perm[gt]):
                gt -= 1
            if lt >= gt:
                break
            t = perm[lt]; perm[lt] = perm[gt]; perm[gt] = t
        # perm[lo:gt+1] <= pivot <= perm[gt+1:hi]; recurse on the smaller part.
        if gt + 1 - lo < hi - gt - 1:
            _sort_perm(perm, lo, gt + 1, j, s)
            lo = gt + 1
        else:
            _sort_perm(perm, gt + 1, hi, j, s)
            hi = gt + 1
    # Insertion sort for short runs.
    for a in range(lo + 1, hi):
        x = perm[a]
        b = a - 1
        while b >= lo and _less(j, s, x, perm[b]):
            perm[b + 1] = perm[b]
            b -= 1
        perm[b + 1] = x


def search_pairs(
    const i64[::1] order,
    const double[:, ::1] pos_s,
    const double[:, ::1] pw_s,
    const i64[:, ::1] wrap_s,
    const i64[:, ::1] bin_s,
    const i64[::1] bin_start,
    const i64[::1] nb,
    const i64[::1] m,
    const unsigned char[::1] periodic,
    const double[:, ::1] cell,
    double cutoff,
    double prefilter,
    int n_threads,
):
    """Linked-cell pair search over pre-binned atoms (see the module docstring).

    Parameters
    ----------
    order : int64 (n,)
        Original atom index of each binned atom.
    pos_s, pw_s : float64 (n, 3)
        Original and wrapped Cartesian positions in bin order (Å).
    wrap_s, bin_s : int64 (n, 3)
        Integer wrap and bin coordinates in bin order.
    bin_start : int64 (n_bins + 1,)
        CSR start of each linear bin in the sorted order.
    nb, m : int64 (3,)
        Bins per direction and neighbour-bin search half-width.
    periodic : uint8 (3,)
        1 for periodic directions.
    cell : float64 (3, 3)
        Cell rows (Å) used to form ``S @ cell``.
    cutoff : float
        Strict cutoff (Å).
    prefilter : float
        Radius (Å, >= cutoff) of the cheap test on wrapped positions.
    n_threads : int
        OpenMP threads.

    Returns
    -------
    centers, neighbors : int64 (n_pairs,)
    shifts : int64 (n_pairs, 3)
    vectors : float64 (n_pairs, 3)
    distances : float64 (n_pairs,)
    offsets : int64 (n + 1,)
        Pairs sorted by centre, then neighbour index, then shift.
    """
    cdef i64 n = order.shape[0]
    cdef Grid g
    cdef Binned bb
    cdef i64 k, p, i, c, t, off
    cdef i64 max_count = 0
    cdef int[::1] flag_v
    cdef Out local
    cdef Out* lp
    cdef i64* perm
    cdef i64[::1] counts_v
    cdef i64[::1] offs_v
    cdef i64[::1] cen_v
    cdef i64[::1] nbr_v
    cdef i64[:, ::1] sh_v
    cdef double[:, ::1] vec_v
    cdef double[::1] dist_v

    for k in range(3):
        g.nb[k] = nb[k]
        g.m[k] = m[k]
        g.periodic[k] = periodic[k]
        for c in range(3):
            g.cell[3 * k + c] = cell[k, c]
    g.cutoff = cutoff
    g.cut2_loose = prefilter * prefilter

    counts = np.zeros(n, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    counts_v = counts
    offs_v = offsets
    if n == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64),
                np.zeros((0, 3), np.float64), np.zeros(0, np.float64), offsets)

    bb.order = &order[0]
    bb.pos = &pos_s[0, 0]
    bb.pw = &pw_s[0, 0]
    bb.wrap = &wrap_s[0, 0]
    bb.bins = &bin_s[0, 0]
    bb.bin_start = &bin_start[0]

    # Pass 1: count pairs per centre.
    with nogil:
        for p in prange(n, num_threads=n_threads, schedule="dynamic", chunksize=64):
            counts_v[bb.order[p]] = _search_centre(&g, &bb, p, NULL)
        for i in range(n):
            offs_v[i + 1] = offs_v[i] + counts_v[i]
            if counts_v[i] > max_count:
                max_count = counts_v[i]

    n_pairs = offsets[n]
    centers = np.empty(n_pairs, dtype=np.int64)
    neighbors = np.empty(n_pairs, dtype=np.int64)
    shifts = np.empty((n_pairs, 3), dtype=np.int64)
    vectors = np.empty((n_pairs, 3), dtype=np.float64)
    distances = np.empty(n_pairs, dtype=np.float64)
    if n_pairs == 0:
        return centers, neighbors, shifts, vectors, distances, offsets
    cen_v = centers
    nbr_v = neighbors
    sh_v = shifts
    vec_v = vectors
    dist_v = distances

    flag = np.zeros(1, dtype=np.intc)   # shared error flag (a plain variable would be private)
    flag_v = flag

    lp = NULL
    perm = NULL
    # Pass 2: fill per centre into thread-local buffers, sort, copy out.
    with nogil, parallel(num_threads=n_threads):
        lp = <Out*> malloc(sizeof(Out))
        perm = <i64*> malloc(max_count * sizeof(i64))
        if lp != NULL:
            lp.cap = max_count
            lp.j = <i64*> malloc(max_count * sizeof(i64))
            lp.s = <i64*> malloc(3 * max_count * sizeof(i64))
            lp.v = <double*> malloc(3 * max_count * sizeof(double))
            lp.d = <double*> malloc(max_count * sizeof(double))
        if (lp == NULL or perm == NULL or lp.j == NULL or lp.s == NULL or lp.v == NULL
                or lp.d == NULL):
            flag_v[0] = 1
        else:
            for p in prange(n, schedule="dynamic", chunksize=64):
                i = bb.order[p]
                c = _search_centre(&g, &bb, p, lp)
                if c != counts_v[i]:
                    flag_v[0] = 2
                    continue
                for t in range(c):
                    perm[t] = t
                _sort_perm(perm, 0, c, lp.j, lp.s)
                off = offs_v[i]
                for t in range(c):
                    k = perm[t]
                    cen_v[off + t] = i
                    nbr_v[off + t] = lp.j[k]
                    sh_v[off + t, 0] = lp.s[3 * k]
                    sh_v[off + t, 1] = lp.s[3 * k + 1]
                    sh_v[off + t, 2] = lp.s[3 * k + 2]
                    vec_v[off + t, 0] = lp.v[3 * k]
                    vec_v[off + t, 1] = lp.v[3 * k + 1]
                    vec_v[off + t, 2] = lp.v[3 * k + 2]
                    dist_v[off + t] = lp.d[k]
        if lp != NULL:
            free(lp.j)
            free(lp.s)
            free(lp.v)
            free(lp.d)
        free(lp)
        free(perm)
    if flag[0] == 1:
        raise MemoryError("neighbour list: could not allocate per-thread pair buffers")
    if flag[0] == 2:
        raise RuntimeError("neighbour list: count and fill passes disagree (internal error)")
    return centers, neighbors, shifts, vectors, distances, offsets
