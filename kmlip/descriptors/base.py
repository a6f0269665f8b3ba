"""The descriptor protocol shared by every descriptor and consumed by the GP.

The GP never names a descriptor: it only needs features ``X`` and :class:`PairGradients`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Largest per-atom feature vector a descriptor may be configured for (10^6 floats: 8 MB per
#: atom, 24 MB per neighbour pair for gradients). Far above useful sizes (SOAP with 4 species,
#: n_max 12, l_max 12 has 15,288); it turns a typo into a ValueError instead of a MemoryError.
MAX_FEATURES = 1_000_000
#: Largest cutoff a descriptor accepts, Å: far beyond any local environment, and a bound that
#: keeps a damaged model file from asking the neighbour list for the whole universe.
MAX_CUTOFF = 100.0


@dataclass(frozen=True)
class PairGradients:
    """Derivatives of per-atom features with respect to atomic positions, stored per pair.

    Entries of centre ``i`` are ``offsets[i]:offsets[i+1]``; the first of them is the self term
    (``neighbors == i``, ``vectors == 0``), then one entry per neighbour-list pair (periodic
    images of the same atom, including images of ``i`` itself, are separate entries).
    Entries sharing (centre, neighbour) add up to the full derivative.

    Attributes
    ----------
    centers : ndarray of int64, shape (n_entries,)
        Index ``i`` of the atom whose features are differentiated.
    neighbors : ndarray of int64, shape (n_entries,)
        Index ``j`` of the atom that moves.
    values : ndarray of float64, shape (n_entries, 3, n_features)
        ``values[k, a, f] = d X[centers[k], f] / d r[neighbors[k], a]`` (1/Å times feature units).
    vectors : ndarray of float64, shape (n_entries, 3)
        Pair vector ``r_ij = r_j + S @ cell - r_i`` of each entry in Å (zero for self terms).
        ``sum_k values[k, a, f] * vectors[k, b]`` over the entries of centre ``i`` is the strain
        derivative ``d X[i, f] / d eps[a, b]``.
    offsets : ndarray of int64, shape (n_atoms + 1,)
        CSR offsets of the entries of each centre.
    """

    centers: np.ndarray
    neighbors: np.ndarray
    values: np.ndarray
    vectors: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_neighbor_list(cls, nl, values: np.ndarray) -> PairGradients:
        """The layout of a kernel that writes, per centre i, its self term and then one entry
        per pair of ``nl`` (a full neighbour list sorted by centre, CSR ``offsets``).

        Parameters
        ----------
        nl : neighbour list with ``offsets`` (n_atoms + 1,), ``neighbors`` and ``vectors``
        values : ndarray, shape (n_atoms + n_pairs, 3, n_features)
        """
        n_atoms = len(nl.offsets) - 1
        counts = np.diff(nl.offsets)
        offsets = nl.offsets + np.arange(n_atoms + 1)
        centers = np.repeat(np.arange(n_atoms, dtype=np.int64), counts + 1)
        first = offsets[:-1]
        neighbors = np.empty_like(centers)
        vectors = np.zeros((len(centers), 3))
        mask = np.ones(len(centers), dtype=bool)
        mask[first] = False
        neighbors[first] = np.arange(n_atoms)
        neighbors[mask] = nl.neighbors
        vectors[mask] = nl.vectors
        return cls(centers=centers, neighbors=neighbors, values=values, vectors=vectors,
                   offsets=offsets)

    @property
    def n_entries(self) -> int:
        return int(self.centers.shape[0])

    def strain(self) -> np.ndarray:
        """Strain derivative of the features, shape (n_atoms, 3, 3, n_features).

        ``out[i, a, b, f] = d X[i, f] / d eps[a, b]`` (unsymmetrised).
        """
        n_atoms = self.offsets.shape[0] - 1
        out = np.zeros((n_atoms, 3, 3, self.values.shape[2]))
        for i in range(n_atoms):
            s = slice(self.offsets[i], self.offsets[i + 1])
            out[i] = np.einsum("kaf,kb->abf", self.values[s], self.vectors[s])
        return out

    def dense(self, n_atoms: int | None = None) -> np.ndarray:
        """Dense derivative array (n_atoms, n_atoms, 3, n_features); for tests on small systems."""
        if n_atoms is None:
            n_atoms = self.offsets.shape[0] - 1
        out = np.zeros((n_atoms, n_atoms, 3, self.values.shape[2]))
        np.add.at(out, (self.centers, self.neighbors), self.values)
        return out


@dataclass(frozen=True)
class Environments:
    """The local environments of one structure, as the kernel sees them.

    An atom-centred descriptor (SOAP, ACSF) has one environment per atom, keyed by the atom's
    atomic number. Other descriptors may have other environments: :class:`Distance2b
    <kmlip.descriptors.distance2b.Distance2b>` has one per pair of atoms within the cutoff.
    Each environment contributes a local energy; the total energy is their sum, and the
    per-atom energy of atom ``i`` is the sum of the local energies of the environments it
    owns, each split equally among its owners.

    Attributes
    ----------
    features : ndarray, shape (n_env, n_features)
    keys : ndarray of int64, shape (n_env,)
        Kernel block of each environment: environments with different keys never correlate
        (the atomic number of the centre for atom-centred descriptors; see
        :meth:`Descriptor.kernel_keys`).
    owners : ndarray of int64, shape (n_env, p)
        Atoms that share each environment's local energy, ``1/p`` each (``p = 1`` for
        atom-centred descriptors, 2 for pairs).
    gradients : PairGradients or None
        Derivatives of the features; its ``centers`` index environments.
    """

    features: np.ndarray
    keys: np.ndarray
    owners: np.ndarray
    gradients: PairGradients | None = None

    @property
    def n_env(self) -> int:
        return int(self.features.shape[0])

    def per_atom(self, values: np.ndarray, n_atoms: int) -> np.ndarray:
        """Per-environment values (n_env, ...) summed onto their owners (n_atoms, ...)."""
        values = np.asarray(values, dtype=np.float64)
        p = self.owners.shape[1]
        if p == 1 and self.owners.shape[0] == n_atoms \
                and np.array_equal(self.owners[:, 0], np.arange(n_atoms)):
            return values.copy()
        out = np.zeros((n_atoms,) + values.shape[1:])
        for c in range(p):
            np.add.at(out, self.owners[:, c], values / p)
        return out


class Descriptor:
    """Base class of descriptors (the protocol the GP relies on).

    Subclasses set ``species_z`` (atomic numbers), ``n_features`` and ``cutoff`` (Å) in
    ``_setup``, and implement :meth:`transform`.

    Parameters follow scikit-learn's conventions: ``__init__`` stores each argument unchanged
    under its own name and calls ``_setup``, which validates them (``TypeError`` for a wrong
    type, ``ValueError`` for a bad value, naming the parameter) and derives the private state.
    :meth:`get_params` returns the stored objects themselves, so ``sklearn.base.clone`` works;
    :meth:`to_dict` converts them to plain JSON types for model files. Changing a parameter
    means :meth:`set_params` (which validates); mutating a stored list in place does not
    rebuild the descriptor.
    """

    species_z: tuple[int, ...]
    n_features: int
    cutoff: float
    #: One environment per atom, keyed by its atomic number (see :class:`Environments`);
    #: descriptors of other environments set it False and override :meth:`environments`.
    atom_centred: bool = True
    #: The kernel exponent zeta applies (the normalised dot-product kernel); a descriptor with
    #: a kernel of its own (see :meth:`make_basis`) sets it False.
    uses_zeta: bool = True

    def _setup(self) -> None:
        """Validates the stored parameters and derives the private state."""
        raise NotImplementedError

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """Features (n_atoms, n_features), or ``(X, PairGradients)`` when ``gradients``."""
        raise NotImplementedError

    # -- environments and the kernel (what the GP calls) --------------------------------------
    def kernel_keys(self) -> tuple[int, ...]:
        """Keys of the kernel blocks (:attr:`Environments.keys`) this descriptor can produce;
        atom-centred descriptors: the atomic numbers of ``species``."""
        return tuple(self.species_z)

    def key_name(self, key: int) -> str:
        """Name of a kernel key in model files and ``n_sparse`` dicts (a chemical symbol)."""
        from ase.data import chemical_symbols

        return chemical_symbols[int(key)]

    def key_from_name(self, name) -> int:
        """Inverse of :meth:`key_name`; ValueError for a name that is not one of this
        descriptor's keys."""
        for k in self.kernel_keys():
            if self.key_name(k) == name:
                return k
        raise ValueError(f"{name!r} is not a kernel key of {type(self).__name__} (keys: "
                         f"{[self.key_name(k) for k in self.kernel_keys()]})")

    def key_species(self, key: int) -> tuple[int, ...]:
        """Atomic numbers an environment of kernel key ``key`` involves (atom-centred: the
        centre's)."""
        return (int(key),)

    def keys_present(self, numbers) -> tuple[int, ...]:
        """Keys that structures made of the atomic numbers ``numbers`` can produce."""
        present = {int(z) for z in np.asarray(numbers).ravel()}
        return tuple(k for k in self.kernel_keys() if k in present)

    def environments(self, atoms, gradients: bool = False, n_threads: int | None = None,
                     **kw) -> Environments:
        """The structure's local environments (atom-centred: one per atom, from
        :meth:`transform`); ``kw`` is passed on to :meth:`transform`."""
        n = len(atoms)
        keys = np.asarray(atoms.numbers, dtype=np.int64)
        owners = np.arange(n, dtype=np.int64)[:, None]
        if gradients:
            X, G = self.transform(atoms, gradients=True, n_threads=n_threads, **kw)
            return Environments(X, keys, owners, G)
        return Environments(self.transform(atoms, gradients=False, n_threads=n_threads),
                            keys, owners)

    def backprop_environments(self, atoms, grad_fn, n_threads: int | None = None):
        """Environments, then forces and virial of a scalar ``E`` given ``dE/dX``.

        Parameters
        ----------
        grad_fn : callable
            ``grad_fn(env)`` returns ``dE/d env.features``, shape (n_env, n_features).

        Returns
        -------
        env : Environments
        V : ndarray, shape (n_env, n_features), as returned by ``grad_fn``
        forces : ndarray, shape (n_atoms, 3)
        virial : ndarray, shape (3, 3)
            ``dE/d eps`` (unsymmetrised).
        """
        if self.atom_centred:
            keys = np.asarray(atoms.numbers, dtype=np.int64)
            owners = np.arange(len(atoms), dtype=np.int64)[:, None]
            held = {}

            def fn(X):
                held["env"] = Environments(X, keys, owners)
                return grad_fn(held["env"])

            X, V, forces, virial = self.backprop(atoms, fn, n_threads=n_threads)
            return held.get("env", Environments(X, keys, owners)), V, forces, virial
        from kmlip.kernels import contract_forces

        env = self.environments(atoms, gradients=True, n_threads=n_threads)
        V = np.ascontiguousarray(grad_fn(env), dtype=np.float64)
        if V.shape != env.features.shape:
            raise ValueError(f"grad_fn returned shape {V.shape}, expected "
                             f"{env.features.shape}")
        forces, virial = contract_forces(env.gradients, V, len(atoms), n_threads=n_threads)
        return env, V, forces, virial

    def make_basis(self, points, zeta: int | None):
        """The sparse basis of this descriptor's kernel on sparse points ``{key: (M_k, F)}``:
        the normalised dot-product kernel of degree ``zeta`` by default."""
        from kmlip.kernels import SparseBasis

        if zeta is None:
            raise ValueError(f"{type(self).__name__} needs an integer zeta (got None)")
        return SparseBasis(points, zeta, species_z=self.kernel_keys())

    def backprop(self, atoms, grad_fn, n_threads: int | None = None):
        """Features, then forces and virial of a scalar ``E(X)`` given ``dE/dX``.

        This default goes through :meth:`transform` with pair gradients and contracts them with
        ``V = grad_fn(X)``; a descriptor with a faster way (e.g. SOAP, inside its kernel)
        overrides it. The model calls only this, never asking which descriptor it has.

        Returns
        -------
        X : ndarray, shape (n_atoms, n_features)
        V : ndarray, shape (n_atoms, n_features), as returned by ``grad_fn``
        forces : ndarray, shape (n_atoms, 3)
            ``-dE/dr``.
        virial : ndarray, shape (3, 3)
            ``dE/d eps`` (unsymmetrised).
        """
        from kmlip.kernels import contract_forces

        X, G = self.transform(atoms, gradients=True, n_threads=n_threads)
        V = np.ascontiguousarray(grad_fn(X), dtype=np.float64)
        if V.shape != X.shape:
            raise ValueError(f"grad_fn returned shape {V.shape}, expected {X.shape}")
        forces, virial = contract_forces(G, V, X.shape[0], n_threads=n_threads)
        return X, V, forces, virial

    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, exactly the objects passed (``deep`` has no effect)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> Descriptor:
        """Changes parameters and rebuilds the descriptor; returns ``self``.

        Raises
        ------
        ValueError
            Unknown parameter name, or a bad value; TypeError for a wrong type. On any error
            the descriptor is left exactly as it was.
        """
        valid = self._get_param_names()
        for k in params:
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; "
                                 f"valid: {valid}")
        saved = dict(self.__dict__)
        try:
            for k, v in params.items():
                setattr(self, k, v)
            self._setup()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description: ``{"type": ClassName, "params": {...}}``.

        Parameters in plain Python types (NumPy scalars become int/float/bool, tuples and
        arrays become lists); :meth:`from_dict` rebuilds an equivalent descriptor.
        """
        from kmlip._validate import plain

        params = {k: plain(v) for k, v in self.get_params().items()}
        species = getattr(self, "species", None)
        if isinstance(species, (set, frozenset)):
            # the order check_species gave the set (by atomic number), not repr order
            params["species"] = [plain(s) for s in
                                 sorted(species, key=lambda s: self._species_key(s))]
        return {"type": type(self).__name__, "params": params}

    @staticmethod
    def _species_key(s) -> int:
        from ase.data import atomic_numbers

        return atomic_numbers[s] if isinstance(s, str) else int(s)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        """Rebuilds a descriptor from :meth:`to_dict` output (e.g. read from a model file).

        Raises
        ------
        ValueError
            For any malformed description or invalid parameter.
        """
        from kmlip.descriptors import registry

        return registry.build(d)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
