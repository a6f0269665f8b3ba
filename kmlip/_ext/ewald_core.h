/* Ewald summation of point charges: the per-pair and per-k-vector mathematics.
 *
 * Plain C99, no Python: included by kmlip/_ext/ewald.pyx and meant to be included unchanged by
 * a future LAMMPS pair-style plugin (C++), which owns its own loop over local atoms and calls
 * kmlip_ewald_real_centre() with its full neighbour list.
 *
 * Conventions (shared with kmlip/ewald.py):
 *   - charges in units of e, lengths in Å; every energy here is in e^2/Å, multiply by
 *     k_e = 14.399645 eV·Å to get eV.
 *   - pair vector d = r_j + S·cell - r_i (from the centre i to its neighbour j).
 *   - g = (1/r) dE_pair/dr, so the force on the centre from one pair is F_i = g d, and the
 *     pair's contribution to the strain derivative dE/de_ab is g d_a d_b (half of it per centre
 *     when the list is full, i.e. every pair is seen from both ends).
 *   - virial arrays are Voigt-ordered: xx yy zz yz xz xy.
 *   - E = E_real + E_recip + E_self + E_background with
 *       E_real  = 1/2 sum_{i,j,S}' q_i q_j erfc(alpha r)/r
 *       E_recip = (2 pi / V) sum_{k != 0} exp(-k^2/(4 alpha^2))/k^2 |S(k)|^2,
 *                 S(k) = sum_j q_j exp(i k.r_j)
 *       E_self  = -alpha/sqrt(pi) sum_i q_i^2
 *       E_bg    = -pi Q^2/(2 V alpha^2),  Q = sum_i q_i.
 */
#ifndef KMLIP_EWALD_CORE_H
#define KMLIP_EWALD_CORE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define restrict __restrict
#endif

/* Run-time choice of AVX2/FMA code for the hot loops (GCC on x86-64 Linux, through ifunc);
 * elsewhere the compiler's default target. Define KMLIP_NO_CLONES to switch it off. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(KMLIP_NO_CLONES)
#define KMLIP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define KMLIP_CLONES __attribute__((unused))
#else
#define KMLIP_CLONES
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KMLIP_COULOMB_EV_A 14.399645       /* k_e = e^2/(4 pi eps0) in eV·Å */
#define KMLIP_TWO_OVER_SQRT_PI 1.12837916709551257390
#define KMLIP_SQRT_PI 1.77245385090551602730
#define KMLIP_PI 3.14159265358979323846

/* erfc(x) for x >= 0, returning exp(-x^2) as well (the force needs it, and it is the costly
 * part): erfc(x) = exp(-x^2) t Q(t), t = 2/(2 + x), with Q a degree-18 polynomial fitted (in
 * Chebyshev nodes, against 40-digit values) on x in [0, 6.5]; relative error < 5e-15 there,
 * which covers every accuracy kmlip accepts (alpha r_c = sqrt(-ln(eps/5)) <= 6.4 for eps >= 1e-17). One exp instead of the
 * two or three of libm's erfc plus the Gaussian, and no branches in the fitted range.
 * Beyond 6.5 it falls back to libm. */
#define KMLIP_ERFC_XMAX 6.5
#define KMLIP_ERFC_T0 0.23529411764705882 /* 2/(2 + 6.5) */
/* Q(u), u = (t - T0) 2/(1 - T0) - 1 in [-1, 1], by Horner (monomials in u; the largest
 * coefficient is 0.6, so the evaluation is well conditioned). */
