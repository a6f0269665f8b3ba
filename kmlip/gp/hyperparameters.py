"""Hyperparameters of the sparse GP (δ and the noise σ's), the log marginal likelihood and its
optimisation: all from the stored per-class QR factors, O(M³) per evaluation, no data pass.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kmlip.gp.sparse import FREE_CLASSES, Solution, optimize_hyperparameters, solve_stack
from kmlip.labels import positive

#: Constructor name of the noise of each free label class.
SIGMA_OF_CLASS = {"energy": "sigma_energy", "forces": "sigma_force", "virial": "sigma_stress"}


@dataclass(frozen=True)
class Hyperparameters:
    """δ (eV, prior std of a local energy) and the label noise (None: class not used).

    Attributes
    ----------
    delta : float, or tuple of float (a sum of kernels: one per term)
    sigma_energy : float or None
        eV per atom.
    sigma_force : float or None
        eV/Å per component.
    sigma_stress : float or None
        Virial noise, eV per atom.
    """

    delta: float | tuple[float, ...]
    sigma_energy: float | None = None
    sigma_force: float | None = None
    sigma_stress: float | None = None

    def sigma_of(self, cls: str) -> float | None:
        return getattr(self, SIGMA_OF_CLASS[cls])

    def updated(self, delta=None, sigma_energy=None, sigma_force=None,
                sigma_stress=None) -> Hyperparameters:
        """A copy with the given (validated, positive) values replaced; None keeps a value."""
        new = {}
        if delta is not None:
            if isinstance(self.delta, tuple):
                if np.ndim(delta) == 0 or len(delta) != len(self.delta):
                    raise ValueError(f"delta must be a sequence of {len(self.delta)} values "
                                     "(one per kernel term)")
                new["delta"] = tuple(positive(d, f"delta[{t}]") for t, d in enumerate(delta))
            else:
                new["delta"] = positive(delta, "delta")
        for name, v in (("sigma_energy", sigma_energy), ("sigma_force", sigma_force),
                        ("sigma_stress", sigma_stress)):
            if v is not None:
                new[name] = positive(v, name)
        return replace(self, **new)

    def as_dict(self) -> dict:
        delta = list(self.delta) if isinstance(self.delta, tuple) else self.delta
        return {"delta": delta, "sigma_energy": self.sigma_energy,
                "sigma_force": self.sigma_force, "sigma_stress": self.sigma_stress}


def free_sigmas(factors: dict, hyper: Hyperparameters) -> dict[str, float]:
    """Noise scale of each free label class that has labels."""
    out = {}
    for cls in FREE_CLASSES:
        f = factors.get(cls)
        if f is not None and f.n_rows > 0:
            s = hyper.sigma_of(cls)
            if s is None:
                raise ValueError(f"label class {cls!r} has labels but {SIGMA_OF_CLASS[cls]} "
                                 "is None")
            out[cls] = s
    return out


def column_delta(delta, groups=None):
    """δ as :func:`kmlip.gp.sparse.solve_stack` takes it: a scalar stays a scalar (so does a
    one-term tuple); one value per term becomes one value per column (``groups``: the columns of
    each kernel term)."""
    if not isinstance(delta, (tuple, list)):
        return delta
    if len(delta) == 1:
        return delta[0]
    M = max(g.stop for g in groups)
    d = np.empty(M)
    for g, v in zip(groups, delta, strict=True):
        d[g] = v
    return d


def solve(factors: dict, L_hat, hyper: Hyperparameters, gradient: bool = False,
          groups=None) -> Solution:
    """Weights, posterior factor and log marginal likelihood at ``hyper``."""
    return solve_stack(factors, L_hat, column_delta(hyper.delta, groups),
                       free_sigmas(factors, hyper),
                       gradient=gradient)


def optimize(factors: dict, L_hat, hyper: Hyperparameters, optimize_delta: bool = True,
             bounds: dict | None = None, groups=None) -> tuple[Hyperparameters, dict]:
    """Maximises the log marginal likelihood over log δ and the log σ's of the classes in use.

    L-BFGS-B within ``bounds`` (``{name: (low, high)}``; defaults δ in [1e-4, 1e3] eV, σ in
    [1e-7, 1e2]), analytic gradient.

    Returns
    -------
    hyper : Hyperparameters
        The optimum.
    info : dict
        ``success``, ``message``, ``n_iterations``.
    """
    sig = free_sigmas(factors, hyper)
    if bounds:
        bounds = {{v: k for k, v in SIGMA_OF_CLASS.items()}.get(k, k): v for k, v in bounds.items()}
    multi = isinstance(hyper.delta, tuple)
    d, s, res = optimize_hyperparameters(factors, L_hat, hyper.delta, sig,
                                         optimize_delta=optimize_delta, bounds=bounds,
                                         groups=list(groups) if multi else None)
    new = replace(hyper, delta=tuple(float(x) for x in d) if multi else float(d),
                  **{SIGMA_OF_CLASS[c]: float(v) for c, v in s.items()})
    return new, {"success": bool(res.success), "message": str(res.message),
                 "n_iterations": int(res.nit)}


__all__ = ["SIGMA_OF_CLASS", "Hyperparameters", "column_delta", "free_sigmas", "optimize",
           "solve"]
