"""Fits on Dask (kmlip.gp.distributed): the serial numerics on a LocalCluster of 2 worker
processes (1 thread each), selection, errors raised on a worker."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from conftest import cual_cells, soap_or_skip  # noqa: E402

from kmlip import labels as lab  # noqa: E402
from kmlip.gp import distributed, sparse_points, training  # noqa: E402
from kmlip.gp.sparse import ClassFactor, cholesky_jitter, solve_stack  # noqa: E402
from kmlip.gp.terms import KernelSum, Term  # noqa: E402

try:
    from kmlip.descriptors.soap import SOAP
except ImportError:  # pragma: no cover - without the compiled SOAP (soap_or_skip skips)
    SOAP = object

SIGMAS = {"energy": 0.002, "forces": 0.02, "virial": 0.02, "energy_fixed": 1.0}


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    # the scheduler's HTTP server on a free port (None means 8787, maybe taken: a warning)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def soap():
    return soap_or_skip(n_max=4, l_max=3)


@pytest.fixture(scope="module")
def frames():
    fr = cual_cells(24, seed=11)
    # per-structure energy noise on the first structures only: the class "energy_fixed" exists
    # on one worker and not on the other
    for a in fr[:3]:
        a.info["energy_sigma"] = 0.01
    return fr


def data_of(frames, use_stress=True):
    keys = lab.LabelKeys(use_stress=use_stress)
    labels = [lab.read_labels(a, k, keys) for k, a in enumerate(frames)]
    base = [training.baseline_values(None, a) for a in frames]
    e0 = [-3.5 * len(a) for a in frames]
    return labels, e0, base


@pytest.fixture(scope="module")
def kernel(soap, frames):
    spec = sparse_points.validate(12, "cur", frames, soap)
    points, _ = sparse_points.choose(spec, soap, frames, 0, 1)
    return KernelSum([Term(soap, soap.make_basis(points, 4))])


def gram(T):
    return T.T @ T


def assert_same_factors(f_serial, f_dist, rtol=1e-12):
    assert set(f_serial) == set(f_dist)
    for c, f in f_serial.items():
        g = f_dist[c]
        assert g.n_rows == f.n_rows, c
        assert g.log_scale_sum == pytest.approx(f.log_scale_sum, rel=1e-13, abs=1e-12), c
        assert g.T.shape == f.T.shape, c
        assert np.allclose(np.tril(g.T, -1), 0.0), c
        A, B = gram(f.T), gram(g.T)
        assert np.abs(A - B).max() <= rtol * np.abs(A).max(), c


def assert_same_solution(kernel, f_serial, f_dist):
    L, _ = cholesky_jitter(kernel.kmm(), 1e-8)
    s1 = solve_stack(f_serial, L, 0.2, SIGMAS, gradient=True)
    s2 = solve_stack(f_dist, L, 0.2, SIGMAS, gradient=True)
    assert np.abs(s1.alpha - s2.alpha).max() <= 1e-9 * np.abs(s1.alpha).max()
    # R differs by row signs at most: the quantities of the solve are those of R^T R
    assert np.allclose(gram(s1.R), gram(s2.R), rtol=1e-10, atol=1e-10 * np.abs(gram(s1.R)).max())
    assert s2.log_marginal_likelihood == pytest.approx(s1.log_marginal_likelihood, rel=1e-10)
    assert s2.n_labels == s1.n_labels
    for k, g in s1.gradient.items():
        assert s2.gradient[k] == pytest.approx(g, rel=1e-9, abs=1e-9 * abs(s1.gradient["delta"]))
    return s1, s2


def test_accumulate_equals_serial(client, kernel, frames):
    labels, e0, base = data_of(frames)
    f1, _ = training.accumulate(kernel, frames, labels, e0, base, 1, "double", 4096)
    seen = []
    f2, t_rows = distributed.accumulate(client, kernel, frames, labels, e0, base, 1, "double",
                                        4096, on_frame=lambda: seen.append(1))
    assert len(seen) == len(frames)
    assert t_rows > 0
    assert "energy_fixed" in f2 and f2["energy_fixed"].n_rows == 3
    assert_same_factors(f1, f2)
    s1, s2 = assert_same_solution(kernel, f1, f2)
    # predictions: energies and forces of unseen structures from their kernel rows
    test = cual_cells(3, seed=12)
    t_labels, t_e0, t_base = data_of(test)
    for k, a in enumerate(test):
        for _, rows, _, _ in training.frame_rows(kernel, a, t_labels[k], 0.0, t_base[k], 1,
                                                 "double"):
            p1, p2 = rows @ s1.alpha, rows @ s2.alpha
            assert np.abs(p1 - p2).max() <= 1e-9 * np.abs(p1).max()


def test_accumulate_extends_given_factors(client, kernel, frames):
    """``factors=``: the rows of earlier structures are folded in (online update)."""
    labels, e0, base = data_of(frames, use_stress=False)
    f_all, _ = training.accumulate(kernel, frames, labels, e0, base, 1, "double", 4096)
    f_head, _ = training.accumulate(kernel, frames[:5], labels[:5], e0[:5], base[:5], 1,
                                    "double", 4096)
    before = {c: f.T.copy() for c, f in f_head.items()}
    f2, _ = distributed.accumulate(client, kernel, frames[5:], labels[5:], e0[5:], base[5:], 1,
                                   "double", 64, factors=f_head)
    assert all(np.array_equal(f_head[c].T, before[c]) for c in before)  # not modified
    assert_same_factors(f_all, f2)


def test_merge_factors_is_tsqr():
    """Merging the factors of two row sets gives the factor of their union (any shapes,
    classes on one side only)."""
    rng = np.random.default_rng(0)
    n1 = 6
    A, B = rng.standard_normal((3, n1)), rng.standard_normal((40, n1))
    C = rng.standard_normal((2, n1))

    def fac(X, s):
        R = np.linalg.qr(X, mode="r")
        return ClassFactor(np.triu(R), X.shape[0], s)

    a = {"forces": fac(A, 0.5), "virial": fac(C, 1.0)}
    b = {"forces": fac(B, 0.25), "energy": fac(C, 2.0)}
    m = distributed.merge_factors(a, b)
    assert set(m) == {"forces", "virial", "energy"}
    f = m["forces"]
    assert f.n_rows == 43 and f.log_scale_sum == pytest.approx(0.75)
    assert f.T.shape == (n1, n1)
    X = np.vstack([A, B])
    assert np.allclose(gram(f.T), X.T @ X, atol=1e-12)
    # two trapezoidal factors (fewer rows than columns) stay trapezoidal, as in a serial QR
    t = distributed.merge_factors({"virial": a["virial"]}, {"virial": fac(C[:1], 0.0)})
    assert t["virial"].T.shape == (3, n1)
    Y = np.vstack([C, C[:1]])
    assert np.allclose(gram(t["virial"].T), Y.T @ Y, atol=1e-12)
    assert m["virial"].T is not a["virial"].T  # copies, inputs untouched
    with pytest.raises(ValueError, match="sparse points"):
        distributed.merge_factors(a, {"forces": fac(rng.standard_normal((8, 4)), 0.0)})


@pytest.mark.parametrize("method", ["cur", "fps"])
def test_choose_equals_serial(client, soap, frames, method):
    spec = sparse_points.validate(9, method, frames, soap)
    p1, i1 = sparse_points.choose(spec, soap, frames, 3, 1)
    for sample in ("all", "auto"):  # "auto" returns everything for a set this small
        p2, i2 = distributed.choose(client, spec, soap, frames, 3, 1, sample=sample)
        assert set(p1) == set(p2) and set(i1) == set(i2)
        for z in p1:
            np.testing.assert_array_equal(p1[z], p2[z])
        for k in i1:
            np.testing.assert_array_equal(i1[k], i2[k])


def test_choose_global_indices_and_points(client, soap, frames):
    idx = np.array([0, 5, 17, 100, 150])
    spec = sparse_points.validate(0, idx, frames, soap)
    p1, i1 = sparse_points.choose(spec, soap, frames, 0, 1)
    p2, i2 = distributed.choose(client, spec, soap, frames, 0, 1)
    for z in p1:
        np.testing.assert_array_equal(p1[z], p2[z])
        np.testing.assert_array_equal(i1[soap.key_name(z)], i2[soap.key_name(z)])


def test_choose_sample(client, soap, frames):
    """A sample per worker: ids global and valid, features those of the ids, reproducible."""
    spec = sparse_points.validate(5, "random", frames, soap)
    env, ids = sparse_points.collect_environments(sorted(spec.counts), soap, frames, 1)
    lookup = {z: {tuple(r): k for k, r in enumerate(ids[z].tolist())} for z in ids}
    runs = [distributed.choose(client, spec, soap, frames, 7, 1, sample=10) for _ in range(2)]
    for z, pts in runs[0][0].items():
        name = soap.key_name(z)
        np.testing.assert_array_equal(pts, runs[1][0][z])
        got = runs[0][1][name]
        assert got.shape == (5, 2)
        rows = [lookup[z][tuple(r)] for r in got.tolist()]
        np.testing.assert_array_equal(pts, env[z][rows])
    with pytest.raises(ValueError, match="sample"):
        distributed.choose(client, spec, soap, frames, 7, 1, sample=0)


def test_worker_error_names_the_structure(client, kernel, soap, frames):
    bad = [a.copy() for a in frames]
    bad[14].positions[2, 1] = np.nan
    labels, e0, base = data_of(frames)
    with pytest.raises(ValueError, match=r"structure 14 \(Dask worker tcp://.*\): .*NaN"):
        distributed.accumulate(client, kernel, bad, labels, e0, base, 1, "double", 4096)
    spec = sparse_points.validate(5, "cur", bad, soap)
    with pytest.raises(ValueError, match=r"structure 14 \(Dask worker .*NaN"):
        distributed.choose(client, spec, soap, bad, 0, 1)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        distributed.accumulate(client, kernel, frames, labels[:3], e0, base, 1, "double", 4096)
    # the cluster is still usable afterwards
    f, _ = distributed.accumulate(client, kernel, frames[:4], labels[:4], e0[:4], base[:4], 1,
                                  "double", 4096)
    assert f["forces"].n_rows == 3 * sum(len(a) for a in frames[:4])


def test_partition_balances_atoms():
    n_atoms = np.array([8] * 10 + [32] * 5 + [1] * 3)
    blocks = distributed._partition(n_atoms, ["w0", "w1"], blocks_per_worker=3)
    covered = np.concatenate([np.arange(b.start, b.stop) for b in blocks])
    np.testing.assert_array_equal(covered, np.arange(len(n_atoms)))
    per = {w: sum(int(n_atoms[b.start:b.stop].sum()) for b in blocks if b.worker == w)
           for w in ("w0", "w1")}
    assert abs(per["w0"] - per["w1"]) <= 32
    # more workers than structures: every structure once, no empty block
    few = distributed._partition(np.array([4, 4]), ["a", "b", "c"])
    assert [(b.start, b.stop) for b in few] == [(0, 1), (1, 2)]


def test_model_fit_with_client_equals_serial(client, soap, monkeypatch):
    """``KernelPotential.fit(frames, client=...)``: the serial model's predictions to 1e-9."""
    from kmlip.model import KernelPotential

    train = cual_cells(16, seed=21)
    test = cual_cells(3, seed=22)
    kw = dict(n_sparse=10, sigma_stress=0.02, random_state=0, n_threads=1)
    m1 = KernelPotential(soap, **kw).fit(train)
    sent = []
    bare = distributed._bare
    monkeypatch.setattr(distributed, "_bare", lambda a: sent.append(1) or bare(a))
    m2 = KernelPotential(soap, **kw).fit(train, client=client)
    assert len(sent) == len(train)  # each structure sent once, for selection and data pass
    for k in m1.sparse_points_:
        np.testing.assert_array_equal(m1.sparse_points_[k], m2.sparse_points_[k])
    e1, s1 = m1.predict(test, return_std=True)
    e2, s2 = m2.predict(test, return_std=True)
    np.testing.assert_allclose(e2, e1, rtol=1e-9)
    np.testing.assert_allclose(s2, s1, rtol=1e-9)
    for a in test:
        f1, f2 = m1.predict_forces(a), m2.predict_forces(a)
        assert np.abs(f1 - f2).max() <= 1e-9 * np.abs(f1).max()
        v1, v2 = m1.predict_stress(a), m2.predict_stress(a)
        assert np.abs(v1 - v2).max() <= 1e-9 * np.abs(v1).max()
    assert m2.hyperparameters_["log_marginal_likelihood"] == pytest.approx(
        m1.hyperparameters_["log_marginal_likelihood"], rel=1e-10)
    # the structures were scattered once for selection and data pass, and then released
    assert client.id not in distributed._scattered