#define KMLIP_ERFC_C0 1.14202258985060028e-10
#define KMLIP_ERFC_HORNER(p, u) do { \
    (p) = (p) * (u) + -1.45667400357311701e-09; \
    (p) = (p) * (u) + 2.88854957976051933e-09; \
    (p) = (p) * (u) + 7.75574023109661767e-09; \
    (p) = (p) * (u) + -4.42614449576475400e-08; \
    (p) = (p) * (u) + 5.68346918678847178e-08; \
    (p) = (p) * (u) + 2.06703817513031889e-07; \
    (p) = (p) * (u) + -1.06207262414327093e-06; \
    (p) = (p) * (u) + 9.59418905959277250e-07; \
    (p) = (p) * (u) + 7.64048789887990363e-06; \
    (p) = (p) * (u) + -2.73964508203027432e-05; \
    (p) = (p) * (u) + -2.26378634387301825e-05; \
    (p) = (p) * (u) + 3.48294197636137188e-04; \
    (p) = (p) * (u) + -2.11345330995160307e-04; \
    (p) = (p) * (u) + -4.50118495227538797e-03; \
    (p) = (p) * (u) + 3.01359782392963483e-03; \
    (p) = (p) * (u) + 8.69438398857275141e-02; \
    (p) = (p) * (u) + 3.14876694848570227e-01; \
    (p) = (p) * (u) + 5.99572371428602979e-01; \
} while (0)

static inline double kmlip_erfc_gauss(double x, double *gauss)
{
    const double g = exp(-x * x);
    double t, u, p;
    *gauss = g;
    if (x > KMLIP_ERFC_XMAX)
        return erfc(x);
    t = 2.0 / (2.0 + x);
    u = (t - KMLIP_ERFC_T0) * (2.0 / (1.0 - KMLIP_ERFC_T0)) - 1.0;
    p = KMLIP_ERFC_C0;
    KMLIP_ERFC_HORNER(p, u);
    return g * t * p;
}

/* exp(z) for -700 < z <= 0 without a library call, so that loops over pairs vectorise:
 * z = k ln2 + r, |r| <= ln2/2 (Cody-Waite, k by the 1.5*2^52 rounding trick), exp(r) by its
 * Taylor series to degree 13 (truncation < 5e-18), times 2^k built in the exponent bits.
 * Relative error ~2e-16. */
static inline double kmlip_exp_neg(double z)
{
    const double shift = 6755399441055744.0; /* 1.5 * 2^52 */
    const double ln2hi = 6.93147180369123816490e-01, ln2lo = 1.90821492927058770002e-10;
    double kd = z * 1.4426950408889634 + shift;
    union { double d; uint64_t u; } bits, scale;
    double r, p;
    bits.d = kd;
    kd -= shift;
    r = (z - kd * ln2hi) - kd * ln2lo;
    p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    scale.u = (bits.u + 1023u) << 52; /* the high bits of the shift fall off the top */
    return p * scale.d;
}

/* kmlip_erfc_gauss without branches or calls, valid for 0 <= x <= KMLIP_ERFC_XMAX. */
static inline double kmlip_erfc_gauss_fast(double x, double *gauss)
{
    const double g = kmlip_exp_neg(-x * x);
    const double t = 2.0 / (2.0 + x);
    const double u = (t - KMLIP_ERFC_T0) * (2.0 / (1.0 - KMLIP_ERFC_T0)) - 1.0;
    double p = KMLIP_ERFC_C0;
    KMLIP_ERFC_HORNER(p, u);
    *gauss = g;
    return g * t * p;
}

/* Lanes of the partial sums kept by kmlip_ewald_real_flush (one AVX2 register of doubles). */
#define KMLIP_LANES 4
/* Number of partial sums per lane in kmlip_ewald_real_flush's acc. */
#define KMLIP_NACC 10
/* Squared distance below which two charges count as coincident (Å^2). */
#define KMLIP_TINY_R2 1e-20

/* Candidate neighbours of one centre, gathered from one bin: d = x_k - x_i (the centre
 * already shifted by the bin's image) into bx, by, bz, and the charges into bq. */
KMLIP_CLONES
static void kmlip_ewald_real_gather(long m, const double *restrict xs, const double *restrict ys,
                                    const double *restrict zs, const double *restrict qj,
                                    double xi, double yi, double zi, double *restrict bx,
                                    double *restrict by, double *restrict bz,
                                    double *restrict bq)
{
    long k;
    for (k = 0; k < m; ++k) {
        bx[k] = xs[k] - xi;
        by[k] = ys[k] - yi;
        bz[k] = zs[k] - zi;
        bq[k] = qj[k];
    }
}

