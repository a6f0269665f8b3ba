"""KernelPotential: accuracy on EMT Cu–Al, derivatives, determinism, sklearn API, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones
from conftest import cual_cells, cual_cluster, fd_forces, label, soap_or_skip
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from kmlip.model import KernelPotential


def _fd_forces(model, atoms, h=1e-4):
    return fd_forces(lambda a: model.predict(a)[0], atoms, h)


def _fd_stress(model, atoms, h=1e-5):
    W = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = np.zeros((3, 3))
            e[a, b] = h
            p, m = atoms.copy(), atoms.copy()
            p.set_cell(atoms.cell @ (np.eye(3) + e).T, scale_atoms=True)
            m.set_cell(atoms.cell @ (np.eye(3) - e).T, scale_atoms=True)
            W[a, b] = (model.predict(p)[0] - model.predict(m)[0]) / (2 * h)
    W = 0.5 * (W + W.T) / atoms.get_volume()
    return np.array([W[0, 0], W[1, 1], W[2, 2], W[1, 2], W[0, 2], W[0, 1]])


def test_emt_cual_force_errors_far_below_force_spread(d2b, train_frames, test_frames):
    model = KernelPotential(d2b, n_sparse=150, sigma_stress=0.02, random_state=0, n_threads=1)
    model.fit(train_frames)
    ev = model.evaluate(test_frames)
    f_ref = np.concatenate([a.get_forces().ravel() for a in test_frames])
    e_ref = np.array([a.get_potential_energy() / len(a) for a in test_frames])
    assert ev["forces_rmse"] < 0.2 * f_ref.std()
    assert ev["energy_rmse"] < 0.2 * e_ref.std()
    assert set(ev) >= {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_mae",
                       "stress_rmse"}
    assert 0.9 < model.score(test_frames) <= 1.0


def test_emt_cual_with_soap(train_frames, test_frames):
    soap = soap_or_skip()
    model = KernelPotential(soap, n_sparse=150, sigma_stress=0.02, random_state=0, n_threads=1)
    model.fit(train_frames)
    ev = model.evaluate(test_frames)
    f_ref = np.concatenate([a.get_forces().ravel() for a in test_frames])
    assert ev["forces_rmse"] < 0.2 * f_ref.std()
    a = test_frames[0]
    np.testing.assert_allclose(model.predict_forces(a), _fd_forces(model, a), atol=1e-6)
    np.testing.assert_allclose(model.predict_stress(a), _fd_stress(model, a), atol=1e-7)


def test_forces_and_stress_are_derivatives_of_the_energy_periodic(fitted, test_frames):
    a = test_frames[0]
    np.testing.assert_allclose(fitted.predict_forces(a), _fd_forces(fitted, a), atol=1e-6)
    np.testing.assert_allclose(fitted.predict_stress(a), _fd_stress(fitted, a), atol=1e-7)
    # a general (triclinic) cell
    b = a.copy()
    b.set_cell(a.cell @ np.array([[1, 0.05, 0.02], [0, 1, -0.04], [0, 0, 1]]), scale_atoms=True)
    np.testing.assert_allclose(fitted.predict_forces(b), _fd_forces(fitted, b), atol=1e-6)
    np.testing.assert_allclose(fitted.predict_stress(b), _fd_stress(fitted, b), atol=1e-7)


def test_forces_are_derivatives_of_the_energy_molecular(d2b, train_frames):
    clusters = [cual_cluster(seed) for seed in range(6)]
    model = KernelPotential(d2b, n_sparse=40, sigma_stress=0.02, random_state=0, n_threads=1)
    model.fit(train_frames[:10] + clusters)  # mixed periodic and molecular training
    c = cual_cluster(99)
    np.testing.assert_allclose(model.predict_forces(c), _fd_forces(model, c), atol=1e-6)
    assert np.all(np.isnan(model.predict_stress(c)))
    # momentum conservation of a free cluster
    np.testing.assert_allclose(model.predict_forces(c).sum(0), 0.0, atol=1e-10)


def test_energy_is_sum_of_local_energies_and_e0(fitted, test_frames):
    a = test_frames[1]
    loc = fitted.predict_local_energies(a)
    assert loc.shape == (len(a),)
    assert fitted.predict(a)[0] == pytest.approx(loc.sum(), rel=1e-12)
    lst = fitted.predict(test_frames[:3])
    assert lst.shape == (3,)
    F = fitted.predict_forces(test_frames[:2])
    assert isinstance(F, list) and F[0].shape == (len(test_frames[0]), 3)
    assert fitted.predict_stress(test_frames[:2]).shape == (2, 6)


def test_given_e0_is_used(d2b, train_frames):
    e0 = {"Cu": -0.1, "Al": 0.2}
    model = KernelPotential(d2b, n_sparse=20, e0=e0, random_state=0, n_threads=1)
    model.fit(train_frames[:6])
    assert model.e0_ == e0
    iso = Atoms("Cu", positions=[[0, 0, 0]], pbc=False)  # nothing in the cutoff: e0 only
    assert model.predict(iso)[0] == pytest.approx(-0.1)


def test_deterministic_for_a_fixed_seed(d2b, train_frames):
    kw = dict(n_sparse=30, sigma_stress=0.02, random_state=7, n_threads=1)
    a = KernelPotential(d2b, **kw).fit(train_frames[:12])
    b = KernelPotential(d2b, **kw).fit(train_frames[:12])
    assert np.array_equal(a.alpha_, b.alpha_)
    for s in a.sparse_points_:
        assert np.array_equal(a.sparse_points_[s], b.sparse_points_[s])
    c = KernelPotential(d2b, **dict(kw, random_state=8)).fit(train_frames[:12])
    assert not np.array_equal(a.sparse_indices_["Cu"], c.sparse_indices_["Cu"])


def test_sparse_methods_and_per_species_counts(d2b, train_frames):
    frames = train_frames[:8]
    for method in ("cur", "fps", "random"):
        m = KernelPotential(d2b, n_sparse={"Cu": 9, "Al": 4}, sparse_method=method,
                            random_state=0, n_threads=1).fit(frames)
        assert len(m.sparse_points_["Cu"]) == 9 and len(m.sparse_points_["Al"]) == 4
    big = KernelPotential(d2b, n_sparse=10**6, random_state=0, n_threads=1).fit(frames)
    n_cu = sum(int(np.sum(a.numbers == 29)) for a in frames)
    assert len(big.sparse_points_["Cu"]) == n_cu  # capped at the environments available
    pts = big.sparse_points_["Cu"][:5]
    given = KernelPotential(d2b, sparse_method={"Cu": pts, "Al": np.array([0, 2])},
                            n_threads=1).fit(frames)
    assert np.array_equal(given.sparse_points_["Cu"], pts)
    assert len(given.sparse_points_["Al"]) == 2


def test_clone_get_params_set_params(fitted, d2b):
    params = fitted.get_params(deep=False)
    assert params["n_sparse"] == 60 and params["sigma_stress"] == 0.02
    c = clone(fitted)
    assert not hasattr(c, "alpha_")
    assert c.get_params(deep=False)["descriptor"].get_params() == d2b.get_params()
    assert c.get_params(deep=False)["descriptor"] is not d2b
    c.set_params(zeta=2, delta=0.5)
    assert c.zeta == 2 and fitted.zeta == 4
    deep = fitted.get_params(deep=True)
    assert deep["descriptor__r_cut"] == d2b.r_cut


def test_per_structure_sigma_overrides(d2b, train_frames):
    frames = [a.copy() for a in train_frames[:10]]
    for a, src in zip(frames, train_frames[:10], strict=True):
        a.calc = src.calc
    # a grossly wrong energy with a huge per-structure sigma must not spoil the fit
    bad = frames[0]
    e = bad.get_potential_energy()
    bad.calc = type(bad.calc)(bad, energy=e + 5.0, forces=bad.get_forces(),
                              stress=bad.get_stress())
    bad.info["energy_sigma"] = 1e3
    kw = dict(n_sparse=40, random_state=0, n_threads=1)
    m = KernelPotential(d2b, **kw).fit(frames)
    assert m.n_labels_["energy_fixed"] == 1 and m.n_labels_["energy"] == 9
    # the same with the correct energy: the down-weighted label must hardly matter
    good = [a.copy() for a in train_frames[:10]]
    for a, src in zip(good, train_frames[:10], strict=True):
        a.calc = src.calc
    good[0].info["energy_sigma"] = 1e3
    ref = KernelPotential(d2b, **kw).fit(good)
    del bad.info["energy_sigma"]
    m2 = KernelPotential(d2b, **kw).fit(frames)  # the wrong energy at full weight
    e_ref = ref.predict(bad)[0]
    assert abs(m2.predict(bad)[0] - e_ref) > 1.0
    assert abs(m.predict(bad)[0] - e_ref) < 0.01 * abs(m2.predict(bad)[0] - e_ref)
    assert abs(m.e0_["Cu"] - ref.e0_["Cu"]) < 1e-3


def test_labels_from_info_and_arrays(d2b, train_frames):
    frames = []
    for a in train_frames[:6]:
        b = a.copy()
        b.info["E_ref"] = a.get_potential_energy()
        b.arrays["F_ref"] = a.get_forces()
        b.info["S_ref"] = a.get_stress(voigt=False)  # 3x3 accepted
        frames.append(b)
    kw = dict(n_sparse=20, sigma_stress=0.02, random_state=0, n_threads=1)
    m1 = KernelPotential(d2b, energy_key="E_ref", forces_key="F_ref", stress_key="S_ref",
                         **kw).fit(frames)
    m2 = KernelPotential(d2b, **kw).fit(train_frames[:6])
    np.testing.assert_allclose(m1.alpha_, m2.alpha_, rtol=1e-10, atol=1e-14)


def test_partial_fit_equals_fit_on_all_frames(d2b, train_frames):
    pts = KernelPotential(d2b, n_sparse=20, random_state=0, n_threads=1).fit(
        train_frames[:10]).sparse_points_
    kw = dict(sparse_method=dict(pts), e0={"Cu": -0.05, "Al": 0.1}, sigma_stress=0.02,
              n_threads=1)
    full = KernelPotential(d2b, **kw).fit(train_frames[:10])
    online = KernelPotential(d2b, **kw).fit(train_frames[:6]).partial_fit(train_frames[6:10])
    np.testing.assert_allclose(online.alpha_, full.alpha_, rtol=1e-7, atol=1e-10)
    assert online.log_marginal_likelihood_ == pytest.approx(full.log_marginal_likelihood_,
                                                            rel=1e-9)


class _LJBaseline:
    """A toy baseline with the protocol the model expects."""

    def __init__(self, epsilon=0.01, sigma=2.3):
        self.epsilon, self.sigma = epsilon, sigma

    def compute(self, atoms):
        a = atoms.copy()
        a.calc = LennardJones(epsilon=self.epsilon, sigma=self.sigma, rc=4.0, smooth=True)
        s = a.get_stress() if np.all(a.pbc) else None
        return a.get_potential_energy(), a.get_forces(), s

    def to_dict(self):
        return {"epsilon": self.epsilon, "sigma": self.sigma}

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def test_baseline_is_subtracted_and_added_back(d2b, train_frames):
    base = _LJBaseline()
    m = KernelPotential(d2b, n_sparse=30, baseline=base, sigma_stress=0.02, random_state=0,
                        n_threads=1).fit(train_frames[:10])
    a = train_frames[11]
    E_b, F_b, S_b = base.compute(a)
    r = m.compute(a, ("energy", "energies", "forces", "stress"))
    assert r.energy == pytest.approx(r.energies.sum() + E_b, rel=1e-12)
    np.testing.assert_allclose(m.predict_forces(a), _fd_forces(m, a), atol=1e-5)
    np.testing.assert_allclose(m.predict_stress(a), _fd_stress(m, a), atol=1e-6)


def test_local_variance_far_from_data_is_large(d2b):
    # Pure Cu: every local environment of the training set is pinned by the data. (In random
    # alloys the split of a total energy between atoms stays uncertain, a real effect.)
    train = cual_cells(30, seed=2, frac_al=0.0)
    model = KernelPotential(d2b, n_sparse=60, random_state=0, n_threads=1).fit(train)
    _, var_train = model.predict_local_energies(train[0], return_var=True)
    assert np.all(var_train >= 0)
    squeezed = bulk("Cu", "fcc", a=3.65 * 0.7, cubic=True).repeat((2, 1, 1))  # 30 % compressed
    _, var_far = model.predict_local_energies(squeezed, return_var=True)
    assert np.all(var_far >= 10 * var_train.max())
    assert np.all(var_far <= model.delta_**2 * (1 + 1e-9))
    E, std = model.predict([train[0], squeezed], return_std=True)
    assert std[1] > 10 * std[0] and np.all(std >= 0)


def test_unseen_species_pair_gets_large_variance(d2b):
    pure = cual_cells(6, seed=3, frac_al=0.0) + cual_cells(6, seed=4, frac_al=1.0)
    m = KernelPotential(d2b, n_sparse=40, random_state=0, n_threads=1).fit(pure)
    _, var_train = m.predict_local_energies(pure[0], return_var=True)
    mixed = cual_cells(1, seed=5, frac_al=0.5)[0]
    _, var_mixed = m.predict_local_energies(mixed, return_var=True)
    assert var_mixed.min() >= 10 * var_train.max()


# -- bad input -------------------------------------------------------------------------------------
def test_missing_labels_name_frame_and_key(d2b, train_frames):
    frames = list(train_frames[:4])
    nolabel = train_frames[4].copy()  # .copy() drops the calculator
    frames.append(nolabel)
    with pytest.raises(ValueError, match=r"frame 4.*'energy'"):
        KernelPotential(d2b, n_sparse=5).fit(frames)
    nolabel.info["energy"] = -1.0
    with pytest.raises(ValueError, match=r"frame 4.*'forces'"):
        KernelPotential(d2b, n_sparse=5).fit(frames)
    nolabel.arrays["forces"] = np.zeros((len(nolabel), 3))
    with pytest.raises(ValueError, match=r"frame 4.*'stress'"):
        KernelPotential(d2b, n_sparse=5, sigma_stress=0.01).fit(frames)
    KernelPotential(d2b, n_sparse=5, n_threads=1).fit(frames)  # complete now


def test_nan_labels_are_rejected(d2b, train_frames):
    a = train_frames[0].copy()
    a.info["energy"] = float("nan")
    a.arrays["forces"] = np.zeros((len(a), 3))
    with pytest.raises(ValueError, match=r"frame 0.*NaN"):
        KernelPotential(d2b).fit([a])
    a.info["energy"] = -1.0
    a.arrays["forces"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"frame 0.*forces.*NaN"):
        KernelPotential(d2b).fit([a])


def test_unknown_species_and_wrong_types(fitted, d2b, train_frames):
    h2o = Atoms("H2O", positions=[[0, 0, 0], [0.9, 0, 0], [0, 0.9, 0]])
    with pytest.raises(ValueError, match="species"):
        fitted.predict(h2o)
    au = label(bulk("Au", "fcc", a=4.1))
    with pytest.raises(ValueError, match="species"):
        KernelPotential(d2b).fit([au])
    with pytest.raises(ValueError, match="empty"):
        KernelPotential(d2b).fit([])
    with pytest.raises(TypeError):
        KernelPotential(d2b).fit("frames.xyz")
    with pytest.raises(TypeError):
        KernelPotential(d2b).fit([train_frames[0], 3])
    with pytest.raises(TypeError):
        fitted.predict(np.zeros((3, 3)))
    with pytest.raises(TypeError, match="descriptor"):
        KernelPotential(None).fit(train_frames[:2])
    with pytest.raises(ValueError, match="zeta"):
        KernelPotential(d2b, zeta=0).fit(train_frames[:2])
    with pytest.raises(ValueError, match="sigma_force"):
        KernelPotential(d2b, sigma_force=-1.0).fit(train_frames[:2])
    with pytest.raises(NotFittedError):
        KernelPotential(d2b).predict(train_frames[0])


def test_mixed_precision_fit_and_progress_bar(d2b, train_frames, test_frames, capsys):
    kw = dict(n_sparse=40, sigma_stress=0.02, random_state=0, n_threads=1)
    a = KernelPotential(d2b, **kw).fit(train_frames[:12])
    b = KernelPotential(d2b, precision="mixed", progress=True, verbose=1, **kw)
    b.fit(train_frames[:12])
    err = capsys.readouterr().err
    assert "kmlip" in err
    ea, eb = a.predict(test_frames[:4]), b.predict(test_frames[:4])
    np.testing.assert_allclose(eb, ea, atol=1e-3 * len(test_frames[0]))
    with pytest.raises(ValueError, match="precision"):
        KernelPotential(d2b, precision="single").fit(train_frames[:2])
