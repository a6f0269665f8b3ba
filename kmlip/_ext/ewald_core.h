/* Ewald summation of point charges: the per-pair and per-k-vector mathematics.
 *
 * Plain C (C99 or later; also valid C++), no Python, no allocation: included by
 * kmlip/_ext/ewald.pyx and meant to be included unchanged by a future LAMMPS pair-style plugin
 * (C++), which owns its own loop over local atoms and calls kmlip_ewald_real_atom() with the
 * (image) positions of each atom's neighbours in a half list (LAMMPS's "newton on"). Sizes and
 * indices are int64_t throughout.
 *
 * Conventions (shared with kmlip/ewald.py):
 *   - charges in units of e, lengths in Å; every energy here is in e^2/Å, multiply by
 *     k_e = 14.399645 eV·Å to get eV.
 *   - pair vector d = r_j + S·cell - r_i (from the centre i to its neighbour j).
 *   - g = (1/r) dE_pair/dr, so the force on the centre from one pair is F_i = g d, on the
 *     neighbour F_j = -g d, and the pair's contribution to the strain derivative dE/de_ab is
 *     g d_a d_b. Pair lists are half lists: each pair once.
 *   - virial arrays are Voigt-ordered: xx yy zz yz xz xy.
 *   - E = E_real + E_recip + E_self + E_background with
 *       E_real  = 1/2 sum_{i,j,S}' q_i q_j erfc(alpha r)/r
 *       E_recip = (2 pi / V) sum_{k != 0} exp(-k^2/(4 alpha^2))/k^2 |S(k)|^2,
 *                 S(k) = sum_j q_j exp(i k.r_j)
 *       E_self  = -alpha/sqrt(pi) sum_i q_i^2
 *       E_bg    = -pi Q^2/(2 V alpha^2),  Q = sum_i q_i
 *     (the last three, and the k-vector weights, are formed in kmlip/ewald.py).
 */
#ifndef KMLIP_EWALD_CORE_H
#define KMLIP_EWALD_CORE_H

#include <math.h>
#include <stdint.h>

/* C99 restrict; C++ has only the compiler extension. */
#ifndef KMLIP_RESTRICT
#if defined(__cplusplus)
#define KMLIP_RESTRICT __restrict
#else
#define KMLIP_RESTRICT restrict
#endif
#endif

/* Run-time choice of AVX2/FMA code for the hot loops (GCC on x86-64 Linux, through ifunc);
 * elsewhere the compiler's default target. Define KMLIP_NO_CLONES to switch it off. */
#ifndef KMLIP_CLONES
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(KMLIP_NO_CLONES)
#define KMLIP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define KMLIP_CLONES __attribute__((unused))
#else
#define KMLIP_CLONES
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KMLIP_TWO_OVER_SQRT_PI 1.12837916709551257390
#define KMLIP_EWALD_PI 3.14159265358979323846

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

/* erfc(x) for 0 <= x <= KMLIP_ERFC_XMAX, returning its derivative's Gaussian exp(-x^2) as
 * well (d erfc/dx = -(2/sqrt(pi)) exp(-x^2); the force needs it, and it is the costly part):
 * erfc(x) = exp(-x^2) t Q(t), t = 2/(2 + x), with Q a degree-18 polynomial fitted (in Chebyshev
 * nodes, against 40-digit values) on x in [0, 6.5]; relative error < 5e-15 there, which covers
 * every accuracy kmlip accepts (alpha r_c = sqrt(-ln(eps/5)) <= 6.43 for eps >= 1e-17). One
 * exponential, no branches and no calls, so loops over pairs vectorise. */
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
    const double g = kmlip_exp_neg(-x * x);
    const double t = 2.0 / (2.0 + x);
    const double u = (t - KMLIP_ERFC_T0) * (2.0 / (1.0 - KMLIP_ERFC_T0)) - 1.0;
    double p = KMLIP_ERFC_C0;
    KMLIP_ERFC_HORNER(p, u);
    *gauss = g;
    return g * t * p;
}

/* Lanes of the partial sums kept by kmlip_ewald_real_atom (one AVX2 register of doubles). */
#define KMLIP_EWALD_LANES 4
/* Number of partial sums per lane in kmlip_ewald_real_atom's acc. */
#define KMLIP_EWALD_NACC 10
/* Squared distance below which two charges count as coincident (Å^2). */
#define KMLIP_EWALD_TINY_R2 1e-20

