"""GAP's ``distance_2b``: one environment per pair of atoms, described by its distance.

Environments are the unordered pairs ``(i, j, image)`` with ``r_ij < r_cut`` whose species pair is
one of ``pairs`` (all pairs of ``species`` by default); each pair is one local environment with
the single feature ``r_ij`` (Å). Its local energy enters the total as an atom's does, and is split
half and half between the two atoms in per-atom energies. The kernel between two pairs of the same
species pair is GAP's squared exponential on the distance, weighted by a smooth cutoff
(:class:`kmlip.pair_kernel.PairSEBasis`)::

    k(r, r') = delta^2 fc(r) fc(r') exp(-(r - r')^2 / (2 theta^2)),

with ``fc`` a shifted cosine going from 1 at ``r_cut - cutoff_width`` to 0 at ``r_cut``; pairs of
different species pairs do not correlate. Pairs come from kmlip's compiled neighbour list, and
the half list, keys and gradients from a compiled OpenMP pass over it (``kmlip/_ext/pairs.pyx``).

Gradients follow :class:`kmlip.descriptors.base.PairGradients` with environments as centres:
pair ``e = (i, j)`` has two entries, ``(e, i, -r_hat, 0)`` and ``(e, j, +r_hat, r_ij)``, so that
``sum values ⊗ vectors = r_hat ⊗ r_ij = d r / d eps`` (the virial).
"""
from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kmlip._validate import check_real, check_species, checked_system
from kmlip.descriptors.base import MAX_CUTOFF, Descriptor, Environments, PairGradients

#: Key of a species pair (a, b), a <= b: ``KEY_BASE * a + b``.
KEY_BASE = 1000


def pair_key(za: int, zb: int) -> int:
    """Kernel key of the species pair (order-independent)."""
    a, b = sorted((int(za), int(zb)))
    return KEY_BASE * a + b


