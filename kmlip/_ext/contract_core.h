/* Contraction of normalised dot-product kernel derivatives with per-pair descriptor gradients.
 *
 * Plain C99 (also valid C++17) over raw pointers (row-major, double / int64): the Cython layer
 * (contract.pyx) owns the parallel loops, memory and validation; a LAMMPS plugin can include this
 * header and call the per-centre routines from its own loop. Every size and index is int64_t;
 * functions are prefixed kmlip_, macros KMLIP_; a name ending in "_" is an internal step.
 *
 * Kernel (unit prefactor delta^2 = 1 here; callers scale): k(p, s) = (p_hat . s_hat)^zeta,
 *   dk/dp = zeta c^(zeta-1) (s_hat - c p_hat) / |p|,   c = p_hat . s_hat.
 * Pair-gradient layout: values[e, a, f] = d X[centre(e), f] / d r[neighbour(e), a].
 */
#ifndef KMLIP_CONTRACT_CORE_H
#define KMLIP_CONTRACT_CORE_H

#include <math.h>
#include <stdint.h>

/* C99 restrict; C++ has no such keyword, but GCC, Clang and MSVC accept __restrict. */
#ifndef KMLIP_RESTRICT
#ifdef __cplusplus
#define KMLIP_RESTRICT __restrict
#else
#define KMLIP_RESTRICT restrict
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Force and virial rows of K_NM for the columns [m0, m1) of one species block.
 *
 * H      (3 n_e, ldh)   values[e].reshape(3, F) @ S_hat^T          (GEMM output)
 * A, AC  (n_c, ldh)     A[i, m] = zeta c^(zeta-1)/|p_i|, AC = A * c  (per centre of the block)
 * pv     (n_e, 3)       p_hat_centre . values[e, a, :]
 * cl     (n_e)          row of the entry's centre in A / AC
 * nb     (n_e)          neighbour atom index j of the entry
 * vec    (n_e, 3)       pair vector r_ij of the entry
 * outF   (3 n_atoms, ldo)  force rows, columns col0 + m: outF[3j + a] -= g
 * outW   (9, ldo)          virial rows (unsymmetrised): outW[3a + b] += g vec[e, b]
 * with g = A[i, m] H[3e + a, m] - AC[i, m] pv[e, a] = values[e, a] . dk(p_i, s_m)/dp_i.
 * Each output element is accumulated in entry order, so the result does not depend on how the
 * column range is split between threads.
 */
static inline void kmlip_scatter_row_(
    const double *KMLIP_RESTRICT Hr, const double *KMLIP_RESTRICT Ai, const double *KMLIP_RESTRICT ACi, double q,
    double r0, double r1, double r2, double *KMLIP_RESTRICT F, double *KMLIP_RESTRICT W0,
    double *KMLIP_RESTRICT W1, double *KMLIP_RESTRICT W2, int64_t m0, int64_t m1)
{
    /* restrict + simd: the output rows never alias each other or the inputs, so the loop
     * vectorises (4 independent streaming updates per column). */
#ifdef _OPENMP
#pragma omp simd
#endif
    for (int64_t m = m0; m < m1; ++m) {
        const double g = Ai[m] * Hr[m] - ACi[m] * q;
        F[m] -= g;
        W0[m] += g * r0;
        W1[m] += g * r1;
        W2[m] += g * r2;
    }
}

static inline void kmlip_scatter_force_rows(
    const double *H, int64_t ldh, const double *A, const double *AC, const double *pv,
    const int64_t *cl, const int64_t *nb, const double *vec, int64_t n_e,
    int64_t m0, int64_t m1, int64_t col0, double *outF, double *outW, int64_t ldo)
{
    for (int64_t e = 0; e < n_e; ++e) {
        const double *Ai = A + cl[e] * ldh;
        const double *ACi = AC + cl[e] * ldh;
        const double r0 = vec[3 * e], r1 = vec[3 * e + 1], r2 = vec[3 * e + 2];
        for (int64_t a = 0; a < 3; ++a) {
            double *W0 = outW + (3 * a) * ldo + col0;
            kmlip_scatter_row_(H + (3 * e + a) * ldh, Ai, ACi, pv[3 * e + a], r0, r1, r2,
                               outF + (3 * nb[e] + a) * ldo + col0, W0, W0 + ldo,
                               W0 + 2 * ldo, m0, m1);
        }
    }
}

/* The same with a single-precision GEMM output (mixed-precision training): the GEMM runs on
 * sparse points centred on a reference direction u, H = values . (s_hat - u) in float32, and
 * hu = values . u (double) restores values . s_hat = H + hu; centring shrinks the float32
 * rounding by the spread of the sparse points around u. Every accumulation stays in double. */
static inline void kmlip_scatter_row_f_(
    const float *KMLIP_RESTRICT Hr, double hu, const double *KMLIP_RESTRICT Ai, const double *KMLIP_RESTRICT ACi,
    double q,
    double r0, double r1, double r2, double *KMLIP_RESTRICT F, double *KMLIP_RESTRICT W0,
    double *KMLIP_RESTRICT W1, double *KMLIP_RESTRICT W2, int64_t m0, int64_t m1)
{
#ifdef _OPENMP
#pragma omp simd
#endif
    for (int64_t m = m0; m < m1; ++m) {
        const double g = Ai[m] * ((double)Hr[m] + hu) - ACi[m] * q;
        F[m] -= g;
        W0[m] += g * r0;
        W1[m] += g * r1;
        W2[m] += g * r2;
    }
}