/* Per-lane sums of energy, forces and virial for lanes [0, nl) of the group at k0 (see
 * kmlip_ewald_real_atom for the layout of acc). */
static inline void kmlip_ewald_lanes(int64_t nl, int64_t k0, const double *KMLIP_RESTRICT be,
                                     const double *KMLIP_RESTRICT bg,
                                     const double *KMLIP_RESTRICT bx,
                                     const double *KMLIP_RESTRICT by,
                                     const double *KMLIP_RESTRICT bz,
                                     double *KMLIP_RESTRICT acc)
{
    int64_t l;
    for (l = 0; l < nl; ++l) {
        const int64_t kk = k0 + l;
        const double g = bg[kk], dx = bx[kk], dy = by[kk], dz = bz[kk];
        double gd;
        acc[0 * KMLIP_EWALD_LANES + l] += be[kk];
        gd = g * dx;
        acc[1 * KMLIP_EWALD_LANES + l] += gd;
        acc[4 * KMLIP_EWALD_LANES + l] += gd * dx;
        acc[8 * KMLIP_EWALD_LANES + l] += gd * dz;
        acc[9 * KMLIP_EWALD_LANES + l] += gd * dy;
        gd = g * dy;
        acc[2 * KMLIP_EWALD_LANES + l] += gd;
        acc[5 * KMLIP_EWALD_LANES + l] += gd * dy;
        acc[7 * KMLIP_EWALD_LANES + l] += gd * dz;
        gd = g * dz;
        acc[3 * KMLIP_EWALD_LANES + l] += gd;
        acc[6 * KMLIP_EWALD_LANES + l] += gd * dz;
    }
}

/* The real-space pairs of one centre i at (xi, yi, zi), charge qi, with m candidate neighbours
 * at (cx, cy, cz) (periodic images already applied) of charges cq: one half of a pair list
 * (each pair once, from one of its two ends; Newton's third law gives the other end).
 *
 * Candidates with 1e-10 Å <= r < rc (rc2 = rc^2; needs alpha*rc <= KMLIP_ERFC_XMAX) count:
 *   - for the centre, they are added, without qi, to lane-wise partial sums
 *     acc[s * KMLIP_EWALD_LANES + lane] for s = 0: sum e, 1-3: sum g d_a (a = x, y, z),
 *     4-9: sum g d_a d_b (Voigt xx yy zz yz xz xy), with e = q_j erfc(alpha r)/r and
 *     g = (1/r) de/dr; so the centre's force is qi (acc 1-3), the pairs' whole strain
 *     derivative qi (acc 4-9) and the centre's half of the pair energies qi/2 (acc 0);
 *   - for each candidate j, its force -qi g d is added to (cfx, cfy, cfz)[j] and its half of the
 *     pair energy qi e/2 to ce[j].
 * The return value counts candidates closer than 1e-10 Å (coincident atoms). bx, by, bz, bq, be,
 * bg (doubles) and keep, idx (int64_t), m each, are scratch. The candidates inside the cutoff
 * are found by a vectorised pass and compacted by index (branch-free), then evaluated and
 * summed by loops that vectorise; the lanes are independent sums in a fixed order, so nothing is
 * reassociated and the result does not depend on how the caller shares the work among threads.
 * Compile with -fno-math-errno so that sqrt vectorises. */
