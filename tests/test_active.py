"""On-the-fly learning: new sparse points without a refit, learn_on_the_fly, resume, kmlip learn.

Fast settings: 32-atom fcc Cu with EMT, a tiny SOAP, tens of MD steps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from kmlip.active import learn_on_the_fly
from kmlip.descriptors.soap import SOAP
from kmlip.gp import columns
from kmlip.model import KernelPotential

STEPS = 40


def _cu(seed=None, rattle=0.0, a=3.61):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def _labelled(atoms):
    b = atoms.copy()
    b.calc = EMT()
    e, f, s = b.get_potential_energy(), b.get_forces(), b.get_stress()
    b.calc = SinglePointCalculator(b, energy=e, forces=f, stress=s)
    return b


def _soap():
    return SOAP(["Cu"], r_cut=4.0, n_max=3, l_max=2)


class CountingEMT(Calculator):
    """EMT that records every completed call (in memory and, optionally, in a file)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, record=None, **kw):
        super().__init__(**kw)
        self.calls = []
        self.record = record
        self._emt = EMT()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self._emt
        self.results = {"energy": a.get_potential_energy(),
                        "free_energy": a.get_potential_energy(),
                        "forces": a.get_forces(), "stress": a.get_stress()}
        self.calls.append(self.atoms.positions.copy())
        if self.record is not None:
            with open(self.record, "a") as fh:
                fh.write("call\n")


