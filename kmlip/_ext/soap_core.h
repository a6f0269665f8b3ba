/* SOAP power spectrum and its exact gradients for one centre.
 *
 * Plain C99 (also valid C++17) over raw pointers: no Python, no allocation. The Cython driver
 * (soap.pyx) owns the loop over centres and the memory; a LAMMPS pair style can include this
 * header and call kmlip_soap_centre() (features and gradients) or kmlip_soap_centre_vjp()
 * (forces of a scalar of the features) from its own loop.
 *
 * Conventions: every size, index and species code is int64_t; functions and types are
 * prefixed kmlip_soap_, macros KMLIP_SOAP_; a name ending
 * in "_" is an internal step that callers need not use.
 *
 * Maths (see DESIGN.md, "SOAP"): with the GTO primitive basis r^l exp(-alpha_{lk} r^2) and a
 * Gaussian atom density of width sigma, the radial integral has the closed form
 *     I_{nl}(r) Y_lm(r^) = sum_k B[l][n][k] exp(A[l][k] r^2) * S_lm(x, y, z),
 * where S_lm = r^l Y_lm are the real regular solid harmonics (a polynomial), so every pair costs
 * (l_max+1)*n_max exponentials and a small matrix-vector product; no quadrature, no splines.
 * The coefficients c^s_{nlm} = sum_{j in s} fc(r_ij) I_{nl} Y_lm and the power spectrum
 * p_{(s n)(s' n') l} = scale * sum_m c^s_{nlm} c^{s'}_{n'lm} (rows r = s*n_max + n, r <= r').
 *
 * One centre is computed in named steps, shared by the features, gradient and vjp paths:
 *   kmlip_soap_expand_            coefficients C and per-pair harmonics / radial values
 *   kmlip_soap_power_spectrum_    p from C (the one power-spectrum loop)
 *   kmlip_soap_pair_coeff_grad_   dC: derivative of the pair's coefficients w.r.t. r_j
 *   kmlip_soap_pair_spectrum_grad_  Q = dC_l C_l^T, the pair's derivative rows of P_l
 *   kmlip_soap_scatter_pair_grad_ dp/dr_j into the output (and minus it into the self term)
 *   kmlip_soap_cotangent_         dE/dp from dE/d(p/|p|) (normalised features, vjp path)
 *   kmlip_soap_adjoint_           H_l = U_l C_l, U_l the symmetric matrix of dE/dp
 *   kmlip_soap_pair_vjp_          dE/dr_ij of one pair from H and its harmonics / radial values
 */
#ifndef KMLIP_SOAP_CORE_H
#define KMLIP_SOAP_CORE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* M_PI is not part of strict C99 / C++; the same literal as glibc's M_PI. */
#define KMLIP_SOAP_PI 3.14159265358979323846
/* Y_00 = 1 / sqrt(4 pi) */
#define KMLIP_SOAP_Y00 0.28209479177387814

typedef struct kmlip_soap_params {
    int64_t n_max;          /* radial functions */
    int64_t l_max;          /* angular channels 0..l_max */
    int64_t n_species;      /* neighbour species (rows R = n_species * n_max) */
    int64_t n_features;     /* length of p */
    double r_cut;           /* neighbours with r < r_cut contribute */
    double cutoff_width;    /* > 0: shifted-cosine cutoff on [r_cut - width, r_cut]; 0: hard */
    double center_weight;   /* weight of the centre atom's own Gaussian (l = 0 only) */
    const double *A;        /* (l_max+1, n_max): exponents, exp(A r^2) */
    const double *B;        /* (l_max+1, n_max, n_max): B[l][k][n] (k: primitive, n: basis) */
    const int64_t *feat_index;  /* (l_max+1, R, R): output index of (l, r, r'), r <= r';
                                 * for fixed (l, r) and a species block of r', consecutive */
    const double *feat_scale;   /* (l_max+1, R, R): prefactor of that output */
    const double *ylm_norm;     /* ((l_max+1)^2): normalisation of S_lm at l*l + l + |m| */
} kmlip_soap_params;

/* Pointers into the scratch array of one centre. */
typedef struct kmlip_soap_workspace {
    double *C;      /* (LM, R): coefficients, C[l^2 R + (m+l) R + r] */
    double *ex;     /* (2, L1 N): exponentials of one pair */
    double *P;      /* (R, R): power spectrum of one l */
    double *Q;      /* (3, N, R): derivative rows of one pair and one l */
    double *dC;     /* (3, LM, N): coefficient derivatives of one pair */
    double *hscr;   /* solid-harmonics recurrences */
    double *selfg;  /* (3, F): self term; F doubles of it hold p^ in the vjp path */
    double *adj;    /* vjp: H (LM, R), U (R, R), cotangent (F) */
    double *Sall;   /* (n_neigh, stride): S (LM), dS (3 LM), a (L1 N), b (L1 N) per pair */
    int64_t stride; /* doubles per pair in Sall */
} kmlip_soap_workspace;

/* Doubles of scratch space kmlip_soap_centre() / kmlip_soap_centre_vjp() need for up to n_neigh
 * neighbours. */
static inline int64_t kmlip_soap_work_size(const kmlip_soap_params *p, int64_t n_neigh)
{
    const int64_t L1 = p->l_max + 1, LM = L1 * L1, N = p->n_max, R = p->n_species * N;
    const int64_t per_pair = LM + 3 * LM + 2 * L1 * N;  /* S, dS, a, b */
    const int64_t fixed = R * LM                        /* C */
                          + 2 * L1 * N                  /* exponentials */
                          + R * R                       /* P for one l */
                          + 3 * N * R                   /* Q for one l */
                          + 3 * N * LM                  /* dC of one pair */
                          + 3 * LM + 2 * L1             /* harmonics scratch */
                          + 3 * p->n_features           /* self gradient */
                          + R * LM + R * R + p->n_features;  /* adjoint (vjp) */
    return fixed + n_neigh * per_pair;
}

