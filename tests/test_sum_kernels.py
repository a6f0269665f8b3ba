"""Distance2b (GAP's distance_2b) and sums of kernels: environments, gradients, the vector-δ GP,
fit/predict/variances/save/load/calculator of a 2b + SOAP model, and the general prediction path
against the single-term fast path."""
from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from conftest import cual_cells, fd_forces, fd_positions, fd_strain, soap_or_skip, triclinic_cell

from kmlip import Distance2b, KernelPotential
from kmlip.descriptors.distance2b import pair_key


@pytest.fixture(scope="module")
def frames():
    return cual_cells(12, seed=3)


@pytest.fixture(scope="module")
def sum_model(frames):
    soap = soap_or_skip()
    m = KernelPotential(descriptor=[Distance2b(species=["Cu", "Al"], r_cut=4.0, theta=0.8),
                                    soap],
                        delta=[0.5, 0.2], n_sparse=[8, 30], zeta=[None, 2],
                        sparse_method=["uniform", "cur"], sigma_stress=0.02, random_state=0,
                        n_threads=1)
    return m.fit(frames)


def _pairs_ase(atoms, r_cut):
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, r_cut)
    return np.sort(d[i < j]), np.sort(d[i == j])


def test_distance2b_environments_are_the_unordered_pairs():
    a = triclinic_cell(2)
    d2 = Distance2b(species=["Cu", "Al"], r_cut=4.5)
    env = d2.environments(a)
    lt, eq = _pairs_ase(a, 4.5)
    # pairs i < j once each, images of an atom with itself once per +/- pair
    assert env.n_env == len(lt) + len(eq) // 2
    assert np.allclose(np.sort(env.features[:, 0]),
                       np.sort(np.concatenate([lt, eq[::2]])))
    Z = a.numbers
    assert set(env.keys) <= {pair_key(29, 29), pair_key(13, 29), pair_key(13, 13)}
    k = [pair_key(Z[i], Z[j]) for i, j in env.owners]
    assert np.array_equal(np.asarray(k), env.keys)


def test_distance2b_pairs_filter_and_bad_parameters():
    a = triclinic_cell(1)
    only = Distance2b(species=["Cu", "Al"], r_cut=4.5, pairs=[("Cu", "Al")])
    assert set(only.environments(a).keys) == {pair_key(13, 29)}
    for kw, err in [({"r_cut": -1.0}, ValueError), ({"theta": 0.0}, ValueError),
                    ({"cutoff_width": 9.0}, ValueError), ({"pairs": [("Cu", "Ni")]}, ValueError),
                    ({"r_cut": "4"}, TypeError)]:
        with pytest.raises(err):
            Distance2b(**{"species": ["Cu", "Al"], "r_cut": 4.5, **kw})
    with pytest.raises(ValueError, match="Ni"):
        Distance2b(species=["Cu"], r_cut=4.0).environments(bulk("Ni"))


def test_distance2b_gradients_and_strain_equal_central_differences():
    a = triclinic_cell(3)
    d2 = Distance2b(species=["Cu", "Al"], r_cut=4.5)
    env = d2.environments(a, gradients=True)
    G = env.gradients
    n = len(a)
    num = fd_positions(d2, a, h=1e-6)[..., 0]
    ana = np.zeros((env.n_env, n, 3))
    np.add.at(ana, (G.centers, G.neighbors), G.values[:, :, 0])
    assert np.allclose(ana, num, atol=1e-7)
    # strain derivative: sum values x vectors = d r / d eps
    strain = np.zeros((env.n_env, 3, 3))
    np.add.at(strain, G.centers, G.values[:, :, 0][:, :, None] * G.vectors[:, None, :])
    assert np.allclose(strain, fd_strain(d2, a, h=1e-6)[..., 0], atol=1e-6)


def test_pair_basis_derivative_rows_equal_differences_of_energy_rows():
    a = triclinic_cell(4)
    d2 = Distance2b(species=["Cu", "Al"], r_cut=4.5, theta=0.7)
    env = d2.environments(a, gradients=True)
    pts = {k: env.features[env.keys == k][:3] for k in np.unique(env.keys)}
    basis = d2.make_basis(pts, None)
    Fr, W9 = basis.derivative_rows(env.features, env.keys, env.gradients, n_atoms=len(a))
    h = 1e-6
    for j in (0, 2):
        for c in range(3):
            p, m = a.copy(), a.copy()
            p.positions[j, c] += h
            m.positions[j, c] -= h
            ep, em = d2.environments(p), d2.environments(m)
            num = -(basis.energy_row(ep.features, ep.keys)
                    - basis.energy_row(em.features, em.keys)) / (2 * h)
            assert np.allclose(Fr[3 * j + c], num, atol=1e-7)
    assert np.all(np.isfinite(W9))


