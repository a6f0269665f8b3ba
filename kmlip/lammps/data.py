"""LAMMPS data files from ASE structures, exactly (17 significant digits, no cell rotation).

LAMMPS wants a lower-triangular cell (a along x, b in the xy plane); :func:`lammps_cell_form`
rotates a structure into that form once, so that positions, forces and stresses of LAMMPS and
ASE are compared in the same frame without any further rotation.
"""
from __future__ import annotations

import numpy as np
from ase.data import atomic_masses, atomic_numbers


def lammps_cell_form(atoms):
    """A copy of ``atoms`` with its cell in LAMMPS's lower-triangular form and the positions
    wrapped into it (same crystal, rotated)."""
    atoms = atoms.copy()
    rcell, _ = atoms.cell.standard_form()
    atoms.set_cell(rcell, scale_atoms=True)
    atoms.wrap()
    return atoms


def write_lammps_data(atoms, path, species, charges=None, velocities=None) -> None:
    """Writes a LAMMPS data file (``atom_style atomic``, or ``charge`` with ``charges``).

    Parameters
    ----------
    atoms : ase.Atoms
        Periodic, with a lower-triangular cell (see :func:`lammps_cell_form`).
    path : str or os.PathLike
    species : sequence of str
        Chemical symbol of atom types 1, 2, ... (the order of the ``pair_coeff`` line).
    charges : array (n_atoms,), optional
        Charges in e (writes ``atom_style charge``).
    velocities : array (n_atoms, 3), optional
        Å/ps (LAMMPS metal units; ASE velocities times ``ase.units.fs * 1000``).

    Raises
    ------
    ValueError
        A cell that is not lower triangular, or a species not in ``species``.
    """
    c = np.asarray(atoms.cell, dtype=np.float64)
    if abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) > 1e-12 * np.abs(c).max():
        raise ValueError("the cell is not lower triangular: use lammps_cell_form(atoms) first")
    symbols = atoms.get_chemical_symbols()
    tid = {s: k + 1 for k, s in enumerate(species)}
    missing = sorted(set(symbols) - set(tid))
    if missing:
        raise ValueError(f"species {missing} of the structure are not in species={species}")
    masses = dict(zip(symbols, atoms.get_masses(), strict=True))

    def r(x) -> str:
        return repr(float(x))

    lines = ["LAMMPS data file written by kmlip", "", f"{len(atoms)} atoms",
             f"{len(species)} atom types", "",
             f"0.0 {r(c[0, 0])} xlo xhi", f"0.0 {r(c[1, 1])} ylo yhi",
             f"0.0 {r(c[2, 2])} zlo zhi", f"{r(c[1, 0])} {r(c[2, 0])} {r(c[2, 1])} xy xz yz", "",
             "Masses", ""]
    for s in species:
        lines.append(f"{tid[s]} {r(masses.get(s, atomic_masses[atomic_numbers[s]]))}")
    lines += ["", "Atoms # " + ("charge" if charges is not None else "atomic"), ""]
    for k, (s, p) in enumerate(zip(symbols, atoms.positions, strict=True)):
        q = f" {r(charges[k])}" if charges is not None else ""
        lines.append(f"{k + 1} {tid[s]}{q} {r(p[0])} {r(p[1])} {r(p[2])}")
    if velocities is not None:
        lines += ["", "Velocities", ""]
        for k, v in enumerate(np.asarray(velocities, dtype=np.float64)):
            lines.append(f"{k + 1} {r(v[0])} {r(v[1])} {r(v[2])}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


__all__ = ["lammps_cell_form", "write_lammps_data"]
