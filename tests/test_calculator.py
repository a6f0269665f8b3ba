"""KMLIPCalculator: results, consistency with the model, and the force variance."""
from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from conftest import cual_cells, cual_cluster

from kmlip import kernels
from kmlip.calculator import KMLIPCalculator
from kmlip.model import KernelPotential


def test_results_and_consistency_with_the_model(fitted, test_frames):
    a = test_frames[2].copy()
    a.calc = KMLIPCalculator(fitted)
    e = a.get_potential_energy()
    assert e == pytest.approx(fitted.predict(a)[0], rel=1e-13)
    assert a.get_potential_energy(force_consistent=True) == e
    np.testing.assert_allclose(a.get_forces(), fitted.predict_forces(a), rtol=1e-13)
    np.testing.assert_allclose(a.get_stress(), fitted.predict_stress(a), rtol=1e-12)
    r = a.calc.results
    assert r["energies"].shape == (len(a),)
    assert r["energies"].sum() == pytest.approx(e, rel=1e-12)
    # the first call asked for the energy alone: a single point reports energies_var;
    # the other variances only on request
    assert "energies_var" in r and not {"energy_var", "forces_var"} & set(r)
    ev = a.calc.get_property("energies_var", a)
    assert ev.shape == (len(a),) and np.all(ev >= 0)
    np.testing.assert_array_equal(ev, fitted.predict_local_energies(a, return_var=True)[1])
    assert a.calc.get_property("energy_var", a) >= 0
    assert "forces_var" not in a.calc.results
    assert r["energy_noise_var"] == pytest.approx(fitted.sigma_energy_**2 * len(a))
    assert r["forces_noise_var"] == pytest.approx(fitted.sigma_force_**2)
    assert r["stress_noise_var"] > 0
    assert a.calc.get_property("forces_var").shape == (len(a), 3)


def test_molecule_has_no_stress(fitted):
    c = cual_cluster(3)
    c.calc = KMLIPCalculator(fitted)
    c.get_forces()
    with pytest.raises(PropertyNotImplementedError):
        c.get_stress()


def test_unfitted_model_is_refused(d2b):
    with pytest.raises(ValueError, match="fitted"):
        KMLIPCalculator(KernelPotential(d2b))


def test_force_variance_matches_brute_force_posterior_covariance(d2b):
    """Var F_ja = d^2/dx dx' cov_post(E(R), E(R')) at R = R', by finite differences of the
    posterior covariance of total energies, built from kernel rows with dense linear algebra."""
    train = cual_cells(6, seed=41, repeat=(1, 1, 1))
    model = KernelPotential(d2b, n_sparse=12, sigma_stress=0.02, random_state=0,
                            n_threads=1, delta=0.5).fit(train)
    a = cual_cells(1, seed=42, repeat=(1, 1, 1))[0]
    a.calc = KMLIPCalculator(model, forces_var=True)
    a.get_potential_energy()
    fvar = a.calc.results["forces_var"]
    assert fvar.shape == (len(a), 3) and np.all(fvar >= 0)

    basis, d2 = model.basis_, model.delta_**2
    Kmm = d2 * (basis.kmm() + model.jitter_ * np.eye(basis.n_sparse))
    Sigma = np.linalg.inv(model.R_.T @ model.R_)
    Z = a.numbers

    def cov(p, q):
        Xp, Xq = d2b.transform(p), d2b.transform(q)
        kp = d2 * basis.energy_row(Xp, Z)
        kq = d2 * basis.energy_row(Xq, Z)
        prior = d2 * kernels.structure_kernel(Xp, Z, Xq, Z, basis.zeta)
        return prior - kp @ np.linalg.solve(Kmm, kq) + kp @ Sigma @ kq

    h = 1e-4
    for j in range(len(a)):
        for c in range(3):
            P, M = a.copy(), a.copy()
            P.positions[j, c] += h
            M.positions[j, c] -= h
            fd = (cov(P, P) - cov(P, M) - cov(M, P) + cov(M, M)) / (4 * h * h)
            assert fvar[j, c] == pytest.approx(fd, rel=2e-3, abs=1e-6 * d2)
    # energy variance is the same object at zero displacement
    assert a.calc.get_property("energy_var") == pytest.approx(cov(a, a), rel=1e-6, abs=1e-12)


class _CountingDescriptor:
    """Wraps a descriptor and counts its passes over structures."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def transform(self, *args, **kw):
        self.calls += 1
        return self.inner.transform(*args, **kw)

    def backprop(self, *args, **kw):
        self.calls += 1
        return self.inner.backprop(*args, **kw)


def test_calculator_computes_what_is_asked_and_reuses_the_last_pass(fitted, test_frames):
    import dataclasses

    counting = _CountingDescriptor(fitted.descriptor_)
    model = KernelPotential(fitted.descriptor)
    from kmlip.gp.terms import KernelSum, Term

    st = fitted.fitted_state_
    model.fitted_state_ = dataclasses.replace(
        st, kernel=KernelSum([Term(counting, st.basis)]), _derived={})
    a = test_frames[3].copy()
    a.calc = KMLIPCalculator(model)
    f = a.get_forces()
    assert counting.calls == 1
    assert "energies_var" not in a.calc.results and "energy_var" not in a.calc.results
    var = a.calc.get_property("energies_var", a)
    e_var = a.calc.get_property("energy_var", a)
    assert counting.calls == 1  # the variances reused the last pass's features
    np.testing.assert_array_equal(a.get_forces(), f)
    want_var, want_e = fitted.predict_local_energies(a, return_var=True)[1], \
        fitted.predict(a, return_std=True)[1][0] ** 2
    np.testing.assert_allclose(var, want_var, rtol=1e-12, atol=1e-18)
    assert e_var == pytest.approx(want_e, rel=1e-10)
    a.positions[0, 0] += 0.01  # moved: a new pass, variances not kept
    a.get_forces()
    assert counting.calls == 2 and "energies_var" not in a.calc.results
    # built to compute a variance on every call
    b = test_frames[4].copy()
    b.calc = KMLIPCalculator(fitted, variances=("energies",))
    b.get_forces()
    assert b.calc.results["energies_var"].shape == (len(b),)
    assert "energy_var" not in b.calc.results and "forces_var" not in b.calc.results
    with pytest.raises(ValueError, match="unknown variances"):
        KMLIPCalculator(fitted, variances=("stress",))
    # a single-point energy also reports the per-atom variances; forces then need a pass
    c = test_frames[6].copy()
    c.calc = KMLIPCalculator(model)
    c.get_potential_energy()
    assert counting.calls == 3 and c.calc.results["energies_var"].shape == (len(c),)
    c.get_forces()
    assert counting.calls == 4 and "energies_var" in c.calc.results


def test_compute_returns_exactly_what_is_requested(fitted, test_frames):
    a = test_frames[5]
    r = fitted.compute(a, ("energy",))
    assert r.forces is None and r.stress is None and r.energies_var is None
    assert r.forces_var is None and r.energy_var is None
    full = fitted.compute(a, ("energy", "forces", "stress", "energies_var"))
    assert full.energy == r.energy
    assert full.forces.shape == (len(a), 3) and full.stress.shape == (6,)
    assert full.energies_var.shape == (len(a),) and full.energy_var is None
    with pytest.raises(ValueError, match="unknown properties"):
        fitted.compute(a, ("magmom",))
