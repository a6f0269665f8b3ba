"""The descriptor protocol from a user's side: the example's hand-written descriptor has exact
gradients and fits a potential through the same GP code as SOAP."""
from __future__ import annotations

import numpy as np
from conftest import fd_positions, fd_strain, load_example, triclinic_cell


def _example():
    return load_example("custom_descriptor")


def test_user_descriptor_gradients_follow_the_protocol():
    mod = _example()
    d = mod.Coordination(["Cu", "Al"], r_cut=4.5)
    a = triclinic_cell(5)
    X, G = d.transform(a, gradients=True)
    assert X.shape == (len(a), d.n_features)
    assert np.allclose(G.dense(len(a)), fd_positions(d, a), atol=1e-6)
    assert np.allclose(G.strain(), fd_strain(d, a), atol=1e-5)


def test_user_descriptor_fits_and_predicts_forces_consistently():
    mod = _example()
    err = mod.main(n_train=8, n_test=3)
    assert err["forces_rmse"] < 0.5  # EMT forces of these cells are ~1 eV/Å
    from kmlip import KernelPotential

    frames = mod.labelled_cells(6, 3)
    m = KernelPotential(mod.Coordination(["Cu", "Al"]), zeta=2, n_sparse=20,
                        random_state=0).fit(frames)
    a = frames[0].copy()
    a.rattle(0.05, seed=4)
    f = m.compute(a, ("forces",)).forces
    h = 1e-5
    p, q = a.copy(), a.copy()
    p.positions[3, 1] += h
    q.positions[3, 1] -= h
    assert np.isclose(f[3, 1], -(m.compute(p).energy - m.compute(q).energy) / (2 * h),
                      atol=1e-6)