def test_a_fit_failing_between_the_passes_releases_the_structures(client, soap, monkeypatch):
    """Selection scatters the structures and keeps them for the data pass; a fit that fails in
    between (here the Cholesky factor of K_MM) must not leave them on the workers."""
    import kmlip.model
    from kmlip.model import KernelPotential

    kept = []
    keep = distributed._keep_for_accumulate
    monkeypatch.setattr(distributed, "_keep_for_accumulate",
                        lambda c, p: kept.append(1) or keep(c, p))

    def broken(*a, **k):
        raise np.linalg.LinAlgError("K_MM is not positive definite")

    monkeypatch.setattr(kmlip.model, "cholesky_jitter", broken)
    with pytest.raises(np.linalg.LinAlgError, match="K_MM"):
        KernelPotential(soap, n_sparse=6, random_state=0, n_threads=1).fit(
            cual_cells(6, seed=23), client=client)
    assert kept  # selection did keep them for the data pass ...
    assert client.id not in distributed._scattered  # ... and the failed fit let them go


def test_selection_pieces(monkeypatch, soap, frames):
    """A worker's block is computed in pieces: the same environments, ids offset globally, a
    sample within the cap."""
    monkeypatch.setattr(distributed, "SELECT_PIECE_ATOMS", 20)
    keys = [13, 29]
    env, ids = sparse_points.collect_environments(keys, soap, frames[5:17], 1, frame_offset=5)
    got, gids = distributed._collect_block(soap, frames[5:17], keys, 5, 1, None, None)
    for z in keys:
        np.testing.assert_array_equal(got[z], env[z])
        np.testing.assert_array_equal(gids[z], ids[z])
    rng = np.random.default_rng(1)
    got, gids = distributed._collect_block(soap, frames[5:17], keys, 5, 1, {13: 7, 29: 9}, rng)
    assert got[13].shape[0] == 7 and got[29].shape[0] == 9
    for z in keys:
        rows = [{tuple(r): k for k, r in enumerate(ids[z].tolist())}[tuple(r)]
                for r in gids[z].tolist()]
        np.testing.assert_array_equal(got[z], env[z][rows])