class BrokenReference(Calculator):
    """A reference calculator whose every call fails (e.g. an SCF that does not converge)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise ValueError("SCF did not converge")


def broken_reference():
    return BrokenReference()


def _learn(directory, reference, **kw):
    args = dict(steps=STEPS, temperature=800.0, descriptor=_soap(), seed=3,
                max_new_points=16, progress=False)
    args.update(kw)
    return learn_on_the_fly(_cu(), reference, directory=directory, **args)


def _held_out(n=4):
    return [_labelled(_cu(seed=100 + k, rattle=0.08)) for k in range(n)]


def _force_mae(model, frames):
    return float(np.mean([np.mean(np.abs(model.predict_forces(a) - a.get_forces()))
                          for a in frames]))


# -- new columns ---------------------------------------------------------------------------------
def _fit(frames, points, **kw):
    d = _soap()
    args = dict(zeta=4, delta=0.3, sigma_energy=0.002, sigma_force=0.03, sigma_stress=0.01,
                precision="double", e0={"Cu": -0.1})
    args.update(kw)
    if isinstance(points, int):
        return KernelPotential(d, n_sparse=points, sparse_method="fps", random_state=0,
                               **args).fit(frames)
    return KernelPotential(d, n_sparse=len(points), sparse_method={"Cu": points},
                           **args).fit(frames)


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_new_columns_equal_a_fresh_fit():
    train = [_labelled(_cu(seed=k, rattle=0.1)) for k in range(3)]
    test = [_labelled(_cu(seed=50 + k, rattle=0.1)) for k in range(2)]
    m = _fit(train, 5)
    st = m.fitted_state_
    X = st.descriptor.transform(train[1])
    new = X[[3, 7, 11]]
    cache = columns.build_cache(st, train)
    st2, cache2 = columns.add_columns(st, train, {"Cu": new}, cache)
    assert st2.basis.n_sparse == 8 and cache2.n_columns == 8
    assert st.basis.n_sparse == 5  # the input state is untouched
    fresh = _fit(train, np.concatenate([st.basis.points[29], new]))
    m.fitted_state_ = st2
    for a in test:
        r1 = m.compute(a, ("energy", "forces", "stress", "energies_var"))
        r2 = fresh.compute(a, ("energy", "forces", "stress", "energies_var"))
        assert abs(r1.energy - r2.energy) <= 1e-8 * abs(r2.energy)
        assert _rel(r1.forces, r2.forces) < 1e-8
        assert _rel(r1.stress, r2.stress) < 1e-8
        assert _rel(r1.energies_var, r2.energies_var) < 1e-6
    assert m.log_marginal_likelihood_ == pytest.approx(fresh.log_marginal_likelihood_,
                                                       rel=1e-9)
    # without a cache: the same result (one more descriptor pass)
    st3, _ = columns.add_columns(st, train, {"Cu": new})
    np.testing.assert_allclose(st3.alpha, st2.alpha, rtol=1e-9, atol=1e-12)


def test_new_rows_keep_the_cache_in_step():
    train = [_labelled(_cu(seed=k, rattle=0.1)) for k in range(3)]
    more = _labelled(_cu(seed=9, rattle=0.1))
    test = _labelled(_cu(seed=60, rattle=0.1))
    m = _fit(train, 6)
    st = m.fitted_state_
    cache = columns.build_cache(st, train)
    st2, cache2 = columns.add_rows(st, cache, [more])
    assert len(cache2) == 4 and len(cache) == 3
    # rows then columns: equals a fresh fit on all four frames with all points
    new = st.descriptor.transform(more)[[0, 5]]
    st3, cache3 = columns.add_columns(st2, train + [more], {"Cu": new}, cache2)
    fresh = _fit(train + [more], np.concatenate([st.basis.points[29], new]))
    m.fitted_state_ = st3
    assert _rel(m.predict_forces(test), fresh.predict_forces(test)) < 1e-8
    # the factors rebuilt from the cache are the state's factors (same R^T R)
    for cls, f in cache3.factors().items():
        T = st3.factors[cls].T
        np.testing.assert_allclose(f.T.T @ f.T, T.T @ T, rtol=1e-9, atol=1e-9)
        assert f.n_rows == st3.factors[cls].n_rows
    # save / load of the cache
    back = columns.RowCache.from_arrays(cache3.to_arrays())
    columns.check_cache(st3, back)
    assert len(back) == 4


def test_new_columns_reject_bad_input():
    train = [_labelled(_cu(seed=k, rattle=0.1)) for k in range(2)]
    st = _fit(train, 4).fitted_state_
    cache = columns.build_cache(st, train)
    with pytest.raises(ValueError, match="shape"):
        columns.add_columns(st, train, {"Cu": np.ones((2, 3))}, cache)
    with pytest.raises(ValueError, match="no e0"):
        columns.add_columns(st, train, {"Au": np.ones((1, st.descriptor.n_features))}, cache)
    with pytest.raises(ValueError, match="row cache"):
        columns.add_columns(st, train[:1], {"Cu": np.ones((1, st.descriptor.n_features))},
                            cache)
    with pytest.raises(ValueError, match="labels"):
        columns.add_rows(st, columns.RowCache(cache.frames[:1], cache.n_columns), train[:1])


# -- learn_on_the_fly ----------------------------------------------------------------------------
def test_learning_calls_the_reference_improves_and_logs(tmp_path):
    held = _held_out()
    ref0 = CountingEMT()
    first = _learn(tmp_path / "first", ref0, max_reference_calls=1)
    assert len(ref0.calls) == 1 and first.n_reference_calls == 1
    ref = CountingEMT()
    res = _learn(tmp_path / "run", ref)
    assert res.steps == STEPS and res.stopped == "steps"
    assert res.n_reference_calls >= 2  # the start structure and at least one gate trip
    assert len(ref.calls) == res.n_reference_calls
    assert _force_mae(res.model, held) < 0.5 * _force_mae(first.model, held)
    run = tmp_path / "run"
    log = (run / "log").read_text()
    for rec in res.calls:
        assert f"reference call {rec['call']}: step {rec['step']}," in log
    assert "descriptor" in log and "gate" in log
    for rec in res.calls[1:]:
        assert rec["max_uncertainty"] > 0 and rec["force_mae"] > 0
        assert f"max uncertainty {rec['max_uncertainty']:.4g} eV/Å" in log
    refs = read(run / "reference.extxyz", ":")
    assert len(refs) == res.n_reference_calls
    for a, pos in zip(refs, ref.calls, strict=True):
        np.testing.assert_allclose(a.positions, pos, atol=1e-7)
        assert a.get_forces().shape == (32, 3) and a.get_stress().shape == (6,)
    traj = read(run / "trajectory.extxyz", ":")
    assert len(traj) == STEPS + 1
    assert [a.info["step"] for a in traj] == list(range(STEPS + 1))
    assert all(a.arrays["uncertainty"].shape == (32,) for a in traj)
    assert all(np.all(a.arrays["uncertainty"] > 0) for a in traj)
    # the model file is the model returned
    from kmlip import load

    m = load(run / "model.kmlip")
    np.testing.assert_array_equal(m.predict_forces(held[0]), res.model.predict_forces(held[0]))
    assert all(0 < v for k, v in m.hyperparameters_.items()
               if v is not None and k != "log_marginal_likelihood")


def test_caps(tmp_path):
    ref = CountingEMT()
    res = _learn(tmp_path / "a", ref, max_reference_calls=2, threshold=1e-3)
    assert res.n_reference_calls == 2 and len(ref.calls) == 2 and res.steps == STEPS
    assert "cap 2 reached" in (tmp_path / "a" / "log").read_text()
    ref = CountingEMT()
    res = _learn(tmp_path / "b", ref, max_wall_time=1e-9)
    assert res.stopped == "wall_time" and res.steps < STEPS
    # resumable: the next call finishes the steps
    res2 = _learn(tmp_path / "b", ref)
    assert res2.steps == STEPS and len(ref.calls) == res2.n_reference_calls
    with pytest.raises(ValueError, match="holds a learning run"):
        _learn(tmp_path / "b", ref, resume=False)
    with pytest.raises(ValueError, match="bounds"):
        _learn(tmp_path / "c", ref, bounds={"delta": (0.0, 1.0)})


def test_resume_refuses_another_descriptor_and_keeps_its_own(tmp_path):
    # a resumed run goes on with the model of its checkpoint: another descriptor asked for
    # would be ignored without a word, so it is refused before the run directory is touched
    from kmlip.active.learn import terms_difference
    from kmlip.model import load

    ref = CountingEMT()
    run = tmp_path / "run"
    _learn(run, ref, max_wall_time=1e-9)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    other = SOAP(species=["Cu"], r_cut=3.0, n_max=2, l_max=2)
    with pytest.raises(ValueError, match=r"resumes from its own model, but the given "
                                         r"descriptor differs: term 0 \(SOAP\) differs in "):
        _learn(run, ref, descriptor=other)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    st = load(run / "model.kmlip").fitted_state_
    assert terms_difference(st, [(_soap(), 4)]) is None
    assert "zeta 2" in terms_difference(st, [(_soap(), 2)])
    assert "e0" in terms_difference(st, [(_soap(), 4)], {"Cu": 123.0})
    # the same descriptor, or none, resumes
    res = _learn(run, ref)
    assert res.steps == STEPS
    res = _learn(run, ref, descriptor=None, steps=STEPS + 5)
    assert res.steps == STEPS + 5


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["after_checkpoint", "during_update"])
def test_resume_after_a_crash_repeats_and_loses_no_call(tmp_path, monkeypatch, where):
    ref_full = CountingEMT()
    full = _learn(tmp_path / "full", ref_full, threshold=0.02)
    assert full.n_reference_calls >= 3, "the test needs a few gate trips"
    k = 2  # crash around the k-th reference call (the start structure is call 1)
    ref = CountingEMT()
    if where == "after_checkpoint":
        def callback(rec):
            if rec["call"] == k:
                raise Crash
        with pytest.raises(Crash):
            _learn(tmp_path / "run", ref, threshold=0.02, callback=callback)
    else:
        real = columns.add_columns
        n = {"calls": 0}

        def failing(*a, **kw):
            n["calls"] += 1
            if n["calls"] == k - 1:
                raise Crash
            return real(*a, **kw)
        monkeypatch.setattr(columns, "add_columns", failing)
        with pytest.raises(Crash):
            _learn(tmp_path / "run", ref, threshold=0.02)
        monkeypatch.setattr(columns, "add_columns", real)
    assert len(ref.calls) == k
    res = _learn(tmp_path / "run", ref, threshold=0.02)
    # every call made once, none lost: the same calls as the uninterrupted run
    assert len(ref.calls) == res.n_reference_calls
    assert [r["step"] for r in res.calls] == [r["step"] for r in full.calls]
    refs = read(tmp_path / "run" / "reference.extxyz", ":")
    assert [a.info["kmlip_step"] for a in refs] == [r["step"] for r in full.calls]
    traj = read(tmp_path / "run" / "trajectory.extxyz", ":")
    assert [a.info["step"] for a in traj] == list(range(STEPS + 1))
    held = _held_out(2)
    np.testing.assert_allclose(res.model.predict_forces(held[0]),
                               full.model.predict_forces(held[0]), rtol=1e-9, atol=1e-10)
    # the calibration data of the interrupted call are recomputed from the same model
    cal, cal_full = res.model.fitted_state_.calibration, full.model.fitted_state_.calibration
    assert cal is not None and cal.n_atoms == cal_full.n_atoms
    np.testing.assert_allclose([cal.scale, cal.floor], [cal_full.scale, cal_full.floor],
                               rtol=1e-6)
    log = (tmp_path / "run" / "log").read_text()
    for rec in res.calls:
        assert f"reference call {rec['call']}:" in log


def test_resume_after_kill_9(tmp_path):
    run = tmp_path / "run"
    record = tmp_path / "calls.txt"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_active as t
        from kmlip.active import learn_on_the_fly
        ref = t.CountingEMT(record={str(record)!r})
        def slow(rec):
            time.sleep(0.05)
        learn_on_the_fly(t._cu(), ref, directory={str(run)!r}, steps=100000, temperature=800.0,
                         descriptor=t._soap(), seed=3, max_new_points=16, threshold=0.02,
                         progress=False, callback=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                            cwd=tmp_path)  # not the checkout: the installed package
    manifest = run / "manifest.json"
    t0 = time.time()
    try:
        while time.time() - t0 < 120:
            if manifest.exists():
                try:
                    if json.loads(manifest.read_text())["n_reference_calls"] >= 3:
                        break
                except (ValueError, KeyError):
                    pass
            if proc.poll() is not None:
                pytest.fail("the learner ended early: " + proc.stderr.read().decode()[-500:])
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint with 3 reference calls within 120 s")
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    n_before = len(record.read_text().splitlines())
    assert n_before >= 3
    ref = CountingEMT(record=str(record))
    res = learn_on_the_fly(_cu(), ref, directory=run, steps=STEPS + 200, temperature=800.0,
                           descriptor=_soap(), seed=3, max_new_points=16, threshold=0.02,
                           progress=False)
    assert len(record.read_text().splitlines()) == res.n_reference_calls
    steps = [r["step"] for r in res.calls]
    assert steps == sorted(set(steps))
    traj = read(run / "trajectory.extxyz", ":")
    assert [a.info["step"] for a in traj] == list(range(res.steps + 1))


# -- command line --------------------------------------------------------------------------------
def test_cli_learn_emt(tmp_path, capsys):
    from ase.io import write

    from kmlip.cli.main import main

    start = tmp_path / "start.xyz"
    write(start, _cu())
    out = tmp_path / "run"
    args = ["learn", str(start), "--reference", "emt", "--steps", "30", "--temperature", "800",
            "--timestep", "1.0", "-o", str(out), "--r-cut", "4.0", "--n-max", "3", "--l-max",
            "2", "--quiet"]
    assert main(args) == 0
    for name in ("model.kmlip", "trajectory.extxyz", "reference.extxyz", "log"):
        assert (out / name).exists()
    assert "reference calls" in capsys.readouterr().out
    traj = read(out / "trajectory.extxyz", ":")
    assert len(traj) == 31 and "uncertainty" in traj[-1].arrays
    n_refs = len(read(out / "reference.extxyz", ":"))
    # resumes (nothing more to do for the same steps; more steps continue)
    assert main(args[:5] + ["40"] + args[6:]) == 0
    assert len(read(out / "trajectory.extxyz", ":")) == 41
    assert len(read(out / "reference.extxyz", ":")) >= n_refs
    # errors: one line, status 2, nothing written
    bad = tmp_path / "bad"
    for ref in ("nope", "no_such_module_xyz:f", "os:path"):
        assert main(["learn", str(start), "--reference", ref, "--steps", "5",
                     "--temperature", "300", "-o", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kmlip learn: error:") and "\n" not in err
        assert not bad.exists()
    # a reference that fails: nothing of the run is left, in a new or an existing directory
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for target in (bad, existing):
        assert main(["learn", str(start), "--reference", "test_active:broken_reference",
                     "--steps", "5", "--temperature", "300", "-o", str(target)]) == 2
        assert "SCF did not converge" in capsys.readouterr().err
    assert not bad.exists()
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    assert main(["learn", str(tmp_path / "missing.xyz"), "--reference", "emt", "--steps",
                 "5", "--temperature", "300", "-o", str(bad)]) == 2
    assert not bad.exists()


def test_given_frames_and_nve(tmp_path):
    given = [_labelled(_cu(seed=k, rattle=0.05)) for k in range(2)]
    ref = CountingEMT()
    res = _learn(tmp_path / "run", ref, frames=given, ensemble="nve", steps=20)
    assert res.steps == 20
    assert len(ref.calls) == res.n_reference_calls  # the given frames are not reference calls
    assert all(rec["step"] > 0 for rec in res.calls)
    refs = read(tmp_path / "run" / "reference.extxyz", ":")
    assert [a.info["kmlip_source"] for a in refs] == ["given"] * 2 + ["reference"] * len(ref.calls)
    np.testing.assert_allclose(refs[0].get_forces(), given[0].get_forces(), atol=1e-7)
    # two frames: the hyperparameters were optimised at once, within the bounds
    log = (tmp_path / "run" / "log").read_text()
    assert "hyperparameters:" in log
    with pytest.raises(ValueError, match="ensemble"):
        _learn(tmp_path / "x", ref, ensemble="npt")