KMLIP_CLONES
static int64_t kmlip_ewald_real_atom(int64_t m, const double *KMLIP_RESTRICT cx,
                                     const double *KMLIP_RESTRICT cy,
                                     const double *KMLIP_RESTRICT cz,
                                     const double *KMLIP_RESTRICT cq, double xi, double yi,
                                     double zi, double qi, double alpha, double rc2,
                                     double *KMLIP_RESTRICT bx, double *KMLIP_RESTRICT by,
                                     double *KMLIP_RESTRICT bz, double *KMLIP_RESTRICT bq,
                                     double *KMLIP_RESTRICT be, double *KMLIP_RESTRICT bg,
                                     int64_t *KMLIP_RESTRICT keep, int64_t *KMLIP_RESTRICT idx,
                                     double *KMLIP_RESTRICT acc, double *KMLIP_RESTRICT cfx,
                                     double *KMLIP_RESTRICT cfy, double *KMLIP_RESTRICT cfz,
                                     double *KMLIP_RESTRICT ce)
{
    const double c = KMLIP_TWO_OVER_SQRT_PI * alpha, hq = 0.5 * qi;
    int64_t k, k0, w = 0, near = 0;
    for (k = 0; k < m; ++k) { /* vectorised: which candidates are inside the cutoff */
        const double dx = cx[k] - xi, dy = cy[k] - yi, dz = cz[k] - zi;
        const double r2 = dx * dx + dy * dy + dz * dz;
        keep[k] = (r2 < rc2) & (r2 >= KMLIP_EWALD_TINY_R2);
        near += r2 < KMLIP_EWALD_TINY_R2;
    }
    for (k = 0; k < m; ++k) { /* branch-free compaction of their indices */
        idx[w] = k;
        w += keep[k];
    }
    m = w;
    for (k = 0; k < m; ++k) { /* gather the kept pairs */
        const int64_t j = idx[k];
        const double dx = cx[j] - xi, dy = cy[j] - yi, dz = cz[j] - zi;
        bx[k] = dx;
        by[k] = dy;
        bz[k] = dz;
        bq[k] = cq[j];
        be[k] = dx * dx + dy * dy + dz * dz;
    }
    for (k = 0; k < m; ++k) {
        const double inv_r = 1.0 / sqrt(be[k]);
        double gauss, erfc_x, er;
        erfc_x = kmlip_erfc_gauss(alpha * be[k] * inv_r, &gauss);
        er = bq[k] * erfc_x * inv_r;
        be[k] = er;
        /* d/dr [erfc(a r)/r] = -erfc(a r)/r^2 - (2a/sqrt(pi)) exp(-a^2 r^2)/r */
        bg[k] = -(er + bq[k] * c * gauss) * inv_r * inv_r;
    }
    for (k = 0; k < m; ++k) { /* the other end of each pair (indices distinct) */
        const int64_t j = idx[k];
        const double f = qi * bg[k];
        cfx[j] -= f * bx[k];
        cfy[j] -= f * by[k];
        cfz[j] -= f * bz[k];
        ce[j] += hq * be[k];
    }
    for (k0 = 0; k0 < m; k0 += KMLIP_EWALD_LANES) {
        if (m - k0 >= KMLIP_EWALD_LANES) /* constant trip count after inlining: vectorised */
            kmlip_ewald_lanes(KMLIP_EWALD_LANES, k0, be, bg, bx, by, bz, acc);
        else                             /* the same sums for the last, partial group */
            kmlip_ewald_lanes(m - k0, k0, be, bg, bx, by, bz, acc);
    }
    return near;
}

/* Bare Coulomb pair (non-periodic direct sum): energy q_i q_j / r and g = (1/r) dE/dr. */
static inline void kmlip_coulomb_pair(double qq, double r2, double *e, double *g)
{
    const double inv_r = 1.0 / sqrt(r2);
    const double er = qq * inv_r;
    *e = er;
    *g = -er * inv_r * inv_r;
}

/* Atoms per block in kmlip_ewald_recip_block (the vectorised loops run over them). */
#define KMLIP_EWALD_BLOCK 16

/* Phase tables e^{i n 2 pi s_a} of one atom at fractional position s, by recurrence from one
 * cos/sin per axis (error ~ n * 1e-16): n = 0..n1 for axis 1, -n2..n2 for axis 2 and -n3..n3 for
 * axis 3, entry n of axis 1 at tr[stride * n], of axis 2 at tr[stride * (n1 + 1 + n2 + n)],
 * of axis 3 at tr[stride * (n1 + 2 + 2 n2 + n3 + n)] (ti likewise, imaginary parts). */
