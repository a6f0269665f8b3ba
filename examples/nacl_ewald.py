"""Rock-salt NaCl: a local GP misses the long-range Coulomb energy; GP + Ewald baseline gets it.

Reference potential (written here): Born–Mayer repulsion between unlike ions within 5 Å,
``B exp(-r / rho)`` shifted to zero at the cutoff, plus the full Coulomb energy of +1/−1 point
charges by Ewald summation (checked against the Madelung constant of rock salt).

Training data: rattled, strained 64-ion cells near equilibrium. Held-out tests probe the long
range: an energy–volume curve over ±6% in lattice constant, and cells with a separated Na/Cl
vacancy pair (a neutral defect whose energy depends on the distance between the two vacancies
far beyond the 5 Å SOAP cutoff).

Run: ``python examples/nacl_ewald.py`` (about a minute); ``--quick`` for a smaller run.
"""
from __future__ import annotations

import argparse

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list

from kmlip import SOAP, Ewald, KernelPotential

CHARGES = {"Na": 1.0, "Cl": -1.0}
A0 = 5.64          # Å, lattice constant
RHO = 0.317        # Å, Born–Mayer range
R_CUT_BM = 5.0     # Å
MADELUNG_NACL = 1.747564594633
KE = 14.399645     # eV Å
# B such that the nearest-neighbour model is in equilibrium at A0 (per ion pair:
# dE/dr0 = M ke / r0^2 - 6 B/rho exp(-r0/rho) = 0)
B_BM = MADELUNG_NACL * KE * RHO * np.exp(A0 / 2 / RHO) / (6 * (A0 / 2) ** 2)


class BornMayerCoulomb(Calculator):
    """Reference NaCl potential: shifted Born–Mayer (Na–Cl pairs) + Ewald Coulomb."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, coulomb: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.coulomb = coulomb
        self.ewald = Ewald(charges=CHARGES, accuracy=1e-8)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        i, j, d, D = neighbor_list("ijdD", a, R_CUT_BM)
        q = np.array([CHARGES[s] for s in a.get_chemical_symbols()])
        unlike = q[i] * q[j] < 0
        i, j, d, D = i[unlike], j[unlike], d[unlike], D[unlike]
        e_pair = B_BM * (np.exp(-d / RHO) - np.exp(-R_CUT_BM / RHO))
        de = -B_BM / RHO * np.exp(-d / RHO)           # dE_pair/dr
        energy = 0.5 * e_pair.sum()                    # full list: each pair twice
        fvec = 0.5 * (de / d)[:, None] * D             # dE/dr_j of each listed pair
        forces = np.zeros((len(a), 3))
        np.add.at(forces, j, -fvec)
        np.add.at(forces, i, fvec)
        virial = fvec.T @ D                            # dE/d strain
        stress = 0.5 * (virial + virial.T) / a.get_volume()
        if self.coulomb:
            ec, fc, sc = self.ewald.compute(a)
            energy += ec
            forces += fc
            stress = stress + _full(sc)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces,
                        "stress": _voigt(stress)}


def _full(voigt):
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _voigt(s):
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def labelled(atoms: Atoms) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = BornMayerCoulomb()
    r = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
         "stress": atoms.get_stress()}
    atoms.calc = SinglePointCalculator(atoms, **r)
    return atoms


def crystal(a: float = A0, repeat: int = 2) -> Atoms:
    return bulk("NaCl", "rocksalt", a=a, cubic=True).repeat(repeat)


def training_set(n: int, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = crystal(A0 * (1 + rng.uniform(-0.02, 0.02)))
        eps = rng.uniform(-0.01, 0.01, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)).T, scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        frames.append(labelled(atoms))
    return frames


def vacancy_pairs(seed: int = 1) -> list[Atoms]:
    """A Na and a Cl vacancy at increasing separations in a 3x3x3 cubic cell (216 sites)."""
    base = crystal(A0, 3)
    na = [k for k, s in enumerate(base.get_chemical_symbols()) if s == "Na"]
    cl = [k for k, s in enumerate(base.get_chemical_symbols()) if s == "Cl"]
    frames = []
    first = na[0]
    d = base.get_distances(first, cl, mic=True)
    for target in (2.82, 4.9, 6.3, 8.5):
        k = cl[int(np.argmin(np.abs(d - target)))]
        atoms = base.copy()
        del atoms[[first, k]]
        rng = np.random.default_rng(seed)
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        frames.append(labelled(atoms))
    return frames


def energy_volume(scales=(0.94, 0.96, 0.98, 1.0, 1.02, 1.04, 1.06)) -> list[Atoms]:
    return [labelled(crystal(A0 * s)) for s in scales]


def make_model(baseline) -> KernelPotential:
    return KernelPotential(
        descriptor=SOAP(species=["Na", "Cl"], r_cut=5.0, n_max=6, l_max=4, sigma=0.5),
        zeta=4, delta=0.5, n_sparse=150, sigma_energy=0.001, sigma_force=0.02,
        sigma_stress=0.005, baseline=baseline, random_state=0)


def run(n_train: int = 30) -> dict[str, dict[str, float]]:
    """Fits both models and returns their held-out errors (meV/atom)."""
    train = training_set(n_train)
    tests = {"energy-volume": energy_volume(), "vacancy pairs": vacancy_pairs()}
    out = {}
    for name, baseline in (("GP only", None), ("GP + Ewald", Ewald(charges=CHARGES))):
        model = make_model(baseline).fit(train)
        out[name] = {}
        for tname, frames in tests.items():
            ref = np.array([a.get_potential_energy() / len(a) for a in frames])
            pred = model.predict(frames) / np.array([len(a) for a in frames])
            # relative energies remove any constant offset: what matters is the curve's shape
            err = (pred - pred.mean()) - (ref - ref.mean())
            out[name][tname] = 1000 * float(np.sqrt(np.mean(err**2)))
        out[name]["train force MAE (meV/Å)"] = 1000 * model.evaluate(train)["forces_mae"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    e = labelled(crystal(A0, 1))
    coul = Ewald(charges=CHARGES, accuracy=1e-10).compute(crystal(A0, 1))[0]
    print(f"Coulomb energy per ion pair {coul / 4:.10f} eV "
          f"(Madelung: {-MADELUNG_NACL * KE / (A0 / 2):.10f} eV); "
          f"reference total {e.get_potential_energy() / 4:.4f} eV per ion pair")
    res = run(12 if args.quick else 30)
    print(f"{'model':12s} {'E-V RMSE':>12s} {'vacancy RMSE':>14s} {'train F MAE':>12s}")
    for name, r in res.items():
        print(f"{name:12s} {r['energy-volume']:9.2f} meV {r['vacancy pairs']:11.2f} meV "
              f"{r['train force MAE (meV/Å)']:9.1f} meV/Å")


if __name__ == "__main__":
    main()