static inline kmlip_soap_workspace kmlip_soap_workspace_(const kmlip_soap_params *p, double *work)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = p->n_species * N;
    kmlip_soap_workspace w;
    w.C = work;
    w.ex = w.C + R * LM;
    w.P = w.ex + 2 * L1 * N;
    w.Q = w.P + R * R;
    w.dC = w.Q + 3 * N * R;
    w.hscr = w.dC + 3 * N * LM;
    w.selfg = w.hscr + 3 * LM + 2 * L1;
    w.adj = w.selfg + 3 * p->n_features;
    w.Sall = w.adj + R * LM + R * R + p->n_features;
    w.stride = LM + 3 * LM + 2 * L1 * N;
    return w;
}

/* Smooth cutoff fc(r), returned, and its slope d fc / d r, written to *slope. */
static inline double kmlip_soap_cutoff(const kmlip_soap_params *p, double r, double *slope)
{
    const double w = p->cutoff_width;
    if (w <= 0.0 || r <= p->r_cut - w) { *slope = 0.0; return 1.0; }
    if (r >= p->r_cut) { *slope = 0.0; return 0.0; }
    const double t = KMLIP_SOAP_PI * (r - p->r_cut + w) / w;
    *slope = -0.5 * sin(t) * KMLIP_SOAP_PI / w;
    return 0.5 * (1.0 + cos(t));
}

/* Values only of the solid harmonics (see kmlip_soap_solid_harmonics). */
static inline void kmlip_soap_solid_harmonics_values_(int64_t l_max, double x, double y, double z,
                                                      const double *norm, double *scratch,
                                                      double *S)
{
    const int64_t L1 = l_max + 1;
    const double r2 = x * x + y * y + z * z;
    double *Pi = scratch, *Am = Pi + L1 * L1, *Bm = Am + L1;
    Am[0] = 1.0; Bm[0] = 0.0;
    for (int64_t m = 1; m <= l_max; m++) {
        Am[m] = x * Am[m - 1] - y * Bm[m - 1];
        Bm[m] = x * Bm[m - 1] + y * Am[m - 1];
    }
    double pmm = 1.0;
    for (int64_t m = 0; m <= l_max; m++) {
        if (m > 0) pmm *= (double)(2 * m - 1);
        Pi[m * L1 + m] = pmm;
        if (m + 1 <= l_max) Pi[(m + 1) * L1 + m] = (2 * m + 1) * z * pmm;
        for (int64_t l = m + 2; l <= l_max; l++) {
            /* the same operations as the gradient path, so both paths agree to the bit */
            const double a = (double)(2 * l - 1), b = (double)(l + m - 1);
            const double inv = 1.0 / (double)(l - m);
            Pi[l * L1 + m] = (a * z * Pi[(l - 1) * L1 + m] - b * r2 * Pi[(l - 2) * L1 + m]) * inv;
        }
    }
    /* m outer, l inner: the index l*l + l is not affine in l, so the compiler keeps these short
     * loops scalar (vectorised over m they cost more in set-up than they save) */
    for (int64_t l = 0; l <= l_max; l++) S[l * l + l] = norm[l * l + l] * Pi[l * L1];
    for (int64_t m = 1; m <= l_max; m++) {
        for (int64_t l = m; l <= l_max; l++) {
            const int64_t i0 = l * l + l;
            const double Nm = norm[i0 + m], P = Pi[l * L1 + m];
            S[i0 + m] = Nm * P * Am[m];
            S[i0 - m] = Nm * P * Bm[m];
        }
    }
}

/* Real regular solid harmonics S_lm = r^l Y_lm (orthonormal Y_lm) at index l*l + (m + l), m < 0
 * the sine type, and, if dS is not NULL, their Cartesian gradients dS (3, LM). Recurrences in
 * (x, y, z) only. norm: kmlip_soap_params.ylm_norm; scratch: 3 LM + 2 (l_max+1) doubles. */
