"""Kernel contractions, the streaming-QR DTC solve, likelihood, variances and sparse selection."""
from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import cual_cells

from kmlip import kernels
from kmlip._ext import contract
from kmlip.gp import selection
from kmlip.gp.sparse import StreamingQR, cholesky_jitter, predictive_variance, solve_stack
from kmlip.model import KernelPotential


def _strained(atoms, a, b, h):
    e = np.zeros((3, 3))
    e[a, b] = h
    out = atoms.copy()
    out.set_cell(atoms.cell @ (np.eye(3) + e).T, scale_atoms=True)
    return out


def _moved(atoms, j, c, h):
    out = atoms.copy()
    out.positions[j, c] += h
    return out


@pytest.fixture(scope="module")
def small_case(d2b):
    atoms = cual_cells(1, seed=5)[0]
    rng = np.random.default_rng(0)
    F = d2b.n_features
    basis = kernels.SparseBasis({29: rng.random((7, F)), 13: rng.random((5, F))}, zeta=4)
    return atoms, basis


# -- kernel contractions ---------------------------------------------------------------------------
def test_derivative_rows_are_derivatives_of_the_energy_row(d2b, small_case):
    atoms, basis = small_case
    Z = atoms.numbers
    X, G = d2b.transform(atoms, gradients=True)
    Fr, W9 = basis.derivative_rows(X, Z, G)
    h = 1e-5
    row = lambda a: basis.energy_row(d2b.transform(a), Z)  # noqa: E731
    fd = np.array([-(row(_moved(atoms, j, c, h)) - row(_moved(atoms, j, c, -h))) / (2 * h)
                   for j in range(len(atoms)) for c in range(3)])
    np.testing.assert_allclose(Fr, fd, atol=1e-7 * np.abs(fd).max())
    fdw = np.array([(row(_strained(atoms, a, b, h)) - row(_strained(atoms, a, b, -h))) / (2 * h)
                    for a in range(3) for b in range(3)])
    np.testing.assert_allclose(W9, fdw, atol=1e-6 * np.abs(fdw).max())


