"""The estimator's contract: validate first, assign once; scikit-learn conventions; e0 warnings."""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from ase.build import bulk
from conftest import cual_cells, label, soap_or_skip
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from kmlip.model import KernelPotential


def _snapshot(model, frames):
    E, std = model.predict(frames, return_std=True)
    F = model.predict_forces(frames)
    return [E, std, *F, model.alpha_.copy(), np.array(list(model.e0_.values()))]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class _Exploding:
    """A descriptor wrapper that raises on its n-th pass (an exception from inside the fit)."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name):
        if name.startswith("__") or name == "inner":  # copy/deepcopy probe before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def get_params(self, deep=True):
        return {"inner": self.inner, "after": self.after}

    def to_dict(self):
        return self.inner.to_dict()

    def environments(self, *args, **kw):
        # the protocol's default: environments from this object's own transform
        from kmlip.descriptors.base import Descriptor

        return Descriptor.environments(self, *args, **kw)

    def transform(self, *args, **kw):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("descriptor failed")
        return self.inner.transform(*args, **kw)


def test_failed_refit_leaves_the_fitted_model_untouched(d2b, train_frames, test_frames):
    model = KernelPotential(d2b, n_sparse=30, sigma_stress=0.02, random_state=0, n_threads=1)
    model.fit(train_frames[:10])
    state = model.fitted_state_
    before = _snapshot(model, test_frames[:3])
    # a bad parameter (checked before any work)
    for bad in ({"n_sparse": {"Cu": -1}}, {"sparse_method": np.array([0, 0])},
                {"sparse_method": {"Cu": np.array([10_000])}}, {"e0": {"Cu": "x"}},
                {"e0": {"Cu": -1.0}}, {"delta": -1.0}, {"precision": "half"},
                {"sparse_method": "kmeans"}):
        model.set_params(**bad)
        with pytest.raises((ValueError, TypeError)):
            model.fit(train_frames[10:20])
        model.set_params(n_sparse=30, sparse_method="cur", e0=None, delta=0.2,
                         precision="auto")
        assert model.fitted_state_ is state and _same(before, _snapshot(model, test_frames[:3]))
    # a bad frame in the middle of the data
    frames = list(train_frames[10:20])
    broken = frames[5].copy()  # .copy() drops the labels
    frames[5] = broken
    with pytest.raises(ValueError, match="frame 5"):
        model.fit(frames)
    assert model.fitted_state_ is state and _same(before, _snapshot(model, test_frames[:3]))
    # an exception raised by the descriptor half-way through the data pass
    model.set_params(descriptor=_Exploding(d2b, after=13))
    with pytest.raises(RuntimeError, match="descriptor failed"):
        model.fit(train_frames[10:20])
    model.set_params(descriptor=d2b)
    assert model.fitted_state_ is state and _same(before, _snapshot(model, test_frames[:3]))
    # partial_fit with a bad frame, and a failed hyperparameter update
    with pytest.raises(ValueError, match="frame 1"):
        model.partial_fit([train_frames[12], broken])
    with pytest.raises(ValueError, match="delta"):
        model.update_hyperparameters(delta=0.0)
    assert model.fitted_state_ is state and _same(before, _snapshot(model, test_frames[:3]))
    # and a good refit does change it
    model.fit(train_frames[10:20])
    assert model.fitted_state_ is not state


def test_fitted_state_is_read_only(fitted):
    with pytest.raises(ValueError):
        fitted.alpha_[0] = 1.0
    with pytest.raises(AttributeError):
        fitted.fitted_state_.alpha = None
    with pytest.raises(TypeError):
        fitted.fitted_state_.e0["Cu"] = 0.0


def test_sklearn_conventions(d2b, train_frames):
    sig = inspect.signature(KernelPotential.__init__)
    kinds = {n: p.kind for n, p in sig.parameters.items() if n != "self"}
    assert kinds.pop("descriptor") is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError):
        KernelPotential(d2b, 4)
    assert "__sklearn_clone__" not in vars(KernelPotential)  # the default one works
    model = KernelPotential(d2b, n_sparse={"Cu": 5, "Al": 3}, delta=0.3, random_state=1)
    with pytest.raises(NotFittedError):
        model.predict(train_frames[0])
    assert not hasattr(model, "alpha_")
    params = model.get_params(deep=False)
    assert params["descriptor"] is d2b and params["n_sparse"] == {"Cu": 5, "Al": 3}
    c = clone(model)
    assert c.get_params(deep=False)["n_sparse"] == {"Cu": 5, "Al": 3}
    assert c.descriptor is not d2b and c.descriptor.get_params() == d2b.get_params()
    soap = soap_or_skip()
    c2 = clone(KernelPotential(soap, n_sparse=7))
    assert c2.descriptor.get_params() == soap.get_params()
    c2.fit(train_frames[:3])
    assert c2.alpha_.shape == (c2.basis_.n_sparse,)


def test_e0_from_stoichiometric_data_warns(d2b):
    frames = []
    rng = np.random.default_rng(0)
    for _ in range(4):
        a = bulk("Cu", "fcc", a=3.65, cubic=True)  # 4 atoms
        a.symbols[[0, 1]] = "Al"                    # always Cu2Al2
        a.rattle(0.05, seed=int(rng.integers(1000)))
        frames.append(label(a))
    with pytest.warns(UserWarning, match="e0"):
        KernelPotential(d2b, n_sparse=4, n_threads=1).fit(frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        KernelPotential(d2b, n_sparse=4, n_threads=1, e0={"Cu": -0.1, "Al": -0.2}).fit(frames)
        KernelPotential(d2b, n_sparse=4, n_threads=1).fit(frames + cual_cells(2, seed=3))


def test_add_sparse_points_equals_a_fit_with_all_points(d2b, train_frames, test_frames):
    frames = train_frames[:6]
    kw = dict(n_threads=1, sigma_stress=0.02, e0={"Cu": -0.1, "Al": -0.2})
    model = KernelPotential(d2b, n_sparse=8, random_state=0, **kw).fit(frames)
    X = d2b.transform(frames[3])
    Z = frames[3].numbers
    new = {"Cu": X[Z == 29][:2], "Al": X[Z == 13][:1]}
    before = model.fitted_state_
    model.add_sparse_points(new, frames)
    assert model.basis_.n_sparse == before.basis.n_sparse + 3
    pts = {s: np.concatenate([before.basis.points[z], new[s]])
           for s, z in (("Cu", 29), ("Al", 13))}
    ref = KernelPotential(d2b, sparse_method=pts, **kw).fit(frames)
    np.testing.assert_allclose(model.predict(test_frames[:3]), ref.predict(test_frames[:3]),
                               rtol=1e-9)
