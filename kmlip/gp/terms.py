"""The model's kernel as a sum of terms: each a descriptor with its own sparse basis and δ.

GAP's usual model is a two-body term plus a SOAP term; each term t contributes local energies of
its own environments (atoms, pairs, ...), with the kernel ``delta_t^2 k_hat_t`` and its own sparse
points, and the terms are independent a priori. In the sparse GP this is one basis whose columns
are the terms' columns one after another: K_MM is block diagonal (by term, then by key), a label's
kernel row is the concatenation of the terms' unit rows, and the per-term δ becomes a column
scaling (see :mod:`kmlip.gp.sparse`). A single-term model is the special case with one term and a
scalar δ, with exactly the arithmetic it always had.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Term:
    """One kernel of the sum: a descriptor and its sparse basis (``descriptor.make_basis``)."""

    descriptor: Any
    basis: Any


class KernelSum:
    """Terms and the column layout of their joint sparse basis.

    Parameters
    ----------
    terms : sequence of Term
    """

    def __init__(self, terms: Sequence[Term]):
        self.terms = tuple(terms)
        if not self.terms:
            raise ValueError("a model needs at least one kernel term")
        self.offsets = []
        col = 0
        for t in self.terms:
            self.offsets.append(col)
            col += t.basis.n_sparse
        self.n_sparse = col

    def __len__(self) -> int:
        return len(self.terms)

    def columns(self, t: int) -> slice:
        """Columns of term ``t`` in the joint basis."""
        o = self.offsets[t]
        return slice(o, o + self.terms[t].basis.n_sparse)

    @property
    def single(self) -> bool:
        """One term: the arithmetic of a single-kernel model (scalar δ)."""
        return len(self.terms) == 1

    def column_scale(self, delta) -> float | np.ndarray:
        """δ of every column: the scalar itself for one term, else an (M,) vector."""
        from kmlip.gp.hyperparameters import column_delta

        return column_delta(delta, [self.columns(t) for t in range(len(self.terms))])

    def column_blocks(self) -> dict:
        """``{(term, key): slice}`` of the joint columns (K_MM is zero between blocks)."""
        out = {}
        for t, term in enumerate(self.terms):
            o = self.offsets[t]
            for k in term.basis.species_z:
                c = term.basis.columns(k)
                out[(t, k)] = slice(o + c.start, o + c.stop)
        return out

    def kmm(self) -> np.ndarray:
        """Unit K_MM of the joint basis (block diagonal by term)."""
        if self.single:
            return self.terms[0].basis.kmm()
        K = np.zeros((self.n_sparse, self.n_sparse))
        for t, term in enumerate(self.terms):
            s = self.columns(t)
            K[s, s] = term.basis.kmm()
        return K

    def environments(self, atoms, gradients: bool, n_threads: int | None,
                     grad_buffers: Sequence | None = None) -> list:
        """Every term's :class:`kmlip.descriptors.base.Environments` of one structure."""
        out = []
        for t, term in enumerate(self.terms):
            buf = None if grad_buffers is None else grad_buffers[t]
            kw = {"grad_buffer": buf} if (gradients and buf is not None) else {}
            out.append(term.descriptor.environments(atoms, gradients=gradients,
                                                    n_threads=n_threads, **kw))
        return out

    def energy_row(self, envs) -> np.ndarray:
        """Unit kernel row of the total energy, (M,)."""
        rows = [t.basis.energy_row(e.features, e.keys) for t, e in zip(self.terms, envs,
                                                                       strict=True)]
        return rows[0] if self.single else np.concatenate(rows)

    def derivative_rows(self, envs, n_atoms: int, n_threads: int | None, precision: str):
        """Unit kernel rows of force components (3 n_atoms, M) and virial components (9, M)."""
        parts = [t.basis.derivative_rows(e.features, e.keys, e.gradients, n_threads=n_threads,
                                         precision=precision, n_atoms=n_atoms)
                 for t, e in zip(self.terms, envs, strict=True)]
        if self.single:
            return parts[0]
        return (np.concatenate([p[0] for p in parts], axis=1),
                np.concatenate([p[1] for p in parts], axis=1))

    def species_with_points(self) -> list[int]:
        """Atomic numbers that some term has sparse points for, in term order."""
        out = []
        for term in self.terms:
            for k in term.basis.species_z:
                out += [z for z in term.descriptor.key_species(k) if z not in out]
        return out

    def release_scratch(self) -> None:
        for t in self.terms:
            t.basis.release_scratch()

    def grad_buffers(self) -> list:
        """Reusable gradient storage per term (descriptors with ``accepts_grad_buffer``)."""
        out = []
        for t in self.terms:
            if getattr(t.descriptor, "accepts_grad_buffer", False):
                from kmlip.descriptors.soap import GradientBuffer

                out.append(GradientBuffer())
            else:
                out.append(None)
        return out


def atom_rows(envs, n_atoms: int, K_envs: Sequence[np.ndarray], layout: KernelSum) -> np.ndarray:
    """Unit kernel rows of the per-atom energies, (n_atoms, M): each term's environment rows
    summed onto their owners, in the term's columns."""
    out = np.zeros((n_atoms, layout.n_sparse))
    for t, (e, K) in enumerate(zip(envs, K_envs, strict=True)):
        out[:, layout.columns(t)] = e.per_atom(K, n_atoms)
    return out


def atom_prior(envs, n_atoms: int, layout: KernelSum, d2) -> np.ndarray:
    """Prior variance of every per-atom energy, eV²: ``sum_t delta_t^2 sum_{e,e' of i}
    w_e w_e' k_hat_t(e, e')`` (terms independent)."""
    out = np.zeros(n_atoms)
    for t, e in enumerate(envs):
        basis = layout.terms[t].basis
        p = e.owners.shape[1]
        if p == 1:
            kss = np.zeros(n_atoms)
            np.add.at(kss, e.owners[:, 0], basis.self_kernel(e.features, e.keys))
        else:
            kss = np.zeros(n_atoms)
            owner_of = [[] for _ in range(n_atoms)]
            for c in range(p):
                for k, a in enumerate(e.owners[:, c]):
                    owner_of[a].append(k)
            for a in range(n_atoms):
                if owner_of[a]:
                    idx = np.asarray(owner_of[a])
                    X = e.features[idx]
                    kss[a] = basis.cross(X, e.keys[idx], X, e.keys[idx]).sum() / (p * p)
        out += d2[t] * kss
    return out


__all__ = ["KernelSum", "Term", "atom_prior", "atom_rows"]
