"""Posterior variances: the per-species GEMM form against triangular solves, and the clipping
of round-off negatives."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.build import bulk
from conftest import cual_cells, soap_or_skip

from kmlip import kernels
from kmlip.gp.sparse import PosteriorVariance, predictive_variance


@pytest.fixture(scope="module")
def soap_model():
    from kmlip.model import KernelPotential

    soap = soap_or_skip()
    frames = cual_cells(12, seed=3)
    return KernelPotential(soap, n_sparse=40, sigma_stress=0.02, random_state=0,
                           n_threads=1).fit(frames), frames


def _rows_with_sparse_points(model, frames):
    """Unit kernel rows of training environments and of the sparse points themselves (where
    the novelty term is the smallest difference)."""
    basis = model.basis_
    X = [model.descriptor_.transform(a) for a in frames]
    Z = [a.numbers for a in frames]
    for z in basis.species_z:
        X.append(basis.points[z])
        Z.append(np.full(len(basis.points[z]), z))
    X, Z = np.concatenate(X), np.concatenate(Z)
    _, _, K = basis.evaluate(X, Z, model.alpha_, grad=False, rows=True)
    return K, Z


def test_local_variances_match_triangular_solves(soap_model):
    model, frames = soap_model
    basis = model.basis_
    assert len(basis.species_z) == 2  # two blocks: exercises the QR factor of a middle block
    K, Z = _rows_with_sparse_points(model, frames)
    pv = PosteriorVariance(model.L_hat_, model.R_, model.delta_,
                           {z: basis.columns(z) for z in basis.species_z})
    ref = predictive_variance(K, np.ones(len(K)), model.L_hat_, model.R_, model.delta_)
    got = pv.local(K, Z, n_threads=1)
    d2 = model.delta_ ** 2
    assert np.max(np.abs(got - ref)) < 1e-9 * d2
    # the novelty term is resolved: variances are far below the prior, and not all equal
    assert np.median(ref) < 0.1 * d2 and np.ptp(ref) > 1e-6 * d2
    assert np.array_equal(pv.local(K, Z, n_threads=2), got)


def test_local_variance_of_a_species_without_sparse_points_is_the_prior(soap_model):
    model, frames = soap_model
    basis = model.basis_
    z0, z1 = basis.species_z
    pv = PosteriorVariance(model.L_hat_, model.R_, model.delta_, {z0: basis.columns(z0)})
    K, Z = _rows_with_sparse_points(model, frames)
    k_ss = np.where(Z == z1, 0.5, 1.0)
    got = pv.local(K, Z, k_ss)
    d2 = model.delta_ ** 2
    assert np.allclose(got[Z == z1], 0.5 * d2, rtol=0, atol=0)
    ref = predictive_variance(K[Z == z0], k_ss[Z == z0], model.L_hat_, model.R_, model.delta_)
    assert np.max(np.abs(got[Z == z0] - ref)) < 1e-9 * d2


def test_posterior_variance_rejects_bad_input(soap_model):
    model, _ = soap_model
    M = model.basis_.n_sparse
    with pytest.raises(ValueError, match="square"):
        PosteriorVariance(model.L_hat_[:, :-1], model.R_, 0.2, {})
    with pytest.raises(ValueError, match="delta"):
        PosteriorVariance(model.L_hat_, model.R_, -1.0, {})
    with pytest.raises(ValueError, match="overlap"):
        PosteriorVariance(model.L_hat_, model.R_, 0.2, {1: slice(0, 3), 2: slice(2, 5)})
    pv = PosteriorVariance(model.L_hat_, model.R_, 0.2, {1: slice(0, M)})
    with pytest.raises(ValueError, match="shape"):
        pv.local(np.zeros((2, M + 1)), [1, 1])


def test_zero_prior_variance_round_off_is_not_reported(soap_model):
    """Force components of a perfect crystal have prior variance 0 by symmetry: the round-off
    negatives around 0 are clipped silently (once reported as '-1.3e274 of the prior')."""
    model, _ = soap_model
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 1, 1))
    X, G = model.descriptor_.transform(atoms, gradients=True)
    Fr, _ = model.basis_.derivative_rows(X, atoms.numbers, G, n_threads=1)
    kss = kernels.force_prior_variance(X, atoms.numbers, G, model.basis_.zeta).reshape(-1)
    assert np.max(np.abs(kss)) < 1e-12 and np.max(np.abs(Fr)) < 1e-10
    Fr = Fr + 1e-13  # round-off of a realistic size, so that some variances come out < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        var = predictive_variance(Fr, kss, model.L_hat_, model.R_, model.delta_, "force")
    assert np.all(var >= 0) and np.max(var) < 1e-12 * model.delta_ ** 2


def test_clearly_negative_variance_warning_names_sane_figures():
    rng = np.random.default_rng(9)
    M = 5
    B = rng.standard_normal((M, M))
    L = np.linalg.cholesky(B @ B.T + M * np.eye(M))
    R = np.triu(rng.standard_normal((M, M))) + 5 * np.eye(M)
    k = rng.standard_normal((3, M))
    with pytest.warns(RuntimeWarning, match="clipped") as rec:
        v = predictive_variance(k, np.zeros(3), L, R, 1.0)
    assert np.all(v >= 0)
    msg = str(rec[0].message)
    assert "prior variance 0.00e+00" in msg and "e+2" not in msg