def test_sample_budget_is_global_and_stratified(soap, frames):
    """The sample budget per key is shared by the blocks in proportion to their environments
    of that key (not multiplied by the number of workers)."""
    spec = sparse_points.validate(5, "cur", frames, soap)
    keys = sorted(spec.counts)
    w = distributed._key_weights(soap, frames, keys)
    for n_workers in (2, 8):
        blocks = distributed._partition(np.array([len(a) for a in frames]),
                                        [f"w{i}" for i in range(n_workers)])
        caps = distributed._sample_caps(spec, blocks, w, 40)
        for j, z in enumerate(keys):
            got = np.array([c[z] for c in caps])
            want = np.array([w[b.start:b.stop, j].sum() for b in blocks]) / w[:, j].sum() * 40
            assert np.all(got >= want) and np.all(got <= want + 1)
    assert distributed._sample_caps(spec, blocks, w, "all") is None
    idx_spec = sparse_points.validate(0, np.array([1, 2]), frames, soap)
    assert distributed._sample_caps(idx_spec, blocks, w, "auto") is None


def test_cli_fit_on_dask(client, tmp_path):
    """``kmlip fit --scheduler ADDRESS`` and ``--workers N`` give the serial model."""
    from ase.io import write

    from kmlip.cli.main import main
    from kmlip.model import load

    train = tmp_path / "train.xyz"
    write(train, cual_cells(10, seed=31))
    args = ["--r-cut", "4.0", "--n-max", "4", "--l-max", "3", "--n-sparse", "8",
            "--threads", "1"]
    paths = {k: tmp_path / f"{k}.kmlip" for k in ("serial", "scheduler", "workers")}
    assert main(["fit", str(train), "-o", str(paths["serial"]), *args]) == 0
    assert main(["fit", str(train), "-o", str(paths["scheduler"]), *args,
                 "--scheduler", client.scheduler.address]) == 0
    assert main(["fit", str(train), "-o", str(paths["workers"]), *args, "--workers", "1"]) == 0
    test = cual_cells(2, seed=32)
    ref = load(paths["serial"]).predict(test)
    for k in ("scheduler", "workers"):
        np.testing.assert_allclose(load(paths[k]).predict(test), ref, rtol=1e-9)
    assert main(["fit", str(train), "-o", str(tmp_path / "x.kmlip"), *args,
                 "--workers", "0"]) == 2


