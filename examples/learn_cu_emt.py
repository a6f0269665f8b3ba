"""On-the-fly learning of fcc Cu with EMT as the reference.

108 atoms at 1000 K, a few hundred Langevin steps of 1 fs with the model; EMT is called only
where an atom's uncertainty passes the gate. Then the learned model is tested on 20 frames of an
independent EMT run (other seed, frames 25 steps apart). Prints the reference calls, the force
MAE and the CPU time. A few seconds to a minute on 2 cores.

Run: ``python examples/learn_cu_emt.py [--steps 500] [--out run_cu_emt]`` (an existing run
directory is resumed; delete it to start over).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from kmlip.active import learn_on_the_fly
from kmlip.datasets import langevin_frames
from kmlip.uncertainty import spearman


def independent_frames(n: int = 20, every: int = 25, seed: int = 1234, temperature=1000.0):
    """Frames of an EMT Langevin run from another seed, with their EMT forces (100 steps of
    1 fs leave the perfect lattice behind first)."""
    return langevin_frames(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3), EMT(), n, every,
                           temperature, seed=seed, forces_key="emt_forces")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1000.0)
    p.add_argument("--out", default="run_cu_emt", help="run directory (resumed if present)")
    args = p.parse_args()

    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)  # 108 atoms
    t0 = time.process_time()
    res = learn_on_the_fly(start, EMT(), steps=args.steps, temperature=args.temperature,
                           timestep=1.0, directory=args.out, seed=0)
    cpu_learn = time.process_time() - t0
    print(f"{res.steps} steps, {res.n_reference_calls} reference calls "
          f"(the start structure included), "
          f"{res.model.fitted_state_.basis.n_sparse} sparse points, "
          f"learning CPU time {cpu_learn:.1f} s")
    for rec in res.calls:
        mae = rec.get("force_mae")
        print(f"  call {rec['call']}: step {rec['step']}"
              + ("" if mae is None else f", force MAE before the update {1000 * mae:.1f} meV/Å"))

    test = independent_frames()
    err, u = [], []
    for a in test:
        r = res.model.compute(a, ("forces", "uncertainty"))
        err.append(r.forces - a.arrays["emt_forces"])
        u.append(r.uncertainty)
    err, u = np.concatenate(err), np.concatenate(u)
    mae = float(np.mean(np.abs(err)))
    rho = spearman(u, np.linalg.norm(err, axis=1))
    print(f"force MAE on {len(test)} frames of an independent EMT run: {1000 * mae:.1f} meV/Å "
          f"(RMSE {1000 * float(np.sqrt(np.mean(err ** 2))):.1f}); per-atom uncertainty vs "
          f"force error Spearman {rho:.2f}; errors within ±2 uncertainty "
          f"{100 * float(np.mean(np.abs(err) <= 2 * u[:, None])):.0f} %")


if __name__ == "__main__":
    main()
