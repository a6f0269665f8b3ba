"""``kmlip demo``: fits a potential to EMT copper and reports its errors and uncertainty."""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from kmlip.cli._files import check_output

DESCRIPTION = (
    "Fit SOAP + sparse GP to rattled, strained 32-atom Cu cells labelled by ASE's EMT, print "
    "the test errors (energy meV/atom, forces meV/Å, stress meV/Å³), save and reload the model, "
    "and show the epistemic uncertainty rising for a compressed cell outside the training data.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="12 training and 6 test cells, 100 sparse points (a few seconds) "
                        "instead of 40, 20 and 300 (default: off)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="save the fitted model to this path (default: a temporary file)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the data and the sparse points (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from kmlip import SOAP, KernelPotential, KMLIPCalculator, load
    from kmlip.datasets import emt_frames

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.out:
        check_output(args.out)
    n_train, n_test = (12, 6) if args.quick else (40, 20)
    soap = SOAP(species=["Cu"], r_cut=4.5, n_max=6, l_max=4, sigma=0.5)
    print(f"kmlip demo: {n_train} training and {n_test} test cells of 32 Cu atoms (ASE EMT)")
    train = emt_frames(n_train, seed=args.seed)
    test = emt_frames(n_test, seed=args.seed + 1)
    model = KernelPotential(descriptor=soap, zeta=4, delta=0.2,
                            n_sparse=100 if args.quick else 300, sparse_method="cur",
                            sigma_energy=0.002, sigma_force=0.02, sigma_stress=0.02,
                            n_threads=args.threads, random_state=args.seed)
    t0 = time.perf_counter()
    model.fit(train)
    print(f"fit: {time.perf_counter() - t0:.2f} s")
    err = model.evaluate(test)
    spread = np.std(np.concatenate([a.get_forces().ravel() for a in test]))
    print(f"test energy MAE {1000 * err['energy_mae']:.2f} meV/atom, "
          f"force MAE {1000 * err['forces_mae']:.1f} meV/Å "
          f"(force spread {1000 * spread:.0f} meV/Å), "
          f"stress MAE {1000 * err['stress_mae']:.3f} meV/Å³")

    path = args.out or os.path.join(tempfile.mkdtemp(prefix="kmlip-demo-"), "demo.kmlip")
    model.save(path)
    model = load(path)
    atoms = test[0].copy()
    atoms.calc = KMLIPCalculator(model)
    e = atoms.get_potential_energy()
    std_in = np.sqrt(atoms.calc.get_property("energies_var", atoms)).mean()
    squeezed = test[0].copy()
    squeezed.set_cell(squeezed.cell * 0.85, scale_atoms=True)
    squeezed.calc = KMLIPCalculator(model)
    squeezed.get_potential_energy()
    std_out = np.sqrt(squeezed.calc.get_property("energies_var", squeezed)).mean()
    print(f"saved {path}; reloaded model energy of a test cell {e:.4f} eV")
    print(f"epistemic std of local energies: {1000 * std_in:.2f} meV (test cell), "
          f"{1000 * std_out:.2f} meV (15% compressed cell: outside the training data)")
    return 0