def test_sum_of_kernels_with_client(client):
    """A 2b + SOAP model (pair environments, not atom-centred) fitted on Dask equals serial."""
    from kmlip import SOAP, Distance2b, KernelPotential

    train, test = cual_cells(12, seed=41), cual_cells(2, seed=42)

    def model():
        return KernelPotential(
            descriptor=[Distance2b(species=["Cu", "Al"], r_cut=4.0, theta=1.0),
                        SOAP(["Cu", "Al"], r_cut=4.0, n_max=4, l_max=3)],
            delta=[0.5, 0.2], n_sparse=[10, 10], zeta=[None, 4],
            sparse_method=["uniform", "cur"], random_state=0, n_threads=1)

    m1, m2 = model().fit(train), model().fit(train, client=client)
    np.testing.assert_allclose(m2.predict(test), m1.predict(test), rtol=1e-9)
    f1, f2 = m1.predict_forces(test[0]), m2.predict_forces(test[0])
    assert np.abs(f1 - f2).max() <= 1e-9 * np.abs(f1).max()


# -- partial_fit on Dask ----------------------------------------------------------------------
LABEL_SETS = {"energy": dict(sigma_force=None), "forces": dict(sigma_energy=None),
              "stress": dict(sigma_stress=0.02)}


@pytest.fixture(scope="module")
def online_frames():
    """8 structures for the first fit, 8 to add (one with per-structure noise overrides, so
    the update brings a label class the model did not have)."""
    fr = cual_cells(16, seed=51)
    fr[11].info.update(energy_sigma=0.01, force_sigma=0.05, virial_sigma=0.05)
    return fr[:8], fr[8:]


