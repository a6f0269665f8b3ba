"""Per-species isolated-atom energies e0: validated when given, fitted by least squares otherwise.

``E = sum_i eps_i + sum_i e0(Z_i) + E_baseline``: e0 takes the part of the total energies that is
linear in the species counts, so that the GP models what is left.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from ase.data import atomic_numbers, chemical_symbols


def validate_e0(e0: object) -> dict[str, float] | None:
    """Checks a user's ``e0`` (None or ``{symbol: eV}``) and returns it as plain floats.

    Raises
    ------
    TypeError
        Not a mapping.
    ValueError
        A key that is not a chemical symbol, or a value that is not a finite number.
    """
    if e0 is None:
        return None
    if not isinstance(e0, Mapping):
        raise TypeError(f"e0 must be a dict {{symbol: eV}} or None, got {type(e0).__name__}")
    out = {}
    for s, v in e0.items():
        if not isinstance(s, str) or atomic_numbers.get(s, 0) == 0:
            raise ValueError(f"e0 key {s!r} is not a chemical symbol")
        if isinstance(v, (bool, str, bytes)):
            # float("1.0") would pass a string from a hand-edited spec unnoticed
            raise ValueError(f"e0[{s!r}] is not a number: {v!r}")
        try:
            out[s] = float(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"e0[{s!r}] is not a number: {v!r}") from exc
        if not math.isfinite(out[s]):
            raise ValueError(f"e0[{s!r}] is not finite")
    return out


def fit_e0(counts: np.ndarray, energies: np.ndarray, sigmas: np.ndarray,
           species_z: Sequence[int]) -> dict[str, float]:
    """Least-squares e0 from total energies against species counts, weighted by 1/sigma.

    Parameters
    ----------
    counts : ndarray, shape (n_frames, n_species)
        Number of atoms of each species in each structure.
    energies : ndarray, shape (n_frames,)
        Total energies minus any baseline, eV.
    sigmas : ndarray, shape (n_frames,)
        Noise of each total energy, eV (per-structure overrides act on e0 as on the GP).
    species_z : sequence of int
        Atomic numbers of the columns of ``counts``.

    Returns
    -------
    dict
        ``{symbol: eV}``.

    Warns
    -----
    UserWarning
        When the compositions do not determine e0 (e.g. only stoichiometric NaCl: any split
        of the Na + Cl energy fits equally well); the minimum-norm split is returned.
    """
    C = counts / sigmas[:, None]
    coef, _, rank, _ = np.linalg.lstsq(C, energies / sigmas, rcond=None)
    if rank < len(species_z):
        names = [chemical_symbols[z] for z in species_z]
        warnings.warn(
            f"the training compositions do not determine e0 of {names} separately (the "
            "species counts are linearly dependent, e.g. every structure stoichiometric); "
            "e0 is split arbitrarily (minimum norm). Pass e0={symbol: eV} (isolated-atom "
            "energies) or include structures of other compositions", UserWarning, stacklevel=3)
    return {chemical_symbols[z]: float(c) for z, c in zip(species_z, coef, strict=True)}


def e0_of_atoms(e0: Mapping[str, float], numbers: np.ndarray) -> np.ndarray:
    """Per-atom e0 (eV) of a structure's atomic numbers (0 for species without an e0)."""
    return np.array([e0.get(chemical_symbols[z], 0.0) for z in numbers], dtype=np.float64)


__all__ = ["e0_of_atoms", "fit_e0", "validate_e0"]