/* The hot loop: the real-space pairs of one centre with m gathered candidates
 * (pair vectors bx, by, bz and charges bq, all overwritten; be, bg, keep are scratch of m).
 *
 * Candidates with 1e-10 Å <= r < rc (rc2 = rc^2; needs alpha*rc <= KMLIP_ERFC_XMAX) are added,
 * without the centre's charge, to lane-wise partial sums acc[q * KMLIP_LANES + lane] for
 *   q = 0: sum e, 1-3: sum g d_a (a = x, y, z), 4-9: sum g d_a d_b (Voigt xx yy zz yz xz xy),
 * with e = q_j erfc(alpha r)/r and g = (1/r) de/dr; the return value counts candidates closer
 * than 1e-10 Å (the centre itself, or a coincident atom). The candidates inside the cutoff
 * are first compacted in place (branch-free), then evaluated and summed by loops that
 * vectorise; the lanes are independent sums in a fixed order, so nothing is reassociated and
 * the result does not depend on how the caller shares the work among threads. Compile with
 * -fno-math-errno so that sqrt vectorises. */
/* Per-lane sums of energy, forces and virial for lanes [0, nl) of the group at k0. */
static inline void kmlip_ewald_lanes(int nl, long k0, const double *restrict be,
                                     const double *restrict bg, const double *restrict bx,
                                     const double *restrict by, const double *restrict bz,
                                     double *restrict acc)
{
    int l;
    for (l = 0; l < nl; ++l) {
        const long kk = k0 + l;
        const double g = bg[kk], dx = bx[kk], dy = by[kk], dz = bz[kk];
        double gd;
        acc[0 * KMLIP_LANES + l] += be[kk];
        gd = g * dx;
        acc[1 * KMLIP_LANES + l] += gd;
        acc[4 * KMLIP_LANES + l] += gd * dx;
        acc[8 * KMLIP_LANES + l] += gd * dz;
        acc[9 * KMLIP_LANES + l] += gd * dy;
        gd = g * dy;
        acc[2 * KMLIP_LANES + l] += gd;
        acc[5 * KMLIP_LANES + l] += gd * dy;
        acc[7 * KMLIP_LANES + l] += gd * dz;
        gd = g * dz;
        acc[3 * KMLIP_LANES + l] += gd;
        acc[6 * KMLIP_LANES + l] += gd * dz;
    }
}

KMLIP_CLONES
static long kmlip_ewald_real_flush(long m, double *restrict bx, double *restrict by,
                                   double *restrict bz, double *restrict bq, double alpha,
                                   double rc2, double *restrict be, double *restrict bg,
                                   long *restrict keep, double *restrict acc)
{
    const double c = KMLIP_TWO_OVER_SQRT_PI * alpha;
    long k, k0, w = 0, near = 0;
    for (k = 0; k < m; ++k) { /* vectorised: r^2, the keep flag, coincident count */
        const double r2 = bx[k] * bx[k] + by[k] * by[k] + bz[k] * bz[k];
        be[k] = r2;
        keep[k] = (r2 < rc2) & (r2 >= KMLIP_TINY_R2);
        near += r2 < KMLIP_TINY_R2;
    }
    for (k = 0; k < m; ++k) { /* branch-free compaction in place (w <= k) */
        const double r2 = be[k];
        bx[w] = bx[k];
        by[w] = by[k];
        bz[w] = bz[k];
        bq[w] = bq[k];
        be[w] = r2;
        w += keep[k];
    }
    m = w;
    for (k = 0; k < m; ++k) {
        const double inv_r = 1.0 / sqrt(be[k]);
        double gauss, erfc_x, er;
        erfc_x = kmlip_erfc_gauss_fast(alpha * be[k] * inv_r, &gauss);
        er = bq[k] * erfc_x * inv_r;
        be[k] = er;
        bg[k] = -(er + bq[k] * c * gauss) * inv_r * inv_r;
    }
    for (k0 = 0; k0 < m; k0 += KMLIP_LANES) {
        const int nl = (m - k0 < KMLIP_LANES) ? (int)(m - k0) : KMLIP_LANES;
        if (nl == KMLIP_LANES) /* constant trip count after inlining: vectorised */
            kmlip_ewald_lanes(KMLIP_LANES, k0, be, bg, bx, by, bz, acc);
        else                   /* the same sums for the last, partial group */
            kmlip_ewald_lanes(nl, k0, be, bg, bx, by, bz, acc);
    }
    return near;
}

