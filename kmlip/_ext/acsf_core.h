/* Atom-centred symmetry functions (Behler) and their exact gradients for one centre.
 *
 * Plain C99 (also valid C++17) over raw pointers: no Python, no allocation. The Cython driver
 * (acsf.pyx) owns the loop over centres and the memory; a LAMMPS pair style can include this
 * header and call kmlip_acsf_centre() from its own loop.
 *
 * Conventions: every size, index and species code is int64_t; functions and types are
 * prefixed kmlip_acsf_, macros KMLIP_ACSF_; a name ending
 * in "_" is an internal step that callers need not use.
 *
 * Maths, with the pair vectors a = r_ij, b = r_ik, c = b - a = r_jk of the neighbour list and
 * Behler's cutoff fc(r) = (cos(pi r / r_cut) + 1) / 2 for r < r_cut, 0 beyond:
 *   G1          = sum_j fc(r_ij)                                       per neighbour species
 *   G2(eta, Rs) = sum_j exp(-eta (r_ij - Rs)^2) fc(r_ij)                per neighbour species
 *   G3(kappa)   = sum_j cos(kappa r_ij) fc(r_ij)                        per neighbour species
 *   G4(eta, zeta, lambda) = sum_{j<k} 2^(1-zeta) (1 + lambda cos theta_ijk)^zeta
 *                 exp(-eta (r_ij^2 + r_ik^2 + r_jk^2)) fc(r_ij) fc(r_ik) fc(r_jk)
 *   G5(eta, zeta, lambda) = the same without the r_jk terms,           per neighbour species pair
 * (the sum over unordered pairs of neighbour-list entries, as DScribe's ACSF). A value depends
 * on the pair vectors only, so d/dr_j of the centre's features lands in the entry of pair j
 * (for a triplet: both pairs' entries), and the self entry is minus their sum.
 */
#ifndef KMLIP_ACSF_CORE_H
#define KMLIP_ACSF_CORE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* M_PI is not part of strict C99 / C++; the same literal as glibc's M_PI. */
#define KMLIP_ACSF_PI 3.14159265358979323846
/* Pairs closer than this (Å) are overlapping atoms: skipped instead of dividing by zero. */
#define KMLIP_ACSF_TINY 1e-10

typedef struct kmlip_acsf_params {
    int64_t n_species;      /* neighbour species */
    int64_t n_g2;           /* (eta, Rs) pairs */
    int64_t n_g3;           /* kappas */
    int64_t n_g4;           /* (eta, zeta, lambda) triples of G4 */
    int64_t n_g5;           /* (eta, zeta, lambda) triples of G5 */
    int64_t n_features;     /* length of the feature vector */
    double r_cut;           /* cutoff radius, Å */
    const double *g2;       /* (n_g2, 2): eta (1/Å^2), Rs (Å) */
    const double *g3;       /* (n_g3): kappa (1/Å) */
    const double *g4;       /* (n_g4, 3): eta (1/Å^2), zeta (>= 1), lambda (+-1) */
    const double *g5;       /* (n_g5, 3): as g4 */
    const int64_t *radial_block;   /* (n_species): first feature of G1..G3 of a species */
    const int64_t *angular_block;  /* (n_species, n_species): first feature of G4, G5 of a
                                    * species pair (symmetric) */
} kmlip_acsf_params;

/* Doubles of scratch one centre with n_neigh neighbours needs. */
static inline int64_t kmlip_acsf_work_size(const kmlip_acsf_params *p, int64_t n_neigh)
{
    return n_neigh * (4 + p->n_g4 + p->n_g5) + 1;
}

/* Cutoff fc(r) and its derivative dfc/dr. */
static inline void kmlip_acsf_cutoff_(double r_cut, double r, double *fc, double *dfc)
{
    if (r >= r_cut) {
        *fc = 0.0;
        *dfc = 0.0;
        return;
    }
    double w = KMLIP_ACSF_PI / r_cut;
    *fc = 0.5 * (cos(w * r) + 1.0);
    *dfc = -0.5 * w * sin(w * r);
}

/* Where the derivative of feature f with respect to one pair vector goes: its gradient entry
 * (features and gradients) and/or its contraction with a cotangent (vjp). */
