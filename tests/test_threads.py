"""Thread counts: kmlip's parallel products, and fits, give bitwise the same results for 1 and
2 threads."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import cual_cells, soap_or_skip

from kmlip._ext import contract
from kmlip._threads import resolve_threads, serial_blas, threads_for


def test_threads_for_uses_one_thread_for_small_work():
    assert threads_for(2, 10) == 1
    assert threads_for(2, 10**9) == 2
    assert threads_for(None, 10**9) == resolve_threads(None)
    with pytest.raises(ValueError, match="n_threads"):
        threads_for(0, 10**9)


@pytest.mark.parametrize("trans_b", [True, False])
def test_blocked_gemm_matches_numpy_bitwise_across_threads(trans_b):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((333, 70))
    B = rng.standard_normal((150, 70)) if trans_b else rng.standard_normal((70, 150))
    ref = A @ (B.T if trans_b else B)
    outs = []
    with serial_blas():
        for nt in (1, 2):
            out = np.empty((333, 150))
            contract.gemm(A, B, out, trans_b, nt)
            outs.append(out)
    assert np.allclose(outs[0], ref, rtol=0, atol=1e-12)
    assert np.array_equal(outs[0], outs[1])


def test_tri_square_norms_skip_only_zero_triangles():
    rng = np.random.default_rng(2)
    M, n = 300, 200
    K = rng.standard_normal((n, M))
    W = np.tril(rng.standard_normal((M, M)))
    G = np.tril(rng.standard_normal((M, M)))
    with serial_blas():
        w2, g2 = contract.tri_square_norms(K, contract.pack_lower([W, G], 128), 128, 1)
        w2b, g2b = contract.tri_square_norms(K, contract.pack_lower([W, G], 128), 128, 2)
        (w2c,) = contract.tri_square_norms(K, contract.pack_lower([W], 100), 100, 2)
    assert np.allclose(w2, np.sum((K @ W.T) ** 2, axis=1), rtol=1e-12, atol=0)
    assert np.allclose(g2, np.sum((K @ G.T) ** 2, axis=1), rtol=1e-12, atol=0)
    assert np.allclose(w2c, w2, rtol=1e-12, atol=0)
    assert np.array_equal(w2, w2b) and np.array_equal(g2, g2b)


def test_fused_gemm_scatter_rows_equal_the_reference_and_do_not_depend_on_threads():
    soap = soap_or_skip()
    from kmlip.kernels import SparseBasis

    atoms = cual_cells(1, seed=4, repeat=(2, 2, 1), frac_al=0.5)[0]
    assert set(atoms.numbers) == {13, 29}
    X, G = soap.transform(atoms, gradients=True)
    rng = np.random.default_rng(3)
    # 100 points per species: two column blocks, and enough work for a parallel region
    points = {z: np.repeat(X[atoms.numbers == z][:2], 50, axis=0)
              + 0.01 * rng.standard_normal((100, X.shape[1])) for z in (13, 29)}
    basis = SparseBasis(points, 3)
    F1, W1 = basis.derivative_rows(X, atoms.numbers, G, n_threads=1, precision="double")
    F2, W2 = basis.derivative_rows(X, atoms.numbers, G, n_threads=2, precision="double")
    assert np.array_equal(F1, F2) and np.array_equal(W1, W2)
    # the energy row's derivative along a random displacement, by finite differences
    d = rng.standard_normal((len(atoms), 3))
    h = 1e-5
    rows = []
    for s in (1, -1):
        b = atoms.copy()
        b.positions += s * h * d
        rows.append(basis.energy_row(soap.transform(b), b.numbers))
    fd = (rows[0] - rows[1]) / (2 * h)
    assert np.allclose(-d.reshape(-1) @ F1, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_fits_with_1_and_2_threads_predict_the_same(precision):
    from kmlip.model import KernelPotential

    soap = soap_or_skip()
    frames = cual_cells(16, seed=5, repeat=(2, 2, 1))
    test = cual_cells(2, seed=6, repeat=(2, 2, 2))
    preds, alphas = [], []
    for nt in (1, 2):
        # a small block size makes the streaming QR update (split dtpqrt) run several times
        m = KernelPotential(soap, n_sparse=30, sigma_stress=0.02, random_state=0,
                            n_threads=nt, block_size=600, precision=precision).fit(frames)
        alphas.append(m.alpha_)
        preds.append(np.concatenate([np.ravel(m.predict_forces(a)) for a in test]
                                    + [m.predict(test)]))
    # every floating-point step of a fit is split into blocks that do not depend on the
    # thread count (rows, QR updates) or runs with single-threaded BLAS (K_MM, the solve)
    assert np.array_equal(alphas[0], alphas[1])
    assert np.array_equal(preds[0], preds[1])


def test_derivative_rows_from_concurrent_threads_match_serial():
    """Training computes structures side by side in Python threads (and Dask runs threaded
    workers): the GEMM scratch of one SparseBasis must not be shared between threads."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import cual_cells, soap_or_skip

    from kmlip import KernelPotential

    soap = soap_or_skip()
    frames = cual_cells(8, seed=21)
    m = KernelPotential(soap, n_sparse=15, zeta=2, random_state=0, n_threads=1,
                        precision="mixed").fit(frames[:3])
    basis = m.fitted_state_.basis
    data = [soap.transform(a, gradients=True) + (a.numbers,) for a in frames]
    want = [basis.derivative_rows(X, Z, G, n_threads=1, precision="mixed")
            for X, G, Z in data]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda d: basis.derivative_rows(d[0], d[2], d[1], n_threads=1,
                                                                precision="mixed"), data * 3))
        for k, (F, W) in enumerate(got):
            assert np.array_equal(F, want[k % len(data)][0])
            assert np.array_equal(W, want[k % len(data)][1])