/* Real-space (screened) pair: energy q_i q_j erfc(alpha r)/r and g = (1/r) dE/dr. */
static inline void kmlip_ewald_real_pair(double qq, double r2, double alpha,
                                         double *e, double *g)
{
    const double inv_r = 1.0 / sqrt(r2);
    const double r = r2 * inv_r;
    const double ar = alpha * r;
    double gauss;
    const double erfc_ar = kmlip_erfc_gauss(ar, &gauss);
    const double er = qq * erfc_ar * inv_r;
    *e = er;
    /* d/dr [erfc(a r)/r] = -erfc(a r)/r^2 - (2a/sqrt(pi)) exp(-a^2 r^2)/r */
    *g = -(er + qq * KMLIP_TWO_OVER_SQRT_PI * alpha * gauss) * inv_r * inv_r;
}

/* Bare Coulomb pair (non-periodic direct sum): energy q_i q_j / r and g = (1/r) dE/dr. */
static inline void kmlip_coulomb_pair(double qq, double r2, double *e, double *g)
{
    const double inv_r = 1.0 / sqrt(r2);
    const double er = qq * inv_r;
    *e = er;
    *g = -er * inv_r * inv_r;
}

/* Accumulates one pair seen from centre i (full list): half the pair energy and half the pair
 * virial go to the centre, so that summing over all centres counts each pair once. */
static inline void kmlip_ewald_accumulate(double e, double g, double dx, double dy, double dz,
                                          double *en, double *f, double *vir)
{
    const double hg = 0.5 * g;
    *en += 0.5 * e;
    f[0] += g * dx;
    f[1] += g * dy;
    f[2] += g * dz;
    vir[0] += hg * dx * dx;
    vir[1] += hg * dy * dy;
    vir[2] += hg * dz * dz;
    vir[3] += hg * dy * dz;
    vir[4] += hg * dx * dz;
    vir[5] += hg * dx * dy;
}

/* Real-space sum of one centre over a full neighbour list (the plugin's entry point).
 * d: (n, 3) pair vectors r_j + S·cell - r_i, qj: (n,) neighbour charges; pairs at r >= rc and
 * exact zero vectors are skipped. Adds to *energy (half of each pair, in e^2/Å), f[3] (force on
 * the centre) and vir[6] (half of each pair's strain derivative, Voigt order). */
static inline void kmlip_ewald_real_centre(double qi, long n, const double *d, const double *qj,
                                           double alpha, double rc, double *energy, double *f,
                                           double *vir)
{
    const double rc2 = rc * rc;
    long k;
    for (k = 0; k < n; ++k) {
        const double dx = d[3 * k], dy = d[3 * k + 1], dz = d[3 * k + 2];
        const double r2 = dx * dx + dy * dy + dz * dz;
        double e, g;
        if (r2 >= rc2 || r2 == 0.0)
            continue;
        kmlip_ewald_real_pair(qi * qj[k], r2, alpha, &e, &g);
        kmlip_ewald_accumulate(e, g, dx, dy, dz, energy, f, vir);
    }
}

/* Reciprocal-space weight of one k vector: w = exp(-k^2/(4 alpha^2))/k^2 and the factor
 * c = 2 (1/k^2 + 1/(4 alpha^2)) of its strain derivative:
 *   d(w)/de_ab = w (c k_a k_b)  for k -> (1 - e^T) k. */
