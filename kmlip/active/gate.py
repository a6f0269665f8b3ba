"""Uncertainty-gated dynamics: stop any ASE dynamics when the model is unsure.

:class:`UncertaintyGate` is an observer for any ASE ``Dynamics`` (VelocityVerlet, Langevin, NPT,
optimisers). Each step it reads the per-atom ``uncertainty`` (eV/Å, the calibrated estimate of
each atom's force error, :mod:`kmlip.uncertainty`) of the structure's :class:`KMLIPCalculator`
and, past a threshold, records the step, writes the frame that tripped it (extxyz with the
per-atom uncertainty) and raises :class:`UncertaintyExceeded`, which :func:`run_gated` turns
into a clean stop (a learner catches it to hand over to the reference calculator).

Thresholds are in eV/Å: absolute (``threshold``) or relative to the model's calibrated noise
level (``relative``: ``relative`` times the median uncertainty of the calibration frames, i.e.
of data like the training data; ``sigma_force`` for an uncalibrated model); the log states the
value used.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import TextIO

import numpy as np


class UncertaintyExceeded(RuntimeError):
    """Raised by :class:`UncertaintyGate` when the per-atom uncertainty passes the threshold.

    Attributes
    ----------
    step : int
        Dynamics step (number of observer calls before this one).
    max_uncertainty : float
        Largest per-atom uncertainty, eV/Å.
    atoms : ase.Atoms
        A copy of the frame that tripped the gate (with ``arrays["uncertainty"]``).
    """

    def __init__(self, step: int, max_uncertainty: float, threshold: float, atoms):
        super().__init__(f"step {step}: per-atom uncertainty {max_uncertainty:.4g} eV/Å "
                         f"exceeds the threshold {threshold:.4g} eV/Å")
        self.step, self.max_uncertainty, self.threshold, self.atoms = \
            step, max_uncertainty, threshold, atoms


class UncertaintyGate:
    """Observer that stops dynamics when any atom's uncertainty passes a threshold.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure being propagated; its calculator must be a :class:`KMLIPCalculator`
        (build it with ``variances=("uncertainty",)`` so the value comes with every force call
        at no extra descriptor pass).
    threshold : float, optional
        Absolute threshold, eV/Å.
    relative : float, optional
        Threshold as a multiple of the model's calibrated noise level (eV/Å, see the module
        docstring). Exactly one of ``threshold`` and ``relative`` is given.
    output : str or os.PathLike, optional
        Where the frame that trips the gate is written (extxyz, atomically); its directory
        must exist (checked here, not when the gate trips).
    log : file-like or None
        Where the threshold and a trip are stated (default stderr; None: silent).
    raise_on_trip : bool
        Raise :class:`UncertaintyExceeded` when tripped (default); False only records it
        (``tripped``, ``step``, ``max_uncertainty``), for use with :func:`run_gated`.

    Attributes
    ----------
    threshold : float
        The threshold used, eV/Å.
    history : list of float
        The largest per-atom uncertainty of every step seen.
    tripped : UncertaintyExceeded or None

    Raises
    ------
    TypeError
        The calculator is not a KMLIPCalculator; a threshold that is not a real number.
    ValueError
        Not exactly one of ``threshold``/``relative``, a value that is not positive and finite,
        or an ``output`` in a missing directory or naming a directory.
    """

    def __init__(self, atoms, threshold: float | None = None, relative: float | None = None,
                 output=None, log: TextIO | None = sys.stderr, raise_on_trip: bool = True):
        from kmlip.calculator import KMLIPCalculator

        calc = atoms.calc
        if not isinstance(calc, KMLIPCalculator):
            raise TypeError("UncertaintyGate needs atoms whose calculator is a KMLIPCalculator, "
                            f"got {type(calc).__name__}")
        if (threshold is None) == (relative is None):
            raise ValueError("give exactly one of threshold (eV/Å) and relative (× the "
                             "calibrated noise level)")
        level = calc.model.fitted_state_.uncertainty_map.noise_level
        value = threshold if threshold is not None else relative
        name = "threshold" if threshold is not None else "relative"
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a positive number, got {type(value).__name__} "
                            f"{value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
        if output is not None:
            # a missing directory would otherwise surface only when the gate trips, mid-run
            import os

            directory = os.path.dirname(os.path.abspath(os.fspath(output)))
            if os.path.isdir(os.fspath(output)):
                raise ValueError(f"output {os.fspath(output)}: is a directory, not a file name")
            if not os.path.isdir(directory):
                raise ValueError(f"output {os.fspath(output)}: directory {directory} does not "
                                 "exist")
        self.threshold = float(value) if threshold is not None else float(value) * level
        self.atoms, self.output, self.log = atoms, output, log
        self.raise_on_trip = bool(raise_on_trip)
        self.history: list[float] = []
        self.tripped: UncertaintyExceeded | None = None
        calibrated = calc.model.fitted_state_.calibration is not None
        how = (f"{relative:g} × the {'calibrated' if calibrated else 'uncalibrated'} noise "
               f"level {level:.4g} eV/Å"
               if relative is not None else "absolute")
        self._say(f"uncertainty gate: stops when an atom's uncertainty exceeds "
                  f"{self.threshold:.4g} eV/Å ({how})")

    def _say(self, msg: str) -> None:
        if self.log is not None:
            print(f"[kmlip] {msg}", file=self.log, flush=True)

    def __call__(self) -> None:
        a = self.atoms
        u = np.asarray(a.calc.get_property("uncertainty", a))
        umax = float(u.max()) if u.size else 0.0
        step = len(self.history)
        self.history.append(umax)
        if umax <= self.threshold or self.tripped is not None:
            return
        frame = a.copy()
        frame.calc = None
        frame.arrays["uncertainty"] = u.copy()
        frame.info.update(step=step, max_uncertainty=umax, threshold=self.threshold)
        self.tripped = UncertaintyExceeded(step, umax, self.threshold, frame)
        if self.output is not None:
            from ase.io import write

            from kmlip.io import atomic_write

            atomic_write(self.output, lambda fh: write(fh, frame, format="extxyz"), text=True)
        self._say(str(self.tripped) + (f"; frame written to {self.output}"
                                       if self.output is not None else ""))
        if self.raise_on_trip:
            raise self.tripped


def run_gated(dynamics, steps: int, gate: UncertaintyGate) -> int:
    """Runs ``dynamics`` for up to ``steps`` steps, stopping cleanly when ``gate`` trips.

    The gate is checked on the starting structure and after every step.

    Returns
    -------
    int
        Steps completed.
    """
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a non-negative int, got {type(steps).__name__} "
                        f"{steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    steps = int(steps)
    raise_before = gate.raise_on_trip
    gate.raise_on_trip = False
    done = 0
    try:
        for done, _ in enumerate(dynamics.irun(steps)):  # noqa: B007 - the count is returned
            gate()
            if gate.tripped is not None:
                break
    finally:
        gate.raise_on_trip = raise_before
    return done


__all__ = ["UncertaintyExceeded", "UncertaintyGate", "run_gated"]
