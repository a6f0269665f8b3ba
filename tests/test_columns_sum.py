"""New sparse points (kernel columns) for a sum of kernels (2b + SOAP): the result equals a fresh
fit with all the points, whichever term takes them; how a caller names the term."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import cual_cells, soap_or_skip

from kmlip import Distance2b, KernelPotential
from kmlip.descriptors.distance2b import pair_key
from kmlip.gp import columns

E0 = {"Cu": -0.1, "Al": -0.2}
PROPS = ("energy", "energies", "forces", "stress", "energies_var", "energy_var", "forces_var",
         "novelty")


def _d2():
    return Distance2b(species=["Cu", "Al"], r_cut=4.0, theta=0.8)


def _kw():
    return dict(delta=[0.5, 0.2], zeta=[None, 2], sigma_energy=0.002, sigma_force=0.03,
                sigma_stress=0.02, e0=E0, precision="double", n_threads=1)


def _fit_with(frames, points):
    """A fresh fit with exactly ``points`` (one {name: X} per term)."""
    return KernelPotential(descriptor=[_d2(), soap_or_skip()],
                           n_sparse=[{k: len(v) for k, v in p.items()} for p in points],
                           sparse_method=[dict(p) for p in points], **_kw()).fit(frames)


@pytest.fixture(scope="module")
def data():
    frames = cual_cells(5, seed=21)
    test = cual_cells(2, seed=22)
    m = KernelPotential(descriptor=[_d2(), soap_or_skip()], n_sparse=[4, 6],
                        sparse_method=["uniform", "fps"], random_state=0, **_kw()).fit(frames)
    return frames, test, m


def _new_points(m, frames):
    """Two pair distances of the Cu-Al key and three SOAP vectors (2 Cu, 1 Al) of frame 2."""
    st = m.fitted_state_
    d2, soap = st.descriptors
    env = d2.environments(frames[2])
    r = env.features[env.keys == pair_key(13, 29)][[1, 4], 0]
    X = soap.transform(frames[2])
    Z = frames[2].numbers
    return r, {"Cu": X[Z == 29][[0, 2]], "Al": X[Z == 13][:1]}


def _extended(m, pair=None, soap=None):
    pts = [dict(p) for p in m.sparse_points_]
    if pair is not None:
        pts[0]["Al-Cu"] = np.concatenate([pts[0]["Al-Cu"], pair[:, None]])
    for k, v in (soap or {}).items():
        pts[1][k] = np.concatenate([pts[1][k], v]) if k in pts[1] else v
    return pts


def _assert_same(m, ref, test, rtol=1e-9):
    for a in test:
        r1, r2 = m.compute(a, PROPS), ref.compute(a, PROPS)
        for k in PROPS:
            v1, v2 = np.atleast_1d(getattr(r1, k)), np.atleast_1d(getattr(r2, k))
            scale = max(np.max(np.abs(v2)), 1e-300)
            assert np.max(np.abs(v1 - v2)) <= rtol * scale, (k, np.max(np.abs(v1 - v2)) / scale)


@pytest.mark.parametrize("which", ["pair", "soap", "both"])
def test_new_points_of_a_sum_equal_a_fresh_fit(data, which):
    frames, test, m0 = data
    from sklearn.base import clone

    m = clone(m0)
    m.fitted_state_ = m0.fitted_state_
    r, soap_pts = _new_points(m, frames)
    before = m.fitted_state_
    pts = {"pair": {"Cu-Al": r}, "soap": dict(soap_pts),
           "both": {"Al-Cu": r[:, None], **soap_pts}}[which]
    cache = m.add_sparse_points(pts, frames)
    st = m.fitted_state_
    assert before.n_sparse == 4 * 3 + 12  # the input state is untouched
    n_new = {"pair": 2, "soap": 3, "both": 5}[which]
    assert st.n_sparse == before.n_sparse + n_new and cache.n_columns == st.n_sparse
    ref = _fit_with(frames, _extended(m0, r if which != "soap" else None,
                                      soap_pts if which != "pair" else None))
    for t in range(2):  # the same points, in the same columns
        for k, v in ref.sparse_points_[t].items():
            np.testing.assert_array_equal(m.sparse_points_[t][k], v)
    np.testing.assert_array_equal(ref.e0_ == m.e0_, True)
    assert ref.delta_ == m.delta_
    _assert_same(m, ref, test)
    assert m.log_marginal_likelihood_ == pytest.approx(ref.log_marginal_likelihood_,
                                                       rel=1e-10)
    # the cache returned is the rows of the extended basis: its factors are the state's
    for cls, f in cache.factors().items():
        T = st.factors[cls].T
        np.testing.assert_allclose(f.T.T @ f.T, T.T @ T, rtol=1e-9, atol=1e-9)


def test_rows_then_columns_of_a_sum_and_save_load(data, tmp_path):
    from kmlip import load

    frames, test, m0 = data
    more = cual_cells(1, seed=23)
    st = m0.fitted_state_
    cache = columns.build_cache(st, frames)
    st2, cache2 = columns.add_rows(st, cache, more)
    r, soap_pts = _new_points(m0, more * 3)
    # the per-term forms: {term: {key: X}} and one mapping per term
    st3, cache3 = columns.add_columns(st2, frames + more, {0: {"Cu-Al": r},
                                                           1: {"Al": soap_pts["Al"]}}, cache2)
    st4, cache4 = columns.add_columns(st3, frames + more, [None, {"Cu": soap_pts["Cu"]}],
                                      cache3)
    ref = _fit_with(frames + more, _extended(m0, r, soap_pts))
    m = KernelPotential(descriptor=[_d2(), soap_or_skip()], **_kw())
    m.fitted_state_ = st4
    _assert_same(m, ref, test)
    # a cache saved and read back serves the next update
    back = columns.RowCache.from_arrays(cache4.to_arrays())
    columns.check_cache(st4, back)
    p = tmp_path / "m.kmlip"
    m.save(p)
    m2 = load(p)
    for a in test:
        r1, r2 = m.compute(a, PROPS), m2.compute(a, PROPS)
        for k in PROPS:
            np.testing.assert_array_equal(getattr(r1, k), getattr(r2, k))
    # the loaded model (with its factors) takes more points and stays a fresh fit's equal
    m2.add_sparse_points({"Cu-Cu": np.array([2.4])}, frames + more, back)
    pts = _extended(m0, r, soap_pts)
    pts[0]["Cu-Cu"] = np.concatenate([pts[0]["Cu-Cu"], [[2.4]]])
    _assert_same(m2, _fit_with(frames + more, pts), test)


def test_new_points_of_a_sum_reject_bad_names(data):
    frames, _, m = data
    st = m.fitted_state_
    F = st.descriptors[1].n_features
    cache = columns.build_cache(st, frames)
    cases = [({"Cu-Au": [2.5]}, "not a kernel key of any term"),
             ({"Au": np.ones((1, F))}, "not a kernel key of any term"),
             ({2: {"Cu": np.ones((1, F))}}, "not a term index"),
             ({0: {"Cu": [2.5]}}, "not a kernel key of term 0"),
             ({"Cu-Al": [[2.5, 1.0]]}, "shape"),
             ({"Cu-Al": [4.5]}, "prior variance"),
             ({"Cu-Al": [np.nan]}, "finite"),
             ([{"Cu-Al": [2.5]}], "2 terms"),
             ({"Cu": np.ones((1, F + 1))}, "shape")]
    for pts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            columns.add_columns(st, frames, pts, cache)
    with pytest.raises(TypeError, match="mapping"):
        columns.add_columns(st, frames, [None, np.ones((1, F))], cache)
    # two terms with the same keys: a bare name is ambiguous, the term index is not
    soap = soap_or_skip()
    two = KernelPotential(descriptor=[soap, soap_or_skip(r_cut=3.0)], delta=[0.2, 0.1],
                          zeta=[2, 2], n_sparse=3, sparse_method="fps", e0=E0, n_threads=1,
                          random_state=0).fit(frames[:2])
    X = soap.transform(frames[0])[:1]
    with pytest.raises(ValueError, match=r"terms \[0, 1\]; name the term"):
        columns.add_columns(two.fitted_state_, frames[:2], {"Cu": X})
    X = soap.transform(frames[0])[frames[0].numbers == 29][:1]
    st2, _ = columns.add_columns(two.fitted_state_, frames[:2], {1: {"Cu": X}})
    n0 = [t.basis.n_sparse for t in two.fitted_state_.kernel.terms]
    assert [t.basis.n_sparse for t in st2.kernel.terms] == [n0[0], n0[1] + 1]
