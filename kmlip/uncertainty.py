"""One calibrated per-atom ``uncertainty`` (eV/Å): an estimate of the atom's force error.

Per-atom measures the model can give for every structure (see :mod:`kmlip.prediction`):

``novelty`` (eV²)
    The projected-process term of the local-energy variance, ``delta^2 (k** - |L^-1 k*|^2)``:
    how far the atom's environment is from the span of the sparse points of its species. It is
    what GAP and FLARE gate on; it rises steeply for compressed, hot or unseen environments.
``energies_var`` (eV²)
    The full DTC posterior variance of the local energy, novelty plus ``|R^-T k*|^2`` (the
    uncertainty of the weights, nearly constant across environments on many data sets, which
    hides the novelty term when added).
``forces_var_diag`` (eV²/Å², summed over x, y, z)
    A cheap per-atom force variance (:func:`force_variance_diag`): the novelty of every centre
    that sees the atom, weighted by how much that centre's normalised features move with the
    atom. It needs the pair gradients (one pass, no force kernel rows); the exact per-component
    posterior stays available as the prediction's ``forces_var``.

A measure is usable for the ``uncertainty`` once the prediction path computes it
(:func:`predicted_measures`).

The ``uncertainty`` of atom i is ``u_i = sqrt(b^2 + a^2 m_i)`` with ``m_i`` the chosen measure,
``a`` (1/Å for the local-energy measures, dimensionless for ``forces_var_diag``) and ``b``
(eV/Å, the error floor of environments the model knows well) fitted by
:func:`fit_calibration` on labelled held-out frames: maximum likelihood of the per-atom force
errors under ``dF_i ~ N(0, u_i^2 I_3)``, so that ``u_i`` is the standard deviation of each
force component, with ``b`` at most the model's force noise σ_F (the errors beyond the label
noise are the measure's to explain; see :func:`calibrate`). Uncalibrated models use
``a = 1/Å`` and ``b = sigma_force`` (a rough guess, documented as such).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Measures a calibration may be built on.
MEASURES = ("novelty", "energies_var", "forces_var_diag")
#: Measures "auto" chooses among: those from the pass that gives the forces.
#: ``forces_var_diag`` is taken only when asked for: it needs the pair gradients on every
#: step (2.5× the cost of a force call on 108-atom Cu) and, though it ranks errors a little
#: better (Spearman 0.79 vs 0.72 on the Cu–Au held-out sets), it rises less on novel cells
#: (15 %-compressed Cu–Au: 2.9× the training median vs 3.7× for novelty).
AUTO_MEASURES = ("novelty", "energies_var")


def predicted_measures() -> tuple[str, ...]:
    """The measures of :data:`MEASURES` the prediction path computes (``model.compute``)."""
    from kmlip.prediction import PROPERTIES

    return tuple(m for m in MEASURES if m in PROPERTIES)


@dataclass(frozen=True)
class Calibration:
    """Map from a per-atom measure to the per-atom uncertainty (see the module docstring).

    Attributes
    ----------
    measure : str
        One of :data:`MEASURES`.
    scale : float
        ``a``, 1/Å (dimensionless for ``forces_var_diag``).
    floor : float
        ``b``, eV/Å.
    n_atoms : int
        Atoms the calibration was fitted on (0: the uncalibrated default).
    report : dict
        Figures of the fit (Spearman per measure, coverage of ±2u before and after, ...).
    """

    measure: str = "novelty"
    scale: float = 1.0
    floor: float = 0.02
    n_atoms: int = 0
    report: dict | None = None

    @property
    def noise_level(self) -> float:
        """The typical uncertainty of the calibration frames (their median, eV/Å), or the
        floor when uncalibrated: what relative gate thresholds multiply."""
        med = (self.report or {}).get("median_uncertainty")
        return float(med) if isinstance(med, (int, float)) and med > 0 else self.floor

    def uncertainty(self, m: np.ndarray) -> np.ndarray:
        """Per-atom uncertainty (eV/Å) from the per-atom measure ``m`` (eV², or eV²/Å²)."""
        return np.sqrt(self.floor ** 2 + self.scale ** 2 * np.maximum(m, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """Validated rebuild (ValueError for anything out of range)."""
        if not isinstance(d, dict):
            raise ValueError("calibration must be a dict")
        if d.get("measure") not in predicted_measures():
            # a measure this version's prediction path does not compute would leave the
            # uncertainty undefined
            raise ValueError(f"calibration measure must be one of {predicted_measures()}, got "
                             f"{d.get('measure')!r}")
        out = {"measure": d["measure"]}
        for key in ("scale", "floor"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not 0 <= v <= 1e6:
                raise ValueError(f"calibration {key} must be a number in [0, 1e6], got {v!r}")
            out[key] = float(v)
        n = d.get("n_atoms", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError("calibration n_atoms must be a non-negative int")
        report = d.get("report")
        if report is not None and not isinstance(report, dict):
            raise ValueError("calibration report must be a dict")
        return cls(measure=out["measure"], scale=out["scale"], floor=out["floor"], n_atoms=n,
                   report=report)


def default_calibration(sigma_force: float | None) -> Calibration:
    """The uncalibrated map: ``a = 1/Å``, ``b = sigma_force`` (or 0.02 eV/Å)."""
    return Calibration("novelty", 1.0, float(sigma_force) if sigma_force else 0.02, 0, None)


def _single_kernel(state, what: str, hint: str = "") -> None:
    if not getattr(state, "atom_centred", True):
        raise ValueError(f"{what} needs a model with one atom-centred kernel ({hint}a sum of "
                         "kernels gives the exact per-component forces_var)")


def _pair_blocks(G, n_atoms: int, n_centres: int | None = None):
    """Pair gradients with the periodic images of each (centre, moving atom) pair summed.

    Returns ``(i, j, D)``: centres (k,), moving atoms (k,) and ``D[k] = d X_i / d r_j`` of shape
    (k, 3, F), one block per distinct (i, j). Centres are atoms, or ``n_centres`` environments
    of another kind (e.g. pairs).
    """
    n_atoms = n_atoms if n_centres is None else max(int(n_centres), 1)
    key = np.asarray(G.neighbors, dtype=np.int64) * n_atoms + np.asarray(G.centers,
                                                                          dtype=np.int64)
    if np.unique(key).size == key.size:
        # no periodic images of the same pair (any cell wider than twice the cutoff): the
        # entries are the blocks, no copy of the gradients
        return (np.asarray(G.centers, dtype=np.int64), np.asarray(G.neighbors, dtype=np.int64),
                np.asarray(G.values, dtype=np.float64))
    order = np.argsort(key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    D = np.add.reduceat(np.asarray(G.values, dtype=np.float64)[order], starts, axis=0)
    uk = ks[starts]
    return uk % n_atoms, uk // n_atoms, D


def force_variance_diag(state, atoms, X: np.ndarray | None = None, G=None,
                        local_var: np.ndarray | None = None, *, envs=None,
                        per_term: bool = False) -> np.ndarray:
    """Cheap per-atom force variance: local-energy variances spread by the pair gradients.

    The variance of the force on atom j is a double sum over the centres i, i' that see j of
    ``g_ij^T Cov(d eps_i/d p_i, d eps_i'/d p_i') g_i'j`` (``g_ij = d p_i / d r_j``). Keeping
    only the diagonal terms i = i' and, for each, the isotropic part of the local-energy
    gradient's covariance -- which for the unit kernel ``(p_hat . s_hat)^zeta`` is exactly
    ``zeta P_i / |p_i|^2`` times the local-energy variance at the prior
    (``P_i = I - p_hat_i p_hat_i^T``) -- gives::

        s_j = zeta * sum_i  v_i |P_i g_ij|^2 / |p_i|^2     (summed over the 3 components)

    with ``v_i`` the local-energy variance of centre i (``novelty`` or ``energies_var``). At
    the prior (``v_i = delta^2``) this is the diagonal part of the exact prior force variance
    (:func:`kmlip.kernels.force_prior_variance`); away from it, it scales each centre's
    contribution by how unknown that centre's environment is. It costs one pass over the pair
    gradients (``O(n_pairs F)``), no kernel rows of force components (the exact
    ``forces_var`` costs ``O(n_pairs F M)``).

    A sum of kernels (``envs`` given) adds the terms' values, each from its own environments:
    ``v_e`` is the projected-process variance (novelty) of environment e's local energy in its
    term, ``delta_t^2 (k_hat(e, e) - |L_t^-1 k_e|^2)`` with L_t the term's block of the
    Cholesky factor (K_MM is block diagonal by term), spread to the atoms that move it by
    that term's pair gradients with the isotropic gradient factor of its kernel at the prior:
    ``zeta P_e / |p_e|^2`` for the normalised dot-product kernel (as above), and
    ``1/theta^2 + (fc'(r)/fc(r))^2`` for the two-body squared exponential (the ratio of
    ``d^2 k/dr dr'`` at ``r = r'`` to ``k(r, r)``; a pair's gradient is the unit vector along
    it, so a pair adds ``v_e (1/theta^2 + (fc'/fc)^2)`` to each of its two atoms). Terms are
    independent a priori, so this is the diagonal part of the prior force variance of the sum
    at the prior, as for one term.

    It is a measure for ranking and calibration, not the size of the exact posterior: the
    exact projected-process force variance also counts the directions of the kernel's
    derivative that the sparse points do not span, even in well-known environments (10²-10³
    times this value on fcc Cu); the calibration of :func:`fit_calibration` sets the scale.
    On frames of an independent 1000 K Cu run it ranks per-atom force errors better than
    ``novelty`` (Spearman 0.45 vs 0.40) and nearly as well as the exact one (0.47).

    Parameters
    ----------
    state : FittedState
        The fitted model state (its kernel exponent ``zeta``).
    atoms : ase.Atoms
        The structure (only its size and numbers are used).
    X : ndarray, shape (n_atoms, F)
        Raw descriptor vectors of the atoms (the prediction's ``features``); one atom-centred
        term only (else pass ``envs``).
    G : PairGradients
        Pair gradients of ``X`` (``descriptor.transform(atoms, gradients=True)[1]``).
    local_var : ndarray, shape (n_atoms,)
        Per-atom local-energy variance, eV² (``novelty`` or ``energies_var``); with ``envs``,
        optionally a list of per-environment variances (n_env_t,), one per term (default the
        terms' novelties).
    envs : list of Environments, optional
        Every term's environments of ``atoms`` with gradients
        (``term.descriptor.environments(atoms, gradients=True)``, in term order): any model,
        needed for a sum of kernels.
    per_term : bool
        With ``envs``: return each term's part, shape (n_terms, n_atoms).

    Returns
    -------
    ndarray, shape (n_atoms,)
        Per-atom force variance summed over x, y, z, eV²/Å² (the sum over terms).
    """
    if envs is not None:
        return _force_variance_diag_terms(state, atoms, envs, local_var, per_term)
    _single_kernel(state, "force_variance_diag with features X",
                   "pass envs=, every term's environments with gradients, instead; ")
    n = len(atoms)
    X = np.asarray(X, dtype=np.float64)
    v = np.asarray(local_var, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"features must have shape ({n}, F), got {X.shape}")
    if v.shape != (n,):
        raise ValueError(f"local_var must have shape ({n},), got {v.shape}")
    out = np.zeros(n)
    if getattr(G, "n_entries", 0) == 0:
        return out
    if G.values.shape[2] != X.shape[1]:
        raise ValueError(f"pair gradients have {G.values.shape[2]} features, X has {X.shape[1]}")
    i, j, D = _pair_blocks(G, n)
    np.add.at(out, j, state.basis.gradient_weights(X, i, D) * np.maximum(v[i], 0.0))
    return out


def _force_variance_diag_terms(state, atoms, envs, local_var, per_term: bool) -> np.ndarray:
    """:func:`force_variance_diag` of every kernel term from its environments."""
    import scipy.linalg as sla

    kernel = state.kernel
    n = len(atoms)
    if not isinstance(envs, (list, tuple)) or len(envs) != len(kernel.terms):
        raise ValueError(f"envs must be a list of {len(kernel.terms)} Environments, one per "
                         "kernel term")
    if local_var is not None and (not isinstance(local_var, (list, tuple))
                                  or len(local_var) != len(envs)):
        raise ValueError("with envs, local_var must be None or a list of per-environment "
                         "variances, one array per term")
    deltas = state.hyper.delta if isinstance(state.hyper.delta, tuple) else (state.hyper.delta,)
    out = np.zeros((len(envs), n))
    for t, (term, env) in enumerate(zip(kernel.terms, envs, strict=True)):
        basis = term.basis
        Xe = np.asarray(env.features, dtype=np.float64)
        keys = np.asarray(env.keys)
        G = env.gradients
        if G is None:
            raise ValueError(f"envs[{t}] has no gradients (environments(..., gradients=True))")
        if env.n_env == 0 or G.n_entries == 0:
            continue
        if local_var is None:
            d2 = float(deltas[t]) ** 2
            kss = basis.self_kernel(Xe, keys)
            if basis.n_sparse:
                cols = kernel.columns(t)
                K = basis.local_rows(Xe, keys)
                A = sla.solve_triangular(state.L_hat[cols, cols], K.T, lower=True,
                                         check_finite=False)
                v = d2 * np.maximum(kss - np.sum(A * A, axis=0), 0.0)
            else:
                v = d2 * kss
        else:
            v = np.asarray(local_var[t], dtype=np.float64)
            if v.shape != (env.n_env,):
                raise ValueError(f"local_var[{t}] must have shape ({env.n_env},), got "
                                 f"{v.shape}")
        i, j, D = _pair_blocks(G, n, env.n_env)
        weights = getattr(basis, "gradient_weights", None)
        if weights is None:
            raise ValueError(f"force_variance_diag: no gradient factor for the kernel of "
                             f"term {t} ({type(basis).__name__}: no gradient_weights)")
        np.add.at(out[t], j, weights(Xe, i, D) * np.maximum(v[i], 0.0))
    return out if per_term else out.sum(axis=0)


def force_variance_exact(state, atoms, X: np.ndarray, G, part: str = "full") -> np.ndarray:
    """Exact per-atom force variance (summed over x, y, z) from the force kernel rows.

    ``part`` "full" is the DTC posterior variance of the force components (as the prediction's
    ``forces_var`` summed per atom), "novelty" its projected-process term only
    (``delta^2 (k** - |L^-1 k*|^2)``). Costs the kernel rows of all 3 n force components,
    ``O(n_pairs F M)``: for analysis and for a model's report, not every MD step.

    Parameters
    ----------
    state : FittedState
    atoms : ase.Atoms
    X : ndarray, shape (n_atoms, F)
    G : PairGradients
    part : {"full", "novelty"}

    Returns
    -------
    ndarray, shape (n_atoms,)
        eV²/Å².
    """
    import scipy.linalg as sla

    from kmlip import kernels

    if part not in ("full", "novelty"):
        raise ValueError(f"part must be 'full' or 'novelty', got {part!r}")
    _single_kernel(state, "force_variance_exact")
    n = len(atoms)
    Z = np.asarray(atoms.numbers, dtype=np.int64)
    Fr, _ = state.basis.derivative_rows(np.asarray(X, dtype=np.float64), Z, G)
    kss = kernels.force_prior_variance(X, Z, G, state.basis.zeta).reshape(-1)
    d2 = state.hyper.delta ** 2
    A = sla.solve_triangular(state.L_hat, Fr.T, lower=True, check_finite=False)
    var = d2 * (kss - np.sum(A * A, axis=0))
    if part == "full":
        B = sla.solve_triangular(state.R, d2 * Fr.T, trans="T", lower=False,
                                 check_finite=False)
        var = var + np.sum(B * B, axis=0)
    return np.maximum(var, 0.0).reshape(n, 3).sum(axis=1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def coverage(errors: np.ndarray, u: np.ndarray, k: float = 2.0) -> float:
    """Fraction of force-error components within ±k u of their atom (errors (n, 3), u (n,))."""
    return float(np.mean(np.abs(errors) <= k * u[:, None]))


def fit_calibration(measure: str, m: np.ndarray, errors: np.ndarray,
                    max_floor: float | None = None) -> Calibration:
    """Maximum-likelihood ``a``, ``b`` of ``dF_i ~ N(0, (b^2 + a^2 m_i) I_3)``.

    Parameters
    ----------
    measure : str
    m : ndarray, shape (n_atoms,)
        The per-atom measure (eV², eV²/Å² for ``forces_var_diag``).
    errors : ndarray, shape (n_atoms, 3)
        Force errors (eV/Å) of the same atoms.
    max_floor : float, optional
        Upper bound of ``b`` (eV/Å); the model's force noise σ_F is the natural one (see
        :func:`calibrate`). None: unbounded.
    """
    from scipy.optimize import minimize

    m = np.maximum(np.asarray(m, dtype=np.float64), 0.0)
    e2 = np.sum(np.asarray(errors, dtype=np.float64) ** 2, axis=1)
    if m.size < 2:
        raise ValueError("calibration needs labelled forces of at least 2 atoms")
    if max_floor is not None and not (math.isfinite(max_floor) and max_floor > 0):
        raise ValueError(f"max_floor must be a positive number, got {max_floor!r}")
    rms = math.sqrt(float(np.mean(e2)) / 3) or 1e-6

    def nll(x):
        a2, b2 = math.exp(2 * x[0]), math.exp(2 * x[1])
        v = b2 + a2 * m
        f = float(np.sum(3 * np.log(v) + e2 / v))
        g_v = 3 / v - e2 / v ** 2
        return f, np.array([float(np.sum(g_v * 2 * a2 * m)), float(np.sum(g_v * 2 * b2))])

    mm = float(np.mean(m)) or 1.0
    hi_b = math.log(rms) + 5
    if max_floor is not None:
        hi_b = min(hi_b, math.log(max_floor))
    b_bounds = (min(math.log(rms) - 15, hi_b - 10), hi_b)
    best = None
    for x0 in ([math.log(rms / math.sqrt(mm)), math.log(rms / 2)],
               [math.log(rms / math.sqrt(mm) / 10), math.log(rms)]):
        x0[1] = min(max(x0[1], b_bounds[0]), b_bounds[1])
        res = minimize(nll, np.array(x0), jac=True, method="L-BFGS-B",
                       bounds=[(-30, 15), b_bounds])
        if best is None or res.fun < best.fun:
            best = res
    a, b = math.exp(best.x[0]), math.exp(best.x[1])
    return Calibration(measure, a, b, int(m.size), None)


def calibration_from_data(measures: dict, errors: np.ndarray, measure: str = "auto",
                          u_before: np.ndarray | None = None, n_frames: int = 0,
                          max_floor: float | None = None) -> tuple[Calibration, dict]:
    """Fits the map on per-atom measures and force errors already collected.

    Parameters
    ----------
    measures : dict
        ``{name: ndarray (n_atoms,)}`` for some of :data:`MEASURES`.
    errors : ndarray, shape (n_atoms, 3)
        Force errors (eV/Å), model minus reference, of the same atoms.
    measure : str
        "auto" takes, among the given measures of :data:`AUTO_MEASURES`, the one whose
        ranking agrees best with the per-atom error norm (Spearman; "novelty" on ties).
    u_before : ndarray (n_atoms,), optional
        The uncertainty before this calibration (for the report's ``coverage_before``).
    n_frames : int
        Frames the atoms come from (for the report).
    max_floor : float, optional
        Upper bound of the floor ``b`` (eV/Å; see :func:`calibrate`).

    Returns
    -------
    Calibration
        With the report attached.
    dict
        ``measure``, ``scale``, ``floor``, ``n_atoms``, ``n_frames``, ``spearman`` of every
        given measure, ``coverage_before``/``coverage_after`` (fraction of force-error
        components within ±2u), ``force_rmse``, ``median_uncertainty``.
    """
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 2 or err.shape[1] != 3:
        raise ValueError(f"errors must have shape (n_atoms, 3), got {err.shape}")
    m = {}
    for k, v in measures.items():
        if k not in MEASURES:
            raise ValueError(f"unknown measure {k!r}; known: {MEASURES}")
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (err.shape[0],):
            raise ValueError(f"measure {k!r} has shape {v.shape}, expected ({err.shape[0]},)")
        m[k] = v
    usable = [k for k in predicted_measures() if k in m]
    if measure == "auto":
        if not any(k in AUTO_MEASURES for k in usable):
            raise ValueError(f"'auto' chooses among {AUTO_MEASURES}; none of them was given")
    elif measure not in MEASURES:
        raise ValueError(f"measure must be 'auto' or one of {MEASURES}, got {measure!r}")
    elif measure not in m:
        raise ValueError(f"measure {measure!r} was not given")
    elif measure not in usable:
        raise ValueError(f"measure {measure!r} is not computed by this version's prediction "
                         f"path (it computes {predicted_measures()})")
    e_atom = np.linalg.norm(err, axis=1)
    rho = {k: spearman(v, e_atom) for k, v in m.items()}
    if measure == "auto":
        measure = max((k for k in usable if k in AUTO_MEASURES),
                      key=lambda k: (np.nan_to_num(rho[k], nan=-2.0), k == "novelty"))
    cal = fit_calibration(measure, m[measure], err, max_floor)
    u_after = cal.uncertainty(m[measure])
    report = {"measure": measure, "scale": cal.scale, "floor": cal.floor,
              "max_floor": max_floor,
              "n_atoms": cal.n_atoms, "n_frames": int(n_frames), "spearman": rho,
              "coverage_before": None if u_before is None else coverage(err, u_before),
              "coverage_after": coverage(err, u_after),
              "force_rmse": float(np.sqrt(np.mean(err ** 2))),
              "median_uncertainty": float(np.median(u_after))}
    return Calibration(measure, cal.scale, cal.floor, cal.n_atoms, dict(report)), report


def calibrate(compute, frames, forces_key: str = "forces", measure: str = "auto",
              max_floor: float | None | str = "model") -> tuple[Calibration, dict]:
    """Fits the uncertainty map on labelled frames (what :meth:`KernelPotential.calibrate` does).

    Parameters
    ----------
    compute : callable
        ``compute(atoms, properties) -> Prediction`` of the model.
    frames : list of ase.Atoms
        Held-out structures with force labels.
    forces_key : str
    measure : {"auto", "novelty", "energies_var", "forces_var_diag"}
        A measure the prediction path computes (:func:`predicted_measures`).
    max_floor : float, None or "model"
        Upper bound of the floor ``b`` (eV/Å). "model" (default): the force noise σ_F of the
        model whose bound method ``compute`` is, when it has one. The floor stands for the
        errors the measure does not explain; left free, it also takes the part of the errors
        of calibration frames that the measure does explain, and then caps how far the
        uncertainty can rise on novel structures (on Cu–Au: b 0.096 eV/Å for σ_F 0.02, and a
        15 %-compressed cell's median uncertainty only 1.8× the training median while its
        force errors are 4.5× larger; with b <= σ_F, 3.7× and 91 % instead of 80 % of its
        error components within ±2u).

    Returns
    -------
    Calibration
        With the report attached.
    dict
        The report (see :func:`calibration_from_data`).
    """
    from kmlip.labels import read_forces

    if measure != "auto" and measure not in MEASURES:
        raise ValueError(f"measure must be 'auto' or one of {MEASURES}, got {measure!r}")
    names = predicted_measures()
    if measure != "auto" and measure not in names:
        raise ValueError(f"measure {measure!r} is not computed by this version's prediction "
                         f"path (it computes {names})")
    st = getattr(getattr(compute, "__self__", None), "fitted_state_", None)
    if isinstance(max_floor, str):
        if max_floor != "model":
            raise ValueError(f"max_floor must be a number, None or 'model', got {max_floor!r}")
        hyper = getattr(st, "hyper", None)
        max_floor = getattr(hyper, "sigma_force", None)
    m = {k: [] for k in names}
    errors, u_before = [], []
    for k, a in enumerate(frames):
        f = read_forces(a, forces_key, f"frame {k}")
        r = compute(a, ("forces", *names, "uncertainty"))
        errors.append(r.forces - f)
        u_before.append(r.uncertainty)
        for name in names:
            m[name].append(getattr(r, name))
    if not errors:
        raise ValueError("calibration needs at least one labelled frame")
    return calibration_from_data({k: np.concatenate(v) for k, v in m.items()},
                                 np.concatenate(errors), measure, np.concatenate(u_before),
                                 len(frames), max_floor)


__all__ = ["AUTO_MEASURES", "MEASURES", "Calibration", "calibrate", "calibration_from_data",
           "coverage", "default_calibration", "fit_calibration", "force_variance_diag",
           "force_variance_exact", "predicted_measures", "spearman"]
