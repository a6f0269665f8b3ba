"""On-the-fly learning with a sum of kernels (Distance2b + SOAP) on Cu-Al with EMT: reference
calls, resume after an interruption, and the final model equal to a fresh fit on the labelled
frames; the learner's pair points; force_variance_diag of a sum."""
from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read
from conftest import cual_cells, soap_or_skip

from kmlip import Distance2b, KernelPotential
from kmlip import uncertainty as unc
from kmlip.active import learn_on_the_fly
from kmlip.active.learn import pick_pairs

STEPS = 40
E0 = {"Cu": -0.1, "Al": -0.2}


def _cual():
    a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(2)
    a.symbols[np.random.default_rng(0).random(len(a)) < 0.3] = "Al"
    return a


def _template():
    return KernelPotential([Distance2b(["Cu", "Al"], r_cut=4.0, theta=0.8), soap_or_skip()],
                           zeta=[None, 4], delta=[0.5, 0.3], e0=E0)


def _learn(directory, **kw):
    args = dict(steps=STEPS, temperature=800.0, model=_template(), seed=3, max_new_points=16,
                progress=False)
    args.update(kw)
    return learn_on_the_fly(_cual(), EMT(), directory=directory, **args)


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    return _learn(d), d


def test_learning_with_a_sum_resumes_and_equals_a_fresh_fit(tmp_path, full_run):
    full, full_dir = full_run
    assert full.n_reference_calls >= 3, "the test needs two gate trips"
    st = full.model.fitted_state_
    assert [type(t.descriptor).__name__ for t in st.kernel.terms] == ["Distance2b", "SOAP"]
    assert full.calls[-1]["n_sparse"] == st.n_sparse > 22  # grown from the first model
    log = (full_dir / "log").read_text()
    assert "term 0 (Distance2b) distances of the start frames' pairs, grown" in log
    assert "sparse points of the first model: term 0 (Distance2b): Al-Al 2" in log

    def callback(rec):
        if rec["call"] == 2:
            raise Crash

    with pytest.raises(Crash):
        _learn(tmp_path / "run", callback=callback)
    res = _learn(tmp_path / "run")
    assert [r["step"] for r in res.calls] == [r["step"] for r in full.calls]
    m = res.model
    test = cual_cells(2, seed=31, repeat=(2, 2, 2))
    for a in test:
        f1, f2 = m.predict_forces(a), full.model.predict_forces(a)
        # the same model up to the rounding of a hyperparameter optimisation after resume
        assert np.max(np.abs(f1 - f2)) <= 1e-8 * np.max(np.abs(f2))
    # the model equals a fresh fit on the labelled frames with its points and hyperparameters
    refs = read(tmp_path / "run" / "reference.extxyz", ":")
    assert len(refs) == res.n_reference_calls
    pts = m.sparse_points_
    fresh = KernelPotential(
        _template().descriptor, zeta=[None, 4], delta=m.delta_,
        n_sparse=[{k: len(v) for k, v in p.items()} for p in pts], sparse_method=pts,
        sigma_energy=m.sigma_energy_, sigma_force=m.sigma_force_, sigma_stress=m.sigma_stress_,
        e0=m.e0_, jitter=m.jitter_, precision="double").fit(refs)
    assert m.e0_ == E0
    for a in test:
        r1 = m.compute(a, ("energy", "forces", "stress", "energies_var"))
        r2 = fresh.compute(a, ("energy", "forces", "stress", "energies_var"))
        assert abs(r1.energy - r2.energy) <= 1e-9 * abs(r2.energy)
        for k in ("forces", "stress", "energies_var"):
            v1, v2 = getattr(r1, k), getattr(r2, k)
            assert np.max(np.abs(v1 - v2)) <= 1e-8 * np.max(np.abs(v2)), k
    # the calibration was fitted on a sum's measures, forces_var_diag among them
    cal = m.fitted_state_.calibration
    assert cal is not None and "forces_var_diag" in cal.report["spearman"]


def test_a_frame_labelled_before_a_crash_in_the_update_is_taken_on_resume(tmp_path, monkeypatch,
                                                                        full_run):
    from kmlip.gp import columns

    full, _ = full_run
    real = columns.add_columns

    def failing(*a, **kw):
        raise Crash

    monkeypatch.setattr(columns, "add_columns", failing)
    with pytest.raises(Crash):
        _learn(tmp_path / "run")
    monkeypatch.setattr(columns, "add_columns", real)
    assert len(read(tmp_path / "run" / "reference.extxyz", ":")) == 2  # labelled, not taken
    res = _learn(tmp_path / "run")
    assert "call 2 taken on resume" in (tmp_path / "run" / "log").read_text()
    assert [r["step"] for r in res.calls] == [r["step"] for r in full.calls]
    a = cual_cells(1, seed=32, repeat=(2, 2, 2))[0]
    f1, f2 = res.model.predict_forces(a), full.model.predict_forces(a)
    assert np.max(np.abs(f1 - f2)) <= 1e-8 * np.max(np.abs(f2))


def test_learner_arguments_with_a_template(tmp_path):
    with pytest.raises(ValueError, match="either descriptor or model"):
        _learn(tmp_path / "a", descriptor=soap_or_skip())
    with pytest.raises(TypeError, match="KernelPotential"):
        _learn(tmp_path / "b", model=soap_or_skip())
    with pytest.raises(ValueError, match="term 0"):
        _learn(tmp_path / "c", model=KernelPotential(
            [Distance2b(["Cu"], r_cut=4.0), soap_or_skip()], zeta=[None, 4]))


