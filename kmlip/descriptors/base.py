"""The descriptor protocol shared by every descriptor and consumed by the GP.

The GP never names a descriptor: it only needs features ``X`` and :class:`PairGradients`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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


class Descriptor:
    """Base class of descriptors (the protocol the GP relies on).

    Subclasses set ``species`` (symbols), ``species_z`` (atomic numbers, same order),
    ``n_features`` and ``cutoff`` (Å), and implement :meth:`transform`, :meth:`get_params`
    and :meth:`to_dict` / :meth:`from_dict` for model files.
    """

    species: list[str]
    species_z: tuple[int, ...]
    n_features: int
    cutoff: float

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """Features (n_atoms, n_features), or ``(X, PairGradients)`` when ``gradients``."""
        raise NotImplementedError

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description: ``{"type": ClassName, "params": {...}}``."""
        return {"type": type(self).__name__, "params": self.get_params()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        from kmlip.descriptors import registry

        return registry.build(d)
