"""``kmlip predict``: energies, forces, stress and their uncertainties for structures."""
from __future__ import annotations

import argparse

import numpy as np

from kmlip.cli._files import check_output, check_readable, load_model, read_structures

DESCRIPTION = (
    "Predict the energy (eV), forces (eV/Å) and, for periodic cells, stress (eV/Å³, ASE's "
    "sign and Voigt order) of every structure in a file, with the epistemic standard "
    "deviations of the total and per-atom energies. Prints one line per structure; -o also "
    "writes them to an extxyz file.")


def read_frames(path: str, format: str | None = None):
    """All structures of an ASE-readable file (see :func:`kmlip.cli._files.read_structures`)."""
    return read_structures(path, format=format)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")
    p.add_argument("structures", help="structures to predict: any file ASE can read "
                                      "(extxyz, POSCAR, cif, ...), all frames are used")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="also write the structures with the predictions to this extxyz file: "
                        "energy (eV), forces (eV/Å), stress (eV/Å³), info 'energy_std' (eV), "
                        "arrays 'energies_std' (eV) and, with --forces-var, 'forces_std' "
                        "(eV/Å); written atomically, an existing file is replaced only on "
                        "success (default: no file)")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="ASE format name of the structures file, e.g. extxyz "
                        "(default: guessed from the file name and content)")
    p.add_argument("--forces-var", action="store_true",
                   help="also compute the epistemic variance of every force component "
                        "(costs about as much again as the forces; default: off)")


def _property(calc, atoms, name):
    """``name`` from the calculator, or None if it does not implement it."""
    if name not in calc.implemented_properties:
        return None
    return calc.get_property(name, atoms)


def run(args: argparse.Namespace) -> int:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from kmlip import KMLIPCalculator

    if args.output:
        check_output(args.output, {"model file": args.model,
                                   "structures file": args.structures})
    # cheap checks first: a bad structures file fails before the model (and scikit-learn) loads
    check_readable(args.model, "model file")
    frames = read_structures(args.structures, format=args.format)
    model = load_model(args.model)
    out = []
    for k, atoms in enumerate(frames):
        a = atoms.copy()
        a.calc = KMLIPCalculator(model)
        try:
            r = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
            if np.all(a.pbc):
                r["stress"] = a.get_stress()
            e_var = _property(a.calc, a, "energy_var")
            energies_var = _property(a.calc, a, "energies_var")
            forces_var = _property(a.calc, a, "forces_var") if args.forces_var else None
        except (ValueError, TypeError) as exc:
            from kmlip.cli._files import first_line

            raise ValueError(f"{args.structures}: structure {k}: {first_line(exc)}") from None
        line = f"{k}: {len(a)} atoms  E = {r['energy']:.6f} eV"
        b = atoms.copy()
        if e_var is not None:
            std = float(np.sqrt(max(float(e_var), 0.0)))
            b.info["energy_std"] = std
            line += f"  std(E) = {1000 * std:.3f} meV"
        if energies_var is not None:
            b.arrays["energies_std"] = np.sqrt(np.maximum(energies_var, 0.0))
        if forces_var is not None:
            b.arrays["forces_std"] = np.sqrt(np.maximum(forces_var, 0.0))
        print(line)
        b.calc = SinglePointCalculator(b, **r)
        out.append(b)
    if args.output:
        from kmlip.io import atomic_write

        atomic_write(args.output, lambda fh: write(fh, out, format="extxyz"), text=True)
        print(f"wrote {args.output}")
    return 0
