"""Full vs species-compressed SOAP (issue 11 item 4) on a five-element EMT data set.

Data: random substitutional fcc alloys of Cu, Ag, Au, Ni and Pd (each site drawn uniformly),
32-atom cubic cells with the composition-weighted (Vegard) lattice constant of ASE's reference
states, a random symmetric strain of at most ±2%, Gaussian displacements of 0.1 Å, labelled by
ASE's EMT (energy, forces). Training cells seed 0, test cells seed 1 (cached as extxyz under
``benchmarks/out/``).

For ``compression`` = "off" (the full power spectrum), "mu1nu1" and "mu2", with the same SOAP
(r_cut 5 Å, 0.5 Å smooth cutoff, atom width 0.5 Å, n_max and l_max from the command line,
default 8 and 6), all on one thread (``n_threads=1``; CPU time by ``time.process_time``):

- ``F``: features per atom;
- ``grad atoms/CPU-s``: ``SOAP.transform(atoms, gradients=True)`` over the test cells, atoms per
  CPU-second (median of ``--repeat`` passes, the three modes interleaved in every pass);
- ``backprop atoms/CPU-s``: ``SOAP.backprop`` (features and the force contraction of the
  prediction path) with a fixed random cotangent, measured the same way;
- ``fit CPU s``: ``KernelPotential.fit`` on the training cells (energies and forces, ζ = 4,
  δ = 0.2, σ_E = 0.002 eV/atom, σ_F = 0.02 eV/Å, ``--n-sparse`` CUR points per species);
- held-out energy RMSE (meV/atom) and force RMSE/MAE (eV/Å) on the test cells.

Ratios are to the full spectrum of the same run. ``--quick`` uses fewer cells and smaller
n_max/l_max (seconds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT_DIR,
    cached_frames,
    emt_snapshot,
    fmt,
    format_table,
    random_strain,
)

METALS = ("Cu", "Ag", "Au", "Ni", "Pd")
MODES = ("off", "mu1nu1", "mu2")


def five_metal_cells(n_cells: int, seed: int, rattle: float = 0.1, max_strain: float = 0.02):
    """``n_cells`` random 32-atom fcc alloys of :data:`METALS`, EMT-labelled (energy, forces,
    stress); see the module docstring."""
    from ase.build import bulk
    from ase.data import atomic_numbers, reference_states

    a_ref = {s: reference_states[atomic_numbers[s]]["a"] for s in METALS}
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_cells):
        symbols = rng.choice(METALS, 32)
        a = float(np.mean([a_ref[s] for s in symbols]))
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
        atoms.symbols = symbols
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + random_strain(rng, max_strain)),
                       scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
        frames.append(emt_snapshot(atoms))
    return frames


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--n-max", type=int, default=8)
    ap.add_argument("--l-max", type=int, default=6)
    ap.add_argument("--n-sparse", type=int, default=100, help="CUR points per species")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.n_max, args.l_max = 12, 4, 4, 3
        args.n_sparse, args.repeat = 30, 1

    from kmlip import SOAP
    from kmlip.model import KernelPotential

    train = cached_frames(OUT_DIR / f"soap_compression_train_{args.n_train}.xyz",
                          lambda: five_metal_cells(args.n_train, seed=0))
    test = cached_frames(OUT_DIR / f"soap_compression_test_{args.n_test}.xyz",
                         lambda: five_metal_cells(args.n_test, seed=1))
    n_test_atoms = sum(len(a) for a in test)
    soaps = {m: SOAP(list(METALS), r_cut=5.0, n_max=args.n_max, l_max=args.l_max, sigma=0.5,
                     compression=m, n_threads=1) for m in MODES}
    rng = np.random.default_rng(0)
    cot = {m: [rng.standard_normal((len(a), s.n_features)) for a in test]
           for m, s in soaps.items()}

    grad_t = {m: [] for m in MODES}
    bp_t = {m: [] for m in MODES}
    for s in soaps.values():   # warm-up
        s.transform(test[0], gradients=True)
    for _ in range(args.repeat):   # modes interleaved in every pass: same machine state
        for m, s in soaps.items():
            grad_t[m].append(_cpu(lambda s=s: [s.transform(a, gradients=True) for a in test]))
            bp_t[m].append(_cpu(lambda s=s, m=m: [s.backprop(a, lambda X, c=c: c)
                                                  for a, c in zip(test, cot[m], strict=True)]))

    F_ref = np.concatenate([a.get_forces() for a in test])
    E_ref = np.array([a.get_potential_energy() / len(a) for a in test])
    rows = []
    for m, s in soaps.items():
        model = KernelPotential(s, zeta=4, delta=0.2, n_sparse=args.n_sparse,
                                sparse_method="cur", sigma_energy=0.002, sigma_force=0.02,
                                random_state=0, n_threads=1)
        fit_cpu = _cpu(lambda model=model: model.fit(train))
        E = np.asarray(model.predict(test)) / np.array([len(a) for a in test])
        F = np.concatenate(model.predict_forces(test))
        rows.append(dict(mode=m, F=s.n_features,
                         grad=n_test_atoms / np.median(grad_t[m]),
                         bp=n_test_atoms / np.median(bp_t[m]), fit=fit_cpu,
                         e_rmse=1000 * np.sqrt(np.mean((E - E_ref) ** 2)),
                         f_rmse=np.sqrt(np.mean((F - F_ref) ** 2)),
                         f_mae=np.mean(np.abs(F - F_ref))))
    full = rows[0]
    for r in rows:
        r["grad_x"] = r["grad"] / full["grad"]
        r["bp_x"] = r["bp"] / full["bp"]
        r["fit_x"] = full["fit"] / r["fit"]

    print(f"five-element EMT fcc alloys {'/'.join(METALS)}: {len(train)} training and "
          f"{len(test)} test cells of 32 atoms; SOAP r_cut 5, n_max {args.n_max}, l_max "
          f"{args.l_max}, sigma 0.5; {args.n_sparse} CUR points per species; 1 thread")
    print(f"force scale (RMS of test forces): {np.sqrt(np.mean(F_ref ** 2)):.3f} eV/Å")
    print(format_table(rows, [("mode", "compression"), ("F", "F"),
                              ("grad", "grad atoms/CPU-s"), ("grad_x", "x full"),
                              ("bp", "backprop atoms/CPU-s"), ("bp_x", "x full"),
                              ("fit", "fit CPU s"), ("fit_x", "x full"),
                              ("e_rmse", "E RMSE meV/atom"), ("f_rmse", "F RMSE eV/Å"),
                              ("f_mae", "F MAE eV/Å")]))
    print("target (issue 11): compressed SOAP with 5 species >= 3x the full SOAP's speed with "
          "gradients at the same n_max, l_max: "
          + ", ".join(f"{r['mode']} {fmt(r['grad_x'])}x" for r in rows[1:]))


if __name__ == "__main__":
    main()
