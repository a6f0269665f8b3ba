"""ASE calculator around a fitted :class:`~kmlip.model.KernelPotential`.

It computes what ASE asks for, through the model's one prediction path
(:meth:`KernelPotential.compute`). Results (eV, Å):

``energy``, ``free_energy``
    Total energy (local GP energies + e0 + baseline).
``energies`` (n_atoms,)
    Per-atom energies: local GP energy + e0 of the atom (a baseline's energy is not split per
    atom, so with a baseline ``sum(energies) = energy - baseline_energy``).
``forces`` (n_atoms, 3)
    Forces (eV/Å).
``stress`` (6,)
    Stress in Voigt order (eV/Å³), ASE sign (periodic systems only).
``energy_var``, ``energies_var`` (n_atoms,), ``forces_var`` (n_atoms, 3)
    Epistemic variances (eV², eV²/Å²) from the sparse-GP posterior. Computed when requested
    (``calc.get_property("energies_var", atoms)``), or on every call for those named in
    ``variances``; a call that asks for the energy alone on new positions (a single point:
    dynamics and optimisers ask for forces) also reports ``energies_var``. A variance requested
    after the forces at the same positions reuses that call's features and kernel rows (no new
    descriptor pass).
``novelty`` (n_atoms,), ``uncertainty`` (n_atoms,)
    The projected-process term of ``energies_var`` (eV²) and the calibrated per-atom
    uncertainty (eV/Å, an estimate of the atom's force error; see :mod:`kmlip.uncertainty`),
    on request or on every call when named in ``variances``.
``energy_noise_var``, ``forces_noise_var``, ``stress_noise_var``
    The aleatoric noise variances the model was trained with (sigma_energy² n_atoms,
    sigma_force², sigma_stress² n_atoms / V²), reported apart from the epistemic part; None
    when that label class was not used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

#: names accepted in ``variances`` and the result each one adds
VARIANCES = {"energy": "energy_var", "energies": "energies_var", "forces": "forces_var",
             "novelty": "novelty", "forces_var_diag": "forces_var_diag",
             "uncertainty": "uncertainty"}


class KMLIPCalculator(Calculator):
    """ASE calculator of a fitted KernelPotential.

    Parameters
    ----------
    model : KernelPotential
        A fitted model.
    variances : iterable of str
        Variances computed on every call: any of ``"energy"`` (``energy_var``),
        ``"energies"`` (``energies_var``), ``"forces"`` (``forces_var``; costs an exact
        per-component prior variance, O(sum_j n_j² F)), ``"novelty"``, ``"uncertainty"``
        (per-atom, eV/Å; what gates use). Others are computed on request only.
    forces_var : bool
        Shorthand for adding ``"forces"`` to ``variances`` (earlier versions' name).
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.

    Raises
    ------
    TypeError
        ``variances`` is not a str or an iterable of str; ``forces_var`` is not a bool.
    ValueError
        An unfitted model or an unknown variance name.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress",
                              "energy_var", "energies_var", "forces_var", "novelty",
                              "forces_var_diag", "uncertainty"]

    def __init__(self, model, variances: Iterable[str] = (), forces_var: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if not hasattr(model, "compute") or not hasattr(model, "alpha_"):
            raise ValueError("KMLIPCalculator needs a fitted KernelPotential")
        if isinstance(forces_var, (bool, np.bool_)):
            forces_var = bool(forces_var)
        else:
            raise TypeError(f"forces_var must be True or False, got {type(forces_var).__name__} "
                            f"{forces_var!r}")
        if isinstance(variances, str):
            variances = (variances,)
        if variances is None or isinstance(variances, (bytes, Mapping)) \
                or not isinstance(variances, Iterable):
            raise TypeError("variances must be a tuple of names such as ('uncertainty',), got "
                            f"{type(variances).__name__} {variances!r}")
        variances = tuple(variances)
        bad = [v for v in variances if not isinstance(v, str) or v not in VARIANCES]
        if bad:
            raise ValueError(f"unknown variances {bad}; choose from {sorted(VARIANCES)}")
        self.model = model
        self.variances = variances + (("forces",) if forces_var and "forces" not in variances
                                      else ())
        self._last = None

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        try:
            self._calculate(atoms, properties, system_changes)
        except BaseException:
            # ASE has already stored these atoms as the calculator's: without a reset, asking
            # again would return the previous structure's results as this one's
            self.reset()
            raise

    def _calculate(self, atoms, properties, system_changes):
        if properties is None:
            properties = ["energy"]
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        want = {p for p in properties if p in self.implemented_properties}
        want |= {VARIANCES[v] for v in self.variances}
        if system_changes or self._last is None:
            # Energies cost one descriptor pass; forces (and then the stress, from the same
            # pair terms) a backward pass on top: an energy-only call stays energy-only, and
            # what comes free with the requested pass is kept.
            want |= {"energy", "energies"}
            if want & {"forces", "stress", "forces_var"}:
                want.add("forces")
                if bool(a.pbc.all()):
                    want.add("stress")
            else:
                # a single-point energy (dynamics and optimisers ask for forces) also reports
                # the per-atom variances, as earlier versions did
                want.add("energies_var")
            r = self.model.compute(a, want)
            self.results = {}
        else:
            # same positions: only what is missing, reusing the last features and rows
            want -= set(self.results)
            r = self.model.compute(a, want, reuse=self._last)
        self._last = r
        self.results.update(r.as_results())
        noise = self.model.noise_levels(a)
        self.results["energy_noise_var"] = noise["energy"]
        self.results["forces_noise_var"] = noise["forces"]
        self.results["stress_noise_var"] = noise["stress"]

    def reset(self):
        super().reset()
        self._last = None
