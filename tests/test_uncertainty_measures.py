"""Per-atom force-variance measures and calibration from collected data (kmlip.uncertainty)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase import Atoms
from conftest import soap_or_skip

from kmlip import kernels
from kmlip import uncertainty as unc
from kmlip.datasets import emt_frames
from kmlip.model import KernelPotential


def _state(zeta):
    # force_variance_diag reads only the basis's kernel (its gradient factor), not its points
    return SimpleNamespace(basis=kernels.SparseBasis({}, zeta))


@pytest.mark.parametrize("periodic", [False, True])
def test_diag_force_variance_is_exact_at_the_prior_without_cross_terms(periodic):
    # Cu-Au: the kernel between centres of different species is zero, so the exact prior force
    # variance has no cross-centre terms and equals the diagonal form at v_i = delta^2; in the
    # small periodic cell every pair appears through several images (summed first)
    soap = soap_or_skip(species=["Cu", "Au"], r_cut=4.5, n_max=4, l_max=3)
    if periodic:
        a = Atoms("CuAu", scaled_positions=[[0, 0, 0], [0.5, 0.45, 0.52]], cell=[3.0, 3.1, 2.9],
                  pbc=True)
    else:
        a = Atoms("CuAu", positions=[[0, 0, 0], [1.3, 1.6, 0.9]])
    X, G = soap.transform(a, gradients=True)
    Z = a.numbers.astype(np.int64)
    d2 = 0.7 ** 2
    for zeta in (1, 2, 4):
        want = d2 * kernels.force_prior_variance(X, Z, G, zeta).sum(axis=1)
        got = unc.force_variance_diag(_state(zeta), a, X, G, np.full(len(a), d2))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        assert np.all(got > 0)
    # linear in the local variances: an atom's own centre and its neighbour's add up
    v = np.array([0.3, 0.0])
    one = unc.force_variance_diag(_state(2), a, X, G, v)
    other = unc.force_variance_diag(_state(2), a, X, G, np.array([0.0, 0.5]))
    both = unc.force_variance_diag(_state(2), a, X, G, np.array([0.3, 0.5]))
    np.testing.assert_allclose(one + other, both, rtol=1e-12)


def test_diag_force_variance_rejects_bad_shapes():
    soap = soap_or_skip(species=["Cu"], r_cut=4.0, n_max=3, l_max=2)
    a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.4]])
    X, G = soap.transform(a, gradients=True)
    with pytest.raises(ValueError, match="local_var"):
        unc.force_variance_diag(_state(2), a, X, G, np.ones(3))
    with pytest.raises(ValueError, match="features"):
        unc.force_variance_diag(_state(2), a, X[:1], G, np.ones(2))


@pytest.fixture(scope="module")
def cu():
    soap = soap_or_skip(species=["Cu"], r_cut=4.0, n_max=4, l_max=3)
    model = KernelPotential(soap, n_sparse=30, random_state=0, n_threads=1)
    return model.fit(emt_frames(6, seed=0)), emt_frames(3, seed=4)


def test_exact_force_variance_is_the_summed_forces_var(cu):
    model, frames = cu
    st = model.fitted_state_
    a = frames[0]
    r = model.compute(a, ("forces_var", "novelty"))
    X, G = st.descriptor.transform(a, gradients=True)
    full = unc.force_variance_exact(st, a, X, G)
    np.testing.assert_allclose(full, r.forces_var.sum(axis=1), rtol=1e-8, atol=1e-14)
    nov = unc.force_variance_exact(st, a, X, G, "novelty")
    assert np.all(nov <= full + 1e-15) and np.all(nov >= 0)
    # the diagonal form rises with novelty as the exact one does (a 15 % compressed cell)
    diag = unc.force_variance_diag(st, a, X, G, r.novelty)
    b = a.copy()
    b.set_cell(b.cell * 0.85 ** (1 / 3), scale_atoms=True)
    Xb, Gb = st.descriptor.transform(b, gradients=True)
    diag_b = unc.force_variance_diag(st, b, Xb, Gb, model.compute(b, ("novelty",)).novelty)
    nov_b = unc.force_variance_exact(st, b, Xb, Gb, "novelty")
    assert np.all(diag > 0)
    assert np.median(diag_b) > 3 * np.median(diag)
    assert np.median(nov_b) > np.median(nov)
    with pytest.raises(ValueError, match="part"):
        unc.force_variance_exact(st, a, X, G, "weights")


def test_calibration_from_data_fits_and_validates():
    rng = np.random.default_rng(0)
    n = 4000
    m = rng.uniform(0, 1e-3, n)
    a, b = 3.0, 0.01
    sigma = np.sqrt(b ** 2 + a ** 2 * m)
    err = rng.normal(size=(n, 3)) * sigma[:, None]
    noise = rng.uniform(0, 1e-3, n)  # a measure unrelated to the errors
    cal, rep = unc.calibration_from_data({"novelty": m, "energies_var": noise}, err)
    assert rep["measure"] == "novelty" and cal.measure == "novelty"
    assert abs(cal.scale / a - 1) < 0.1 and abs(cal.floor / b - 1) < 0.15
    assert 0.93 < rep["coverage_after"] < 0.97
    assert rep["spearman"]["novelty"] > rep["spearman"]["energies_var"] + 0.2
    assert rep["coverage_before"] is None and cal.report["n_atoms"] == n
    with pytest.raises(ValueError, match="shape"):
        unc.calibration_from_data({"novelty": m}, err[:, :2])
    with pytest.raises(ValueError, match="unknown measure"):
        unc.calibration_from_data({"max": m}, err)
    with pytest.raises(ValueError, match="was not given"):
        unc.calibration_from_data({"novelty": m}, err, "energies_var")
    # "auto" does not take forces_var_diag (a pair-gradient pass per step) even when it ranks
    # best; asked for by name, it is used once the prediction path computes it
    if "forces_var_diag" in unc.predicted_measures():
        cal, rep = unc.calibration_from_data({"novelty": noise, "forces_var_diag": m}, err)
        assert rep["measure"] == "novelty"
        cal, rep = unc.calibration_from_data({"novelty": noise, "forces_var_diag": m}, err,
                                             "forces_var_diag")
        assert cal.measure == "forces_var_diag"
    else:
        # a measure the prediction path cannot compute cannot become the uncertainty
        with pytest.raises(ValueError, match="prediction path"):
            unc.calibration_from_data({"forces_var_diag": m}, err, "forces_var_diag")
        with pytest.raises(ValueError, match="chooses among"):
            unc.calibration_from_data({"forces_var_diag": m}, err)
        with pytest.raises(ValueError, match="measure"):
            unc.Calibration.from_dict({"measure": "forces_var_diag", "scale": 1.0,
                                       "floor": 0.01})


def test_floor_is_bounded_by_the_force_noise(cu):
    rng = np.random.default_rng(1)
    n = 3000
    m = rng.uniform(0, 1e-3, n)
    err = rng.normal(size=(n, 3)) * np.sqrt(0.05 ** 2 + 4.0 * m)[:, None]
    free = unc.fit_calibration("novelty", m, err)
    assert abs(free.floor / 0.05 - 1) < 0.15
    capped = unc.fit_calibration("novelty", m, err, max_floor=0.01)
    assert capped.floor <= 0.01 * (1 + 1e-9)
    assert capped.scale > free.scale  # the measure takes the errors the floor may not
    with pytest.raises(ValueError, match="max_floor"):
        unc.fit_calibration("novelty", m, err, max_floor=-1.0)
    # model.calibrate bounds the floor by the model's sigma_force
    model, frames = cu
    rep = model.calibrate(frames)
    assert rep["max_floor"] == model.fitted_state_.hyper.sigma_force
    assert model.fitted_state_.calibration.floor <= rep["max_floor"] * (1 + 1e-9)
