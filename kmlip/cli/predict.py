"""``kmlip predict``: energies, forces, stress and their uncertainties for structures."""
from __future__ import annotations

import argparse
import os

import numpy as np


def read_frames(path: str):
    """All structures of an ASE-readable file; a clear error if there are none."""
    from ase.io import read

    if not os.path.exists(path):
        raise ValueError(f"no such file: {path}")
    frames = read(path, index=":")
    if not frames:
        raise ValueError(f"{path} holds no structures")
    return frames


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")
    p.add_argument("structures", help="structures to predict (any ASE-readable file)")
    p.add_argument("-o", "--output", default=None,
                   help="write an extxyz with the predictions (energy, forces, stress, "
                        "energy_std, energies_std) to this path")
    p.add_argument("--forces-var", action="store_true", help="also force variances")


def run(args: argparse.Namespace) -> int:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from kmlip import KMLIPCalculator, load

    model = load(args.model)
    frames = read_frames(args.structures)
    out = []
    for k, atoms in enumerate(frames):
        a = atoms.copy()
        a.calc = KMLIPCalculator(model, forces_var=args.forces_var)
        e = a.get_potential_energy()
        r = dict(a.calc.results)
        std = float(np.sqrt(r["energy_var"]))
        print(f"{k}: {len(a)} atoms  E = {e:.6f} eV  std(E) = {1000 * std:.3f} meV")
        b = atoms.copy()
        b.info["energy_std"] = std
        b.arrays["energies_std"] = np.sqrt(r["energies_var"])
        if "forces_var" in r:
            b.arrays["forces_std"] = np.sqrt(r["forces_var"])
        b.calc = SinglePointCalculator(b, **{k2: r[k2] for k2 in ("energy", "forces", "stress")
                                            if k2 in r})
        out.append(b)
    if args.output:
        from kmlip.io import atomic_write

        atomic_write(args.output, lambda fh: write(fh, out, format="extxyz"), text=True)
        print(f"wrote {args.output}")
    return 0
