"""ASE calculator around a fitted :class:`~kmlip.model.KernelPotential`.

Results (eV, Å):

``energy``, ``free_energy``
    Total energy (local GP energies + e0 + baseline).
``energies`` (n_atoms,)
    Per-atom energies: local GP energy + e0 of the atom (a baseline's energy is not split per
    atom, so with a baseline ``sum(energies) = energy - baseline_energy``).
``forces`` (n_atoms, 3), ``stress`` (6,) Voigt, eV/Å³, ASE sign (periodic systems only).
``energy_var``
    Epistemic variance of the total energy (eV²), posterior of the sparse GP.
``energies_var`` (n_atoms,)
    Epistemic variance of every local energy (eV²), always computed.
``forces_var`` (n_atoms, 3)
    Epistemic variance of every force component (eV²/Å²), only with ``forces_var=True``
    (it needs the exact prior variance of each force component, O(sum_j n_j² F)).
``energy_noise_var``, ``forces_noise_var``, ``stress_noise_var``
    The aleatoric noise variances the model was trained with (sigma_energy² n_atoms,
    sigma_force², sigma_stress² n_atoms / V²), reported apart from the epistemic part; None
    when that label class was not used.
"""
from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes


class KMLIPCalculator(Calculator):
    """ASE calculator of a fitted KernelPotential.

    Parameters
    ----------
    model : KernelPotential
        A fitted model.
    forces_var : bool
        Also compute ``forces_var`` (epistemic variance of each force component).
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress",
                              "energy_var", "energies_var", "forces_var"]

    def __init__(self, model, forces_var: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(model, "alpha_"):
            raise ValueError("KMLIPCalculator needs a fitted KernelPotential")
        self.model = model
        self.forces_var = bool(forces_var)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if properties is None:
            properties = ["energy"]
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic = bool(np.all(a.pbc))
        r = self.model._evaluate(a, forces=True, stress=periodic, local_var=True,
                                 energy_var=True,
                                 forces_var=self.forces_var or "forces_var" in properties)
        res = {"energy": r["energy"], "free_energy": r["energy"],
               "energies": r["local_energies"], "forces": r["forces"],
               "energy_var": r["energy_var"], "energies_var": r["local_energies_var"]}
        if periodic:
            res["stress"] = r["stress"]
        if "forces_var" in r:
            res["forces_var"] = r["forces_var"]
        noise = self.model.noise_levels(a)
        res["energy_noise_var"] = noise["energy"]
        res["forces_noise_var"] = noise["forces"]
        res["stress_noise_var"] = noise["stress"]
        self.results = res