class Distance2b(Descriptor):
    """GAP's two-body descriptor: pairs of atoms and their distance.

    Parameters
    ----------
    species : list of str or int
        Chemical symbols (or atomic numbers) of the structures it accepts.
    r_cut : float
        Cutoff radius, Å (> 0).
    theta : float, default 1.0
        Length scale of the squared-exponential kernel on the distance, Å (> 0).
    cutoff_width : float, default 0.5
        Width of the cosine transition ending at ``r_cut``, Å, in (0, r_cut].
    pairs : list of (str, str) or None
        Species pairs that get a two-body term (default: every pair of ``species``).

    Attributes
    ----------
    n_features : int
        1 (the distance).
    cutoff : float
        ``r_cut`` (Å).
    """

    atom_centred = False
    uses_zeta = False

    def __init__(self, species, r_cut: float, theta: float = 1.0, cutoff_width: float = 0.5,
                 pairs=None):
        self.species = species
        self.r_cut = r_cut
        self.theta = theta
        self.cutoff_width = cutoff_width
        self.pairs = pairs
        self._setup()

    def _setup(self) -> None:
        zs = check_species(self.species)
        r_cut = check_real("r_cut", self.r_cut, low=0.0, low_open=True, high=MAX_CUTOFF,
                           unit="Å")
        theta = check_real("theta", self.theta, low=0.0, low_open=True, high=1e3, unit="Å")
        cw = check_real("cutoff_width", self.cutoff_width, low=0.0, low_open=True, unit="Å")
        if cw > r_cut:
            raise ValueError(f"cutoff_width must be in (0, r_cut={r_cut:g}] Å, got "
                             f"{self.cutoff_width!r}")
        if self.pairs is None:
            keys = [pair_key(a, b) for a, b in combinations_with_replacement(zs, 2)]
        else:
            if isinstance(self.pairs, (str, bytes)) or not hasattr(self.pairs, "__iter__"):
                raise TypeError("pairs must be a list of (species, species) pairs or None")
            keys = []
            for p in self.pairs:
                if isinstance(p, (str, bytes)) or len(p) != 2:
                    raise ValueError(f"pairs: {p!r} is not a pair of species")
                zp = [atomic_numbers.get(s, 0) if isinstance(s, str) else int(s) for s in p]
                if any(z not in zs for z in zp):
                    raise ValueError(f"pairs: {p!r} has a species not in species "
                                     f"{[chemical_symbols[z] for z in zs]}")
                keys.append(pair_key(*zp))
            if not keys:
                raise ValueError("pairs must name at least one species pair")
        self.species_z = zs
        self._keys = tuple(sorted(set(keys)))
        self._r_cut, self._theta, self._cw = r_cut, theta, cw
        self.n_features = 1
        self.cutoff = r_cut

    # -- protocol ---------------------------------------------------------------------------
    def kernel_keys(self) -> tuple[int, ...]:
        return self._keys

    def key_name(self, key: int) -> str:
        a, b = divmod(int(key), KEY_BASE)
        return f"{chemical_symbols[a]}-{chemical_symbols[b]}"

    def key_from_name(self, name) -> int:
        if isinstance(name, str) and name.count("-") == 1:
            a, b = name.split("-")
            za, zb = atomic_numbers.get(a, 0), atomic_numbers.get(b, 0)
            if za and zb and pair_key(za, zb) in self._keys:
                return pair_key(za, zb)
        return super().key_from_name(name)

    def key_species(self, key: int) -> tuple[int, ...]:
        return tuple(sorted(set(divmod(int(key), KEY_BASE))))

    def keys_present(self, numbers) -> tuple[int, ...]:
        present = {int(z) for z in np.asarray(numbers).ravel()}
        return tuple(k for k in self._keys
                     if k // KEY_BASE in present and k % KEY_BASE in present)

    def make_basis(self, points, zeta=None):
        """:class:`kmlip.pair_kernel.PairSEBasis` with this descriptor's θ and cutoff (ζ does
        not apply: pass None)."""
        from kmlip.pair_kernel import PairSEBasis

        if zeta is not None:
            raise ValueError(f"zeta does not apply to Distance2b (its kernel is a squared "
                             f"exponential with theta={self._theta:g}); pass zeta=None for "
                             "this term")
        return PairSEBasis(points, theta=self._theta, r_cut=self._r_cut,
                           cutoff_width=self._cw, keys=self._keys)

    def environments(self, atoms, gradients: bool = False, n_threads: int | None = None,
                     **kw) -> Environments:
        """One environment per pair within the cutoff (see the module docstring)."""
        from kmlip._ext import pairs as _pairs
        from kmlip._threads import resolve_threads, threads_for
        from kmlip.neighbors import check_no_overlap, neighbor_list

        Z = checked_system(atoms)[0]  # TypeError for anything but Atoms; NaN, singular cells
        bad = sorted({int(z) for z in Z if int(z) not in self.species_z})
        if bad:
            raise ValueError(f"species {[chemical_symbols[z] for z in bad]} not declared in "
                             f"the descriptor's species {list(self.species)}")
        nt = resolve_threads(n_threads)
        nl = neighbor_list(atoms, self._r_cut, n_threads=nt)
        check_no_overlap(nl)
        n_pairs = len(nl.centers)
        i, j, D, d, keys, grad = _pairs.half_pairs(
            np.ascontiguousarray(nl.centers, dtype=np.int64),
            np.ascontiguousarray(nl.neighbors, dtype=np.int64),
            np.ascontiguousarray(nl.vectors, dtype=np.float64),
            np.ascontiguousarray(nl.distances, dtype=np.float64), Z, float(self._r_cut),
            np.asarray(self._keys, dtype=np.int64), KEY_BASE, bool(gradients),
            threads_for(nt, 4 * n_pairs))
        X = d[:, None].copy()
        owners = np.stack([i, j], axis=1)
        if not gradients:
            return Environments(X, keys, owners)
        values, neighbors, vectors = grad
        n_env = len(d)
        G = PairGradients(centers=np.repeat(np.arange(n_env, dtype=np.int64), 2),
                          neighbors=neighbors, values=values, vectors=vectors,
                          offsets=2 * np.arange(n_env + 1, dtype=np.int64))
        return Environments(X, keys, owners, G)

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """Pair distances (n_pairs, 1), and optionally their :class:`PairGradients` (centres
        are pairs). See :meth:`environments` for the pairs' atoms and keys."""
        env = self.environments(atoms, gradients=gradients, n_threads=n_threads)
        return (env.features, env.gradients) if gradients else env.features

    def backprop(self, atoms, grad_fn, n_threads: int | None = None):
        """Pair distances, then forces and virial of ``E(X)`` given ``dE/dX`` (the protocol's
        default contraction of the pair gradients)."""
        env, V, forces, virial = self.backprop_environments(
            atoms, lambda e: grad_fn(e.features), n_threads=n_threads)
        return env.features, V, forces, virial