static inline double kmlip_ewald_kweight(double k2, double alpha, double *strain_factor)
{
    const double inv4a2 = 0.25 / (alpha * alpha);
    *strain_factor = 2.0 * (1.0 / k2 + inv4a2);
    return exp(-k2 * inv4a2) / k2;
}

/* Strain derivative of one k vector's (half-space) term W = pref w |S|^2, pref = 4 pi / V:
 * dE/de_ab = W (-delta_ab + c k_a k_b); adds to vir[6] (Voigt). */
static inline void kmlip_ewald_recip_virial(double W, double c, double kx, double ky, double kz,
                                            double *vir)
{
    vir[0] += W * (c * kx * kx - 1.0);
    vir[1] += W * (c * ky * ky - 1.0);
    vir[2] += W * (c * kz * kz - 1.0);
    vir[3] += W * c * ky * kz;
    vir[4] += W * c * kx * kz;
    vir[5] += W * c * kx * ky;
}

/* Atoms per group in kmlip_ewald_recip_group (the lanes of its vectorised loops). */
#define KMLIP_RECIP_LANES 4

/* Phase tables e^{i n 2 pi s_a} of one atom at fractional position s, by recurrence from one
 * cos/sin per axis (error ~ n * 1e-16): n = 0..n1 for axis 1, -n2..n2 for axis 2 and -n3..n3 for
 * axis 3, entry n of axis 1 at tr[stride * n], of axis 2 at tr[stride * (n1 + 1 + n2 + n)],
 * of axis 3 at tr[stride * (n1 + 2 + 2 n2 + n3 + n)] (ti likewise, imaginary parts). */
static inline void kmlip_ewald_phase_table(const double *s, long n1, long n2, long n3,
                                           long stride, double *tr, double *ti)
{
    const long o2 = n1 + 1 + n2, o3 = n1 + 2 + 2 * n2 + n3;
    const long off[3] = {0, o2, o3}, top[3] = {n1, n2, n3};
    int a;
    long m;
    for (a = 0; a < 3; ++a) {
        const double th = 2.0 * KMLIP_PI * s[a], c = cos(th), sn = sin(th);
        double *r = tr + stride * off[a], *i = ti + stride * off[a];
        r[0] = 1.0;
        i[0] = 0.0;
        for (m = 1; m <= top[a]; ++m) {
            r[stride * m] = r[stride * (m - 1)] * c - i[stride * (m - 1)] * sn;
            i[stride * m] = r[stride * (m - 1)] * sn + i[stride * (m - 1)] * c;
            if (a > 0) {
                r[-stride * m] = r[stride * m];
                i[-stride * m] = -i[stride * m];
            }
        }
    }
}

/* Structure factors of one row of k vectors (h, k, l = lo .. lo + cnt - 1) from nj atoms:
 * out[t] += q_j e^{i (h b1 + k b2 + (lo + t) b3) . r_j}, with the atoms' phase tables as rows of
 * tr, ti (stride 1, ntab entries each); h, o2 = n1 + 1 + n2 + k and o3 = n1 + 2 + 2 n2 + n3 + lo
 * index the tables. The loop over t vectorises. */
KMLIP_CLONES
static void kmlip_ewald_sf_row(long nj, long ntab, long h, long o2, long o3, long cnt,
                               const double *restrict q, const double *restrict tr,
                               const double *restrict ti, double *restrict outr,
                               double *restrict outi)
{
    long j, t;
    for (j = 0; j < nj; ++j) {
        const double *a = tr + j * ntab, *b = ti + j * ntab;
        const double pr = q[j] * (a[h] * a[o2] - b[h] * b[o2]);
        const double pi = q[j] * (a[h] * b[o2] + b[h] * a[o2]);
        for (t = 0; t < cnt; ++t) {
            outr[t] += pr * a[o3 + t] - pi * b[o3 + t];
            outi[t] += pr * b[o3 + t] + pi * a[o3 + t];
        }
    }
}

