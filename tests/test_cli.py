"""The kmlip command line: demo, fit, predict, info, one-line errors, atomic writes, --help."""
import argparse
import builtins
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from ase.io import read, write

import kmlip
import kmlip.cli._files as cli_files
from kmlip.cli.main import SUBCOMMANDS, build_parser, main
from kmlip.datasets import emt_frames

FIT_ARGS = ["--r-cut", "4.0", "--n-max", "4", "--l-max", "3", "--n-sparse", "30",
            "--sigma-stress", "0.02"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model fitted through ``kmlip fit`` and a valid structures file (module-wide)."""
    d = tmp_path_factory.mktemp("cli")
    train = d / "train.xyz"
    write(train, emt_frames(6, repeat=(2, 2, 2), seed=3), format="extxyz")
    model = d / "cu.kmlip"
    assert main(["fit", str(train), "-o", str(model), *FIT_ARGS]) == 0
    test = d / "test.xyz"
    write(test, emt_frames(2, seed=4), format="extxyz")
    return {"dir": d, "train": train, "model": model, "test": test}


def one_line_error(capsys, cmd: str, path=None) -> str:
    """The single stderr line of a failed command; checks its form and that it names path."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = f"kmlip {cmd}: error: " + ("" if path is None else f"{path}: ")
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def test_fit_predict_info_round_trip(files, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "pred.xyz"
    assert main(["predict", str(files["model"]), str(files["test"]), "-o", str(out),
                 "--forces-var"]) == 0
    pred = read(out, index=":")
    frames = read(files["test"], index=":")
    assert len(pred) == 2
    ref = np.array([a.get_potential_energy() for a in frames])
    got = np.array([a.get_potential_energy() for a in pred])
    assert np.all(np.abs(got - ref) / 32 < 0.01)  # eV/atom
    assert np.all(np.isfinite([a.info["energy_std"] for a in pred]))
    assert pred[0].arrays["energies_std"].shape == (32,)
    assert pred[0].arrays["forces_std"].shape == (32, 3)
    assert pred[0].get_stress().shape == (6,)
    assert main(["info", str(files["model"])]) == 0
    assert "SOAP" in capsys.readouterr().out


# -- input files that cannot be read -------------------------------------------------------------

def _bad_structure_file(kind: str, d, monkeypatch):
    """Creates an unreadable structure file of the given kind; returns (path, words of the
    expected message)."""
    p = d / f"bad_{kind}.xyz"
    if kind == "text_txt":
        p = d / "notes.txt"
        p.write_text("hello world\nnot a structure\n")
        return p, "format"
    if kind == "text_xyz":
        p.write_text("hello world\nnot a structure\n")
        return p, "cannot read"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty"
    if kind == "binary_bin":
        p = d / "blob.bin"
        p.write_bytes(np.random.default_rng(0).bytes(300))
        return p, "format"
    if kind == "binary_xyz":
        p.write_bytes(b"\xa5\xff\x00" + np.random.default_rng(1).bytes(300))
        return p, ""
    if kind == "truncated_xyz":
        p.write_text("3\n\nCu 0 0 0\n")
        return p, "cannot read"
    if kind == "no_atoms":
        p.write_text("0\n\n")
        return p, ""
    if kind == "directory":
        p = d / "a_dir"
        p.mkdir()
        return p, "directory"
    if kind == "missing":
        return d / "missing.xyz", "does not exist"
    if kind == "no_permission":
        write(p, emt_frames(1), format="extxyz")
        p.chmod(0)
        if os.access(p, os.R_OK):  # running as root: permissions do not stop reads
            def refuse(file, *args, **kwargs):
                if os.fspath(file) == os.fspath(p):
                    raise PermissionError(13, "Permission denied", os.fspath(file))
                return builtins.open(file, *args, **kwargs)
            monkeypatch.setattr(cli_files, "open", refuse, raising=False)
        return p, "permission denied"
    raise AssertionError(kind)


BAD_KINDS = ["text_txt", "text_xyz", "empty", "binary_bin", "binary_xyz", "truncated_xyz",
             "no_atoms", "directory", "missing", "no_permission"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unreadable_structure_files_give_one_line(kind, files, tmp_path, capsys, monkeypatch):
    path, words = _bad_structure_file(kind, tmp_path, monkeypatch)
    capsys.readouterr()
    out = tmp_path / "never.kmlip"
    assert main(["fit", str(path), "-o", str(out)]) == 2
    assert words in one_line_error(capsys, "fit", path)
    assert not out.exists()
    assert main(["predict", str(files["model"]), str(path)]) == 2
    assert words in one_line_error(capsys, "predict", path)


def test_format_option_reads_a_file_with_any_name(files, tmp_path, capsys):
    odd = tmp_path / "structures.data"
    shutil.copy(files["test"], odd)
    assert main(["predict", str(files["model"]), str(odd)]) == 2
    assert "--format" in one_line_error(capsys, "predict", odd)
    assert main(["predict", str(files["model"]), str(odd), "--format", "extxyz"]) == 0


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x10
    return bytes(b)


def test_unreadable_model_files_give_one_line(files, tmp_path, capsys):
    good = files["model"].read_bytes()
    cases = {"missing.kmlip": None, "empty.kmlip": b"", "text.kmlip": b"not a model\n",
             "half.kmlip": good[:len(good) // 2], "tail.kmlip": good[-200:]}
    # bit flips in the ZIP central directory (the last few hundred bytes) and in the data
    rng = np.random.default_rng(0)
    for k, pos in enumerate(rng.integers(len(good) - 400, len(good), 12).tolist()
                            + rng.integers(0, len(good), 4).tolist()):
        cases[f"flip{k}.kmlip"] = _flip(good, pos)
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        for cmd in (["info", str(path)], ["predict", str(path), str(files["test"])]):
            rc = main(cmd)
            err = capsys.readouterr().err
            if rc == 0:  # a flip in padding or a field that does not matter: loads fine
                assert name.startswith("flip") and err == ""
                continue
            assert rc == 2, (name, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith(f"kmlip {cmd[0]}: error: {path}: "), lines[0]
    assert main(["predict", str(tmp_path / "missing.kmlip"), str(files["test"])]) == 2
    assert "model file does not exist" in one_line_error(capsys, "predict",
                                                         tmp_path / "missing.kmlip")
    # a structures file given as the model, and a directory
    assert main(["info", str(files["test"])]) == 2
    assert "not a kmlip model file" in one_line_error(capsys, "info", files["test"])
    assert main(["info", str(tmp_path)]) == 2
    assert "directory" in one_line_error(capsys, "info", tmp_path)


@pytest.mark.parametrize("exc", [NotImplementedError("zip feature"), RuntimeError("boom"),
                                 AttributeError("no attribute"), MemoryError()])
def test_any_model_loading_failure_is_one_line(exc, files, capsys, monkeypatch):
    # safety net: whatever the loader raises becomes one line naming the file
    def broken(path, *a, **k):
        raise exc
    monkeypatch.setattr(kmlip, "load", broken)
    assert main(["info", str(files["model"])]) == 2
    one_line_error(capsys, "info", files["model"])


def test_interrupt_while_loading_is_not_swallowed(files, capsys, monkeypatch):
    def interrupted(path, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(kmlip, "load", interrupted)
    assert main(["info", str(files["model"])]) == 130
    assert capsys.readouterr().err.strip() == "kmlip info: interrupted"


def test_bad_structure_for_the_model_names_file_and_frame(files, tmp_path, capsys):
    from ase.build import bulk

    alien = tmp_path / "alien.xyz"
    write(alien, [emt_frames(1)[0], bulk("Au", cubic=True)], format="extxyz")
    assert main(["predict", str(files["model"]), str(alien)]) == 2
    assert "structure 1" in one_line_error(capsys, "predict", alien)


def test_training_file_defects_name_the_file(tmp_path, capsys):
    from ase.build import bulk

    unlabelled = tmp_path / "unlabelled.xyz"
    write(unlabelled, [bulk("Cu", cubic=True)] * 2, format="extxyz")
    assert main(["fit", str(unlabelled), "-o", str(tmp_path / "m.kmlip")]) == 2
    assert "frame 0" in one_line_error(capsys, "fit", unlabelled)
    assert not (tmp_path / "m.kmlip").exists()
    dummy = tmp_path / "dummy.xyz"
    a = emt_frames(1)[0]
    a.symbols[0] = "X"
    write(dummy, a, format="extxyz")
    existing = tmp_path / "m.kmlip"
    existing.write_bytes(b"an earlier model")
    assert main(["fit", str(dummy), "-o", str(existing)]) == 2
    assert "'X'" in one_line_error(capsys, "fit", dummy)
    assert existing.read_bytes() == b"an earlier model"  # a failed fit keeps the old file


@pytest.mark.parametrize("option, value, name", [("--n-max", "1000000", "n_max"),
                                                 ("--l-max", "-1", "l_max"),
                                                 ("--r-cut", "nan", "r_cut"),
                                                 ("--threads", "0", "n_threads")])
def test_bad_parameters_give_one_line(option, value, name, files, tmp_path, capsys):
    out = tmp_path / "never.kmlip"
    assert main(["fit", str(files["train"]), "-o", str(out), option, value]) == 2
    assert name in one_line_error(capsys, "fit")
    assert not out.exists()


# -- outputs -------------------------------------------------------------------------------------

def test_failed_prediction_write_keeps_existing_file(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pred.xyz"
    out.write_text("keep me")
    # the run fails before writing (missing model) ...
    assert main(["predict", str(tmp_path / "missing.kmlip"), str(files["test"]),
                 "-o", str(out)]) == 2
    assert out.read_text() == "keep me"
    capsys.readouterr()

    # ... and while writing: half a file written, then the disk is full
    def failing_write(fh, images, format=None, **kw):
        fh.write("2\npartial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("ase.io.write", failing_write)
    assert main(["predict", str(files["model"]), str(files["test"]), "-o", str(out)]) == 2
    assert "No space left" in one_line_error(capsys, "predict")
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.xyz"]  # no temporary left


def test_unwritable_outputs_fail_before_any_work(files, tmp_path, capsys):
    nowhere = tmp_path / "no" / "such" / "dir" / "m.kmlip"
    assert main(["fit", str(files["train"]), "-o", str(nowhere)]) == 2
    assert "does not exist" in one_line_error(capsys, "fit", nowhere)
    assert capsys.readouterr().out == ""  # nothing was fitted
    assert main(["fit", str(files["train"]), "-o", str(tmp_path)]) == 2
    assert "directory" in one_line_error(capsys, "fit", tmp_path)
    assert main(["predict", str(files["model"]), str(files["test"]), "-o", str(tmp_path)]) == 2
    assert "directory" in one_line_error(capsys, "predict", tmp_path)


def test_warnings_are_one_line(files, capsys, monkeypatch):
    def warn_then_fail(path):
        warnings.warn("first line\nsecond line", RuntimeWarning, stacklevel=2)
        raise ValueError(f"{path}: broken")
    monkeypatch.setattr("kmlip.cli.info.load_model", warn_then_fail)
    assert main(["info", str(files["model"])]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["kmlip info: warning: first line",
                   f"kmlip info: error: {files['model']}: broken"]


# -- help ----------------------------------------------------------------------------------------

def test_help_documents_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, p in sub.choices.items():
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            for opt in action.option_strings:
                assert opt in text, (name, opt)
            if action.option_strings and not action.required and action.dest != "help":
                # every optional argument says what happens when it is not given
                assert "default" in action.help, (name, action.dest)
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)
    assert main(["fit"]) == 2  # usage error from argparse: a status, not an exception


def test_demo_quick(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "force MAE" in out and "epistemic std" in out


def test_installed_entry_point(files, tmp_path):
    exe = shutil.which("kmlip", path=os.path.dirname(sys.executable)) or shutil.which("kmlip")
    assert exe, "the kmlip console script is not installed"
    text = tmp_path / "notes.xyz"
    text.write_text("hello\n")
    r = subprocess.run([exe, "predict", str(files["model"]), str(text)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith(f"kmlip predict: error: {text}: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