typedef struct kmlip_acsf_sink {
    double *g;          /* (3, F) gradient entry of the pair, or NULL */
    const double *v;    /* (F) dE/dX of the centre, or NULL */
    double *f;          /* (3) dE/d r_ij of the pair, accumulated (used with v) */
    int64_t F;          /* number of features */
} kmlip_acsf_sink;

/* d X_f / d r_pair = ca * av + cb * bv + cc * cv: into the gradient entry, and its weight
 * v[f] times the coefficients into (*wa, *wb, *wc) for the vjp (applied once per pair or
 * triplet, not per feature). */
static inline void kmlip_acsf_add3_(const kmlip_acsf_sink *s, int64_t f, double ca,
                                    const double *av, double cb, const double *bv, double cc,
                                    const double *cv, double *wa, double *wb, double *wc)
{
    if (s->g != NULL)
        for (int64_t d = 0; d < 3; ++d)
            s->g[d * s->F + f] += ca * av[d] + cb * bv[d] + cc * cv[d];
    if (s->v != NULL) {
        double w = s->v[f];
        *wa += w * ca;
        *wb += w * cb;
        *wc += w * cc;
    }
}

/* s->f += wa * av + wb * bv + wc * cv (the vjp's accumulated coefficients). */
static inline void kmlip_acsf_flush_(const kmlip_acsf_sink *s, double wa, const double *av,
                                     double wb, const double *bv, double wc, const double *cv)
{
    if (s->v != NULL)
        for (int64_t d = 0; d < 3; ++d)
            s->f[d] += wa * av[d] + wb * bv[d] + wc * cv[d];
}

/* One angular family (G4 if with_jk, else G5) of one triplet.
 * a, b, c: pair vectors r_ij, r_ik, r_jk; rij, rik, rjk their lengths; cos_t the angle's cosine;
 * ej, ek: exp(-eta r^2) of the two pairs for each parameter; fc..: cutoffs and derivatives
 * (fjk = 1, dfjk = 0 for G5). out: the features; sj, sk: the sinks of the two pairs' derivatives
 * (NULL: features only). */
static inline void kmlip_acsf_angular_(const double *prm, int64_t n, int64_t with_jk,
                                       const double *a, const double *b, const double *c,
                                       double rij, double rik, double rjk, double cos_t,
                                       const double *ej, const double *ek,
                                       double fij, double dfij, double fik, double dfik,
                                       double fjk, double dfjk, int64_t f0, double *out,
                                       const kmlip_acsf_sink *sj, const kmlip_acsf_sink *sk)
{
    double rjk2 = rjk * rjk;
    double F3 = fij * fik * fjk;
    double last_eta = -1.0, ejk = 1.0;
    double wja = 0.0, wjb = 0.0, wjc = 0.0, wka = 0.0, wkb = 0.0, wkc = 0.0;
    for (int64_t q = 0; q < n; ++q) {
        double eta = prm[3 * q], zeta = prm[3 * q + 1], lam = prm[3 * q + 2];
        double E = ej[q] * ek[q];
        if (with_jk) {
            /* parameter sets usually share eta across zeta and lambda: one exp for them */
            if (eta != last_eta) {
                ejk = exp(-eta * rjk2);
                last_eta = eta;
            }
            E *= ejk;
        }
        double x = 1.0 + lam * cos_t;
        if (x < 0.0)
            x = 0.0;  /* rounding at theta = 0 or pi */
        /* (x/2)^(zeta-1) by multiplication for small integer zeta (the usual 1, 2, 4, 8, 16) */
        double xz1 = 1.0;
        if (zeta == floor(zeta) && zeta <= 64.0) {
            for (int64_t e = 1; e < (int64_t)zeta; ++e)
                xz1 *= 0.5 * x;
        } else {
            xz1 = pow(0.5 * x, zeta - 1.0);
        }
        double A = xz1 * x;  /* 2^(1-zeta) x^zeta; dA/dcos = zeta lambda (x/2)^(zeta-1) */
        double AE = A * E;
        double AEF = AE * F3;
        out[f0 + q] += AEF;
        if (sj == NULL)
            continue;
        double dAEF = zeta * lam * xz1 * E * F3;
        double cross = dAEF / (rij * rik);
        double ca_a = -dAEF * cos_t / (rij * rij) - 2.0 * eta * AEF + AE * dfij * fik * fjk / rij;
        double cb_b = -dAEF * cos_t / (rik * rik) - 2.0 * eta * AEF + AE * fij * dfik * fjk / rik;
        double cc = 0.0;
        if (with_jk)
            cc = 2.0 * eta * AEF - AE * fij * fik * dfjk / rjk;
        kmlip_acsf_add3_(sj, f0 + q, ca_a, a, cross, b, cc, c, &wja, &wjb, &wjc);
        kmlip_acsf_add3_(sk, f0 + q, cross, a, cb_b, b, -cc, c, &wka, &wkb, &wkc);
    }
    if (sj != NULL) {
        kmlip_acsf_flush_(sj, wja, a, wjb, b, wjc, c);
        kmlip_acsf_flush_(sk, wka, a, wkb, b, wkc, c);
    }
}