def test_prediction_contraction_matches_rows_and_c_core(d2b, small_case):
    atoms, basis = small_case
    Z = atoms.numbers
    X, G = d2b.transform(atoms, gradients=True)
    alpha = np.random.default_rng(1).standard_normal(basis.n_sparse)
    Fr, W9 = basis.derivative_rows(X, Z, G)
    eps, v = basis.local_energy_grad(X, Z, alpha)
    f, W = kernels.contract_forces(G, v, len(atoms))
    np.testing.assert_allclose(f.ravel(), Fr @ alpha, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(W.ravel(), W9 @ alpha, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(eps, basis.local_rows(X, Z) @ alpha, rtol=1e-12)
    for z in basis.species_z:
        rows = np.flatnonzero(Z == z).astype(np.int64)
        e2, v2 = contract.centre_energy_grad(X, rows, basis.points_hat[z],
                                             np.ascontiguousarray(alpha[basis.columns(z)]),
                                             4, 1.0)
        np.testing.assert_allclose(e2, eps[rows], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(v2, v[rows], rtol=1e-11, atol=1e-15)


def test_contraction_is_bitwise_identical_for_1_and_2_threads(d2b):
    atoms = cual_cells(1, seed=3, repeat=(2, 2, 2))[0]  # 32 atoms: large enough to go parallel
    X, G = d2b.transform(atoms, gradients=True)
    rng = np.random.default_rng(2)
    basis = kernels.SparseBasis({29: rng.random((300, X.shape[1])),
                                 13: rng.random((200, X.shape[1]))}, zeta=4)
    F1, W1 = basis.derivative_rows(X, atoms.numbers, G, n_threads=1)
    F2, W2 = basis.derivative_rows(X, atoms.numbers, G, n_threads=2)
    assert np.array_equal(F1, F2) and np.array_equal(W1, W2)
    v = rng.standard_normal(X.shape)
    a1 = contract.pair_forces(G.values, G.centers, v, 1)
    a2 = contract.pair_forces(G.values, G.centers, v, 2)
    assert np.array_equal(a1, a2)


def test_kernel_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    p = rng.random(6)
    S, _ = kernels.normalize(rng.random((4, 6)))
    g = kernels.kernel_gradient(p, S, 3)
    h = 1e-6
    for f in range(6):
        e = np.zeros(6)
        e[f] = h
        k = lambda q: kernels.kernel(kernels.normalize(q[None])[0], S, 3)[0]  # noqa: E731
        np.testing.assert_allclose(g[:, f], (k(p + e) - k(p - e)) / (2 * h), rtol=1e-6)


def test_force_prior_variance_matches_finite_differences_of_the_kernel(d2b):
    atoms = cual_cells(1, seed=7, repeat=(1, 1, 1))[0]  # 4 atoms
    Z = atoms.numbers
    X, G = d2b.transform(atoms, gradients=True)
    kss = kernels.force_prior_variance(X, Z, G, 4)
    h = 1e-4

    def k(a, b):
        return kernels.structure_kernel(d2b.transform(a), Z, d2b.transform(b), Z, 4)

    for j in range(len(atoms)):
        for c in range(3):
            P, M = _moved(atoms, j, c, h), _moved(atoms, j, c, -h)
            fd = (k(P, P) - k(P, M) - k(M, P) + k(M, M)) / (4 * h * h)
            assert kss[j, c] == pytest.approx(fd, rel=1e-4)


# -- solve -----------------------------------------------------------------------------------------
def _dense_rows(model, frames, h=1e-5):
    """K_NM (unit), y and noise for energies, forces and virials by finite differences."""
    basis, desc = model.basis_, model.descriptor_
    rows, y, sig = [], [], []
    for a in frames:
        Z, n = a.numbers, len(a)
        row = lambda b, Z=Z: basis.energy_row(desc.transform(b), Z)  # noqa: E731
        rows.append(row(a))
        y.append(a.get_potential_energy() - sum(model.e0_[s] for s in a.get_chemical_symbols()))
        sig.append(model.sigma_energy_ * np.sqrt(n))
        for j in range(n):
            for c in range(3):
                rows.append(-(row(_moved(a, j, c, h)) - row(_moved(a, j, c, -h))) / (2 * h))
                y.append(a.get_forces()[j, c])
                sig.append(model.sigma_force_)
        W = np.array([(row(_strained(a, p, q, h)) - row(_strained(a, p, q, -h))) / (2 * h)
                      for p in range(3) for q in range(3)])
        Wv = kernels.virial_voigt(W)
        s = a.get_stress() * a.get_volume()
        for t in range(6):
            rows.append(Wv[t])
            y.append(s[t])
            sig.append(model.sigma_stress_ * np.sqrt(n))
    return np.array(rows), np.array(y), np.array(sig)


def test_streaming_qr_solution_equals_dense_dtc_solve(d2b):
    frames = cual_cells(4, seed=11)
    model = KernelPotential(d2b, n_sparse=10, sigma_stress=0.02, block_size=7, random_state=0,
                            n_threads=1, delta=0.5, precision="double").fit(frames)
    K, y, sig = _dense_rows(model, frames)
    d2 = model.delta_ ** 2
    Kmm = d2 * (model.basis_.kmm() + model.jitter_ * np.eye(model.basis_.n_sparse))
    Knm = d2 * K
    A = Kmm + Knm.T @ (Knm / sig[:, None] ** 2)
    alpha = np.linalg.solve(A, Knm.T @ (y / sig**2))
    np.testing.assert_allclose(model.alpha_, alpha, rtol=1e-5, atol=1e-6 * np.abs(alpha).max())
    # log marginal likelihood of the DTC model, densely
    Q = Knm @ np.linalg.solve(Kmm, Knm.T) + np.diag(sig**2)
    sign, logdet = np.linalg.slogdet(Q)
    lml = -0.5 * (y @ np.linalg.solve(Q, y) + logdet + len(y) * np.log(2 * np.pi))
    assert model.log_marginal_likelihood_ == pytest.approx(lml, rel=1e-6, abs=1e-4)
    # predictive variance of local energies against the dense formula
    a = frames[0]
    ks = model.basis_.local_rows(d2b.transform(a), a.numbers)
    Sigma = np.linalg.inv(A)
    kd = d2 * ks
    dense = d2 - np.einsum("ij,ji->i", kd, np.linalg.solve(Kmm, kd.T)) \
        + np.einsum("ij,jk,ik->i", kd, Sigma, kd)
    got = predictive_variance(ks, np.ones(len(a)), model.L_hat_, model.R_, model.delta_)
    np.testing.assert_allclose(got, np.maximum(dense, 0), rtol=1e-4, atol=1e-9 * d2)


def test_block_size_does_not_change_the_solution(d2b):
    frames = cual_cells(5, seed=12)
    kw = dict(n_sparse=15, sigma_stress=0.02, random_state=0, n_threads=1, precision="double")
    a = KernelPotential(d2b, block_size=5, **kw).fit(frames)
    b = KernelPotential(d2b, block_size=100000, **kw).fit(frames)
    np.testing.assert_allclose(a.alpha_, b.alpha_, rtol=1e-8, atol=1e-12)
    assert a.log_marginal_likelihood_ == pytest.approx(b.log_marginal_likelihood_, rel=1e-10)


def test_sparse_gp_with_all_environments_equals_the_full_gp(d2b):
    """Energy labels: with every training environment a sparse point, DTC = full GP exactly."""
    train, test = cual_cells(8, seed=21), cual_cells(3, seed=22)
    n_env = sum(len(a) for a in train)
    model = KernelPotential(d2b, zeta=2, delta=0.3, sigma_energy=0.01, sigma_force=None,
                            sparse_method=np.arange(n_env), jitter=1e-12, n_threads=1)
    model.fit(train)
    assert model.basis_.n_sparse == n_env
    # full GP on total energies, kernel k(A, B) = delta^2 sum_{i in A, j in B} k_hat
    X = [d2b.transform(a) for a in train]
    Z = [a.numbers for a in train]
    d2 = model.delta_ ** 2
    K = d2 * np.array([[kernels.structure_kernel(X[s], Z[s], X[t], Z[t], 2)
                        for t in range(len(train))] for s in range(len(train))])
    y = np.array([a.get_potential_energy() - sum(model.e0_[s] for s in a.get_chemical_symbols())
                  for a in train])
    lam = np.array([model.sigma_energy_**2 * len(a) for a in train])
    beta = np.linalg.solve(K + np.diag(lam), y)
    for a in test:
        Xa = d2b.transform(a)
        ks = d2 * np.array([kernels.structure_kernel(Xa, a.numbers, X[s], Z[s], 2)
                            for s in range(len(train))])
        e_full = ks @ beta + sum(model.e0_[s] for s in a.get_chemical_symbols())
        kss = d2 * kernels.structure_kernel(Xa, a.numbers, Xa, a.numbers, 2)
        v_full = kss - ks @ np.linalg.solve(K + np.diag(lam), ks)
        E, std = model.predict(a, return_std=True)
        assert E[0] == pytest.approx(e_full, abs=1e-6 * abs(ks @ beta) + 1e-9)
        assert std[0] ** 2 == pytest.approx(v_full, rel=1e-4, abs=1e-9)
    # forces of the full GP mean: the same kernel expansion, every environment of training
    # structure s weighted by beta_s
    full = KernelPotential(d2b, zeta=2, delta=0.3, sigma_energy=0.01, sigma_force=None,
                           sparse_method=np.arange(n_env), jitter=1e-12, n_threads=1).fit(train)
    w = np.zeros(n_env)
    for sym, idx in full.sparse_indices_.items():
        w[full.basis_.columns({"Cu": 29, "Al": 13}[sym])] = beta[idx[:, 0]]
    full.fitted_state_ = full.fitted_state_.replace(alpha=w)
    for a in test:
        f_full = full.predict_forces(a)
        np.testing.assert_allclose(model.predict_forces(a), f_full, rtol=1e-5,
                                   atol=1e-6 * np.abs(f_full).max())


def test_log_marginal_likelihood_gradient_and_optimisation(d2b):
    frames = cual_cells(6, seed=31)
    model = KernelPotential(d2b, n_sparse=20, sigma_stress=0.05, random_state=0,
                            n_threads=1, precision="double").fit(frames)
    lml, grad = model.log_marginal_likelihood(eval_gradient=True)
    h = 1e-5
    base = dict(delta=model.delta_, sigma_energy=model.sigma_energy_,
                sigma_force=model.sigma_force_, sigma_stress=model.sigma_stress_)
    for name, cls in (("delta", "delta"), ("sigma_energy", "energy"), ("sigma_force", "forces"),
                      ("sigma_stress", "virial")):
        up = dict(base, **{name: base[name] * np.exp(h)})
        dn = dict(base, **{name: base[name] * np.exp(-h)})
        fd = (model.log_marginal_likelihood(**up) - model.log_marginal_likelihood(**dn)) / (2 * h)
        assert grad[cls] == pytest.approx(fd, rel=1e-4, abs=1e-3)
    before = model.log_marginal_likelihood_
    res = model.optimize_hyperparameters()
    assert res["log_marginal_likelihood"] > before
    assert model.log_marginal_likelihood_ == pytest.approx(res["log_marginal_likelihood"])
    # fit(optimize=True) reaches the same optimum and leaves the constructor arguments alone
    m2 = KernelPotential(d2b, n_sparse=20, sigma_stress=0.05, random_state=0,
                         n_threads=1, precision="double").fit(frames, optimize=True)
    assert m2.delta == 0.2 and m2.sigma_force == 0.02
    assert m2.log_marginal_likelihood_ == pytest.approx(res["log_marginal_likelihood"], rel=1e-5)


def test_solve_stack_and_streaming_qr_on_random_least_squares():
    """The factor pieces reproduce a plain regularised least-squares problem."""
    rng = np.random.default_rng(4)
    M, n = 6, 50
    K = rng.standard_normal((n, M))
    y = rng.standard_normal(n)
    s = rng.uniform(0.5, 2.0, n)
    qr = StreamingQR(M, block_rows=9)
    for i in range(0, n, 13):
        qr.add("forces", K[i:i + 13], y[i:i + 13], s[i:i + 13])
    fac = qr.finalize()
    B = rng.standard_normal((M, M))
    Kmm = B @ B.T + M * np.eye(M)
    L, _ = cholesky_jitter(Kmm, 0.0)
    delta, sigma = 0.7, 0.3
    sol = solve_stack(fac, L, delta, {"forces": sigma})
    Knm = delta**2 * K
    lam = (sigma * s) ** 2
    alpha = np.linalg.solve(delta**2 * Kmm + Knm.T @ (Knm / lam[:, None]), Knm.T @ (y / lam))
    np.testing.assert_allclose(sol.alpha, alpha, rtol=1e-10)


# -- selection -------------------------------------------------------------------------------------
def test_selection_methods_are_deterministic_and_capped():
    rng = np.random.default_rng(5)
    X = rng.random((500, 12))
    for method in ("cur", "fps", "random"):
        a = selection.select(X, 40, method, random_state=3)
        b = selection.select(X, 40, method, random_state=3)
        assert np.array_equal(a, b)
        assert len(np.unique(a)) == 40
        assert len(selection.select(X[:10], 40, method, random_state=3)) == 10
    with pytest.raises(ValueError, match="sparse_method"):
        selection.select(X, 5, "nope")


def test_cur_prefers_high_leverage_and_is_fast():
    rng = np.random.default_rng(6)
    # 10,000 environments near a low-dimensional subspace plus 20 outliers in other directions
    X = np.zeros((10020, 60))
    X[:10000, :5] = rng.random((10000, 5)) + 1.0
    X[10000:, 5:25] = np.eye(20) * 3.0
    X[10000:, 0] = 1.0
    t = time.perf_counter()
    sel = selection.cur_select(X, 40, random_state=0)
    elapsed = time.perf_counter() - t
    assert elapsed < 10.0
    assert np.sum(sel >= 10000) >= 15  # outliers have the largest leverage
    fps = selection.fps_select(X, 30, random_state=0)
    assert np.sum(fps >= 10000) >= 18


def test_mixed_precision_rows_are_close_to_double(d2b):
    atoms = cual_cells(1, seed=3, repeat=(2, 2, 1))[0]
    X, G = d2b.transform(atoms, gradients=True)
    rng = np.random.default_rng(8)
    basis = kernels.SparseBasis({29: rng.random((50, X.shape[1])),
                                 13: rng.random((40, X.shape[1]))}, zeta=4)
    Fd, Wd = basis.derivative_rows(X, atoms.numbers, G)
    Fm, Wm = basis.derivative_rows(X, atoms.numbers, G, precision="mixed")
    np.testing.assert_allclose(Fm, Fd, rtol=0, atol=1e-5 * np.abs(Fd).max())
    np.testing.assert_allclose(Wm, Wd, rtol=0, atol=1e-5 * np.abs(Wd).max())
    F1, _ = basis.derivative_rows(X, atoms.numbers, G, n_threads=1, precision="mixed")
    F2, _ = basis.derivative_rows(X, atoms.numbers, G, n_threads=2, precision="mixed")
    assert np.array_equal(F1, F2)
    with pytest.raises(ValueError, match="precision"):
        basis.derivative_rows(X, atoms.numbers, G, precision="half")
    # auto: mixed for tightly clustered sparse points, double otherwise
    tight = kernels.SparseBasis({29: 1.0 + 0.01 * rng.random((30, X.shape[1]))}, zeta=4)
    assert tight.spread(29) < kernels.MIXED_MAX_SPREAD < basis.spread(29)
    Fa, _ = basis.derivative_rows(X, atoms.numbers, G, precision="auto")
    assert np.array_equal(Fa, Fd)
    Ft, _ = tight.derivative_rows(X, atoms.numbers, G, precision="auto")
    Ftm, _ = tight.derivative_rows(X, atoms.numbers, G, precision="mixed")
    assert np.array_equal(Ft, Ftm)


def test_negative_variances_are_clipped_with_a_warning():
    rng = np.random.default_rng(9)
    M = 5
    B = rng.standard_normal((M, M))
    L, _ = cholesky_jitter(B @ B.T + M * np.eye(M), 0.0)
    R = np.triu(rng.standard_normal((M, M))) + 5 * np.eye(M)
    k = rng.standard_normal((3, M))
    exact = predictive_variance(k, np.full(3, 100.0), L, R, 1.0)
    assert np.all(exact > 0)
    # a prior variance too small for the explained part: clearly negative, clipped, warned
    with pytest.warns(RuntimeWarning, match="clipped"):
        v = predictive_variance(k, np.zeros(3), L, R, 1.0)
    assert np.all(v >= 0)
