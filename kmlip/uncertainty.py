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

The ``uncertainty`` of atom i is ``u_i = sqrt(b^2 + a^2 m_i)`` with ``m_i`` the chosen measure,
``a`` (1/Å) and ``b`` (eV/Å, the error floor of environments the model knows well) fitted by
:func:`fit_calibration` on labelled held-out frames: maximum likelihood of the per-atom force
errors under ``dF_i ~ N(0, u_i^2 I_3)``, so that ``u_i`` is the standard deviation of each
force component. Uncalibrated models use ``a = 1/Å`` and ``b = sigma_force`` (a rough guess,
documented as such).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Measures a calibration may be built on.
MEASURES = ("novelty", "energies_var")


@dataclass(frozen=True)
class Calibration:
    """Map from a per-atom measure to the per-atom uncertainty (see the module docstring).

    Attributes
    ----------
    measure : str
        One of :data:`MEASURES`.
    scale : float
        ``a``, 1/Å.
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
        """Per-atom uncertainty (eV/Å) from the per-atom measure ``m`` (eV²)."""
        return np.sqrt(self.floor ** 2 + self.scale ** 2 * np.maximum(m, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """Validated rebuild (ValueError for anything out of range)."""
        if not isinstance(d, dict):
            raise ValueError("calibration must be a dict")
        if d.get("measure") not in MEASURES:
            raise ValueError(f"calibration measure must be one of {MEASURES}")
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


def fit_calibration(measure: str, m: np.ndarray, errors: np.ndarray) -> Calibration:
    """Maximum-likelihood ``a``, ``b`` of ``dF_i ~ N(0, (b^2 + a^2 m_i) I_3)``.

    Parameters
    ----------
    measure : str
    m : ndarray, shape (n_atoms,)
        The per-atom measure (eV²).
    errors : ndarray, shape (n_atoms, 3)
        Force errors (eV/Å) of the same atoms.
    """
    from scipy.optimize import minimize

    m = np.maximum(np.asarray(m, dtype=np.float64), 0.0)
    e2 = np.sum(np.asarray(errors, dtype=np.float64) ** 2, axis=1)
    if m.size < 2:
        raise ValueError("calibration needs labelled forces of at least 2 atoms")
    rms = math.sqrt(float(np.mean(e2)) / 3) or 1e-6

    def nll(x):
        a2, b2 = math.exp(2 * x[0]), math.exp(2 * x[1])
        v = b2 + a2 * m
        f = float(np.sum(3 * np.log(v) + e2 / v))
        g_v = 3 / v - e2 / v ** 2
        return f, np.array([float(np.sum(g_v * 2 * a2 * m)), float(np.sum(g_v * 2 * b2))])

    mm = float(np.mean(m)) or 1.0
    best = None
    for x0 in ([math.log(rms / math.sqrt(mm)), math.log(rms / 2)],
               [math.log(rms / math.sqrt(mm) / 10), math.log(rms)]):
        res = minimize(nll, np.array(x0), jac=True, method="L-BFGS-B",
                       bounds=[(-30, 15), (math.log(rms) - 15, math.log(rms) + 5)])
        if best is None or res.fun < best.fun:
            best = res
    a, b = math.exp(best.x[0]), math.exp(best.x[1])
    return Calibration(measure, a, b, int(m.size), None)


def calibrate(compute, frames, forces_key: str = "forces",
              measure: str = "auto") -> tuple[Calibration, dict]:
    """Fits the uncertainty map on labelled frames (what :meth:`KernelPotential.calibrate` does).

    Parameters
    ----------
    compute : callable
        ``compute(atoms, properties) -> Prediction`` of the model.
    frames : list of ase.Atoms
        Held-out structures with force labels.
    forces_key : str
    measure : {"auto", "novelty", "energies_var"}

    Returns
    -------
    Calibration
        With the report attached.
    dict
        The report (see :meth:`KernelPotential.calibrate`).
    """
    from kmlip.labels import read_forces

    if measure != "auto" and measure not in MEASURES:
        raise ValueError(f"measure must be 'auto' or one of {MEASURES}, got {measure!r}")
    m = {k: [] for k in MEASURES}
    errors, u_before = [], []
    for k, a in enumerate(frames):
        f = read_forces(a, forces_key, f"frame {k}")
        r = compute(a, ("forces", "novelty", "energies_var", "uncertainty"))
        errors.append(r.forces - f)
        u_before.append(r.uncertainty)
        for name in MEASURES:
            m[name].append(getattr(r, name))
    err = np.concatenate(errors)
    e_atom = np.linalg.norm(err, axis=1)
    m = {k: np.concatenate(v) for k, v in m.items()}
    rho = {k: spearman(v, e_atom) for k, v in m.items()}
    if measure == "auto":
        measure = max(MEASURES, key=lambda k: (np.nan_to_num(rho[k], nan=-2.0),
                                               k == "novelty"))
    cal = fit_calibration(measure, m[measure], err)
    u_after = cal.uncertainty(m[measure])
    report = {"measure": measure, "scale": cal.scale, "floor": cal.floor,
              "n_atoms": cal.n_atoms, "n_frames": len(frames), "spearman": rho,
              "coverage_before": coverage(err, np.concatenate(u_before)),
              "coverage_after": coverage(err, u_after),
              "force_rmse": float(np.sqrt(np.mean(err ** 2))),
              "median_uncertainty": float(np.median(u_after))}
    return Calibration(measure, cal.scale, cal.floor, cal.n_atoms, dict(report)), report


__all__ = ["MEASURES", "Calibration", "calibrate", "coverage", "default_calibration",
           "fit_calibration", "spearman"]
