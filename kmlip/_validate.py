"""Input checks shared by descriptors, baselines and the model."""
from __future__ import annotations

import numpy as np


def checked_system(atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(numbers, positions, cell, pbc)`` of an ``ase.Atoms``.

    Raises
    ------
    TypeError
        If ``atoms`` is not an ``ase.Atoms``.
    ValueError
        For non-finite positions or cell, or a singular cell in a periodic direction.
    """
    from ase import Atoms

    if not isinstance(atoms, Atoms):
        raise TypeError(f"expected an ase.Atoms, got {type(atoms).__name__}")
    positions = np.ascontiguousarray(atoms.get_positions(), dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
        raise ValueError(f"positions contain NaN or inf (atoms {bad[:5].tolist()})")
    cell = np.ascontiguousarray(atoms.cell.array, dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise ValueError("cell contains NaN or inf")
    pbc = np.asarray(atoms.pbc, dtype=bool).copy()
    if pbc.any():
        vecs = cell[pbc]
        # the periodic vectors must span a space of their own dimension
        s = np.linalg.svd(vecs, compute_uv=False)
        if s.size == 0 or s.min() <= 1e-10 * max(1.0, s.max()):
            raise ValueError("cell has zero volume (or degenerate periodic vectors) with pbc=True")
    numbers = np.ascontiguousarray(atoms.numbers, dtype=np.int64)
    return numbers, positions, cell, pbc