def assert_same_model(m1, m2, test, rtol=1e-10):
    """Same weights, factors (their T^T T), likelihood and predictions, to ``rtol``."""
    assert m2.n_labels_ == m1.n_labels_
    assert np.abs(m2.alpha_ - m1.alpha_).max() <= rtol * np.abs(m1.alpha_).max()
    assert m2.log_marginal_likelihood_ == pytest.approx(m1.log_marginal_likelihood_, rel=rtol)
    assert_same_factors(m1.factors_, m2.factors_)
    e1, s1 = m1.predict(test, return_std=True)
    e2, s2 = m2.predict(test, return_std=True)
    np.testing.assert_allclose(e2, e1, rtol=rtol)
    np.testing.assert_allclose(s2, s1, rtol=1e-8)
    for a in test:
        f1, f2 = m1.predict_forces(a), m2.predict_forces(a)
        assert np.abs(f1 - f2).max() <= 10 * rtol * np.abs(f1).max()
        v1, v2 = m1.predict_stress(a), m2.predict_stress(a)
        assert np.abs(v1 - v2).max() <= 10 * rtol * np.abs(v1).max()


@pytest.mark.parametrize("first", ["serial", "dask"])
@pytest.mark.parametrize("labels", sorted(LABEL_SETS))
def test_partial_fit_with_client_equals_serial(client, soap, online_frames, labels, first,
                                               monkeypatch):
    """``partial_fit(frames, client=...)`` folds the new rows into the stored factors: the same
    model as a serial ``partial_fit``, whether the model was first fitted with a client or not,
    for energy-only, force-only and energy + force + stress labels."""
    from sklearn.base import clone

    from kmlip.model import KernelPotential

    def twin(m):
        # the fitted state is immutable (an update assigns a new one), so twins may share it
        t = clone(m)
        t.fitted_state_ = m.fitted_state_
        return t

    head, tail = online_frames
    test = cual_cells(2, seed=52)
    model = KernelPotential(soap, n_sparse=8, random_state=0, n_threads=1,
                            **LABEL_SETS[labels])
    model.fit(head, client=client if first == "dask" else None)
    before = model.n_labels_
    serial = twin(model).partial_fit(tail)
    sent = []
    bare = distributed._bare
    monkeypatch.setattr(distributed, "_bare", lambda a: sent.append(1) or bare(a))
    dask = twin(model).partial_fit(tail, client=client)
    assert len(sent) == len(tail)  # the new structures went to the workers, once
    assert_same_model(serial, dask, test)
    # the update added the new labels (and the override class of structure 11)
    fixed = {"energy": "energy_fixed", "forces": "forces_fixed", "stress": "virial_fixed"}
    assert fixed[labels] in dask.n_labels_ and fixed[labels] not in before
    assert sum(dask.n_labels_.values()) > sum(before.values())
    assert model.n_labels_ == before  # the twins were updated, not the original
    assert client.id not in distributed._scattered