def test_vector_delta_gradient_of_the_likelihood_equals_differences(sum_model):
    from kmlip.gp.sparse import solve_stack

    st = sum_model.fitted_state_
    d = np.array(st.column_delta)
    sig = {"energy": 0.002, "forces": 0.02, "virial": 0.02}
    g = solve_stack(st.factors, st.L_hat, d, sig, gradient=True).gradient["delta"]
    for t in range(2):
        cols = st.kernel.columns(t)
        h = 1e-5
        dp, dm = d.copy(), d.copy()
        dp[cols] *= np.exp(h)
        dm[cols] *= np.exp(-h)
        num = (solve_stack(st.factors, st.L_hat, dp, sig).log_marginal_likelihood
               - solve_stack(st.factors, st.L_hat, dm, sig).log_marginal_likelihood) / (2 * h)
        assert np.isclose(g[cols].sum(), num, rtol=1e-4, atol=1e-6)
    for cls in ("energy", "forces"):
        s2 = dict(sig)
        s2[cls] *= np.exp(1e-4)
        s3 = dict(sig)
        s3[cls] *= np.exp(-1e-4)
        num = (solve_stack(st.factors, st.L_hat, d, s2).log_marginal_likelihood
               - solve_stack(st.factors, st.L_hat, d, s3).log_marginal_likelihood) / 2e-4
        gg = solve_stack(st.factors, st.L_hat, d, sig, gradient=True).gradient[cls]
        # the likelihood is ~1e4 here: differences carry ~1e-3 of round-off
        assert np.isclose(gg, num, rtol=1e-4, atol=5e-3)


def test_sum_model_forces_and_stress_are_derivatives_of_its_energy(sum_model):
    a = cual_cells(1, seed=9)[0]
    r = sum_model.compute(a, ("energy", "forces", "stress", "energies"))
    assert np.isclose(r.energies.sum(), r.energy)
    num = fd_forces(lambda x: sum_model.compute(x).energy, a)
    assert np.allclose(r.forces, num, rtol=0, atol=1e-6)
    cell = a.cell.array
    e = np.eye(3)
    e[0, 1] = e[1, 0] = 1e-6
    p = a.copy()
    p.set_cell(cell @ e, scale_atoms=True)
    m = a.copy()
    m.set_cell(cell @ (2 * np.eye(3) - e), scale_atoms=True)
    num = (sum_model.compute(p).energy - sum_model.compute(m).energy) / (4e-6) / a.get_volume()
    assert np.isclose(r.stress[5], num, atol=1e-6)


def test_sum_model_fits_better_than_its_parts_alone_would_not_break(sum_model, frames):
    test = cual_cells(4, seed=11)
    err = sum_model.error_metrics(test)
    assert err["forces_rmse"] < 0.25  # EMT forces here are ~1 eV/Å
    assert sum_model.delta_ == [0.5, 0.2]
    pts = sum_model.sparse_points_
    assert isinstance(pts, list) and set(pts[0]) <= {"Al-Al", "Al-Cu", "Cu-Cu"}
    assert all(v.shape[1] == 1 for v in pts[0].values())


def test_sum_model_save_load_and_calculator(sum_model, tmp_path):
    from kmlip import KMLIPCalculator, load
    from kmlip.io import read_header

    p = tmp_path / "sum.kmlip"
    sum_model.save(p)
    assert read_header(p)["format_version"] == 3 and "terms" in read_header(p)["fitted"]
    m2 = load(p)
    a = cual_cells(1, seed=12)[0]
    props = ("energy", "forces", "stress", "energies_var", "energy_var")
    r1, r2 = sum_model.compute(a, props), m2.compute(a, props)
    for k in ("energy", "forces", "stress", "energies_var", "energy_var"):
        assert np.array_equal(getattr(r1, k), getattr(r2, k)), k
    a.calc = KMLIPCalculator(m2)
    assert np.isclose(a.get_potential_energy(), r1.energy)
    assert np.allclose(a.get_forces(), r1.forces)


