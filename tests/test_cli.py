"""The kmlip command line: demo, fit, predict, info and one-line errors."""
import numpy as np
from ase.io import read, write

from kmlip.cli.main import main
from kmlip.datasets import emt_frames


def test_fit_predict_info_round_trip(tmp_path, capsys):
    train = tmp_path / "train.xyz"
    write(train, emt_frames(6, repeat=(2, 2, 2), seed=3), format="extxyz")
    model = tmp_path / "cu.kmlip"
    rc = main(["fit", str(train), "-o", str(model), "--r-cut", "4.0", "--n-max", "4",
               "--l-max", "3", "--n-sparse", "30", "--sigma-stress", "0.02"])
    assert rc == 0 and model.exists()
    test = tmp_path / "test.xyz"
    frames = emt_frames(2, seed=4)
    write(test, frames, format="extxyz")
    out = tmp_path / "pred.xyz"
    assert main(["predict", str(model), str(test), "-o", str(out)]) == 0
    pred = read(out, index=":")
    assert len(pred) == 2
    ref = np.array([a.get_potential_energy() for a in frames])
    got = np.array([a.get_potential_energy() for a in pred])
    assert np.all(np.abs(got - ref) / 32 < 0.01)  # eV/atom
    assert np.all(np.isfinite([a.info["energy_std"] for a in pred]))
    assert main(["info", str(model)]) == 0
    assert "SOAP" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.kmlip"), str(tmp_path / "x.xyz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmlip predict: error:") and "\n" not in err
    bad = tmp_path / "bad.kmlip"
    bad.write_bytes(b"not a model")
    xyz = tmp_path / "x.xyz"
    write(xyz, emt_frames(1), format="extxyz")
    assert main(["predict", str(bad), str(xyz)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmlip predict: error:") and "\n" not in err


def test_failed_prediction_write_keeps_existing_file(tmp_path):
    # an existing output file is not destroyed when the run fails before writing
    out = tmp_path / "pred.xyz"
    out.write_text("keep me")
    assert main(["predict", str(tmp_path / "missing.kmlip"), str(tmp_path / "x.xyz"),
                 "-o", str(out)]) == 2
    assert out.read_text() == "keep me"


def test_demo_quick(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "force MAE" in out and "epistemic std" in out
