"""Uncertainty-gated MD: a Cu–Al model stops itself where it no longer knows the physics.

1. Fit a small SOAP + sparse-GP model to rattled, strained fcc Cu–Al cells (25 % Al on random
   sites) labelled by ASE's EMT.
2. Calibrate its per-atom ``uncertainty`` (eV/Å, an estimate of each atom's force error) on
   held-out labelled cells: ``model.calibrate(frames)``.
3. Run Langevin MD at 300 K with an :class:`~kmlip.active.UncertaintyGate` at 5 × the
   calibrated noise level (the median uncertainty of the held-out cells; the most uncertain
   of 32 atoms in 200 steps of ordinary MD reaches about 4 ×, a false alarm at 4 ×): on a
   cell like the training data it runs to the end; on a cell
   compressed by 15 % in volume and heated to 1500 K the gate trips, writes the frame and the
   run stops cleanly. EMT on the tripped frame shows whether the gate was right to stop.

The same from the command line::

    kmlip eval cual.kmlip heldout.extxyz --calibrate -o cual.kmlip
    kmlip md cual.kmlip compressed.extxyz --steps 300 --temperature 1500 \\
        --gate-relative 5 -o traj.extxyz

Runs in about 10 s on 2 cores. Writes into ``gated_md_out/``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from ase import units
from ase.calculators.emt import EMT
from ase.io import write
from ase.md.langevin import Langevin

from kmlip import SOAP, KernelPotential, KMLIPCalculator
from kmlip.active import UncertaintyGate, run_gated
from kmlip.datasets import emt_frames

OUT = "gated_md_out"
CUAL = ("Cu", "Cu", "Cu", "Al")  # species drawn uniformly per site: 25 % Al
A = 3.72  # Å, Vegard's law between Cu (3.61) and Al (4.05)


def gated_run(model, atoms, temperature: float, steps: int, name: str):
    """Langevin MD of ``atoms`` with the model, stopped by a gate at 5 × the noise level."""
    atoms = atoms.copy()
    atoms.calc = KMLIPCalculator(model, variances=("uncertainty",))
    rng = np.random.default_rng(1)
    m = atoms.get_masses()
    p = np.sqrt(m * units.kB * temperature)[:, None] * rng.standard_normal((len(atoms), 3))
    atoms.set_momenta(p - m[:, None] * p.sum(0) / m.sum())
    dyn = Langevin(atoms, timestep=2 * units.fs, temperature_K=temperature,
                   friction=0.02 / units.fs, fixcm=False, rng=rng)
    gate = UncertaintyGate(atoms, relative=5.0, output=os.path.join(OUT, f"{name}.tripped.xyz"),
                           log=sys.stdout)
    done = run_gated(dyn, steps, gate)
    return gate, done


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    train = emt_frames(30, symbols=CUAL, a=A, rattle=0.08, strain=0.03, seed=0)
    heldout = emt_frames(10, symbols=CUAL, a=A, rattle=0.08, strain=0.03, seed=1)
    model = KernelPotential(SOAP(species=["Cu", "Al"], r_cut=4.5, n_max=6, l_max=4),
                            n_sparse=400, sigma_energy=0.002, sigma_force=0.02,
                            sigma_stress=0.02, random_state=0)
    model.fit(train)
    err = model.error_metrics(heldout)
    print(f"fitted on {len(train)} cells of 32 atoms; held-out force MAE "
          f"{1e3 * err['forces_mae']:.1f} meV/Å, energy MAE {1e3 * err['energy_mae']:.2f} "
          "meV/atom")
    rep = model.calibrate(heldout)
    print(f"calibrated on {rep['n_atoms']} held-out atoms: measure {rep['measure']!r}, "
          f"u = sqrt({rep['floor']:.3g}² + {rep['scale']:.3g}² m) eV/Å; errors within ±2u "
          f"{100 * rep['coverage_before']:.0f} % before, {100 * rep['coverage_after']:.0f} % "
          f"after; noise level (median u) {rep['median_uncertainty']:.3f} eV/Å")
    model.save(os.path.join(OUT, "cual.kmlip"))

    start = emt_frames(1, symbols=CUAL, a=A, rattle=0.0, strain=0.0, seed=7)[0]
    print("\n-- 1. a cell like the training data, 300 K, 200 steps of 2 fs")
    gate, done = gated_run(model, start, 300.0, 200, "ordinary")
    print(f"ran {done} steps; largest per-atom uncertainty {max(gate.history):.3f} eV/Å "
          f"(threshold {gate.threshold:.3f} eV/Å): {'tripped' if gate.tripped else 'not tripped'}")

    squeezed = start.copy()
    squeezed.set_cell(squeezed.cell * 0.85 ** (1 / 3), scale_atoms=True)
    print("\n-- 2. the same cell compressed by 15 % in volume, heated to 1500 K, up to 300 steps")
    gate, done = gated_run(model, squeezed, 1500.0, 300, "compressed")
    if gate.tripped is None:
        print(f"ran {done} steps without tripping (largest uncertainty "
              f"{max(gate.history):.3f} eV/Å)")
        return 0
    t = gate.tripped
    frame = t.atoms.copy()
    frame.calc = EMT()
    f_emt = frame.get_forces()
    r = model.compute(t.atoms, ("forces", "uncertainty"))
    e_atom = np.linalg.norm(r.forces - f_emt, axis=1) / np.sqrt(3)
    worst = int(np.argmax(r.uncertainty))
    print(f"stopped cleanly at step {t.step} (t = {2 * t.step} fs): atom {worst} "
          f"({t.atoms.get_chemical_symbols()[worst]}) uncertainty {t.max_uncertainty:.3f} eV/Å "
          f"> threshold {t.threshold:.3f} eV/Å")
    rms = 1e3 * np.sqrt(np.mean(e_atom ** 2))
    print(f"EMT on the tripped frame: RMS force-error component {rms:.0f} meV/Å (held-out "
          f"training-like data: {1e3 * err['forces_rmse']:.0f} meV/Å); the most "
          f"uncertain atom's error {1e3 * e_atom[worst]:.0f} meV/Å, median uncertainty of the "
          f"frame {1e3 * np.median(r.uncertainty):.0f} meV/Å")
    write(os.path.join(OUT, "compressed_start.xyz"), squeezed)
    print(f"the tripped frame is in {OUT}/compressed.tripped.xyz: label it with the reference "
          "and refit (kmlip learn does this on the fly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