def test_pair_points_are_a_grid_of_half_theta_over_uncertain_pairs():
    d2 = Distance2b(["Cu", "Al"], r_cut=4.0, theta=0.8)
    a = cual_cells(1, seed=5, rattle=0.3)[0]
    env = d2.environments(a)
    key = int(env.keys[0])
    existing = {key: np.array([[2.55]])}
    rank = np.full(len(a), np.inf)
    rank[[3, 1]] = [0, 1]  # atom 3 first, then atom 1; no other atom's pairs
    got = pick_pairs(d2, env, existing, rank, np.inf)
    mine = np.isin(env.owners, [1, 3]).any(axis=1)
    fc = d2.make_basis({}, None).cutoff(env.features[:, 0])[0]
    for k, v in got.items():
        r = np.concatenate([existing.get(k, np.zeros((0, 1)))[:, 0], v[:, 0]])
        assert np.min(np.diff(np.sort(r)), initial=np.inf) >= 0.4 - 1e-12
        cand = env.features[(env.keys == k) & mine, 0]
        assert np.all(np.isin(v[:, 0], cand))
        # every candidate inside the cutoff is within theta/2 of a point
        inside = cand[fc[(env.keys == k) & mine] >= 0.1]
        assert np.all(np.min(np.abs(inside[:, None] - r[None, :]), axis=1) < 0.4)
    assert sum(len(v) for v in pick_pairs(d2, env, existing, rank, 2).values()) == 2
    assert pick_pairs(d2, env, existing, np.full(len(a), np.inf), np.inf) == {}


def test_force_variance_diag_of_a_sum_is_the_sum_of_its_terms():
    frames = cual_cells(4, seed=41)
    soap = soap_or_skip()
    d2 = Distance2b(["Cu", "Al"], r_cut=4.0, theta=0.8)
    kw = dict(sigma_stress=0.02, e0=E0, n_threads=1, precision="double")
    s = KernelPotential([d2, soap], zeta=[None, 2], delta=[0.5, 0.2], n_sparse=[4, 6],
                        sparse_method=["uniform", "fps"], random_state=0, **kw).fit(frames)
    st = s.fitted_state_
    a = cual_cells(1, seed=42)[0]
    envs = [t.descriptor.environments(a, gradients=True) for t in st.kernel.terms]
    parts = unc.force_variance_diag(st, a, envs=envs, per_term=True)
    total = unc.force_variance_diag(st, a, envs=envs)
    assert parts.shape == (2, len(a)) and np.all(parts >= 0) and np.all(parts[1] > 0)
    np.testing.assert_allclose(total, parts.sum(axis=0), rtol=1e-14)
    # the SOAP part: the single-term function on a SOAP model with the same points and δ
    one = KernelPotential(soap, zeta=2, delta=0.2, n_sparse=6,
                          sparse_method=s.sparse_points_[1], **kw).fit(frames)
    np.testing.assert_allclose(one.fitted_state_.L_hat, st.L_hat[st.kernel.columns(1)][
        :, st.kernel.columns(1)], rtol=0, atol=1e-15)
    X, G = soap.transform(a, gradients=True)
    nov = one.compute(a, ("novelty",)).novelty
    single = unc.force_variance_diag(one.fitted_state_, a, X, G, nov)
    np.testing.assert_allclose(parts[1], single, rtol=1e-9, atol=1e-15)
    # ... and through envs on that single-term model
    env1 = [soap.environments(a, gradients=True)]
    np.testing.assert_allclose(unc.force_variance_diag(one.fitted_state_, a, envs=env1),
                               single, rtol=1e-9, atol=1e-15)
    # the pair part: each pair's novelty times (1/θ² + (fc'/fc)²), to both of its atoms
    b = st.kernel.terms[0].basis
    e = envs[0]
    r = e.features[:, 0]
    K = b.local_rows(e.features, e.keys)
    cols = st.kernel.columns(0)
    Kmm = b.kmm() + st.jitter * np.eye(b.n_sparse)
    nov = 0.25 * np.maximum(b.self_kernel(e.features, e.keys)
                            - np.einsum("ij,ij->i", K, np.linalg.solve(Kmm, K.T).T), 0.0)
    h = 1e-6
    fc = b.cutoff(r)[0]
    dfc = (b.cutoff(r + h)[0] - b.cutoff(r - h)[0]) / (2 * h)
    w = 1 / 0.8 ** 2 + np.divide(dfc, fc, out=np.zeros_like(fc), where=fc > 0) ** 2
    ref = np.zeros(len(a))
    own = e.owners[:, 0] != e.owners[:, 1]  # a pair with an image of its own atom: no force
    np.add.at(ref, e.owners[own, 0], (nov * w)[own])
    np.add.at(ref, e.owners[own, 1], (nov * w)[own])
    assert cols.stop - cols.start == b.n_sparse
    np.testing.assert_allclose(parts[0], ref, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="envs="):
        unc.force_variance_diag(st, a, X, G, nov)
    # the prediction path of a sum gives the same, as a property and as a calibration measure
    np.testing.assert_allclose(s.compute(a, ("forces_var_diag",)).forces_var_diag, total,
                               rtol=1e-12, atol=1e-18)
    rep = s.calibrate(cual_cells(2, seed=43))
    assert rep["measure"] in ("novelty", "energies_var") and "forces_var_diag" in rep["spearman"]
    rep = s.calibrate(cual_cells(1, seed=43), measure="forces_var_diag")
    assert rep["measure"] == "forces_var_diag"
    r = s.compute(a, ("forces_var_diag", "uncertainty"))
    np.testing.assert_allclose(r.uncertainty, s.fitted_state_.calibration.uncertainty(total),
                               rtol=1e-12)
