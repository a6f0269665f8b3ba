"""``kmlip learn --model SPEC.json``: on-the-fly learning of a Distance2b + SOAP sum from the
command line (32-atom Cu-Al, EMT), the model file it writes through eval/info/md/predict, the
option conflicts, and resuming a run with and without the spec."""
from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from conftest import soap_or_skip

from kmlip import load
from kmlip.cli.main import main

STEPS = 40
E0 = {"Cu": -0.1, "Al": -0.2}
D2B = {"type": "Distance2b", "params": {"species": ["Cu", "Al"], "r_cut": 4.0, "theta": 0.8}}
SOAP = {"type": "SOAP", "params": {"species": ["Cu", "Al"], "r_cut": 4.0, "n_max": 3,
                                   "l_max": 2}}
SPEC = {"terms": [{"descriptor": D2B, "delta": 0.5},
                  {"descriptor": SOAP, "delta": 0.3, "zeta": 4}], "e0": E0}


def _cual():
    a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(2)
    a.symbols[np.random.default_rng(0).random(len(a)) < 0.3] = "Al"
    return a


def _args(start, spec, out, steps=STEPS, *extra):
    return ["learn", str(start), "--model", str(spec), "--reference", "emt", "--steps",
            str(steps), "--temperature", "800", "--seed", "3", "--max-new-points", "16",
            "--threads", "1", "-o", str(out), "--quiet", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("kmlip learn: error: "), err
    return err[len("kmlip learn: error: "):]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One ``kmlip learn --model`` run (module-wide): its directory, start and spec files, and
    what it printed."""
    soap_or_skip()
    d = tmp_path_factory.mktemp("learn_sum")
    start, spec = d / "start.xyz", d / "spec.json"
    write(start, _cual())
    spec.write_text(json.dumps(SPEC))
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_args(start, spec, d / "run")) == 0
    return {"dir": d, "run": d / "run", "start": start, "spec": spec, "out": buf.getvalue()}


def test_learning_a_sum_from_the_command_line(learned):
    run = learned["run"]
    refs = read(run / "reference.extxyz", ":")
    assert len(refs) >= 2, "the test needs a gate trip after the start structure"
    m = load(run / "model.kmlip")
    st = m.fitted_state_
    # the spec's terms, zeta and e0
    assert [t.descriptor.to_dict()["type"] for t in st.kernel.terms] == ["Distance2b", "SOAP"]
    for term, spec in zip(st.kernel.terms, (D2B, SOAP), strict=True):
        got = term.descriptor.to_dict()["params"]
        assert {k: got[k] for k in spec["params"]} == spec["params"]
    assert m.zeta == [None, 4] and m.e0_ == E0
    assert f"{len(refs)} reference calls, {st.n_sparse} sparse points" in learned["out"]
    assert st.n_sparse > sum(sum(d.values()) for d in m.n_sparse)  # grown past the first model
    # the same run through the Python API gives the same model (the spec became the template)
    from kmlip import Distance2b, KernelPotential
    from kmlip.active import learn_on_the_fly
    from kmlip.descriptors.soap import SOAP as SOAPDescriptor

    template = KernelPotential([Distance2b(**D2B["params"]), SOAPDescriptor(**SOAP["params"])],
                               zeta=[None, 4], delta=[0.5, 0.3], e0=E0)
    res = learn_on_the_fly(read(learned["start"]), EMT(), steps=STEPS, temperature=800.0,
                           model=template, seed=3, max_new_points=16, n_threads=1,
                           progress=False)
    assert res.n_reference_calls == len(refs)
    test = _cual()
    test.rattle(0.1, seed=7)
    np.testing.assert_allclose(m.predict_forces(test), res.model.predict_forces(test),
                               rtol=1e-8, atol=1e-10)


def test_eval_info_md_predict_on_the_learned_sum(learned, tmp_path, capsys):
    model = learned["run"] / "model.kmlip"
    m = load(model)
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "sparse points (term 0, Distance2b)" in out and "sparse points (term 1, SOAP)" in out
    assert f"sparse points in all: {m.fitted_state_.n_sparse}" in out
    assert "<array" in out and len(out.splitlines()) < 60  # the points are not printed
    assert main(["eval", str(model), str(learned["run"] / "reference.extxyz")]) == 0
    assert "uncertainty" in capsys.readouterr().out
    traj = tmp_path / "md.extxyz"
    assert main(["md", str(model), str(learned["start"]), "--steps", "4", "--temperature",
                 "300", "-o", str(traj)]) == 0
    frames = read(traj, ":")
    assert len(frames) >= 2 and frames[-1].arrays["uncertainty"].shape == (32,)
    assert np.all(np.isfinite(frames[-1].arrays["uncertainty"]))
    pred = tmp_path / "pred.extxyz"
    assert main(["predict", str(model), str(learned["start"]), "-o", str(pred),
                 "--forces-var"]) == 0
    got = read(pred)
    np.testing.assert_allclose(got.get_potential_energy(), m.predict([read(learned["start"])])[0],
                               rtol=1e-10)
    assert got.arrays["forces_std"].shape == (32, 3)


@pytest.mark.parametrize("extra, named", [(["--r-cut", "4.0"], "--r-cut"),
                                          (["--r-cut", "4.5"], "--r-cut"),  # the default too
                                          (["--n-max", "3", "--l-max", "2"], "--n-max, --l-max")])
def test_soap_options_with_model_are_refused(learned, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    assert main(_args(learned["start"], learned["spec"], out, 5, *extra)) == 2
    msg = _one_line_error(capsys)
    assert msg.startswith(f"{named} and --model cannot be combined"), msg
    assert not out.exists()


def test_bad_specs_are_refused_before_any_call(learned, tmp_path, capsys):
    out = tmp_path / "run"
    cases = [({**SPEC, "E0": E0}, "unknown keys ['E0']"),
             ({**SPEC, "e0": {"Cu": -0.1}}, "e0 has no value for ['Al']"),
             ({**SPEC, "e0": {"Cu": "x", "Al": 0}}, "e0['Cu'] is not a number"),
             ({"terms": [{"descriptor": {**D2B, "params": {**D2B["params"],
                                                           "species": ["Cu"]}}}]},
              "does not cover species ['Al']")]
    for k, (spec, words) in enumerate(cases):
        path = tmp_path / f"spec{k}.json"
        path.write_text(json.dumps(spec))
        assert main(_args(learned["start"], path, out, 5)) == 2
        msg = _one_line_error(capsys)
        assert words in msg, msg
        assert not out.exists()


def test_unused_sparse_settings_of_the_spec_warn(learned, tmp_path, capsys):
    spec = json.loads(json.dumps(SPEC))
    spec["terms"][1].update(n_sparse=50, sparse_method="cur")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(_args(learned["start"], path, tmp_path / "run", 0)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kmlip learn: warning: {path}: n_sparse and sparse_method of the terms are "
                   "not used: the learner picks the sparse points itself"], err
    m = load(tmp_path / "run" / "model.kmlip")
    assert m.fitted_state_.n_sparse < 50  # the learner's points, not the spec's


def test_resume_with_and_without_the_spec(learned, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(learned["run"], run)
    n_traj = len(read(run / "trajectory.extxyz", ":"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # a spec whose terms differ from the run's model: refused, the run untouched
    other = json.loads(json.dumps(SPEC))
    other["terms"][1]["descriptor"]["params"]["n_max"] = 4
    changes = [(other, "term 1 (SOAP) differs in n_max (4 vs the run's 3)"),
               ({"terms": [SPEC["terms"][1]], "e0": E0}, "its terms are SOAP, the run's "
                                                         "Distance2b + SOAP"),
               ({**SPEC, "terms": [SPEC["terms"][0], {**SPEC["terms"][1], "zeta": 2}]},
                "term 1 (SOAP) has zeta 2, the run's 4"),
               ({**SPEC, "e0": {"Cu": 0.0, "Al": 0.0}}, "its e0")]
    for k, (spec, words) in enumerate(changes):
        path = tmp_path / f"other{k}.json"
        path.write_text(json.dumps(spec))
        assert main(_args(learned["start"], path, run, STEPS + 10)) == 2
        msg = _one_line_error(capsys)
        assert msg.startswith(f"--model {path}: {words}"), msg
        assert f"{run} resumes from its own model" in msg
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # the same spec (a different delta is fine: the run re-optimises it) resumes
    same = json.loads(json.dumps(SPEC))
    same["terms"][0]["delta"] = 0.9
    path = tmp_path / "same.json"
    path.write_text(json.dumps(same))
    assert main(_args(learned["start"], path, run, STEPS + 10)) == 0
    assert len(read(run / "trajectory.extxyz", ":")) == n_traj + 10
    assert "resuming the run" in (run / "log").read_text()
    # without --model (no SOAP options either): the run's model goes on
    args = _args(learned["start"], path, run, STEPS + 20)
    i = args.index("--model")
    assert main(args[:i] + args[i + 2:]) == 0
    assert len(read(run / "trajectory.extxyz", ":")) == n_traj + 20
    st = load(run / "model.kmlip").fitted_state_
    assert [type(t.descriptor).__name__ for t in st.kernel.terms] == ["Distance2b", "SOAP"]


def test_fit_reads_the_spec_e0_too(learned, tmp_path):
    """``kmlip fit --model`` and ``kmlip learn --model`` read the same spec: e0 fixed by it."""
    train = learned["run"] / "reference.extxyz"
    spec = json.loads(json.dumps(SPEC))
    for t in spec["terms"]:
        t["n_sparse"] = 6
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "m.kmlip"
    assert main(["fit", str(train), "-o", str(out), "--model", str(path), "--threads",
                 "1"]) == 0
    assert load(out).e0_ == E0
    spec.pop("e0")
    path.write_text(json.dumps(spec))
    assert main(["fit", str(train), "-o", str(out), "--model", str(path), "--threads",
                 "1"]) == 0
    assert load(out).e0_ != E0  # fitted by least squares
