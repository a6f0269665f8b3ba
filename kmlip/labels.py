"""Training labels read from ``ase.Atoms``, validated before any work.

Labels come from ``atoms.info`` / ``atoms.arrays`` first, then from the cached results of
``atoms.calc`` (a ``SinglePointCalculator``, or what ``ase.io.read`` of an extxyz attaches).
Reading a label never triggers a calculation.

* energy (eV): ``info[energy_key]`` or ``calc.results[energy_key]``.
* forces (eV/Å), shape (n_atoms, 3): ``arrays[forces_key]`` or ``calc.results[forces_key]``.
* stress (eV/Å³, ASE sign): ``info[stress_key]`` (3x3, 9 or Voigt 6) or
  ``calc.results[stress_key]``; only periodic structures carry a virial label (``V * stress``).
* per-structure noise overrides, absolute as in GAP: ``info['energy_sigma']`` (eV, total
  energy), ``info['force_sigma']`` (eV/Å), ``arrays['force_atom_sigma']`` (eV/Å per atom),
  ``info['virial_sigma']`` (eV per virial component).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from kmlip._validate import check_numbers


@dataclass(frozen=True)
class LabelKeys:
    """Where labels are read and which label classes are used (None: not used)."""

    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    use_energy: bool = True
    use_forces: bool = True
    use_stress: bool = False


@dataclass(frozen=True)
class FrameLabels:
    """Labels of one structure; None where the structure has none or the class is unused.

    Attributes
    ----------
    energy : float or None
        Total energy, eV.
    forces : ndarray (n_atoms, 3) or None
        eV/Å.
    stress : ndarray (6,) or None
        Voigt, eV/Å³, ASE sign.
    energy_sigma, force_sigma, virial_sigma : float or None
        Absolute per-structure noise overrides.
    force_atom_sigma : ndarray (n_atoms,) or None
    """

    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    energy_sigma: float | None = None
    force_sigma: float | None = None
    virial_sigma: float | None = None
    force_atom_sigma: np.ndarray | None = None


def as_frames(X: Any, what: str = "frames") -> list[Atoms]:
    """A list of ``ase.Atoms`` from one Atoms or an iterable of them.

    Raises
    ------
    TypeError
        Not an Atoms or an iterable of Atoms.
    ValueError
        Empty.
    """
    if isinstance(X, Atoms):
        return [X]
    if isinstance(X, (str, bytes, dict)) or not isinstance(X, (Sequence, np.ndarray, Iterable)):
        raise TypeError(f"{what} must be an ase.Atoms or a list of ase.Atoms, "
                        f"got {type(X).__name__}")
    frames = list(X)
    if not frames:
        raise ValueError(f"{what} is empty")
    for k, a in enumerate(frames):
        if not isinstance(a, Atoms):
            raise TypeError(f"{what}[{k}] is a {type(a).__name__}, not an ase.Atoms")
    return frames


def is_periodic(atoms: Atoms) -> bool:
    """True when the structure is periodic in all three directions (it has a stress)."""
    return bool(np.all(atoms.pbc))


def voigt(stress: Any, where: str) -> np.ndarray:
    """Voigt form (xx yy zz yz xz xy) of a stress given as (6,), (3, 3) or (9,)."""
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (6,):
        return s.copy()
    if s.shape in ((3, 3), (9,)):
        s = s.reshape(3, 3)
        return np.array([s[0, 0], s[1, 1], s[2, 2], 0.5 * (s[1, 2] + s[2, 1]),
                         0.5 * (s[0, 2] + s[2, 0]), 0.5 * (s[0, 1] + s[1, 0])])
    raise ValueError(f"{where}: must have shape (6,), (3, 3) or (9,), got {s.shape}")


def positive(value: Any, where: str) -> float:
    """``float(value)`` if it is a positive finite real number.

    Raises
    ------
    TypeError
        Not a real number: a bool, a str (even ``"0.2"``), None, a complex number or a
        sequence (a 0-d NumPy array of reals is accepted).
    ValueError
        NaN, ±inf, zero or negative; the message names ``where``.
    """
    v = value
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iuf":
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{where} must be a positive number, got {type(value).__name__} "
                        f"{value!r}")
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where} must be a positive finite number, got {value!r}")
    return v


def _results(atoms: Atoms) -> dict:
    # cached calculator results only: reading labels must never trigger a calculation
    return (getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}


def has_label(atoms: Atoms, key: str, where: str) -> bool:
    """Whether ``atoms`` carries ``key`` in ``info``/``arrays`` (``where``) or cached results."""
    return key in getattr(atoms, where) or key in _results(atoms)


def _fetch(atoms: Atoms, where: str, key: str):
    container = getattr(atoms, where)
    return container[key] if key in container else _results(atoms).get(key)


def read_energy(atoms: Atoms, key: str, where: str) -> float:
    """Total energy label (eV); ValueError naming ``where`` and ``key`` if missing or bad."""
    e = _fetch(atoms, "info", key)
    if e is None:
        raise ValueError(f"{where}: no energy label {key!r} (atoms.info or calculator results)")
    a = np.asarray(e)
    if a.dtype.kind not in "iuf" or a.size != 1:
        # bools, strings, complex numbers and arrays are no energy (True is not 1 eV)
        raise ValueError(f"{where}: energy {key!r} is not a number: {e!r}"[:200])
    e = float(a.reshape(()))
    if not math.isfinite(e):
        raise ValueError(f"{where}: energy {key!r} is NaN or inf")
    return e


def read_forces(atoms: Atoms, key: str, where: str) -> np.ndarray:
    """Force label (n_atoms, 3) in eV/Å; ValueError if missing, misshapen or not finite."""
    f = _fetch(atoms, "arrays", key)
    if f is None:
        raise ValueError(f"{where}: no forces label {key!r} (atoms.arrays or calculator results)")
    f = np.asarray(f)
    if f.dtype.kind not in "iuf":  # strings ("1.0") and bools are no forces
        raise ValueError(f"{where}: forces {key!r} are not numbers (dtype {f.dtype})")
    f = np.array(f, dtype=np.float64)
    n = len(atoms)
    if f.shape != (n, 3):
        raise ValueError(f"{where}: forces {key!r} have shape {f.shape}, expected ({n}, 3)")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{where}: forces {key!r} contain NaN or inf")
    return f


def read_stress(atoms: Atoms, key: str, where: str) -> np.ndarray:
    """Stress label, Voigt (6,) in eV/Å³; ValueError if missing, misshapen or not finite."""
    s = _fetch(atoms, "info", key)
    if s is None:
        raise ValueError(f"{where}: no stress label {key!r} for a periodic structure "
                         "(sigma_stress is set)")
    a = np.asarray(s)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{where}: stress {key!r} is not numbers (dtype {a.dtype})")
    s = voigt(a, f"{where}: stress {key!r}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{where}: stress {key!r} contains NaN or inf")
    return s


def read_labels(atoms: Atoms, k: int, keys: LabelKeys) -> FrameLabels:
    """Labels and noise overrides of training frame ``k`` (ValueError naming frame and key)."""
    where = f"frame {k}"
    n = len(atoms)
    if n == 0:
        raise ValueError(f"{where}: structure has no atoms")
    out: dict[str, Any] = {}
    if keys.use_energy:
        out["energy"] = read_energy(atoms, keys.energy_key, where)
    if keys.use_forces:
        out["forces"] = read_forces(atoms, keys.forces_key, where)
    if keys.use_stress and is_periodic(atoms):
        out["stress"] = read_stress(atoms, keys.stress_key, where)
    for key in ("energy_sigma", "force_sigma", "virial_sigma"):
        if atoms.info.get(key) is not None:
            try:
                out[key] = positive(atoms.info[key], f"{where}: info[{key!r}]")
            except TypeError as exc:  # a defect of the data, not of an argument
                raise ValueError(str(exc)) from None
    if "force_atom_sigma" in atoms.arrays:
        fa = np.asarray(atoms.arrays["force_atom_sigma"])
        if fa.dtype.kind not in "iuf" or fa.reshape(-1).shape != (n,) \
                or not np.all(np.isfinite(fa)) or np.any(fa <= 0):
            raise ValueError(f"{where}: arrays['force_atom_sigma'] must be {n} positive numbers")
        out["force_atom_sigma"] = fa.astype(np.float64).reshape(-1)
    return FrameLabels(**out)


def check_species(atoms: Atoms, known: Iterable[int], where: str, what: str) -> None:
    """ValueError when ``atoms`` holds a species not in ``known`` (atomic numbers)."""
    known = set(known)
    try:
        check_numbers(atoms.numbers)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
    bad = sorted({int(z) for z in atoms.numbers} - known)
    if bad:
        names = [chemical_symbols[z] for z in bad]
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}species {names} unknown to the {what} "
                         f"(knows {sorted(chemical_symbols[z] for z in known)})")


__all__ = ["FrameLabels", "LabelKeys", "as_frames", "check_species", "has_label", "is_periodic",
           "positive", "read_energy", "read_forces", "read_labels", "read_stress", "voigt"]