def test_partial_fit_with_client_errors(client, soap, online_frames, tmp_path):
    """Bad frames name the structure (on a worker: and the worker), the model is unchanged; an
    unfitted model is fitted; a model without factors is refused."""
    from ase.build import bulk

    from kmlip.model import KernelPotential, load

    head, tail = online_frames
    test = cual_cells(2, seed=53)
    model = KernelPotential(soap, n_sparse=8, random_state=0, n_threads=1).fit(head)
    state, E = model.fitted_state_, model.predict(test)
    nan = [a.copy() for a in tail]
    for a, b in zip(nan, tail, strict=True):
        a.calc = b.calc
    nan[5].positions[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"structure 5 \(Dask worker tcp://.*\): .*NaN"):
        model.partial_fit(nan, client=client)
    unlabelled = [tail[0], tail[1].copy()]  # .copy() drops the labels
    with pytest.raises(ValueError, match="frame 1"):
        model.partial_fit(unlabelled, client=client)
    gold = bulk("Au", "fcc", a=4.0, cubic=True)
    with pytest.raises(ValueError, match=r"frame 0: species \['Au'\] unknown"):
        model.partial_fit([gold], client=client)
    with pytest.raises(TypeError, match=r"client must be a dask.distributed.Client, got str "
                                        r"\(connect with dask.distributed.Client\('tcp://"):
        model.partial_fit(tail, client=client.scheduler.address)
    assert model.fitted_state_ is state
    np.testing.assert_array_equal(model.predict(test), E)
    # not fitted yet: a fit on the workers
    fresh = KernelPotential(soap, n_sparse=8, random_state=0, n_threads=1)
    fresh.partial_fit(head, client=client)
    np.testing.assert_allclose(fresh.predict(test), E, rtol=1e-9)
    path = tmp_path / "no_factors.kmlip"
    model.save(path, include_factors=False)
    with pytest.raises(ValueError, match="partial_fit needs the per-class QR factors"):
        load(path).partial_fit(tail, client=client)


# -- a worker lost during a fit ---------------------------------------------------------------
class _LosesItsWorker(SOAP):
    """SOAP that, on a Dask worker, on a structure tagged ``info["worker_loss"] = (action,
    pass, marker file)``, makes that worker leave the cluster the first time (no marker file
    yet; the file receives the worker's address), in the selection pass (features only) or the
    data pass (features with gradients): "kill" ends the worker process at once (``os._exit``,
    as the kernel's OOM killer would), "retire" retires it gracefully (Dask moves its data to
    the other worker first). Elsewhere plain SOAP."""

    def transform(self, atoms, gradients=False, n_threads=None, **kw):
        tag = atoms.info.get("worker_loss")
        if tag is not None and gradients == (tag[1] == "data"):
            action, _, marker = tag
            try:
                from distributed import get_worker

                address = get_worker().address
            except ValueError:  # not on a worker: the serial reference
                address = None
            if address is not None and not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(address)
                if action == "kill":
                    os._exit(1)
                from distributed import get_client

                get_client().retire_workers([address])
        return super().transform(atoms, gradients=gradients, n_threads=n_threads, **kw)


