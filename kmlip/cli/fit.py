"""``kmlip fit``: fits a SOAP + sparse-GP potential to labelled structures."""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", help="training structures (any ASE-readable file, e.g. extxyz)")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--species", nargs="+", default=None,
                   help="species (default: those in the training file)")
    p.add_argument("--r-cut", type=float, default=5.0, help="cutoff radius, Å")
    p.add_argument("--n-max", type=int, default=8)
    p.add_argument("--l-max", type=int, default=6)
    p.add_argument("--sigma", type=float, default=0.5, help="atom width, Å")
    p.add_argument("--zeta", type=int, default=4)
    p.add_argument("--delta", type=float, default=0.2, help="kernel scale, eV")
    p.add_argument("--n-sparse", type=int, default=1000, help="sparse points per species")
    p.add_argument("--sparse-method", default="cur", choices=["cur", "fps", "random"])
    p.add_argument("--sigma-energy", type=float, default=0.002, help="eV per atom")
    p.add_argument("--sigma-force", type=float, default=0.02, help="eV/Å")
    p.add_argument("--sigma-stress", type=float, default=None,
                   help="eV per atom on the virial (default: stress not used)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--optimize", action="store_true",
                   help="maximise the log marginal likelihood over delta and the sigmas")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from kmlip import SOAP, KernelPotential
    from kmlip.cli.predict import read_frames

    frames = read_frames(args.train)
    species = args.species or sorted({s for a in frames for s in a.get_chemical_symbols()})
    soap = SOAP(species=species, r_cut=args.r_cut, n_max=args.n_max, l_max=args.l_max,
                sigma=args.sigma)
    model = KernelPotential(descriptor=soap, zeta=args.zeta, delta=args.delta,
                            n_sparse=args.n_sparse, sparse_method=args.sparse_method,
                            sigma_energy=args.sigma_energy, sigma_force=args.sigma_force,
                            sigma_stress=args.sigma_stress, energy_key=args.energy_key,
                            forces_key=args.forces_key, stress_key=args.stress_key,
                            n_threads=args.threads, random_state=args.seed, progress=True)
    t0 = time.perf_counter()
    model.fit(frames, optimize=args.optimize)
    print(f"fitted {len(frames)} structures in {time.perf_counter() - t0:.1f} s")
    if args.optimize:
        print(f"hyperparameters: {model.hyperparameters_}")
    err = model.evaluate(frames)
    print("training errors: " + ", ".join(f"{k} {v:.4g}" for k, v in err.items()))
    model.save(args.output)
    print(f"wrote {args.output}")
    return 0