static inline void kmlip_soap_solid_harmonics(int64_t l_max, double x, double y, double z,
                                              const double *norm, double *scratch, double *S,
                                              double *dS)
{
    if (dS == NULL) {
        kmlip_soap_solid_harmonics_values_(l_max, x, y, z, norm, scratch, S);
        return;
    }
    const int64_t L1 = l_max + 1, LM = L1 * L1;
    const double r2 = x * x + y * y + z * z;
    /* Pi[l][m] (associated Legendre in solid form, no Condon-Shortley phase), D = 2 dPi/d(r^2)
     * (so d/dx Pi = x D), E = dPi/dz; Am + i Bm = (x + i y)^m. */
    double *Pi = scratch, *D = Pi + LM, *E = D + LM;
    double *Am = E + LM, *Bm = Am + L1;
    Am[0] = 1.0; Bm[0] = 0.0;
    for (int64_t m = 1; m <= l_max; m++) {
        Am[m] = x * Am[m - 1] - y * Bm[m - 1];
        Bm[m] = x * Bm[m - 1] + y * Am[m - 1];
    }
    for (int64_t m = 0; m <= l_max; m++) {
        /* Pi[m][m] = (2m-1)!! */
        double pmm = 1.0;
        for (int64_t k = 1; k <= m; k++) pmm *= (double)(2 * k - 1);
        Pi[m * L1 + m] = pmm; D[m * L1 + m] = 0.0; E[m * L1 + m] = 0.0;
        if (m + 1 <= l_max) {
            Pi[(m + 1) * L1 + m] = (2 * m + 1) * z * pmm;
            D[(m + 1) * L1 + m] = 0.0;
            E[(m + 1) * L1 + m] = (2 * m + 1) * pmm;
        }
        for (int64_t l = m + 2; l <= l_max; l++) {
            const double a = (double)(2 * l - 1), b = (double)(l + m - 1);
            const double inv = 1.0 / (double)(l - m);
            const double p1 = Pi[(l - 1) * L1 + m], p2 = Pi[(l - 2) * L1 + m];
            Pi[l * L1 + m] = (a * z * p1 - b * r2 * p2) * inv;
            D[l * L1 + m] = (a * z * D[(l - 1) * L1 + m]
                             - b * (2.0 * p2 + r2 * D[(l - 2) * L1 + m])) * inv;
            E[l * L1 + m] = (a * (p1 + z * E[(l - 1) * L1 + m])
                             - b * (2.0 * z * p2 + r2 * E[(l - 2) * L1 + m])) * inv;
        }
    }
    for (int64_t l = 0; l <= l_max; l++) {
        /* m = 0 */
        const int64_t i0 = l * l + l;
        const double N0 = norm[i0];
        double P = Pi[l * L1], Dl = D[l * L1], El = E[l * L1];
        S[i0] = N0 * P;
        dS[i0] = N0 * x * Dl; dS[LM + i0] = N0 * y * Dl; dS[2 * LM + i0] = N0 * El;
        for (int64_t m = 1; m <= l; m++) {
            const double Nm = norm[i0 + m];
            P = Pi[l * L1 + m]; Dl = D[l * L1 + m]; El = E[l * L1 + m];
            const int64_t ic = i0 + m, is = i0 - m;
            const double A = Am[m], Bv = Bm[m], A1 = Am[m - 1], B1 = Bm[m - 1];
            S[ic] = Nm * P * A;
            S[is] = Nm * P * Bv;
            dS[ic] = Nm * (x * Dl * A + P * m * A1);
            dS[LM + ic] = Nm * (y * Dl * A - P * m * B1);
            dS[2 * LM + ic] = Nm * El * A;
            dS[is] = Nm * (x * Dl * Bv + P * m * B1);
            dS[LM + is] = Nm * (y * Dl * Bv + P * m * A1);
            dS[2 * LM + is] = Nm * El * Bv;
        }
    }
}

/* Radial values a[l][n] = fc * R_nl(r) and, if b is not NULL, their derivative factors
 * b[l][n] = fc'/r * R_nl + 2 fc dR_nl/d(r^2), so that d/dv [fc R_nl S_lm] = b_nl S_lm v +
 * a_nl dS_lm. ex: 2 (l_max+1) n_max doubles of scratch. */
static inline void kmlip_soap_radial(const kmlip_soap_params *p, double r2, double fc,
                                     double dfc_over_r, double *a, double *b, double *ex)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1;
    double *E = ex, *AE = ex + L1 * N;
    if (b == NULL) {  /* values only */
        for (int64_t q = 0; q < L1 * N; q++) E[q] = exp(p->A[q] * r2);
        for (int64_t l = 0; l < L1; l++) {
            const double *Bl = p->B + l * N * N;
            double *al_ = a + l * N;
            for (int64_t n = 0; n < N; n++) al_[n] = 0.0;
            for (int64_t k = 0; k < N; k++) {
                const double e = E[l * N + k];
                const double *Bk = Bl + k * N;
                for (int64_t n = 0; n < N; n++) al_[n] += Bk[n] * e;
            }
            for (int64_t n = 0; n < N; n++) al_[n] *= fc;
        }
        return;
    }
    for (int64_t q = 0; q < L1 * N; q++) {
        const double e = exp(p->A[q] * r2);
        E[q] = e; AE[q] = p->A[q] * e;
    }
    for (int64_t l = 0; l < L1; l++) {
        const double *Bl = p->B + l * N * N;   /* B[l][k][n] */
        double *al_ = a + l * N, *bl_ = b + l * N;
        for (int64_t n = 0; n < N; n++) { al_[n] = 0.0; bl_[n] = 0.0; }
        for (int64_t k = 0; k < N; k++) {
            const double e = E[l * N + k], ae = AE[l * N + k];
            const double *Bk = Bl + k * N;
            for (int64_t n = 0; n < N; n++) { al_[n] += Bk[n] * e; bl_[n] += Bk[n] * ae; }
        }
        for (int64_t n = 0; n < N; n++) {
            const double R = al_[n], G = bl_[n];
            al_[n] = fc * R;
            bl_[n] = dfc_over_r * R + 2.0 * fc * G;
        }
    }
}

/* Step 1. Expansion coefficients ws->C and, per pair, S_lm, the radial values a and (if grad)
 * dS_lm and b, stored in ws->Sall (arguments as kmlip_soap_centre). */