static inline void kmlip_scatter_force_rows_f(
    const float *H, const double *hu, int64_t ldh, const double *A, const double *AC, const double *pv,
    const int64_t *cl, const int64_t *nb, const double *vec, int64_t n_e,
    int64_t m0, int64_t m1, int64_t col0, double *outF, double *outW, int64_t ldo)
{
    for (int64_t e = 0; e < n_e; ++e) {
        const double *Ai = A + cl[e] * ldh;
        const double *ACi = AC + cl[e] * ldh;
        const double r0 = vec[3 * e], r1 = vec[3 * e + 1], r2 = vec[3 * e + 2];
        for (int64_t a = 0; a < 3; ++a) {
            double *W0 = outW + (3 * a) * ldo + col0;
            kmlip_scatter_row_f_(H + (3 * e + a) * ldh, hu[3 * e + a], Ai, ACi, pv[3 * e + a],
                                 r0, r1, r2, outF + (3 * nb[e] + a) * ldo + col0, W0,
                                 W0 + ldo, W0 + 2 * ldo, m0, m1);
        }
    }
}

/* f[e, a] = sum_f values[e, a, f] * v[centre(e), f] for the entries [e0, e1).
 * Three independent sums share each load of v; the simd reduction splits them into vector
 * lanes (a fixed order, the same for any thread count). */
static inline void kmlip_pair_forces(
    const double *values, const int64_t *centers, const double *v, int64_t n_features,
    int64_t e0, int64_t e1, double *f)
{
    for (int64_t e = e0; e < e1; ++e) {
        const double *KMLIP_RESTRICT vi = v + centers[e] * n_features;
        const double *KMLIP_RESTRICT x0 = values + (3 * e) * n_features;
        const double *KMLIP_RESTRICT x1 = x0 + n_features;
        const double *KMLIP_RESTRICT x2 = x1 + n_features;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
#ifdef _OPENMP
#pragma omp simd reduction(+:s0, s1, s2)
#endif
        for (int64_t k = 0; k < n_features; ++k) {
            s0 += x0[k] * vi[k];
            s1 += x1[k] * vi[k];
            s2 += x2[k] * vi[k];
        }
        f[3 * e] = s0;
        f[3 * e + 1] = s1;
        f[3 * e + 2] = s2;
    }
}

/* Forces F_j = -sum_{e: nb[e] = j} f_e and virial W_ab = sum_e f_e[a] vec_e[b] (serial, in entry
 * order). forces (n_atoms, 3) and virial (3, 3) are accumulated into (callers zero them). */
static inline void kmlip_forces_virial(
    const double *f, const int64_t *nb, const double *vec, int64_t n_e,
    double *forces, double *virial)
{
    for (int64_t e = 0; e < n_e; ++e) {
        for (int64_t a = 0; a < 3; ++a) {
            const double fa = f[3 * e + a];
            forces[3 * nb[e] + a] -= fa;
            for (int64_t b = 0; b < 3; ++b) virial[3 * a + b] += fa * vec[3 * e + b];
        }
    }
}

/* Local energy and its gradient for one centre (the per-atom prediction a plugin needs).
 *
 * p (F) raw features; S_hat (M, F) normalised sparse points of the centre's species;
 * alpha (M) weights; scale = delta^2. Returns eps = scale sum_m alpha_m c_m^zeta and writes
 * v = d eps / d p (F). A zero feature vector has eps = 0, v = 0.
 */
static inline double kmlip_centre_energy_grad(
    const double *p, const double *S_hat, const double *alpha, int64_t M, int64_t F,
    int64_t zeta, double scale, double *v)
{
    double nrm = 0.0;
    for (int64_t k = 0; k < F; ++k) nrm += p[k] * p[k];
    nrm = sqrt(nrm);
    for (int64_t k = 0; k < F; ++k) v[k] = 0.0;
    if (nrm == 0.0) return 0.0;
    const double inv = 1.0 / nrm;
    double eps = 0.0, proj = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        const double *s = S_hat + m * F;
        double c = 0.0;
        for (int64_t k = 0; k < F; ++k) c += p[k] * s[k];
        c *= inv;
        double cz1 = 1.0;
        for (int64_t t = 0; t < zeta - 1; ++t) cz1 *= c;
        const double w = alpha[m] * cz1;   /* alpha c^(zeta-1) */
        eps += w * c;
        proj += w * c;
        for (int64_t k = 0; k < F; ++k) v[k] += w * s[k];
    }
    const double fac = scale * zeta * inv;
    for (int64_t k = 0; k < F; ++k) v[k] = fac * (v[k] - proj * p[k] * inv);
    return scale * eps;
}

#ifdef __cplusplus
}
#endif

#endif /* KMLIP_CONTRACT_CORE_H */
