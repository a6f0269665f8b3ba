"""``kmlip eval`` and ``kmlip md``: tables, calibration round trip, plots, trajectories with
per-atom uncertainty, the uncertainty gate, one-line errors without partial files, --help."""
import builtins
import os

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

import kmlip.cli.md as cli_md
from kmlip.cli.eval import uncertainty_figures
from kmlip.cli.main import main
from kmlip.datasets import emt_frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Cu SOAP model, held-out labelled frames and a start structure (module-wide)."""
    from kmlip import SOAP, KernelPotential

    d = tmp_path_factory.mktemp("dyn")
    model = KernelPotential(SOAP(species=["Cu"], r_cut=4.0, n_max=4, l_max=3),
                            n_sparse=30, sigma_stress=0.02, random_state=0, n_threads=1)
    model.fit(emt_frames(6, seed=3))
    path = d / "cu.kmlip"
    model.save(path)
    test = d / "test.xyz"
    write(test, emt_frames(4, seed=4), format="extxyz")
    start = d / "start.xyz"
    write(start, emt_frames(1, seed=5, rattle=0.02)[0], format="extxyz")
    return {"dir": d, "model": path, "test": test, "start": start}


def one_line_error(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"kmlip {cmd}: error: "), lines[0]
    return lines[0]


def _row(out: str, name: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith(name))
    return line[len(name):].split()


def _listing(d) -> set[str]:
    return set(os.listdir(d))


# -- eval ----------------------------------------------------------------------------------------

def test_uncertainty_figures_of_calibrated_gaussian_errors():
    rng = np.random.default_rng(0)
    u = np.exp(rng.uniform(-4, -1, 20000))
    dF = u[:, None] * rng.standard_normal((u.size, 3))
    f = uncertainty_figures(dF, u)
    assert abs(f["coverage"] - 0.9545) < 0.005
    assert abs(f["rms_ratio"] - 1) < 0.03
    assert f["spearman"] > 0.7  # |dF_i| grows with u_i
    f = uncertainty_figures(2 * dF, u)  # overconfident by 2x
    assert abs(f["coverage"] - 0.6827) < 0.01 and abs(f["rms_ratio"] - 2) < 0.06


def test_eval_tables_match_error_metrics(files, capsys):
    import kmlip

    capsys.readouterr()
    assert main(["eval", str(files["model"]), str(files["test"])]) == 0
    out = capsys.readouterr().out
    ref = kmlip.load(files["model"]).error_metrics(read(files["test"], index=":"))
    n, mae, rmse = _row(out, "energy per atom")[1:]
    assert n == "4"
    assert float(mae) == pytest.approx(1e3 * ref["energy_mae"], abs=2e-3)
    assert float(rmse) == pytest.approx(1e3 * ref["energy_rmse"], abs=2e-3)
    n, mae, rmse = _row(out, "forces Cu")[1:]
    assert n == str(4 * 32 * 3)
    assert float(mae) == pytest.approx(1e3 * ref["forces_mae"], abs=2e-3)
    n, mae, rmse = _row(out, "stress")[1:]
    assert n == "24" and float(rmse) == pytest.approx(1e3 * ref["stress_rmse"], abs=2e-3)
    assert "uncertainty (uncalibrated" in out and "Spearman" in out


def test_eval_calibrate_round_trip(files, tmp_path, capsys):
    import kmlip

    before = files["model"].read_bytes()
    cal = tmp_path / "cal.kmlip"
    capsys.readouterr()
    assert main(["eval", str(files["model"]), str(files["test"]), "--calibrate",
                 "-o", str(cal)]) == 0
    out = capsys.readouterr().out
    assert files["model"].read_bytes() == before  # the input model is never touched
    m = kmlip.load(cal)
    c = m.fitted_state_.uncertainty_map
    assert c.n_atoms == 4 * 32 and c.scale > 0 and c.floor > 0
    after = _row(out, "uncertainty after (eV/Å)")
    coverage = float(after[1])
    assert 85 <= coverage <= 100
    assert float(after[3]) == pytest.approx(1.0, abs=0.15)  # ML fit: RMS err ≈ RMS u
    # the stored calibration gives the same figures when the file is evaluated again
    assert main(["eval", str(cal), str(files["test"])]) == 0
    again = _row(capsys.readouterr().out, "uncertainty (calibrated, eV/Å)")
    assert again[:4] == after[:4]
    # and the uncertainty the model now predicts is that calibration applied to its measure
    a = read(files["test"], index=0)
    r = m.compute(a, ("uncertainty", c.measure))
    np.testing.assert_allclose(r.uncertainty, c.uncertainty(getattr(r, c.measure)))


def test_eval_plots_written(files, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the [plot] extra is not installed")
    plots = tmp_path / "plots"
    assert main(["eval", str(files["model"]), str(files["test"]),
                 "--plot-dir", str(plots)]) == 0
    assert _listing(plots) == {"parity.png", "calibration.png"}  # no temporary files left
    for name in ("parity.png", "calibration.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_eval_without_matplotlib_skips_plots_in_one_line(files, tmp_path, capsys,
                                                         monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    plots = tmp_path / "plots"
    capsys.readouterr()
    assert main(["eval", str(files["model"]), str(files["test"]),
                 "--plot-dir", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "forces Cu" in out  # the tables still print
    assert [ln for ln in out.splitlines() if "plots skipped" in ln] == [
        "plots skipped: matplotlib is not installed (pip install 'kmlip[plot]')"]
    assert not plots.exists() or not _listing(plots)


def test_eval_bad_inputs_one_line_no_output(files, tmp_path, capsys):
    out = tmp_path / "cal.kmlip"
    capsys.readouterr()
    assert main(["eval", str(files["model"]), str(files["test"]), "--calibrate"]) == 2
    assert "needs -o" in one_line_error(capsys, "eval")
    assert main(["eval", str(files["model"]), str(files["test"]), "-o", str(out)]) == 2
    assert "only used with --calibrate" in one_line_error(capsys, "eval")
    assert main(["eval", str(files["model"]), str(files["test"]), "--measure", "novelty"]) == 2
    assert "--measure is only used with --calibrate" in one_line_error(capsys, "eval")
    unlabelled = tmp_path / "unlabelled.xyz"
    write(unlabelled, bulk("Cu", cubic=True).repeat(2), format="extxyz")
    assert main(["eval", str(files["model"]), str(unlabelled), "--calibrate",
                 "-o", str(out)]) == 2
    assert "no force labels" in one_line_error(capsys, "eval")
    alien = tmp_path / "alien.xyz"
    write(alien, [emt_frames(1)[0], emt_frames(1, symbols=("Au",), a=4.08)[0]],
          format="extxyz")
    assert main(["eval", str(files["model"]), str(alien), "--calibrate", "-o", str(out)]) == 2
    assert f"{alien}: structure 1" in one_line_error(capsys, "eval")
    assert main(["eval", str(files["model"]), str(tmp_path / "missing.xyz")]) == 2
    assert "does not exist" in one_line_error(capsys, "eval")
    assert main(["eval", str(files["test"]), str(files["test"])]) == 2
    assert "not a kmlip model file" in one_line_error(capsys, "eval")
    assert main(["eval", str(files["model"]), str(files["test"]), "--calibrate",
                 "-o", str(tmp_path / "no_dir" / "cal.kmlip")]) == 2
    assert "does not exist" in one_line_error(capsys, "eval")
    assert _listing(tmp_path) == {"unlabelled.xyz", "alien.xyz"}


# -- md ------------------------------------------------------------------------------------------

def test_md_writes_frames_with_per_atom_uncertainty(files, tmp_path, capsys):
    import kmlip

    traj = tmp_path / "traj.extxyz"
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "6",
                 "--temperature", "300", "--log-interval", "2", "-o", str(traj)]) == 0
    assert _listing(tmp_path) == {"traj.extxyz"}
    frames = read(traj, index=":")
    assert [a.info["step"] for a in frames] == [0, 2, 4, 6]  # N / interval + 1 frames
    model = kmlip.load(files["model"])
    for a in frames:
        u = a.arrays["uncertainty"]
        assert u.shape == (32,) and np.all(u > 0)
        assert a.info["max_uncertainty"] == pytest.approx(u.max())
        r = model.compute(a, ("energy", "forces", "uncertainty"))
        np.testing.assert_allclose(u, r.uncertainty, rtol=1e-5)
        np.testing.assert_allclose(a.get_forces(), r.forces, rtol=1e-5, atol=1e-6)  # 8 digits
        assert a.get_stress().shape == (6,)
    assert not np.allclose(frames[0].positions, frames[-1].positions)
    assert "no uncertainty gate" in capsys.readouterr().out


def test_md_nve_conserves_energy_and_npt_changes_the_cell(files, tmp_path):
    traj = tmp_path / "nve.extxyz"
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "20",
                 "--temperature", "300", "--timestep", "1", "--ensemble", "nve",
                 "--log-interval", "5", "-o", str(traj)]) == 0
    frames = read(traj, index=":")
    e = [a.get_potential_energy() + a.get_kinetic_energy() for a in frames]
    ekin = [a.get_kinetic_energy() for a in frames]
    assert max(ekin) > 0.2  # ~300 K of 32 atoms: the atoms move
    assert np.ptp(e) < 2e-3 * len(frames[0])  # forces are the energy's gradient
    traj = tmp_path / "npt.extxyz"
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "6",
                 "--temperature", "300", "--ensemble", "npt", "--pressure", "5",
                 "--log-interval", "3", "-o", str(traj)]) == 0
    frames = read(traj, index=":")
    assert len(frames) == 3
    assert frames[-1].get_volume() < frames[0].get_volume()  # 5 GPa compresses


def test_md_gate_on_compressed_cell_stops_at_step_0(files, tmp_path, capsys):
    start = read(files["start"])
    start.set_cell(start.cell * 0.85 ** (1 / 3), scale_atoms=True)  # -15 % volume
    comp = tmp_path / "compressed.xyz"
    write(comp, start, format="extxyz")
    traj = tmp_path / "traj.extxyz"
    capsys.readouterr()
    assert main(["md", str(files["model"]), str(comp), "--steps", "10", "--temperature", "300",
                 "--gate-std", "0.001", "-o", str(traj)]) == 0
    out = capsys.readouterr().out
    assert "exceeds 0.001 eV/Å (absolute)" in out  # the threshold, in eV/Å, in the log
    assert "stopped by the uncertainty gate at step 0 of 10" in out
    tripped = tmp_path / "traj.tripped.extxyz"
    assert _listing(tmp_path) == {"compressed.xyz", "traj.extxyz", "traj.tripped.extxyz"}
    t = read(tripped, index=":")
    assert len(t) == 1 and t[0].info["step"] == 0
    np.testing.assert_allclose(t[0].positions, start.positions, atol=1e-7)
    assert t[0].arrays["uncertainty"].max() > 0.001
    assert [a.info["step"] for a in read(traj, index=":")] == [0]
    # a threshold above every uncertainty: the run completes and says so
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "4",
                 "--temperature", "300", "--gate-relative", "100", "-o",
                 str(tmp_path / "ok.extxyz")]) == 0
    out = capsys.readouterr().out
    assert "completed 4 steps" in out and "calibrated noise level" in out
    assert not (tmp_path / "ok.tripped.extxyz").exists()


@pytest.mark.parametrize("bad", [
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--timestep", "0"], "--timestep must be in (0, 100] fs"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--gate-std", "-0.1"], "--gate-std must be a positive number"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--ensemble", "nve", "--friction", "0.1"], "--friction applies to --ensemble nvt only"),
    (["--pressure", "1"], "--pressure applies to --ensemble npt only"),
])
def test_md_bad_options_one_line(bad, files, tmp_path, capsys):
    args, words = bad
    traj = tmp_path / "traj.extxyz"
    base = {"--steps": "3", "--temperature": "300"}
    for k in range(0, len(args), 2):
        base.pop(args[k], None)
    extra = [x for kv in base.items() for x in kv]
    assert main(["md", str(files["model"]), str(files["start"]), *extra, *args,
                 "-o", str(traj)]) == 2
    assert words in one_line_error(capsys, "md")
    assert not _listing(tmp_path)


def test_md_bad_inputs_one_line_no_partial_file(files, tmp_path, capsys, monkeypatch):
    from ase.cluster import Octahedron

    traj = tmp_path / "traj.extxyz"
    run = ["--steps", "4", "--temperature", "300", "-o", str(traj)]
    capsys.readouterr()
    assert main(["md", str(files["model"]), str(tmp_path / "missing.xyz"), *run]) == 2
    assert "does not exist" in one_line_error(capsys, "md")
    alien = tmp_path / "alien.xyz"
    write(alien, bulk("Au", cubic=True), format="extxyz")
    assert main(["md", str(files["model"]), str(alien), *run]) == 2
    assert one_line_error(capsys, "md").startswith(f"kmlip md: error: {alien}: ")
    cluster = tmp_path / "cluster.xyz"
    write(cluster, Octahedron("Cu", 3), format="extxyz")
    assert main(["md", str(files["model"]), str(cluster), *run, "--ensemble", "npt"]) == 2
    assert "npt needs a cell periodic" in one_line_error(capsys, "md")
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "2",
                 "--temperature", "300", "-o", str(tmp_path / "nodir" / "t.extxyz")]) == 2
    one_line_error(capsys, "md")
    assert _listing(tmp_path) == {"alien.xyz", "cluster.xyz"}

    # a failure in the middle of the run: an existing -o stays as it was, no temporary left
    traj.write_text("old\n")
    real_frame, calls = cli_md._frame, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure")
        return real_frame(*args, **kwargs)

    monkeypatch.setattr(cli_md, "_frame", failing)
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "4",
                 "--temperature", "300", "--log-interval", "1", "-o", str(traj)]) == 2
    assert "simulated failure" in one_line_error(capsys, "md")
    assert traj.read_text() == "old\n"
    assert _listing(tmp_path) == {"alien.xyz", "cluster.xyz", "traj.extxyz"}

    # Ctrl-C: nothing at -o changes; the frames so far are kept beside it as .partial
    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_frame(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(cli_md, "_frame", interrupted)
    assert main(["md", str(files["model"]), str(files["start"]), "--steps", "10",
                 "--temperature", "300", "--log-interval", "1", "-o", str(traj)]) == 130
    assert traj.read_text() == "old\n"
    partial = read(tmp_path / "traj.partial.extxyz", index=":")
    assert [a.info["step"] for a in partial] == [0, 1, 2, 3]


def test_help_of_eval_and_md(capsys):
    for cmd, options in (("eval", ["--plot-dir", "--calibrate", "--measure", "-o", "--format"]),
                         ("md", ["--steps", "--temperature", "--timestep", "--ensemble",
                                 "--gate-std", "--gate-relative", "--friction", "--seed",
                                 "--log-interval", "--pressure", "--compressibility", "-o"])):
        assert main([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for opt in options:
            assert opt in text, (cmd, opt)
    assert "eV/Å" in text and "GPa" in text and "1/fs" in text and "status 0" in text