/* One centre: features, and the derivatives into out_grad and/or (with v) out_f; see
 * kmlip_acsf_centre and kmlip_acsf_centre_vjp. */
static inline void kmlip_acsf_centre_(const kmlip_acsf_params *p, int64_t n_neigh,
                                      const double *vec, const int64_t *spec, double *work,
                                      double *out_x, double *out_grad, const double *v,
                                      double *out_f)
{
    const int64_t F = p->n_features, n2 = p->n_g2, n3 = p->n_g3, n4 = p->n_g4, n5 = p->n_g5;
    const int64_t n45 = n4 + n5, E3 = 3 * F;
    const double rc = p->r_cut;
    double *r = work, *fc = work + n_neigh, *dfc = work + 2 * n_neigh;
    double *expo = work + 4 * n_neigh;  /* (n_neigh, n4 + n5): exp(-eta r^2) */

    const int64_t derivs = out_grad != NULL || v != NULL;
    memset(out_x, 0, (size_t)F * sizeof(double));
    if (out_grad != NULL)
        memset(out_grad, 0, (size_t)((n_neigh + 1) * E3) * sizeof(double));
    if (v != NULL)
        memset(out_f, 0, (size_t)(3 * n_neigh) * sizeof(double));

    /* radial part and the per-pair tables of the angular part */
    for (int64_t j = 0; j < n_neigh; ++j) {
        const double *a = vec + 3 * j;
        double rj = sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2]);
        r[j] = rj;
        if (rj < KMLIP_ACSF_TINY || rj >= rc) {
            fc[j] = 0.0;
            dfc[j] = 0.0;
            continue;
        }
        kmlip_acsf_cutoff_(rc, rj, &fc[j], &dfc[j]);
        for (int64_t q = 0; q < n4; ++q)
            expo[j * n45 + q] = exp(-p->g4[3 * q] * rj * rj);
        for (int64_t q = 0; q < n5; ++q)
            expo[j * n45 + n4 + q] = exp(-p->g5[3 * q] * rj * rj);

        int64_t f0 = p->radial_block[spec[j]];
        kmlip_acsf_sink sink = {(out_grad != NULL) ? out_grad + (1 + j) * E3 : NULL, v,
                                (v != NULL) ? out_f + 3 * j : NULL, F};
        const kmlip_acsf_sink *g = derivs ? &sink : NULL;
        double s = 1.0 / rj;  /* d|a|/da = a / r */
        double wr = 0.0, w0 = 0.0;  /* vjp: coefficient of a, and a sink for the unused ones */
        out_x[f0] += fc[j];
        if (g != NULL)
            kmlip_acsf_add3_(g, f0, dfc[j] * s, a, 0.0, a, 0.0, a, &wr, &w0, &w0);
        for (int64_t q = 0; q < n2; ++q) {
            double eta = p->g2[2 * q], dr = rj - p->g2[2 * q + 1];
            double e = exp(-eta * dr * dr);
            out_x[f0 + 1 + q] += e * fc[j];
            if (g != NULL)
                kmlip_acsf_add3_(g, f0 + 1 + q, e * (dfc[j] - 2.0 * eta * dr * fc[j]) * s, a,
                                 0.0, a, 0.0, a, &wr, &w0, &w0);
        }
        for (int64_t q = 0; q < n3; ++q) {
            double kap = p->g3[q];
            double cs = cos(kap * rj);
            out_x[f0 + 1 + n2 + q] += cs * fc[j];
            if (g != NULL)
                kmlip_acsf_add3_(g, f0 + 1 + n2 + q,
                                 (cs * dfc[j] - kap * sin(kap * rj) * fc[j]) * s, a,
                                 0.0, a, 0.0, a, &wr, &w0, &w0);
        }
        if (g != NULL)
            kmlip_acsf_flush_(g, wr, a, 0.0, a, 0.0, a);
    }

    if (n45 > 0) {
        for (int64_t j = 0; j < n_neigh; ++j) {
            if (fc[j] == 0.0 && dfc[j] == 0.0)
                continue;
            const double *a = vec + 3 * j;
            kmlip_acsf_sink sink_j = {(out_grad != NULL) ? out_grad + (1 + j) * E3 : NULL, v,
                                      (v != NULL) ? out_f + 3 * j : NULL, F};
            const kmlip_acsf_sink *gj = derivs ? &sink_j : NULL;
            for (int64_t k = j + 1; k < n_neigh; ++k) {
                if (fc[k] == 0.0 && dfc[k] == 0.0)
                    continue;
                const double *b = vec + 3 * k;
                double c[3] = {b[0] - a[0], b[1] - a[1], b[2] - a[2]};
                double rjk = sqrt(c[0] * c[0] + c[1] * c[1] + c[2] * c[2]);
                double cos_t = (a[0] * b[0] + a[1] * b[1] + a[2] * b[2]) / (r[j] * r[k]);
                kmlip_acsf_sink sink_k = {(out_grad != NULL) ? out_grad + (1 + k) * E3 : NULL,
                                          v, (v != NULL) ? out_f + 3 * k : NULL, F};
                const kmlip_acsf_sink *gk = derivs ? &sink_k : NULL;
                int64_t f0 = p->angular_block[spec[j] * p->n_species + spec[k]];
                if (n4 > 0 && rjk < rc && rjk >= KMLIP_ACSF_TINY) {
                    double fjk, dfjk;
                    kmlip_acsf_cutoff_(rc, rjk, &fjk, &dfjk);
                    kmlip_acsf_angular_(p->g4, n4, 1, a, b, c, r[j], r[k], rjk, cos_t,
                                        expo + j * n45, expo + k * n45, fc[j], dfc[j], fc[k],
                                        dfc[k], fjk, dfjk, f0, out_x, gj, gk);
                }
                if (n5 > 0)
                    kmlip_acsf_angular_(p->g5, n5, 0, a, b, c, r[j], r[k], rjk, cos_t,
                                        expo + j * n45 + n4, expo + k * n45 + n4, fc[j], dfc[j],
                                        fc[k], dfc[k], 1.0, 0.0, f0 + n4, out_x, gj, gk);
            }
        }
    }

    if (out_grad != NULL) {
        /* translation invariance: d/dr_i = -sum_j d/dr_j */
        for (int64_t j = 0; j < n_neigh; ++j) {
            const double *g = out_grad + (1 + j) * E3;
            for (int64_t t = 0; t < E3; ++t)
                out_grad[t] -= g[t];
        }
    }
}

