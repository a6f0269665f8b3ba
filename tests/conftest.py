"""Shared fixtures: small ASE-EMT Cu–Al data sets and cheap descriptors."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def load_example(name: str):
    """The module ``examples/<name>.py`` (examples are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def label(atoms: Atoms) -> Atoms:
    """Attaches EMT energy, forces and (periodic) stress as a SinglePointCalculator."""
    atoms.calc = EMT()
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    s = atoms.get_stress() if np.all(atoms.pbc) else None
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
    return atoms


def cual_cells(n: int, seed: int, repeat=(2, 1, 1), frac_al: float = 0.3,
               rattle: float = 0.1, strain: float = 0.03) -> list[Atoms]:
    """Rattled, strained fcc Cu–Al cells (8 atoms by default), EMT-labelled."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(repeat)
        al = rng.random(len(a)) < frac_al
        a.symbols[al] = "Al"
        eps = strain * rng.standard_normal((3, 3))
        a.set_cell(a.cell @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.rattle(rattle, seed=int(rng.integers(1 << 30)))
        out.append(label(a))
    return out


def cual_cluster(seed: int = 0) -> Atoms:
    """A 13-atom non-periodic Cu–Al cuboctahedron-like cluster, rattled, EMT-labelled."""
    from ase.cluster import Octahedron

    rng = np.random.default_rng(seed)
    a = Octahedron("Cu", 3, cutoff=1, latticeconstant=3.65)
    a.symbols[rng.random(len(a)) < 0.3] = "Al"
    a.pbc = False
    a.rattle(0.08, seed=int(rng.integers(1 << 30)))
    return label(a)


@pytest.fixture(scope="session")
def d2b():
    from kmlip.descriptors.histogram import PairHistogram

    return PairHistogram(["Cu", "Al"], r_cut=4.5, n_max=8)


@pytest.fixture(scope="session")
def train_frames():
    return cual_cells(40, seed=0)


@pytest.fixture(scope="session")
def test_frames():
    return cual_cells(15, seed=1)


@pytest.fixture(scope="session")
def fitted(d2b, train_frames):
    """A model fitted on energies, forces and stresses (session-wide; do not mutate)."""
    from kmlip.model import KernelPotential

    m = KernelPotential(d2b, n_sparse=60, sigma_energy=0.002, sigma_force=0.02,
                        sigma_stress=0.02, random_state=0, n_threads=1)
    return m.fit(train_frames)


def soap_or_skip(**kw):
    """A small SOAP descriptor, or skip the test when the compiled SOAP is unavailable."""
    try:
        from kmlip.descriptors.soap import SOAP

        s = SOAP(**{"species": ["Cu", "Al"], "r_cut": 4.0, "n_max": 3, "l_max": 2,
                    "sigma": 0.5, **kw})
        s.transform(bulk("Cu", "fcc", a=3.6))
        return s
    except (ImportError, NotImplementedError) as exc:  # pragma: no cover
        pytest.skip(f"SOAP unavailable: {exc}")


def triclinic_cell(seed=0, symbols="CuAlCuAlCu") -> Atoms:
    """A small random triclinic periodic cell (cutoffs reach several images)."""
    rng = np.random.default_rng(seed)
    cell = np.array([[4.1, 0.0, 0.0], [1.3, 3.9, 0.0], [0.7, 0.9, 4.3]])
    frac = rng.random((len(Atoms(symbols)), 3))
    return Atoms(symbols, scaled_positions=frac, cell=cell, pbc=True)


def fd_forces(energy, atoms, h=1e-5) -> np.ndarray:
    """Forces ``-dE/dr`` of a scalar ``energy(atoms)`` by central differences, (n_atoms, 3)."""
    out = np.zeros((len(atoms), 3))
    for j in range(len(atoms)):
        for a in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[j, a] += h
            m.positions[j, a] -= h
            out[j, a] = -(energy(p) - energy(m)) / (2 * h)
    return out


def fd_positions(desc, atoms, h=1e-5) -> np.ndarray:
    """Central differences of a descriptor's features, (n_env, n_atoms, 3, F): n_env rows of
    ``desc.transform`` (atoms, or pairs for Distance2b)."""
    n = len(atoms)
    out = None
    for j in range(n):
        for a in range(3):
            p, m = atoms.copy(), atoms.copy()
            p.positions[j, a] += h
            m.positions[j, a] -= h
            d = (desc.transform(p) - desc.transform(m)) / (2 * h)
            if out is None:
                out = np.zeros((d.shape[0], n, 3, d.shape[1]))
            out[:, j, a] = d
    return out


def fd_strain(desc, atoms, h=1e-6) -> np.ndarray:
    """Central differences of the features under cell strain, (n_env, 3, 3, F)."""
    out = None
    cell = atoms.cell.array
    for a in range(3):
        for b in range(3):
            res = []
            for sign in (1, -1):
                e = np.eye(3)
                e[a, b] += sign * h
                s = atoms.copy()
                s.set_cell(cell @ e.T, scale_atoms=True)
                res.append(desc.transform(s))
            if out is None:
                out = np.zeros((res[0].shape[0], 3, 3, res[0].shape[1]))
            out[:, a, b] = (res[0] - res[1]) / (2 * h)
    return out
