/* SOAP power spectrum and its exact gradients for one centre.
 *
 * Plain C over raw pointers: no Python, no allocation. The Cython driver (soap.pyx) owns the loop
 * over centres and the memory; a LAMMPS pair style can include this header and call
 * soap_centre() from its own loop.
 *
 * Maths (see DESIGN.md, "SOAP"): with the GTO primitive basis r^l exp(-alpha_{lk} r^2) and a
 * Gaussian atom density of width sigma, the radial integral has the closed form
 *     I_{nl}(r) Y_lm(r^) = sum_k B[l][n][k] exp(A[l][k] r^2) * S_lm(x, y, z),
 * where S_lm = r^l Y_lm are the real regular solid harmonics (a polynomial), so every pair costs
 * (l_max+1)*n_max exponentials and a small matrix-vector product; no quadrature, no splines.
 * The coefficients c^s_{nlm} = sum_{j in s} fc(r_ij) I_{nl} Y_lm and the power spectrum
 * p_{(s n)(s' n') l} = scale * sum_m c^s_{nlm} c^{s'}_{n'lm} (rows r = s*n_max + n, r <= r').
 */
#ifndef KMLIP_SOAP_CORE_H
#define KMLIP_SOAP_CORE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int n_max;              /* radial functions */
    int l_max;              /* angular channels 0..l_max */
    int n_species;          /* neighbour species (rows R = n_species * n_max) */
    int n_features;         /* length of p */
    double r_cut;           /* neighbours with r < r_cut contribute */
    double cutoff_width;    /* > 0: shifted-cosine cutoff on [r_cut - width, r_cut]; 0: hard */
    double center_weight;   /* weight of the centre atom's own Gaussian (l = 0 only) */
    const double *A;        /* (l_max+1, n_max): exponents, exp(A r^2) */
    const double *B;        /* (l_max+1, n_max, n_max): B[l][k][n] (k: primitive, n: basis) */
    const int64_t *feat_index;  /* (l_max+1, R, R): output index of (l, r, r'), r <= r';
                                 * for fixed (l, r) and a species block of r', consecutive */
    const double *feat_scale;   /* (l_max+1, R, R): prefactor of that output */
    const double *ylm_norm;     /* ((l_max+1)^2): normalisation of S_lm at l*l + l + |m| */
} soap_params;

static inline int soap_lm_size(const soap_params *p) { return (p->l_max + 1) * (p->l_max + 1); }

/* Doubles of scratch space soap_centre() needs for up to n_neigh neighbours. */
static inline int64_t soap_work_size(const soap_params *p, int64_t n_neigh)
{
    const int64_t L1 = p->l_max + 1, LM = L1 * L1, N = p->n_max, R = (int64_t)p->n_species * N;
    int64_t per_pair = LM + 3 * LM + 2 * L1 * N;       /* S, dS, a, b */
    int64_t fixed = R * LM                             /* C */
                    + 2 * L1 * N                        /* exponentials */
                    + 3 * N * R                         /* Q for one l */
                    + 3 * N * LM                        /* dC of one pair */
                    + 4 * LM + 2 * L1 * L1 + 2 * L1 * 2 /* harmonics scratch */
                    + 3 * (int64_t)p->n_features        /* self gradient */
                    + R * LM + R * R + p->n_features;   /* adjoint (vjp) */
    return fixed + n_neigh * per_pair + 64;
}

/* Pointers into the scratch array of one centre. */
typedef struct {
    double *C, *ex, *Q, *dC, *hscr, *selfg, *adj, *Sall;
    int64_t stride;   /* doubles per pair in Sall: S (LM), dS (3 LM), a (L1 N), b (L1 N) */
} soap_ws;