static inline void kmlip_soap_expand_(const kmlip_soap_params *p, int64_t center_species,
                                      int64_t n_neigh, const double *vec, const int64_t *spec,
                                      const kmlip_soap_workspace *ws, int64_t grad)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = p->n_species * N;
    double *C = ws->C;

    memset(C, 0, sizeof(double) * (size_t)(R * LM));

    /* Centre atom: r = 0, only l = 0: S_00 = Y_00, R_n0(0) = sum_k B[0][n][k]. */
    if (p->center_weight != 0.0) {
        for (int64_t n = 0; n < N; n++) {
            double Rn = 0.0;
            for (int64_t k = 0; k < N; k++) Rn += p->B[k * N + n];
            C[center_species * N + n] += p->center_weight * Rn * KMLIP_SOAP_Y00;  /* l = m = 0 */
        }
    }

    for (int64_t j = 0; j < n_neigh; j++) {
        double *S = ws->Sall + j * ws->stride, *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
        const double x = vec[3 * j], y = vec[3 * j + 1], z = vec[3 * j + 2];
        const double r2 = x * x + y * y + z * z, r = sqrt(r2);
        double dfc;
        const double fc = kmlip_soap_cutoff(p, r, &dfc);
        if (grad) {
            kmlip_soap_solid_harmonics(p->l_max, x, y, z, p->ylm_norm, ws->hscr, S, dS);
            kmlip_soap_radial(p, r2, fc, r > 0.0 ? dfc / r : 0.0, a, b, ws->ex);
        } else {
            kmlip_soap_solid_harmonics(p->l_max, x, y, z, p->ylm_norm, ws->hscr, S, NULL);
            kmlip_soap_radial(p, r2, fc, 0.0, a, NULL, ws->ex);
        }
        const int64_t s = spec[j];
        for (int64_t l = 0; l < L1; l++) {
            const int64_t w = 2 * l + 1;
            double *Cl = C + l * l * R + s * N;
            const double *Sl = S + l * l, *al_ = a + l * N;
            for (int64_t m = 0; m < w; m++) {
                const double sm = Sl[m];
                double *Cm = Cl + m * R;
                for (int64_t n = 0; n < N; n++) Cm[n] += al_[n] * sm;
            }
        }
    }
}

/* Step 2. Power spectrum out_p (n_features) from the coefficients C: P_l = C_l^T C_l (sum over
 * m, in order), upper triangle, times feat_scale. P: R*R doubles of scratch. */
static inline void kmlip_soap_power_spectrum_(const kmlip_soap_params *p, const double *C,
                                              double *P, double *out_p)
{
    const int64_t L1 = p->l_max + 1, R = p->n_species * p->n_max;
    for (int64_t l = 0; l < L1; l++) {
        const int64_t w = 2 * l + 1;
        const double *Cl = C + l * l * R;
        const int64_t *fi = p->feat_index + l * R * R;
        const double *fs = p->feat_scale + l * R * R;
        memset(P, 0, sizeof(double) * (size_t)(R * R));
        for (int64_t m = 0; m < w; m++) {
            const double *Cm = Cl + m * R;
            for (int64_t r1 = 0; r1 < R; r1++) {
                const double c1 = Cm[r1];
                double *Pr = P + r1 * R;
                for (int64_t r2 = 0; r2 < R; r2++) Pr[r2] += c1 * Cm[r2];
            }
        }
        for (int64_t r1 = 0; r1 < R; r1++)
            for (int64_t r2 = r1; r2 < R; r2++)
                out_p[fi[r1 * R + r2]] = fs[r1 * R + r2] * P[r1 * R + r2];
    }
}

/* Step 3. dC[al][lm][n] = b_nl S_lm v_al + a_nl dS_al,lm: the derivative w.r.t. r_j of the only
 * coefficients pair j moves (those of its species). v: the pair vector. */
static inline void kmlip_soap_pair_coeff_grad_(const kmlip_soap_params *p, const double *S,
                                               const double *v, double *dC)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1;
    const double *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
    for (int64_t al = 0; al < 3; al++) {
        for (int64_t l = 0; l < L1; l++) {
            const double *al_ = a + l * N, *bl_ = b + l * N;
            for (int64_t q = l * l; q < (l + 1) * (l + 1); q++) {
                const double sv = S[q] * v[al], ds = dS[al * LM + q];
                double *d = dC + (al * LM + q) * N;
                for (int64_t n = 0; n < N; n++) d[n] = bl_[n] * sv + al_[n] * ds;
            }
        }
    }
}

/* Step 4. Q[al][n][r'] = sum_m dC[al][l,m][n] C_l[m][r'] for one l, register-blocked
 * 2 n x 4 r'. */
static inline void kmlip_soap_pair_spectrum_grad_(const kmlip_soap_params *p, int64_t l,
                                                  const double *C, const double *dC, double *Q)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = p->n_species * N;
    const int64_t w = 2 * l + 1;
    const double *Cl = C + l * l * R;
    for (int64_t al = 0; al < 3; al++) {
        const double *D = dC + (al * LM + l * l) * N;   /* (w, N) */
        double *Qa = Q + al * N * R;
        int64_t n = 0;
        for (; n + 2 <= N; n += 2) {
            double *Q0 = Qa + n * R, *Q1 = Q0 + R;
            int64_t rp = 0;
            for (; rp + 4 <= R; rp += 4) {
                double a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
                for (int64_t m = 0; m < w; m++) {
                    const double *Cm = Cl + m * R + rp;
                    const double x0 = D[m * N + n], x1 = D[m * N + n + 1];
                    a0 += x0 * Cm[0]; a1 += x0 * Cm[1]; a2 += x0 * Cm[2]; a3 += x0 * Cm[3];
                    b0 += x1 * Cm[0]; b1 += x1 * Cm[1]; b2 += x1 * Cm[2]; b3 += x1 * Cm[3];
                }
                Q0[rp] = a0; Q0[rp + 1] = a1; Q0[rp + 2] = a2; Q0[rp + 3] = a3;
                Q1[rp] = b0; Q1[rp + 1] = b1; Q1[rp + 2] = b2; Q1[rp + 3] = b3;
            }
            for (; rp < R; rp++) {
                double a0 = 0, b0 = 0;
                for (int64_t m = 0; m < w; m++) {
                    const double c = Cl[m * R + rp];
                    a0 += D[m * N + n] * c; b0 += D[m * N + n + 1] * c;
                }
                Q0[rp] = a0; Q1[rp] = b0;
            }
        }
        for (; n < N; n++) {
            double *Q0 = Qa + n * R;
            for (int64_t rp = 0; rp < R; rp++) {
                double a0 = 0;
                for (int64_t m = 0; m < w; m++) a0 += D[m * N + n] * Cl[m * R + rp];
                Q0[rp] = a0;
            }
        }
    }
}