/* Reciprocal-space force coefficients and potentials of KMLIP_RECIP_LANES atoms at once.
 *
 * rows: (nrows, 5) = h, k, lo, cnt, offset of each row of half-space k vectors; wsr, wsi: the
 * weighted structure factors w_k S(k) (real, imaginary) of the flat k list; tr, ti: the
 * atoms' phase tables interleaved (stride KMLIP_RECIP_LANES, see kmlip_ewald_phase_table).
 * For each atom (lane) j, with e = e^{i k.r_j} and a_k = wsr Im(e) - wsi Re(e):
 *   g[a * L + j] = sum_k a_k (h, k, l)_a,   phi[j] = sum_k (wsr Re(e) + wsi Im(e)),
 * so that F_j = (8 pi / V) q_j sum_a g_a b_a and phi_j (the potential) = (8 pi / V) phi[j].
 * Lanes are atoms, so nothing is reduced across lanes and the loops vectorise. */
KMLIP_CLONES
static void kmlip_ewald_recip_group(long nrows, const ptrdiff_t *restrict rows, long n1, long n2,
                                    long n3, const double *restrict wsr,
                                    const double *restrict wsi, const double *restrict tr,
                                    const double *restrict ti, double *restrict g,
                                    double *restrict phi)
{
    enum { L = KMLIP_RECIP_LANES };
    double g1[L], g2[L], g3[L], ps[L];
    long r, t;
    int l;
    for (l = 0; l < L; ++l) {
        g1[l] = 0.0;
        g2[l] = 0.0;
        g3[l] = 0.0;
        ps[l] = 0.0;
    }
    for (r = 0; r < nrows; ++r) {
        const long h = (long)rows[5 * r], kk = (long)rows[5 * r + 1], lo = (long)rows[5 * r + 2];
        const long cnt = (long)rows[5 * r + 3], off = (long)rows[5 * r + 4];
        const long o2 = n1 + 1 + n2 + kk, o3 = n1 + 2 + 2 * n2 + n3 + lo;
        double ar[L], ai[L], as[L], al[L];
        for (l = 0; l < L; ++l) {
            ar[l] = tr[h * L + l] * tr[o2 * L + l] - ti[h * L + l] * ti[o2 * L + l];
            ai[l] = tr[h * L + l] * ti[o2 * L + l] + ti[h * L + l] * tr[o2 * L + l];
            as[l] = 0.0;
            al[l] = 0.0;
        }
        for (t = 0; t < cnt; ++t) {
            const double sr = wsr[off + t], si = wsi[off + t], lt = (double)(lo + t);
            const double *r3 = tr + (o3 + t) * L, *i3 = ti + (o3 + t) * L;
            for (l = 0; l < L; ++l) {
                const double cr = ar[l] * r3[l] - ai[l] * i3[l];
                const double ci = ar[l] * i3[l] + ai[l] * r3[l];
                const double a = sr * ci - si * cr;
                as[l] += a;
                al[l] += a * lt;
                ps[l] += sr * cr + si * ci;
            }
        }
        for (l = 0; l < L; ++l) {
            g1[l] += (double)h * as[l];
            g2[l] += (double)kk * as[l];
            g3[l] += al[l];
        }
    }
    for (l = 0; l < L; ++l) {
        g[l] = g1[l];
        g[L + l] = g2[l];
        g[2 * L + l] = g3[l];
        phi[l] = ps[l];
    }
}

/* Self energy of one charge: -alpha/sqrt(pi) q^2 (e^2/Å). */
static inline double kmlip_ewald_self(double q, double alpha)
{
    return -alpha / KMLIP_SQRT_PI * q * q;
}

/* Neutralising-background energy for net charge Q in volume V: -pi Q^2/(2 V alpha^2) (e^2/Å).
 * Its strain derivative is -E_bg delta_ab (it scales as 1/V). */
static inline double kmlip_ewald_background(double Q, double volume, double alpha)
{
    return -KMLIP_PI * Q * Q / (2.0 * volume * alpha * alpha);
}

#ifdef __cplusplus
}
#endif
#endif /* KMLIP_EWALD_CORE_H */