static inline soap_ws soap_workspace(const soap_params *p, double *work)
{
    const int64_t N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1, R = (int64_t)p->n_species * N;
    soap_ws w;
    w.C = work;                      /* C[l^2 R + (m+l) R + r] */
    w.ex = w.C + R * LM;             /* exponentials */
    w.Q = w.ex + 2 * L1 * N;         /* (3, N, R) for one l */
    w.dC = w.Q + 3 * N * R;          /* (3, LM, N) of one pair */
    w.hscr = w.dC + 3 * N * LM;
    w.selfg = w.hscr + 4 * LM + 2 * L1 * L1 + 4 * L1;
    w.adj = w.selfg + 3 * (int64_t)p->n_features;
    w.Sall = w.adj + R * LM + R * R + p->n_features;
    w.stride = LM + 3 * LM + 2 * L1 * N;
    return w;
}

/* Real regular solid harmonics S_lm = r^l Y_lm (orthonormal Y_lm) and their Cartesian
 * gradients, index l*l + (m + l) with m < 0 the sine type. Recurrences in (x, y, z) only.
 * scratch: at least 4*(l_max+1)^2 + 2*(l_max+1)^2 + 4*(l_max+1) doubles. */
static inline void soap_solid_harmonics(int l_max, double x, double y, double z,
                                        double *S, double *dS /* (3, LM) */, double *scratch,
                                        const double *norm)
{
    const int L1 = l_max + 1, LM = L1 * L1;
    double r2 = x * x + y * y + z * z;
    /* Pi[l][m] (associated Legendre in solid form, no Condon-Shortley phase), D = 2 dPi/d(r^2)
     * (so d/dx Pi = x D), E = dPi/dz; Am + i Bm = (x + i y)^m. */
    double *Pi = scratch, *D = Pi + LM, *E = D + LM;
    double *Am = E + LM, *Bm = Am + L1;
    Am[0] = 1.0; Bm[0] = 0.0;
    for (int m = 1; m <= l_max; m++) {
        Am[m] = x * Am[m - 1] - y * Bm[m - 1];
        Bm[m] = x * Bm[m - 1] + y * Am[m - 1];
    }
    for (int m = 0; m <= l_max; m++) {
        /* Pi[m][m] = (2m-1)!! */
        double pmm = 1.0;
        for (int k = 1; k <= m; k++) pmm *= (double)(2 * k - 1);
        Pi[m * L1 + m] = pmm; D[m * L1 + m] = 0.0; E[m * L1 + m] = 0.0;
        if (m + 1 <= l_max) {
            Pi[(m + 1) * L1 + m] = (2 * m + 1) * z * pmm;
            D[(m + 1) * L1 + m] = 0.0;
            E[(m + 1) * L1 + m] = (2 * m + 1) * pmm;
        }
        for (int l = m + 2; l <= l_max; l++) {
            double a = (double)(2 * l - 1), b = (double)(l + m - 1), inv = 1.0 / (double)(l - m);
            double p1 = Pi[(l - 1) * L1 + m], p2 = Pi[(l - 2) * L1 + m];
            Pi[l * L1 + m] = (a * z * p1 - b * r2 * p2) * inv;
            D[l * L1 + m] = (a * z * D[(l - 1) * L1 + m] - b * (2.0 * p2 + r2 * D[(l - 2) * L1 + m])) * inv;
            E[l * L1 + m] = (a * (p1 + z * E[(l - 1) * L1 + m]) - b * (2.0 * z * p2 + r2 * E[(l - 2) * L1 + m])) * inv;
        }
    }
    for (int l = 0; l <= l_max; l++) {
        /* m = 0 */
        int i0 = l * l + l;
        double N0 = norm[i0];
        double P = Pi[l * L1], Dl = D[l * L1], El = E[l * L1];
        S[i0] = N0 * P;
        dS[i0] = N0 * x * Dl; dS[LM + i0] = N0 * y * Dl; dS[2 * LM + i0] = N0 * El;
        for (int m = 1; m <= l; m++) {
            double Nm = norm[i0 + m];
            P = Pi[l * L1 + m]; Dl = D[l * L1 + m]; El = E[l * L1 + m];
            int ic = i0 + m, is = i0 - m;
            double A = Am[m], Bv = Bm[m], A1 = Am[m - 1], B1 = Bm[m - 1];
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

/* Values only of the solid harmonics (no gradients): the features-only path. */
static inline void soap_solid_harmonics_values(int l_max, double x, double y, double z,
                                               double *S, double *scratch, const double *norm)
{
    const int L1 = l_max + 1;
    double r2 = x * x + y * y + z * z;
    double *Pi = scratch, *Am = Pi + L1 * L1, *Bm = Am + L1;
    Am[0] = 1.0; Bm[0] = 0.0;
    for (int m = 1; m <= l_max; m++) {
        Am[m] = x * Am[m - 1] - y * Bm[m - 1];
        Bm[m] = x * Bm[m - 1] + y * Am[m - 1];
    }
    double pmm = 1.0;
    for (int m = 0; m <= l_max; m++) {
        if (m > 0) pmm *= (double)(2 * m - 1);
        Pi[m * L1 + m] = pmm;
        if (m + 1 <= l_max) Pi[(m + 1) * L1 + m] = (2 * m + 1) * z * pmm;
        for (int l = m + 2; l <= l_max; l++) {
            /* the same operations as soap_solid_harmonics, so both paths agree to the bit */
            double a = (double)(2 * l - 1), b = (double)(l + m - 1), inv = 1.0 / (double)(l - m);
            Pi[l * L1 + m] = (a * z * Pi[(l - 1) * L1 + m] - b * r2 * Pi[(l - 2) * L1 + m]) * inv;
        }
    }
    for (int l = 0; l <= l_max; l++) {
        int i0 = l * l + l;
        S[i0] = norm[i0] * Pi[l * L1];
        for (int m = 1; m <= l; m++) {
                const double Nm = norm[i0 + m], P = Pi[l * L1 + m];
            S[i0 + m] = Nm * P * Am[m];
            S[i0 - m] = Nm * P * Bm[m];
        }
    }
}

/* Smooth cutoff value and derivative d fc / d r. */
static inline void soap_cutoff(const soap_params *p, double r, double *fc, double *dfc)
{
    double w = p->cutoff_width;
    if (w <= 0.0 || r <= p->r_cut - w) { *fc = 1.0; *dfc = 0.0; return; }
    if (r >= p->r_cut) { *fc = 0.0; *dfc = 0.0; return; }
    double t = M_PI * (r - p->r_cut + w) / w;
    *fc = 0.5 * (1.0 + cos(t));
    *dfc = -0.5 * sin(t) * M_PI / w;
}

/* Radial values a[l][n] = fc * R_nl(r) and b[l][n] = fc'/r * R_nl + 2 fc dR_nl/d(r^2), so that
 * d/dv [fc R_nl S_lm] = b_nl S_lm v + a_nl dS_lm. ex: 2 (l_max+1) n_max doubles of scratch. */
static inline void soap_radial(const soap_params *p, double r2, double fc, double dfc_over_r,
                               double *a, double *b, double *ex)
{
    const int N = p->n_max, L1 = p->l_max + 1;
    double *E = ex, *AE = ex + L1 * N;
    if (b == NULL) {  /* values only */
        for (int q = 0; q < L1 * N; q++) E[q] = exp(p->A[q] * r2);
        for (int l = 0; l < L1; l++) {
            const double *Bl = p->B + (int64_t)l * N * N;
            double *al_ = a + l * N;
            for (int n = 0; n < N; n++) al_[n] = 0.0;
            for (int k = 0; k < N; k++) {
                const double e = E[l * N + k];
                const double *Bk = Bl + (int64_t)k * N;
                for (int n = 0; n < N; n++) al_[n] += Bk[n] * e;
            }
            for (int n = 0; n < N; n++) al_[n] *= fc;
        }
        return;
    }
    for (int q = 0; q < L1 * N; q++) {
        double e = exp(p->A[q] * r2);
        E[q] = e; AE[q] = p->A[q] * e;
    }
    for (int l = 0; l < L1; l++) {
        const double *Bl = p->B + (int64_t)l * N * N;   /* B[l][k][n] */
        double *al_ = a + l * N, *bl_ = b + l * N;
        for (int n = 0; n < N; n++) { al_[n] = 0.0; bl_[n] = 0.0; }
        for (int k = 0; k < N; k++) {
            const double e = E[l * N + k], ae = AE[l * N + k];
            const double *Bk = Bl + (int64_t)k * N;
            for (int n = 0; n < N; n++) { al_[n] += Bk[n] * e; bl_[n] += Bk[n] * ae; }
        }
        for (int n = 0; n < N; n++) {
            const double R = al_[n], G = bl_[n];
            al_[n] = fc * R;
            bl_[n] = dfc_over_r * R + 2.0 * fc * G;
        }
    }
}

/* Expansion coefficients C (layout C[l^2 R + (m+l) R + r]) and, per pair, S_lm, dS_lm and the
 * radial values a, b, stored in work (see soap_centre for the arguments). */
static inline void soap_expand(const soap_params *p, int center_species, int64_t n_neigh,
                               const double *vec, const int32_t *spec, double *work, int grad)
{
    const int N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1;
    const int R = p->n_species * N;
    soap_ws ws = soap_workspace(p, work);
    double *C = ws.C, *ex = ws.ex, *hscr = ws.hscr, *Sall = ws.Sall;
    const int64_t stride = ws.stride;

    memset(C, 0, sizeof(double) * (size_t)R * LM);

    /* Centre atom: r = 0, only l = 0: S_00 = Y_00, R_n0(0) = sum_k B[0][n][k]. */
    if (p->center_weight != 0.0) {
        const double Y00 = 0.28209479177387814;
        for (int n = 0; n < N; n++) {
            double Rn = 0.0;
            for (int k = 0; k < N; k++) Rn += p->B[k * N + n];
            C[center_species * N + n] += p->center_weight * Rn * Y00;  /* l = m = 0 row */
        }
    }

    for (int64_t j = 0; j < n_neigh; j++) {
        double *S = Sall + j * stride, *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
        double x = vec[3 * j], y = vec[3 * j + 1], z = vec[3 * j + 2];
        double r2 = x * x + y * y + z * z, r = sqrt(r2);
        double fc, dfc;
        soap_cutoff(p, r, &fc, &dfc);
        if (grad) {
            soap_solid_harmonics(p->l_max, x, y, z, S, dS, hscr, p->ylm_norm);
            soap_radial(p, r2, fc, r > 0.0 ? dfc / r : 0.0, a, b, ex);
        } else {
            soap_solid_harmonics_values(p->l_max, x, y, z, S, hscr, p->ylm_norm);
            soap_radial(p, r2, fc, 0.0, a, NULL, ex);
        }
        const int s = spec[j];
        for (int l = 0; l < L1; l++) {
            const int w = 2 * l + 1;
            double *Cl = C + (int64_t)l * l * R + (int64_t)s * N;
            const double *Sl = S + l * l, *al_ = a + l * N;
            for (int m = 0; m < w; m++) {
                const double sm = Sl[m];
                double *Cm = Cl + (int64_t)m * R;
                for (int n = 0; n < N; n++) Cm[n] += al_[n] * sm;
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
 *   work           : soap_work_size(p, n_neigh) doubles
 *   out_p          : (n_features,) power spectrum
 *   out_grad       : NULL, or (1 + n_neigh, 3, n_features), zero on entry: entry 0 the self term
 *                    d p / d r_i, entry 1 + k the derivative w.r.t. the position of neighbour k.
 */
static inline void soap_centre(const soap_params *p, int center_species, int64_t n_neigh,
                               const double *vec, const int32_t *spec, double *work,
                               double *out_p, double *out_grad)
{
    const int N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1;
    const int R = p->n_species * N, F = p->n_features;
    soap_ws ws = soap_workspace(p, work);
    double *C = ws.C, *Q = ws.Q, *dC = ws.dC, *selfg = ws.selfg, *Sall = ws.Sall;
    const int64_t stride = ws.stride;

    soap_expand(p, center_species, n_neigh, vec, spec, work, out_grad != NULL);

    /* Power spectrum: P_l = C_l C_l^T, upper triangle. */
    for (int l = 0; l < L1; l++) {
        const int w = 2 * l + 1;
        const double *Cl = C + (int64_t)l * l * R;
        const int64_t *fi = p->feat_index + (int64_t)l * R * R;
        const double *fs = p->feat_scale + (int64_t)l * R * R;
        double *P = Q;  /* R x R scratch */
        memset(P, 0, sizeof(double) * (size_t)R * R);
        for (int m = 0; m < w; m++) {
            const double *Cm = Cl + (int64_t)m * R;
            for (int r1 = 0; r1 < R; r1++) {
                const double c1 = Cm[r1];
                double *Pr = P + (int64_t)r1 * R;
                for (int r2i = 0; r2i < R; r2i++) Pr[r2i] += c1 * Cm[r2i];
            }
        }
        for (int r1 = 0; r1 < R; r1++)
            for (int r2i = r1; r2i < R; r2i++)
                out_p[fi[r1 * R + r2i]] = fs[r1 * R + r2i] * P[r1 * R + r2i];
    }
    if (out_grad == NULL) return;

    memset(selfg, 0, sizeof(double) * 3 * (size_t)F);
    for (int64_t j = 0; j < n_neigh; j++) {
        const double *S = Sall + j * stride, *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
        const double v[3] = {vec[3 * j], vec[3 * j + 1], vec[3 * j + 2]};
        const int s = spec[j];
        double *g = out_grad + (1 + j) * 3 * (int64_t)F;
        /* dC[al][lm][n] = b_nl S_lm v_al + a_nl dS_al,lm: the only coefficients moved by r_j */
        for (int al = 0; al < 3; al++) {
            for (int l = 0; l < L1; l++) {
                const double *al_ = a + l * N, *bl_ = b + l * N;
                for (int q = l * l; q < (l + 1) * (l + 1); q++) {
                    const double sv = S[q] * v[al], ds = dS[al * LM + q];
                    double *d = dC + ((int64_t)al * LM + q) * N;
                    for (int n = 0; n < N; n++) d[n] = bl_[n] * sv + al_[n] * ds;
                }
            }
        }
        for (int l = 0; l < L1; l++) {
            const int w = 2 * l + 1;
            const double *Cl = C + (int64_t)l * l * R;
            /* Q[al][n][r'] = sum_m dC[al][l,m][n] C_l[m][r'], register-blocked 2 n x 4 r' */
            for (int al = 0; al < 3; al++) {
                const double *D = dC + ((int64_t)al * LM + l * l) * N;   /* (w, N) */
                double *Qa = Q + (int64_t)al * N * R;
                int n = 0;
                for (; n + 2 <= N; n += 2) {
                    double *Q0 = Qa + (int64_t)n * R, *Q1 = Q0 + R;
                    int rp = 0;
                    for (; rp + 4 <= R; rp += 4) {
                        double a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
                        for (int m = 0; m < w; m++) {
                            const double *Cm = Cl + (int64_t)m * R + rp;
                            const double x0 = D[m * N + n], x1 = D[m * N + n + 1];
                            a0 += x0 * Cm[0]; a1 += x0 * Cm[1]; a2 += x0 * Cm[2]; a3 += x0 * Cm[3];
                            b0 += x1 * Cm[0]; b1 += x1 * Cm[1]; b2 += x1 * Cm[2]; b3 += x1 * Cm[3];
                        }
                        Q0[rp] = a0; Q0[rp + 1] = a1; Q0[rp + 2] = a2; Q0[rp + 3] = a3;
                        Q1[rp] = b0; Q1[rp + 1] = b1; Q1[rp + 2] = b2; Q1[rp + 3] = b3;
                    }
                    for (; rp < R; rp++) {
                        double a0 = 0, b0 = 0;
                        for (int m = 0; m < w; m++) {
                            const double c = Cl[(int64_t)m * R + rp];
                            a0 += D[m * N + n] * c; b0 += D[m * N + n + 1] * c;
                        }
                        Q0[rp] = a0; Q1[rp] = b0;
                    }
                }
                for (; n < N; n++) {
                    double *Q0 = Qa + (int64_t)n * R;
                    for (int rp = 0; rp < R; rp++) {
                        double a0 = 0;
                        for (int m = 0; m < w; m++) a0 += D[m * N + n] * Cl[(int64_t)m * R + rp];
                        Q0[rp] = a0;
                    }
                }
            }
            /* d p_(a n)(b n') = [a == s] Q[n][b n'] + [b == s] Q[n'][a n], written block by
             * block (species pair, n) so the inner loops run over consecutive features */
            const int64_t *fi = p->feat_index + (int64_t)l * R * R;
            const double *fs = p->feat_scale + (int64_t)l * R * R;
            for (int sa = 0; sa < p->n_species; sa++) {
                for (int sb = sa; sb < p->n_species; sb++) {
                    for (int n1 = 0; n1 < N; n1++) {
                        const int r1 = sa * N + n1, n2s = (sa == sb) ? n1 : 0;
                        const int64_t f0 = fi[r1 * R + sb * N + n2s];
                        const double *sc = fs + r1 * R + sb * N + n2s;
                        const int cnt = N - n2s;
                        for (int al = 0; al < 3; al++) {
                            double *ga = g + al * (int64_t)F + f0;
                            double *sg = selfg + al * (int64_t)F + f0;
                            const double *Qa = Q + (int64_t)al * N * R;
                            if (sa != s && sb != s) {
                                /* zero block: out_grad arrives zero-filled (calloc'd pages a
                                 * block never touches are never faulted in) */
                                continue;
                            } else if (sa == s && sb != s) {
                                const double *q1 = Qa + (int64_t)n1 * R + sb * N + n2s;
                                for (int t = 0; t < cnt; t++) {
                                    const double val = sc[t] * q1[t];
                                    ga[t] = val; sg[t] -= val;
                                }
                            } else if (sa != s) {   /* sb == s */
                                const double *q2 = Qa + (int64_t)n2s * R + r1;
                                for (int t = 0; t < cnt; t++) {
                                    const double val = sc[t] * q2[(int64_t)t * R];
                                    ga[t] = val; sg[t] -= val;
                                }
                            } else {                /* sa == sb == s */
                                const double *q1 = Qa + (int64_t)n1 * R + sb * N + n2s;
                                const double *q2 = Qa + (int64_t)n2s * R + r1;
                                for (int t = 0; t < cnt; t++) {
                                    const double val = sc[t] * (q1[t] + q2[(int64_t)t * R]);
                                    ga[t] = val; sg[t] -= val;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    memcpy(out_grad, selfg, sizeof(double) * 3 * (size_t)F);
}

/* Vector-Jacobian product of one centre, without forming dp/dr: given v = dE/dp (n_features,),
 * writes out_f[3k + a] = dE/d(r_ij)_a for each pair k of the centre (the force on neighbour j
 * from this centre is -out_f[k], on the centre +out_f[k]; the virial is sum out_f[k] (x) r_ij).
 * If normalized, v is the cotangent of p/|p|. Cost per pair O(n_max (l_max+1)^2), no F factor:
 * dE/dC = U C with U_l the symmetric matrix of v, then contract with the pair's dC. */
static inline void soap_centre_vjp(const soap_params *p, int center_species, int64_t n_neigh,
                                   const double *vec, const int32_t *spec, const double *v,
                                   int normalized, double *work, double *out_f)
{
    const int N = p->n_max, L1 = p->l_max + 1, LM = L1 * L1;
    const int R = p->n_species * N, F = p->n_features;
    soap_ws ws = soap_workspace(p, work);
    double *C = ws.C, *Sall = ws.Sall;
    double *Chat = ws.adj, *U = Chat + (int64_t)R * LM, *vv = U + (int64_t)R * R;
    const int64_t stride = ws.stride;

    soap_expand(p, center_species, n_neigh, vec, spec, work, 1);
    memcpy(vv, v, sizeof(double) * (size_t)F);
    if (normalized) {
        /* cotangent of p from that of p^ = p/|p|: (v - p^ (p^.v)) / |p| */
        double *pn = ws.selfg;
        for (int l = 0; l < L1; l++) {
            const int w = 2 * l + 1;
            const double *Cl = C + (int64_t)l * l * R;
            const int64_t *fi = p->feat_index + (int64_t)l * R * R;
            const double *fs = p->feat_scale + (int64_t)l * R * R;
            for (int r1 = 0; r1 < R; r1++)
                for (int r2 = r1; r2 < R; r2++) {
                    double acc = 0.0;
                    for (int m = 0; m < w; m++) acc += Cl[m * R + r1] * Cl[m * R + r2];
                    pn[fi[r1 * R + r2]] = fs[r1 * R + r2] * acc;
                }
        }
        double nrm = 0.0, dot = 0.0;
        for (int f = 0; f < F; f++) nrm += pn[f] * pn[f];
        nrm = sqrt(nrm);
        if (nrm > 0.0) {
            for (int f = 0; f < F; f++) dot += pn[f] * vv[f];
            dot /= nrm;
            for (int f = 0; f < F; f++) vv[f] = (vv[f] - pn[f] / nrm * dot) / nrm;
        }
    }
    for (int l = 0; l < L1; l++) {
        const int w = 2 * l + 1;
        const double *Cl = C + (int64_t)l * l * R;
        double *Ch = Chat + (int64_t)l * l * R;
        const int64_t *fi = p->feat_index + (int64_t)l * R * R;
        const double *fs = p->feat_scale + (int64_t)l * R * R;
        memset(U, 0, sizeof(double) * (size_t)R * R);
        for (int r1 = 0; r1 < R; r1++)
            for (int r2 = r1; r2 < R; r2++) {
                double u = fs[r1 * R + r2] * vv[fi[r1 * R + r2]];
                U[r1 * R + r2] += u;
                U[r2 * R + r1] += u;
            }
        for (int m = 0; m < w; m++) {
            const double *Cm = Cl + (int64_t)m * R;
            double *Hm = Ch + (int64_t)m * R;
            for (int r = 0; r < R; r++) {
                const double *Ur = U + (int64_t)r * R;
                double acc = 0.0;
                for (int rp = 0; rp < R; rp++) acc += Ur[rp] * Cm[rp];
                Hm[r] = acc;
            }
        }
    }
    for (int64_t j = 0; j < n_neigh; j++) {
        const double *S = Sall + j * stride, *dS = S + LM, *a = dS + 3 * LM, *b = a + L1 * N;
        const int s = spec[j];
        double fb = 0.0, fx = 0.0, fy = 0.0, fz = 0.0;
        for (int l = 0; l < L1; l++) {
            for (int q = l * l; q < (l + 1) * (l + 1); q++) {
                const double *H = Chat + (int64_t)q * R + (int64_t)s * N;
                double tb;
                double hb = 0.0, ha = 0.0;
#ifdef _OPENMP
#pragma omp simd reduction(+ : hb, ha)
#endif
                for (int n = 0; n < N; n++) {
                    hb += H[n] * b[l * N + n];
                    ha += H[n] * a[l * N + n];
                }
                tb = hb * S[q];
                fb += tb;
                fx += ha * dS[q];
                fy += ha * dS[LM + q];
                fz += ha * dS[2 * LM + q];
            }
        }
        out_f[3 * j] = fb * vec[3 * j] + fx;
        out_f[3 * j + 1] = fb * vec[3 * j + 1] + fy;
        out_f[3 * j + 2] = fb * vec[3 * j + 2] + fz;
    }
}

/* In-place normalisation p -> p/|p| with the matching gradient transform
 * dp^ = (dp - p^ (p^ . dp)) / |p|, for n_entries gradient blocks of shape (3, F). */
static inline void soap_normalize(int64_t F, double *pv, int64_t n_entries, double *grad)
{
    double nrm = 0.0;
    for (int64_t f = 0; f < F; f++) nrm += pv[f] * pv[f];
    nrm = sqrt(nrm);
    if (nrm <= 0.0) return;
    double inv = 1.0 / nrm;
    for (int64_t f = 0; f < F; f++) pv[f] *= inv;
    if (grad == NULL) return;
    for (int64_t e = 0; e < 3 * n_entries; e++) {
        double *g = grad + e * F, dot = 0.0;
        for (int64_t f = 0; f < F; f++) dot += pv[f] * g[f];
        for (int64_t f = 0; f < F; f++) g[f] = (g[f] - pv[f] * dot) * inv;
    }
}

#endif