def test_sum_model_variances_are_positive_and_rise_off_the_data(sum_model):
    a = cual_cells(1, seed=13)[0]
    r = sum_model.compute(a, ("energies_var", "energy_var", "forces_var", "novelty"))
    assert np.all(r.energies_var > 0) and r.energy_var > 0 and np.all(r.forces_var >= 0)
    assert np.all(r.novelty <= r.energies_var * (1 + 1e-9) + 1e-15)
    far = a.copy()
    far.set_cell(far.cell * 0.85, scale_atoms=True)
    r2 = sum_model.compute(far, ("energies_var",))
    assert np.median(r2.energies_var) > np.median(r.energies_var)


def test_general_path_equals_the_single_term_fast_path(frames):
    from kmlip.prediction import _compute, _compute_terms

    soap = soap_or_skip()
    m = KernelPotential(soap, n_sparse=20, zeta=2, sigma_stress=0.02, random_state=0,
                        n_threads=1).fit(frames[:6])
    st = m.fitted_state_
    a = cual_cells(1, seed=14)[0]
    props = frozenset({"energy", "energies", "forces", "stress", "energies_var", "energy_var",
                       "forces_var", "novelty", "forces_var_diag"})
    fast = _compute(st, a, props, 1, None)
    gen = _compute_terms(st, a, props, 1)
    for k in ("energy", "energies", "forces", "stress", "energy_var", "energies_var",
              "forces_var", "novelty", "forces_var_diag"):
        assert np.allclose(getattr(fast, k), getattr(gen, k), rtol=1e-7, atol=1e-12), k


def test_sum_of_kernels_parameter_checks(frames):
    soap = soap_or_skip()
    d2 = Distance2b(species=["Cu", "Al"], r_cut=4.0)
    bad = [dict(delta=[0.1]), dict(zeta=[4, 4]), dict(n_sparse=[5, 5, 5]),
           dict(descriptor=[]), dict(zeta=[None, None])]
    for kw in bad:
        m = KernelPotential(**{"descriptor": [d2, soap], **kw})
        with pytest.raises((ValueError, TypeError)):
            m.fit(frames[:2])
    with pytest.raises(ValueError, match="index arrays|global indices"):
        KernelPotential([d2, soap], sparse_method=[np.arange(3), "cur"]).fit(frames[:2])


def test_sum_hyperparameter_optimisation_moves_each_delta(sum_model):
    from sklearn.base import clone

    m = clone(sum_model).fit(cual_cells(6, seed=3), optimize=True)
    assert len(m.delta_) == 2 and all(d > 0 for d in m.delta_)
    assert m.log_marginal_likelihood_ >= clone(sum_model).fit(
        cual_cells(6, seed=3)).log_marginal_likelihood_ - 1e-6


def test_kmlip_fit_takes_a_json_model_spec_with_a_sum_of_kernels(frames, tmp_path, capsys):
    import json

    from ase.io import write

    from kmlip import load
    from kmlip.cli.main import main

    soap_or_skip()
    train = tmp_path / "train.xyz"
    write(train, frames[:4], format="extxyz")
    spec = {"terms": [
        {"descriptor": {"type": "Distance2b",
                        "params": {"species": ["Cu", "Al"], "r_cut": 4.0, "theta": 0.8}},
         "delta": 0.5, "n_sparse": 6, "sparse_method": "uniform"},
        {"descriptor": {"type": "SOAP", "params": {"species": ["Cu", "Al"], "r_cut": 4.0,
                                                   "n_max": 3, "l_max": 2, "sigma": 0.5}},
         "delta": 0.2, "zeta": 2, "n_sparse": 10}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "m.kmlip"
    assert main(["fit", str(train), "-o", str(out), "--model", str(path)]) == 0
    m = load(out)
    assert [type(d).__name__ for d in m.fitted_state_.descriptors] == ["Distance2b", "SOAP"]
    assert m.delta_ == [0.5, 0.2]
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"terms": [{"descriptor": {"type": "Nope", "params": {}}}]}))
    assert main(["fit", str(train), "-o", str(tmp_path / "x.kmlip"), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Nope" in err and "bad.json" in err