@pytest.fixture(scope="module")
def loss_cluster():
    """A cluster of its own (2 worker processes under nannies), as workers are lost here."""
    from dask.distributed import Client, LocalCluster

    soap_or_skip()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield cluster, c


def _two_workers(cluster, client):
    cluster.scale(2)
    client.wait_for_workers(2, timeout=30)
    return sorted(client.nthreads())


def _lossy_model():
    from kmlip.model import KernelPotential

    return KernelPotential(_LosesItsWorker(["Cu", "Al"], r_cut=4.0, n_max=4, l_max=3),
                           n_sparse=8, sigma_stress=0.02, random_state=0, n_threads=1)


@pytest.mark.parametrize("stage", ["selection", "data"])
def test_worker_killed_during_fit(loss_cluster, tmp_path, stage):
    """A worker process that dies in the selection or the data pass loses the structures sent
    to it (Dask cannot recompute scattered data): the fit raises RuntimeError naming the worker
    and its structures, the model is unchanged, and once the nanny has restarted the worker the
    same fit succeeds with the serial result."""
    cluster, client = loss_cluster
    workers = _two_workers(cluster, client)
    frames = cual_cells(16, seed=61)  # 8 atoms each: structures 8..15 on the second worker
    test = cual_cells(2, seed=62)
    model = _lossy_model().fit(frames[:8])
    state, E = model.fitted_state_, model.predict(test)
    marker = tmp_path / "killed"
    frames[11].info["worker_loss"] = ("kill", stage, str(marker))
    with pytest.raises(RuntimeError) as err:
        model.fit(frames, client=client)
    dead = marker.read_text()
    if stage == "data":  # one chain of blocks per worker: structure 11 is on its worker
        assert dead == workers[1]
    else:  # an idle worker may steal a selection block (and its structures)
        assert dead in workers
    held = "8\\.\\.15" if dead == workers[1] else "0\\.\\.7"
    assert re.search(rf"the fit lost Dask worker {re.escape(dead)}, which held structures "
                     rf"{held} \(.*\): the worker died", str(err.value)), str(err.value)
    assert model.fitted_state_ is state
    np.testing.assert_array_equal(model.predict(test), E)
    assert client.id not in distributed._scattered  # nothing kept for a next pass
    assert dead not in _two_workers(cluster, client)  # the nanny's new worker
    # the marker now exists: the same calls succeed on the restarted cluster
    model.fit(frames, client=client).partial_fit(frames[:4], client=client)
    serial = _lossy_model().fit(frames).partial_fit(frames[:4])
    np.testing.assert_allclose(model.predict(test), serial.predict(test), rtol=1e-9)
    f1, f2 = serial.predict_forces(test[0]), model.predict_forces(test[0])
    assert np.abs(f1 - f2).max() <= 1e-9 * np.abs(f1).max()


def test_worker_retired_during_fit(loss_cluster, tmp_path):
    """A worker retired gracefully in the middle of the data pass hands its structures to the
    other worker, where Dask reruns its tasks: the fit completes with the serial result."""
    cluster, client = loss_cluster
    workers = _two_workers(cluster, client)
    frames = cual_cells(16, seed=63)
    test = cual_cells(2, seed=64)
    marker = tmp_path / "retired"
    frames[11].info["worker_loss"] = ("retire", "data", str(marker))
    model = _lossy_model().fit(frames, client=client)
    assert marker.read_text() == workers[1]
    assert sorted(client.nthreads()) == workers[:1]
    serial = _lossy_model().fit(frames)
    np.testing.assert_allclose(model.predict(test), serial.predict(test), rtol=1e-9)
    f1, f2 = serial.predict_forces(test[0]), model.predict_forces(test[0])
    assert np.abs(f1 - f2).max() <= 1e-9 * np.abs(f1).max()
    assert model.log_marginal_likelihood_ == pytest.approx(serial.log_marginal_likelihood_,
                                                           rel=1e-10)
