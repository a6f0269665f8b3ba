"""Error metrics of predictions against the labels carried by structures."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kmlip.labels import (
    LabelKeys,
    has_label,
    is_periodic,
    read_energy,
    read_forces,
    read_stress,
)


def error_metrics(predict: Callable, frames: Sequence, keys: LabelKeys) -> dict[str, float]:
    """MAE and RMSE of energy per atom, force components and stress components.

    Parameters
    ----------
    predict : callable
        ``predict(atoms, properties) -> Prediction`` (e.g. ``KernelPotential.compute``).
    frames : sequence of ase.Atoms
        Structures with labels (read as for training; a frame without a label class simply
        does not contribute to it).
    keys : LabelKeys
        Where labels are read.

    Returns
    -------
    dict
        ``energy_mae`` / ``energy_rmse`` (eV/atom), ``forces_mae`` / ``forces_rmse`` (eV/Å, per
        component), ``stress_mae`` / ``stress_rmse`` (eV/Å³, per Voigt component, periodic
        frames), each present when some frame carries that label, and ``n_frames``.
    """
    dE, dF, dS = [], [], []
    for k, a in enumerate(frames):
        where = f"frame {k}"
        has_e = has_label(a, keys.energy_key, "info")
        has_f = has_label(a, keys.forces_key, "arrays")
        has_s = is_periodic(a) and has_label(a, keys.stress_key, "info")
        props = ["energy"] + (["forces"] if has_f else []) + (["stress"] if has_s else [])
        r = predict(a, props)
        if has_e:
            dE.append((r.energy - read_energy(a, keys.energy_key, where)) / len(a))
        if has_f:
            dF.append((r.forces - read_forces(a, keys.forces_key, where)).ravel())
        if has_s:
            dS.append(r.stress - read_stress(a, keys.stress_key, where))
    out: dict[str, float] = {"n_frames": len(frames)}
    for name, d in (("energy", dE), ("forces", dF), ("stress", dS)):
        if d:
            x = np.concatenate([np.atleast_1d(v) for v in d])
            out[f"{name}_mae"] = float(np.mean(np.abs(x)))
            out[f"{name}_rmse"] = float(np.sqrt(np.mean(x * x)))
    return out


__all__ = ["error_metrics"]