/* Step 5. d p_(a n)(b n') / d r_j = [a == s] Q[n][b n'] + [b == s] Q[n'][a n] for one l, written
 * into g (3, F) and subtracted from the self term selfg (3, F), block by block (species pair,
 * n) so the inner loops run over consecutive features. s: species of the pair's neighbour.
 * Blocks of species pairs without s stay untouched (g arrives zero-filled). */
static inline void kmlip_soap_scatter_pair_grad_(const kmlip_soap_params *p, int64_t l, int64_t s,
                                                 const double *Q, double *g, double *selfg)
{
    const int64_t N = p->n_max, R = p->n_species * N, F = p->n_features;
    const int64_t *fi = p->feat_index + l * R * R;
    const double *fs = p->feat_scale + l * R * R;
    for (int64_t sa = 0; sa < p->n_species; sa++) {
        for (int64_t sb = sa; sb < p->n_species; sb++) {
            if (sa != s && sb != s) continue;   /* zero block: never touched, never faulted in */
            for (int64_t n1 = 0; n1 < N; n1++) {
                const int64_t r1 = sa * N + n1, n2s = (sa == sb) ? n1 : 0;
                const int64_t f0 = fi[r1 * R + sb * N + n2s];
                const double *sc = fs + r1 * R + sb * N + n2s;
                const int64_t cnt = N - n2s;
                for (int64_t al = 0; al < 3; al++) {
                    double *ga = g + al * F + f0;
                    double *sg = selfg + al * F + f0;
                    const double *Qa = Q + al * N * R;
                    if (sb != s) {              /* sa == s */
                        const double *q1 = Qa + n1 * R + sb * N + n2s;
                        for (int64_t t = 0; t < cnt; t++) {
                            const double val = sc[t] * q1[t];
                            ga[t] = val; sg[t] -= val;
                        }
                    } else if (sa != s) {       /* sb == s */
                        const double *q2 = Qa + n2s * R + r1;
                        for (int64_t t = 0; t < cnt; t++) {
                            const double val = sc[t] * q2[t * R];
                            ga[t] = val; sg[t] -= val;
                        }
                    } else {                    /* sa == sb == s */
                        const double *q1 = Qa + n1 * R + sb * N + n2s;
                        const double *q2 = Qa + n2s * R + r1;
                        for (int64_t t = 0; t < cnt; t++) {
                            const double val = sc[t] * (q1[t] + q2[t * R]);
                            ga[t] = val; sg[t] -= val;
                        }
                    }
                }
            }
        }
    }
}

/* SOAP of one centre.
 *   center_species : species index of the centre (its own Gaussian, weight center_weight)
 *   n_neigh        : pairs of this centre (r_ij < r_cut, r_ij != 0 not required but the
 *                    centre itself must not be listed at S = 0)
 *   vec            : (n_neigh, 3) pair vectors r_ij = r_j - r_i (Angstrom)
 *   spec           : (n_neigh,) species index of each neighbour
 *   work           : kmlip_soap_work_size(p, n_neigh) doubles
 *   out_p          : (n_features,) power spectrum
 *   out_grad       : NULL, or (1 + n_neigh, 3, n_features), zero on entry: entry 0 the self term
 *                    d p / d r_i, entry 1 + k the derivative w.r.t. the position of neighbour k.
 */
static inline void kmlip_soap_centre(const kmlip_soap_params *p, int64_t center_species,
                                     int64_t n_neigh, const double *vec, const int64_t *spec,
                                     double *work, double *out_p, double *out_grad)
{
    const int64_t L1 = p->l_max + 1, F = p->n_features;
    const kmlip_soap_workspace ws = kmlip_soap_workspace_(p, work);

    kmlip_soap_expand_(p, center_species, n_neigh, vec, spec, &ws, out_grad != NULL);
    kmlip_soap_power_spectrum_(p, ws.C, ws.P, out_p);
    if (out_grad == NULL) return;

    memset(ws.selfg, 0, sizeof(double) * (size_t)(3 * F));
    for (int64_t j = 0; j < n_neigh; j++) {
        kmlip_soap_pair_coeff_grad_(p, ws.Sall + j * ws.stride, vec + 3 * j, ws.dC);
        for (int64_t l = 0; l < L1; l++) {
            kmlip_soap_pair_spectrum_grad_(p, l, ws.C, ws.dC, ws.Q);
            kmlip_soap_scatter_pair_grad_(p, l, spec[j], ws.Q, out_grad + (1 + j) * 3 * F,
                                          ws.selfg);
        }
    }
    memcpy(out_grad, ws.selfg, sizeof(double) * (size_t)(3 * F));
}

/* Cotangent of p from the cotangent vv of p^ = p/|p|, in place: vv <- (vv - p^ (p^.vv)) / |p|.
 * pn: the power spectrum p (F). */
