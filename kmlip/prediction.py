"""The one prediction path: exactly the requested quantities of one structure, one descriptor pass.

``compute(state, atoms, properties)`` returns a :class:`Prediction` with (eV, Å):

``energy``
    Total energy: local GP energies + e0 + baseline (computed whenever an energy, forces or
    stress is requested: it costs nothing beyond them).
``energies`` (n_atoms,)
    Per-atom energies, local GP energy + e0 (a baseline is not split per atom).
``forces`` (n_atoms, 3)
    Forces (eV/Å).
``stress`` (6,)
    Stress in Voigt order (eV/Å³), ASE sign (periodic structures only).
``energy_var``, ``energies_var`` (n_atoms,), ``forces_var`` (n_atoms, 3)
    Epistemic (posterior) variances, eV² and eV²/Å²; each only when requested.
``novelty`` (n_atoms,)
    The projected-process term of ``energies_var`` (eV²): distance from the sparse set.
``uncertainty`` (n_atoms,)
    The calibrated per-atom uncertainty (eV/Å), an estimate of each atom's force error
    (:mod:`kmlip.uncertainty`).

Forces and stress come from the descriptor's ``backprop`` (a descriptor without a fast one
falls back to its pair gradients through the protocol's default), except when ``forces_var``
is requested, which needs the pair gradients themselves. The kernel rows and features of the
last call stay in the result, so a variance requested later for the same positions costs one
product against the sparse points, not another descriptor pass (``reuse=``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from kmlip import kernels, uncertainty
from kmlip._threads import serial_blas
from kmlip.gp.sparse import predictive_variance
from kmlip.gp.training import baseline_values
from kmlip.labels import check_species, is_periodic

#: Property names :func:`compute` understands.
PROPERTIES = ("energy", "free_energy", "energies", "forces", "stress", "energy_var",
              "energies_var", "forces_var", "novelty", "forces_var_diag", "uncertainty")


@dataclass
class Prediction:
    """Result of :func:`compute`; None where not requested (see the module docstring)."""

    energy: float | None = None
    energies: np.ndarray | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    energy_var: float | None = None
    energies_var: np.ndarray | None = None
    forces_var: np.ndarray | None = None
    novelty: np.ndarray | None = None
    forces_var_diag: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    baseline_energy: float | None = None
    #: features (n_atoms, F) and unit kernel rows (n_atoms, M) kept for later variances
    features: np.ndarray | None = field(default=None, repr=False)
    kernel_rows: np.ndarray | None = field(default=None, repr=False)
    unit_local_energies: np.ndarray | None = field(default=None, repr=False)

    @property
    def local_energies(self) -> np.ndarray | None:
        """Alias of ``energies``."""
        return self.energies

    def as_results(self) -> dict:
        """The non-None quantities as an ASE ``results`` dict (``free_energy`` = ``energy``)."""
        out = {}
        for name in ("energy", "energies", "forces", "stress", "energy_var", "energies_var",
                     "forces_var", "novelty", "forces_var_diag", "uncertainty"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.energy is not None:
            out["free_energy"] = self.energy
        return out


def check_properties(properties: Iterable[str]) -> frozenset[str]:
    """Validated set of property names (TypeError/ValueError naming the bad one)."""
    if isinstance(properties, str):
        properties = (properties,)
    try:
        props = frozenset(properties)
    except TypeError as exc:
        raise TypeError("properties must be a sequence of property names") from exc
    bad = sorted(p for p in props if p not in PROPERTIES)
    if bad:
        raise ValueError(f"unknown properties {bad}; known: {list(PROPERTIES)}")
    return props


def compute(state, atoms: Atoms, properties: Iterable[str] = ("energy",),
            n_threads: int | None = None, reuse: Prediction | None = None) -> Prediction:
    """Predicts the requested properties of one structure.

    Parameters
    ----------
    state : FittedState
    atoms : ase.Atoms
    properties : iterable of str
        Any of :data:`PROPERTIES`.
    n_threads : int or None
        OpenMP threads (and the BLAS limit during the call); None follows OMP_NUM_THREADS.
    reuse : Prediction, optional
        A previous result for the same positions: its features and kernel rows are used
        instead of a new descriptor pass when no derivative is requested.

    Returns
    -------
    Prediction
    """
    props = check_properties(properties)
    if not isinstance(atoms, Atoms):
        raise TypeError(f"expected an ase.Atoms, got {type(atoms).__name__}")
    check_species(atoms, state.species_z, "", "model")
    # kmlip's big products run inside its own OpenMP loops; idle BLAS threads would spin
    # beside them
    with serial_blas():
        return _compute(state, atoms, props, n_threads, reuse)


def _wants(state, atoms: Atoms, props: frozenset[str]) -> tuple:
    """What a call computes: (forces, stress, forces_var, energy, uncertainty, energies_var,
    forces_var_diag, novelty, energy_var, kernel rows, derivatives)."""
    want_f = "forces" in props
    want_s = "stress" in props and is_periodic(atoms)
    want_fvar = "forces_var" in props
    want_e = bool(props & {"energy", "free_energy"}) or want_f or want_s
    want_unc = "uncertainty" in props
    measure = state.uncertainty_map.measure if want_unc else None
    want_lvar = "energies_var" in props or measure == "energies_var"
    want_fdiag = "forces_var_diag" in props or measure == "forces_var_diag"
    want_nov = "novelty" in props or measure == "novelty" or want_fdiag
    want_evar = "energy_var" in props
    rows = want_lvar or want_evar or want_nov
    return (want_f, want_s, want_fvar, want_e, want_unc, want_lvar, want_fdiag, want_nov,
            want_evar, rows, want_f or want_s)


def _energy_forces_stress(out: Prediction, state, atoms: Atoms, props: frozenset[str],
                          local: np.ndarray, f, W) -> None:
    """Per-atom energies, total energy, forces and stress into ``out`` (with the baseline: the
    training labels subtracted exactly these values, through the same helper)."""
    want_f = "forces" in props
    want_s = "stress" in props and is_periodic(atoms)
    want_e = bool(props & {"energy", "free_energy"}) or want_f or want_s
    if "energies" in props or want_e:
        out.energies = local
    if not want_e:
        return
    E_b, F_b, S_b = (0.0, None, None) if state.baseline is None \
        else baseline_values(state.baseline, atoms)
    out.baseline_energy = E_b
    out.energy = float(np.sum(local)) + E_b
    if want_f:
        out.forces = f if F_b is None else f + F_b
    if want_s:
        s = kernels.virial_voigt(np.asarray(W).reshape(9)) / atoms.get_volume()
        out.stress = s if S_b is None else s + S_b


def _compute(state, atoms: Atoms, props: frozenset[str], nt, reuse) -> Prediction:
    if not state.atom_centred:
        return _compute_terms(state, atoms, props, nt)
    n = len(atoms)
    Z = np.asarray(atoms.numbers, dtype=np.int64)
    (want_f, want_s, want_fvar, want_e, want_unc, want_lvar, want_fdiag, want_nov, want_evar,
     rows, need_grad) = _wants(state, atoms, props)
    d2 = state.hyper.delta ** 2
    basis = state.basis
    desc = state.descriptor
    alpha = state.alpha
    out = Prediction()
    G = K = f = W = None
    if want_fvar or want_fdiag:
        # the force variances need the pair gradients themselves
        X, G = desc.transform(atoms, gradients=True, n_threads=nt)
        eps, v, K = basis.evaluate(X, Z, alpha, grad=need_grad, rows=rows, n_threads=nt)
        if need_grad:
            f, W = kernels.contract_forces(G, d2 * v, n, n_threads=nt)
    elif need_grad:
        held = {}

        def grad_fn(X):
            held["eval"] = basis.evaluate(X, Z, alpha, grad=True, rows=rows, n_threads=nt)
            return d2 * held["eval"][1]

        X, _, f, W = desc.backprop(atoms, grad_fn, n_threads=nt)
        eps, _, K = held["eval"]
    elif reuse is not None and reuse.features is not None \
            and reuse.features.shape[0] == n and reuse.unit_local_energies is not None:
        X, K, eps = reuse.features, reuse.kernel_rows, reuse.unit_local_energies
    else:
        X = desc.transform(atoms, gradients=False, n_threads=nt)
        eps, _, K = basis.evaluate(X, Z, alpha, grad=False, rows=rows, n_threads=nt)
    if rows and K is None:
        K = basis.local_rows(X, Z)
    out.features, out.kernel_rows, out.unit_local_energies = X, K, eps
    _energy_forces_stress(out, state, atoms, props, d2 * eps + state.e0_table[Z], f, W)
    if want_lvar or want_nov:
        Xh, _ = kernels.normalize(X)
        kss = np.einsum("ij,ij->i", Xh, Xh)  # 1, or 0 for an empty environment
        if want_lvar:
            out.energies_var = state.local_variance(K, Z, kss, n_threads=nt)
        if want_nov:
            out.novelty = state.local_novelty(K, Z, kss, n_threads=nt)
        if want_fdiag:
            out.forces_var_diag = uncertainty.force_variance_diag(state, atoms, X, G,
                                                                  out.novelty)
        if want_unc:
            cal = state.uncertainty_map
            out.uncertainty = cal.uncertainty(getattr(out, cal.measure))
    if want_evar:
        kss = kernels.energy_prior_variance(X, Z, basis.zeta)
        out.energy_var = float(state.variance(K.sum(0)[None, :], np.array([kss]),
                                              "energy")[0])
    if want_fvar:
        Fr, _ = basis.derivative_rows(X, Z, G, n_threads=nt)
        kss = kernels.force_prior_variance(X, Z, G, basis.zeta).reshape(-1)
        out.forces_var = state.variance(Fr, kss, "force").reshape(n, 3)
    return out


def _compute_terms(state, atoms: Atoms, props: frozenset[str], nt) -> Prediction:
    """:func:`_compute` for a sum of kernels, or a term whose environments are not atoms: each
    term's local energies go to the atoms that own its environments; variances use the joint
    posterior of all terms (their prior variances add up, each with its own δ²)."""
    import scipy.linalg as sla

    from kmlip.gp.terms import atom_prior, atom_rows

    n = len(atoms)
    Z = np.asarray(atoms.numbers, dtype=np.int64)
    (want_f, want_s, want_fvar, want_e, want_unc, want_lvar, want_fdiag, want_nov, want_evar,
     rows, need_grad) = _wants(state, atoms, props)
    kernel = state.kernel
    deltas = state.hyper.delta if isinstance(state.hyper.delta, tuple) else (state.hyper.delta,)
    d2s = [float(d) ** 2 for d in deltas]
    dcol = np.array(np.broadcast_to(np.asarray(state.column_delta, dtype=np.float64),
                                    (kernel.n_sparse,)))

    def _var(K, prior, what):
        # full prior variances (eV²), delta per column: the vector form of the formula
        return predictive_variance(K, prior, state.L_hat, state.R, dcol, what)

    eps_atoms = np.zeros(n)
    f = np.zeros((n, 3))
    W = np.zeros((3, 3))
    envs, K_envs = [], []
    for t, term in enumerate(kernel.terms):
        basis, desc, d2 = term.basis, term.descriptor, d2s[t]
        alpha = state.alpha[kernel.columns(t)]
        if want_fvar or want_fdiag or not need_grad:
            # forces_var_diag spreads each environment's novelty by its pair gradients, so it
            # needs them stored, as the exact forces_var does
            env = desc.environments(atoms, gradients=want_fvar or want_fdiag, n_threads=nt)
            eps, v, K = basis.evaluate(env.features, env.keys, alpha, grad=need_grad, rows=rows,
                                       n_threads=nt)
            if need_grad:
                ft, Wt = kernels.contract_forces(env.gradients, d2 * v, n, n_threads=nt)
        else:
            held = {}

            def grad_fn(e, basis=basis, alpha=alpha, d2=d2, held=held):
                held["eval"] = basis.evaluate(e.features, e.keys, alpha, grad=True, rows=rows,
                                              n_threads=nt)
                return d2 * held["eval"][1]

            env, _, ft, Wt = desc.backprop_environments(atoms, grad_fn, n_threads=nt)
            eps, _, K = held["eval"]
        envs.append(env)
        K_envs.append(K)
        eps_atoms += env.per_atom(d2 * eps, n)
        if need_grad:
            f += ft
            W += Wt
    out = Prediction()
    _energy_forces_stress(out, state, atoms, props, eps_atoms + state.e0_table[Z], f, W)
    if want_lvar or want_nov:
        K_atom = atom_rows(envs, n, K_envs, kernel)
        prior = atom_prior(envs, n, kernel, d2s)
        if want_lvar:
            out.energies_var = _var(K_atom, prior, "local energy") \
                if kernel.n_sparse else prior
        if want_nov:
            if kernel.n_sparse:
                A = sla.solve_triangular(state.L_hat, (K_atom * dcol).T, lower=True,
                                         check_finite=False)
                out.novelty = np.maximum(prior - np.sum(A * A, axis=0), 0.0)
            else:
                out.novelty = prior
        if want_fdiag:
            out.forces_var_diag = uncertainty.force_variance_diag(state, atoms, envs=envs)
        if want_unc:
            cal = state.uncertainty_map
            out.uncertainty = cal.uncertainty(getattr(out, cal.measure))
    if want_evar:
        K_tot = np.concatenate([K.sum(0) for K in K_envs])
        prior = sum(d2 * term.basis.energy_prior(e.features, e.keys)
                    for d2, term, e in zip(d2s, kernel.terms, envs, strict=True))
        out.energy_var = float(_var(K_tot[None, :], np.array([prior]), "energy")[0])
    if want_fvar:
        Fr, _ = kernel.derivative_rows(envs, n, nt, "double")
        kss = sum(d2 * term.basis.force_prior_variance(e.features, e.keys, e.gradients, n)
                  for d2, term, e in zip(d2s, kernel.terms, envs, strict=True)).reshape(-1)
        out.forces_var = _var(Fr, kss, "force").reshape(n, 3)
    return out


__all__ = ["PROPERTIES", "Prediction", "check_properties", "compute"]