static inline void kmlip_ewald_phase_table(const double *s, int64_t n1, int64_t n2, int64_t n3,
                                           int64_t stride, double *tr, double *ti)
{
    const int64_t o2 = n1 + 1 + n2, o3 = n1 + 2 + 2 * n2 + n3;
    const int64_t off[3] = {0, o2, o3}, top[3] = {n1, n2, n3};
    int64_t a, m;
    for (a = 0; a < 3; ++a) {
        const double th = 2.0 * KMLIP_EWALD_PI * s[a], c = cos(th), sn = sin(th);
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
static void kmlip_ewald_sf_row(int64_t nj, int64_t ntab, int64_t h, int64_t o2, int64_t o3,
                               int64_t cnt, const double *KMLIP_RESTRICT q,
                               const double *KMLIP_RESTRICT tr, const double *KMLIP_RESTRICT ti,
                               double *KMLIP_RESTRICT outr, double *KMLIP_RESTRICT outi)
{
    int64_t j, t;
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

/* Reciprocal-space force coefficients and potentials of KMLIP_EWALD_BLOCK atoms at once.
 *
 * rows: (nrows, 5) = h, k, lo, cnt, offset of each row of half-space k vectors; wsr, wsi: the
 * weighted structure factors w_k S(k) (real, imaginary) of the flat k list; tr, ti: the
 * atoms' phase tables interleaved (stride KMLIP_EWALD_BLOCK, see kmlip_ewald_phase_table).
 * For each atom j of the block, with e = e^{i k.r_j} and a_k = wsr Im(e) - wsi Re(e):
 *   g[a * B + j] = sum_k a_k (h, k, l)_a,   phi[j] = sum_k (wsr Re(e) + wsi Im(e)),
 * so that F_j = (8 pi / V) q_j sum_a g_a b_a and phi_j (the potential) = (8 pi / V) phi[j].
 * The loops run over the atoms of the block, so nothing is reduced across them and they
 * vectorise; each atom's sums run over k in a fixed order. */
/* GCC's unroll-and-jam (-O3) would fuse two k vectors into one loop over the block that it
 * then leaves scalar (measured: 2.5x slower). */
#if defined(__GNUC__) && !defined(__clang__)
#define KMLIP_EWALD_NO_JAM __attribute__((optimize("no-loop-unroll-and-jam")))
#else
#define KMLIP_EWALD_NO_JAM
#endif

KMLIP_CLONES KMLIP_EWALD_NO_JAM
static void kmlip_ewald_recip_block(int64_t nrows, const int64_t *KMLIP_RESTRICT rows,
                                    int64_t n1, int64_t n2, int64_t n3,
                                    const double *KMLIP_RESTRICT wsr,
                                    const double *KMLIP_RESTRICT wsi,
                                    const double *KMLIP_RESTRICT tr,
                                    const double *KMLIP_RESTRICT ti,
                                    double *KMLIP_RESTRICT g, double *KMLIP_RESTRICT phi)
{
    enum { B = KMLIP_EWALD_BLOCK };
    double ar[KMLIP_EWALD_BLOCK], ai[KMLIP_EWALD_BLOCK], as[KMLIP_EWALD_BLOCK];
    double al[KMLIP_EWALD_BLOCK], pr[KMLIP_EWALD_BLOCK];
    int64_t r, t, j;
    for (j = 0; j < 3 * B; ++j)
        g[j] = 0.0;
    for (j = 0; j < B; ++j)
        phi[j] = 0.0;
    for (r = 0; r < nrows; ++r) {
        const int64_t h = rows[5 * r], kk = rows[5 * r + 1], lo = rows[5 * r + 2];
        const int64_t cnt = rows[5 * r + 3], off = rows[5 * r + 4];
        const int64_t o2 = n1 + 1 + n2 + kk, o3 = n1 + 2 + 2 * n2 + n3 + lo;
        const double *KMLIP_RESTRICT r1 = tr + h * B, *KMLIP_RESTRICT i1 = ti + h * B;
        const double *KMLIP_RESTRICT r2 = tr + o2 * B, *KMLIP_RESTRICT i2 = ti + o2 * B;
        for (j = 0; j < B; ++j) {
            ar[j] = r1[j] * r2[j] - i1[j] * i2[j];
            ai[j] = r1[j] * i2[j] + i1[j] * r2[j];
            as[j] = 0.0;
            al[j] = 0.0;
            pr[j] = 0.0;
        }
        for (t = 0; t < cnt; ++t) {
            const double sr = wsr[off + t], si = wsi[off + t], lt = (double)(lo + t);
            const double *KMLIP_RESTRICT r3 = tr + (o3 + t) * B;
            const double *KMLIP_RESTRICT i3 = ti + (o3 + t) * B;
            for (j = 0; j < B; ++j) {
                const double cr = ar[j] * r3[j] - ai[j] * i3[j];
                const double ci = ar[j] * i3[j] + ai[j] * r3[j];
                const double a = sr * ci - si * cr;
                as[j] += a;
                al[j] += a * lt;
                pr[j] += sr * cr + si * ci;
            }
        }
        for (j = 0; j < B; ++j) {
            g[j] += (double)h * as[j];
            g[B + j] += (double)kk * as[j];
            g[2 * B + j] += al[j];
            phi[j] += pr[j];
        }
    }
}

#ifdef __cplusplus
}
#endif
#endif /* KMLIP_EWALD_CORE_H */