static inline void kmlip_soap_cotangent_(int64_t F, const double *pn, double *vv)
{
    double nrm = 0.0, dot = 0.0;
    for (int64_t f = 0; f < F; f++) nrm += pn[f] * pn[f];
    nrm = sqrt(nrm);
    if (nrm > 0.0) {
        for (int64_t f = 0; f < F; f++) dot += pn[f] * vv[f];
        dot /= nrm;
        for (int64_t f = 0; f < F; f++) vv[f] = (vv[f] - pn[f] / nrm * dot) / nrm;
    }
}

/* dE/dC = H with H_l = U_l C_l (per m), U_l the symmetric matrix of the cotangent vv (F) in the
 * (r, r') layout of the power spectrum. H: (LM, R) like C; U: R*R doubles of scratch. */
static inline void kmlip_soap_adjoint_(const kmlip_soap_params *p, const double *C,
                                       const double *vv, double *U, double *H)
{
    const int64_t L1 = p->l_max + 1, R = p->n_species * p->n_max;
    for (int64_t l = 0; l < L1; l++) {
        const int64_t w = 2 * l + 1;
        const double *Cl = C + l * l * R;
        double *Hl = H + l * l * R;
        const int64_t *fi = p->feat_index + l * R * R;
        const double *fs = p->feat_scale + l * R * R;
        memset(U, 0, sizeof(double) * (size_t)(R * R));
        for (int64_t r1 = 0; r1 < R; r1++)
            for (int64_t r2 = r1; r2 < R; r2++) {
                const double u = fs[r1 * R + r2] * vv[fi[r1 * R + r2]];
                U[r1 * R + r2] += u;
                U[r2 * R + r1] += u;
            }
        /* Hm[r] = sum_rp U[r][rp] Cm[rp], summed over rp in order; U is symmetric (bit for bit),
         * so the sums read the rows U[rp][.], four consecutive r at a time in registers */
        for (int64_t m = 0; m < w; m++) {
            const double *Cm = Cl + m * R;
            double *Hm = Hl + m * R;
            int64_t r = 0;
            for (; r + 4 <= R; r += 4) {
                double h0 = 0.0, h1 = 0.0, h2 = 0.0, h3 = 0.0;
                for (int64_t rp = 0; rp < R; rp++) {
                    const double c = Cm[rp];
                    const double *Ur = U + rp * R + r;
                    h0 += Ur[0] * c; h1 += Ur[1] * c; h2 += Ur[2] * c; h3 += Ur[3] * c;
                }
                Hm[r] = h0; Hm[r + 1] = h1; Hm[r + 2] = h2; Hm[r + 3] = h3;
            }
            for (; r < R; r++) {
                double h0 = 0.0;
                for (int64_t rp = 0; rp < R; rp++) h0 += U[rp * R + r] * Cm[rp];
                Hm[r] = h0;
            }
        }
    }
}

/* dE/d(r_ij) (3) of one pair of neighbour species s, from H = dE/dC and the pair's harmonics and
 * radial values S (one Sall row): sum_lm H[lm][s n] dC[.][lm][n]. */
static inline void kmlip_soap_pair_vjp_(const kmlip_soap_params *p, const double *H,
                                        const double *S, int64_t s, const double *v,
                                        double *out_f)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = p->n_species * N;
    const double *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
    double fb = 0.0, fx = 0.0, fy = 0.0, fz = 0.0;
    for (int64_t l = 0; l < L1; l++) {
        for (int64_t q = l * l; q < (l + 1) * (l + 1); q++) {
            const double *Hq = H + q * R + s * N, *bl_ = b + l * N, *al_ = a + l * N;
            /* Four partial sums (n mod 4, the tail in the first), added in order: the order of
             * the former `omp simd` reduction as GCC built it, written out so that it no longer
             * depends on the compiler, the index type or OpenMP (same sums, bit for bit). */
            double hb0 = 0.0, hb1 = 0.0, hb2 = 0.0, hb3 = 0.0;
            double ha0 = 0.0, ha1 = 0.0, ha2 = 0.0, ha3 = 0.0;
            int64_t n = 0;
            for (; n + 4 <= N; n += 4) {
                hb0 += Hq[n] * bl_[n]; hb1 += Hq[n + 1] * bl_[n + 1];
                hb2 += Hq[n + 2] * bl_[n + 2]; hb3 += Hq[n + 3] * bl_[n + 3];
                ha0 += Hq[n] * al_[n]; ha1 += Hq[n + 1] * al_[n + 1];
                ha2 += Hq[n + 2] * al_[n + 2]; ha3 += Hq[n + 3] * al_[n + 3];
            }
            for (; n < N; n++) {
                hb0 += Hq[n] * bl_[n];
                ha0 += Hq[n] * al_[n];
            }
            const double hb = 0.0 + hb0 + hb1 + hb2 + hb3;
            const double ha = 0.0 + ha0 + ha1 + ha2 + ha3;
            fb += hb * S[q];
            fx += ha * dS[q];
            fy += ha * dS[LM + q];
            fz += ha * dS[2 * LM + q];
        }
    }
    out_f[0] = fb * v[0] + fx;
    out_f[1] = fb * v[1] + fy;
    out_f[2] = fb * v[2] + fz;
}

/* Vector-Jacobian product of one centre, without forming dp/dr: given v = dE/dp (n_features,),
 * writes out_f[3k + a] = dE/d(r_ij)_a for each pair k of the centre (the force on neighbour j
 * from this centre is -out_f[k], on the centre +out_f[k]; the virial is sum out_f[k] (x) r_ij).
 * If normalized, v is the cotangent of p/|p|. Cost per pair O(n_max (l_max+1)^2), no F factor:
 * dE/dC = U C with U_l the symmetric matrix of v, then contract with the pair's dC.
 * Other arguments as kmlip_soap_centre. */