/* Features (out_x, n_features, overwritten) and, if out_grad is not NULL, their derivatives
 * (out_grad, (n_neigh + 1, 3, n_features), overwritten: entry 0 is the self term d/dr_i,
 * entry 1 + j the derivative with respect to the atom of pair j) of one centre.
 * vec: (n_neigh, 3) pair vectors r_j - r_i in Å; spec: (n_neigh) species codes 0..n_species-1;
 * work: kmlip_acsf_work_size() doubles. */
static inline void kmlip_acsf_centre(const kmlip_acsf_params *p, int64_t n_neigh,
                                     const double *vec, const int64_t *spec, double *work,
                                     double *out_x, double *out_grad)
{
    kmlip_acsf_centre_(p, n_neigh, vec, spec, work, out_x, out_grad, NULL, NULL);
}

/* Forces of a scalar E of the features without forming their derivatives: given v = dE/dX of
 * the centre (n_features), out_f[j] = dE/d r_ij (n_neigh, 3, overwritten) for each pair;
 * out_x (n_features) receives the features (scratch for callers that have them already). */
static inline void kmlip_acsf_centre_vjp(const kmlip_acsf_params *p, int64_t n_neigh,
                                         const double *vec, const int64_t *spec, const double *v,
                                         double *work, double *out_x, double *out_f)
{
    kmlip_acsf_centre_(p, n_neigh, vec, spec, work, out_x, NULL, v, out_f);
}

#ifdef __cplusplus
}
#endif

#endif /* KMLIP_ACSF_CORE_H */
