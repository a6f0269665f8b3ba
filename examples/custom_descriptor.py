"""A user-written descriptor: smooth coordination numbers, fitted with kmlip's sparse GP.

The descriptor protocol (``kmlip.descriptors.base.Descriptor``) asks for little:

* ``__init__`` stores its arguments under their own names and calls ``_setup``, which validates
  them and sets ``species_z`` (atomic numbers), ``n_features`` and ``cutoff`` (Å);
* ``transform(atoms, gradients=False, n_threads=None)`` returns the features ``X`` of every
  atom, (n_atoms, n_features), and with ``gradients=True`` also their derivatives as
  :class:`~kmlip.descriptors.base.PairGradients` (per centre: a self entry, then one entry per
  neighbour-list pair, each with the pair vector, which also gives the cell derivative);
* everything else has defaults: ``environments`` (one per atom, keyed by Z), ``backprop`` (forces
  and virial by contracting the pair gradients), ``make_basis`` (the normalised dot-product
  kernel of degree ζ), ``get_params``/``to_dict`` (model files; register the class in
  ``kmlip.descriptors.registry`` to load such files).

Here: for each neighbour species b and width w, ``X[i, (b, w)] = sum_j fc(r_ij) exp(-r_ij^2 /
w^2)`` over neighbours j of species b, with a cosine cutoff fc. Run it::

    python examples/custom_descriptor.py
"""
from __future__ import annotations

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from kmlip import KernelPotential
from kmlip.descriptors.base import Descriptor, PairGradients
from kmlip.neighbors import neighbor_list


class Coordination(Descriptor):
    """Smooth coordination numbers per neighbour species and Gaussian width.

    Parameters
    ----------
    species : list of str
    r_cut : float
        Cutoff, Å.
    widths : list of float
        Gaussian widths w, Å.
    """

    def __init__(self, species, r_cut: float = 5.0, widths=(1.5, 2.5, 3.5)):
        self.species = species
        self.r_cut = r_cut
        self.widths = widths
        self._setup()

    def _setup(self) -> None:
        if not self.species or any(s not in atomic_numbers for s in self.species):
            raise ValueError(f"species must be chemical symbols, got {self.species!r}")
        if not float(self.r_cut) > 0:
            raise ValueError(f"r_cut must be > 0 Å, got {self.r_cut!r}")
        self.species_z = tuple(sorted(atomic_numbers[s] for s in self.species))
        self._w = np.asarray(self.widths, dtype=np.float64)
        self.n_features = len(self.species_z) * len(self._w)
        self.cutoff = float(self.r_cut)

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        nl = neighbor_list(atoms, self.cutoff)
        block = {z: k for k, z in enumerate(self.species_z)}
        Z = atoms.numbers
        d = nl.distances
        fc = 0.5 * (1 + np.cos(np.pi * d / self.cutoff))
        dfc = -0.5 * np.pi / self.cutoff * np.sin(np.pi * d / self.cutoff)
        g = np.exp(-(d[:, None] / self._w) ** 2)
        phi = fc[:, None] * g                                           # (n_pairs, n_w)
        dphi = dfc[:, None] * g - fc[:, None] * g * 2 * d[:, None] / self._w**2
        cols = np.array([block[z] for z in Z[nl.neighbors]], dtype=np.int64)[:, None] \
            * len(self._w) + np.arange(len(self._w))
        X = np.zeros((len(atoms), self.n_features))
        np.add.at(X, (nl.centers[:, None], cols), phi)
        if not gradients:
            return X
        # d X_i / d r_j = phi'(r) r_hat for the pair (i, j); the centre moves the other way
        rhat = nl.vectors / d[:, None]
        pair = np.zeros((len(d), 3, self.n_features))
        for k in range(len(self._w)):
            pair[np.arange(len(d)), :, cols[:, k]] = rhat * dphi[:, k:k + 1]
        n = len(atoms)
        values = np.zeros((n + len(d), 3, self.n_features))
        G = PairGradients.from_neighbor_list(nl, values)
        is_pair = np.ones(len(values), dtype=bool)
        is_pair[G.offsets[:-1]] = False
        values[is_pair] = pair
        self_terms = np.zeros((n, 3, self.n_features))
        np.add.at(self_terms, nl.centers, -pair)
        values[G.offsets[:-1]] = self_terms
        return X, G


def labelled_cells(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 2, 2))
        a.symbols[rng.random(len(a)) < 0.3] = "Al"
        a.rattle(0.1, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        out.append(a)
    return out


def main(n_train: int = 20, n_test: int = 5) -> dict:
    model = KernelPotential(Coordination(["Cu", "Al"]), zeta=2, n_sparse=50, random_state=0)
    model.fit(labelled_cells(n_train, 0))
    err = model.error_metrics(labelled_cells(n_test, 1))
    print("held-out errors: " + ", ".join(f"{k} {v:.4f}" for k, v in err.items()))
    return err


if __name__ == "__main__":
    main()