static inline void kmlip_soap_centre_vjp(const kmlip_soap_params *p, int64_t center_species,
                                         int64_t n_neigh, const double *vec, const int64_t *spec,
                                         const double *v, int64_t normalized, double *work,
                                         double *out_f)
{
    const int64_t R = p->n_species * p->n_max, LM = (p->l_max + 1) * (p->l_max + 1);
    const int64_t F = p->n_features;
    const kmlip_soap_workspace ws = kmlip_soap_workspace_(p, work);
    double *H = ws.adj, *U = H + R * LM, *vv = U + R * R;

    kmlip_soap_expand_(p, center_species, n_neigh, vec, spec, &ws, 1);
    memcpy(vv, v, sizeof(double) * (size_t)F);
    if (normalized) {
        kmlip_soap_power_spectrum_(p, ws.C, ws.P, ws.selfg);
        kmlip_soap_cotangent_(F, ws.selfg, vv);
    }
    kmlip_soap_adjoint_(p, ws.C, vv, U, H);
    for (int64_t j = 0; j < n_neigh; j++)
        kmlip_soap_pair_vjp_(p, H, ws.Sall + j * ws.stride, spec[j], vec + 3 * j, out_f + 3 * j);
}

/* In-place normalisation p -> p/|p| with the matching gradient transform
 * dp^ = (dp - p^ (p^ . dp)) / |p|, for n_entries gradient blocks of shape (3, F) (grad may be
 * NULL). */
static inline void kmlip_soap_normalize(int64_t F, double *pv, int64_t n_entries, double *grad)
{
    double nrm = 0.0;
    for (int64_t f = 0; f < F; f++) nrm += pv[f] * pv[f];
    nrm = sqrt(nrm);
    if (nrm <= 0.0) return;
    const double inv = 1.0 / nrm;
    for (int64_t f = 0; f < F; f++) pv[f] *= inv;
    if (grad == NULL) return;
    for (int64_t e = 0; e < 3 * n_entries; e++) {
        double *g = grad + e * F, dot = 0.0;
        for (int64_t f = 0; f < F; f++) dot += pv[f] * g[f];
        for (int64_t f = 0; f < F; f++) g[f] = (g[f] - pv[f] * dot) * inv;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Species compression "mu1nu1" (Darby, Kermode & Csanyi, npj Comput. Mater. 8, 166 (2022), as
 * DScribe 2.1 exposes it): with the species sum c~_{nlm} = sum_s c^s_{nlm},
 *     p^Z_{n n' l} = scale * sum_m c^Z_{nlm} c~_{n'lm}     (every n, n'; S N^2 (l_max+1) features).
 * It is the (Z, sum) block of the power spectrum of the augmented coefficients [C, C~], so the
 * shared steps run on a copy of the parameters with one more pseudo-species (index n_species)
 * holding C~. Tables for this mode: feat_index / feat_scale of shape (l_max+1, R, n_max), the
 * entry [l][Z n_max + n][n'] giving p^Z_{n n' l}. ("mu2", c~ alone, is the uncompressed kernel
 * with every species mapped to one: no code of its own.)
 * ------------------------------------------------------------------------------------------- */

/* Doubles of scratch space kmlip_soap_centre_mu1nu1() / kmlip_soap_centre_vjp_mu1nu1() need. */
static inline int64_t kmlip_soap_mu1nu1_work_size(const kmlip_soap_params *p, int64_t n_neigh)
{
    kmlip_soap_params pa = *p;
    pa.n_species += 1;
    return kmlip_soap_work_size(&pa, n_neigh);
}

/* C~ = sum over species of C, written into the pseudo-species block of C (LM, R + n_max). */
static inline void kmlip_soap_mu1nu1_sum_(const kmlip_soap_params *p, double *C)
{
    const int64_t N = p->n_max, LM = (p->l_max + 1) * (p->l_max + 1), R = p->n_species * N;
    const int64_t Ra = R + N;
    for (int64_t q = 0; q < LM; q++) {
        double *Cq = C + q * Ra;
        for (int64_t n = 0; n < N; n++) {
            double s = 0.0;
            for (int64_t sp = 0; sp < p->n_species; sp++) s += Cq[sp * N + n];
            Cq[R + n] = s;
        }
    }
}

/* p^Z_{n n' l} from the augmented coefficients C (LM, R + n_max). */
static inline void kmlip_soap_mu1nu1_spectrum_(const kmlip_soap_params *p, const double *C,
                                               double *out_p)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, R = p->n_species * N, Ra = R + N;
    for (int64_t l = 0; l < L1; l++) {
        const int64_t w = 2 * l + 1;
        const double *Cl = C + l * l * Ra;
        const int64_t *fi = p->feat_index + l * R * N;
        const double *fs = p->feat_scale + l * R * N;
        for (int64_t r = 0; r < R; r++)
            for (int64_t n2 = 0; n2 < N; n2++) {
                double acc = 0.0;
                for (int64_t m = 0; m < w; m++) acc += Cl[m * Ra + r] * Cl[m * Ra + R + n2];
                out_p[fi[r * N + n2]] = fs[r * N + n2] * acc;
            }
    }
}

/* d p^Z_{n n' l} / d r_j = [Z == s] Q[n][R + n'] + Q[n'][Z n_max + n] for one l (Q from
 * kmlip_soap_pair_spectrum_grad_ on the augmented coefficients, rows R + n_max), written into g
 * (3, F) and subtracted from selfg (3, F). Every block moves: each pair enters C~. */
static inline void kmlip_soap_mu1nu1_scatter_(const kmlip_soap_params *p, int64_t l, int64_t s,
                                              const double *Q, double *g, double *selfg)
{
    const int64_t N = p->n_max, R = p->n_species * N, Ra = R + N, F = p->n_features;
    const int64_t *fi = p->feat_index + l * R * N;
    const double *fs = p->feat_scale + l * R * N;
    for (int64_t al = 0; al < 3; al++) {
        const double *Qa = Q + al * N * Ra;
        double *ga = g + al * F, *sg = selfg + al * F;
        for (int64_t r = 0; r < R; r++) {
            const int64_t n = r % N;
            const int64_t own = (r / N == s);
            for (int64_t n2 = 0; n2 < N; n2++) {
                double d = Qa[n2 * Ra + r];
                if (own) d += Qa[n * Ra + R + n2];
                const int64_t f = fi[r * N + n2];
                const double val = fs[r * N + n2] * d;
                ga[f] = val; sg[f] -= val;
            }
        }
    }
}

/* kmlip_soap_centre for the "mu1nu1" compression (same arguments; p->feat_index, feat_scale and
 * n_features describe the compressed layout; work: kmlip_soap_mu1nu1_work_size doubles). */
static inline void kmlip_soap_centre_mu1nu1(const kmlip_soap_params *p, int64_t center_species,
                                            int64_t n_neigh, const double *vec,
                                            const int64_t *spec, double *work, double *out_p,
                                            double *out_grad)
{
    const int64_t L1 = p->l_max + 1, F = p->n_features;
    kmlip_soap_params pa = *p;
    pa.n_species += 1;
    const kmlip_soap_workspace ws = kmlip_soap_workspace_(&pa, work);

    kmlip_soap_expand_(&pa, center_species, n_neigh, vec, spec, &ws, out_grad != NULL);
    kmlip_soap_mu1nu1_sum_(p, ws.C);
    kmlip_soap_mu1nu1_spectrum_(p, ws.C, out_p);
    if (out_grad == NULL) return;

    memset(ws.selfg, 0, sizeof(double) * (size_t)(3 * F));
    for (int64_t j = 0; j < n_neigh; j++) {
        kmlip_soap_pair_coeff_grad_(&pa, ws.Sall + j * ws.stride, vec + 3 * j, ws.dC);
        for (int64_t l = 0; l < L1; l++) {
            kmlip_soap_pair_spectrum_grad_(&pa, l, ws.C, ws.dC, ws.Q);
            kmlip_soap_mu1nu1_scatter_(p, l, spec[j], ws.Q, out_grad + (1 + j) * 3 * F,
                                       ws.selfg);
        }
    }
    memcpy(out_grad, ws.selfg, sizeof(double) * (size_t)(3 * F));
}

/* kmlip_soap_centre_vjp for the "mu1nu1" compression. dE/dc^Z_{nlm} = sum_n' u^Z_{nn'} c~_{n'lm}
 * + t_{nlm}, with u the cotangent times feat_scale and t = dE/dc~, t_{n'lm} =
 * sum_{Z,n} u^Z_{nn'} c^Z_{nlm}; then the pair contraction of the uncompressed kernel. */
static inline void kmlip_soap_centre_vjp_mu1nu1(const kmlip_soap_params *p,
                                                int64_t center_species, int64_t n_neigh,
                                                const double *vec, const int64_t *spec,
                                                const double *v, int64_t normalized,
                                                double *work, double *out_f)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = p->n_species * N;
    const int64_t Ra = R + N, F = p->n_features;
    kmlip_soap_params pa = *p;
    pa.n_species += 1;
    const kmlip_soap_workspace ws = kmlip_soap_workspace_(&pa, work);
    double *H = ws.adj, *U = H + Ra * LM, *vv = U + Ra * Ra, *t = ws.P;

    kmlip_soap_expand_(&pa, center_species, n_neigh, vec, spec, &ws, 1);
    kmlip_soap_mu1nu1_sum_(p, ws.C);
    memcpy(vv, v, sizeof(double) * (size_t)F);
    if (normalized) {
        kmlip_soap_mu1nu1_spectrum_(p, ws.C, ws.selfg);
        kmlip_soap_cotangent_(F, ws.selfg, vv);
    }
    /* H (LM, R), the layout kmlip_soap_pair_vjp_ reads */
    for (int64_t l = 0; l < L1; l++) {
        const int64_t *fi = p->feat_index + l * R * N;
        const double *fs = p->feat_scale + l * R * N;
        for (int64_t q = 0; q < R * N; q++) U[q] = fs[q] * vv[fi[q]];
        for (int64_t q = l * l; q < (l + 1) * (l + 1); q++) {
            const double *Cq = ws.C + q * Ra, *Ct = Cq + R;
            double *Hq = H + q * R;
            for (int64_t n2 = 0; n2 < N; n2++) t[n2] = 0.0;
            for (int64_t r = 0; r < R; r++) {
                const double c = Cq[r], *Ur = U + r * N;
                double h = 0.0;
                for (int64_t n2 = 0; n2 < N; n2++) { t[n2] += Ur[n2] * c; h += Ur[n2] * Ct[n2]; }
                Hq[r] = h;
            }
            for (int64_t r = 0; r < R; r++) Hq[r] += t[r % N];
        }
    }
    for (int64_t j = 0; j < n_neigh; j++)
        kmlip_soap_pair_vjp_(p, H, ws.Sall + j * ws.stride, spec[j], vec + 3 * j, out_f + 3 * j);
}

#ifdef __cplusplus
}
#endif

#endif /* KMLIP_SOAP_CORE_H */
