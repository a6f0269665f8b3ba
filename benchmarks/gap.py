"""GAP benchmark: kmlip's sparse GP against ``gap_fit`` (quippy-ase) on the same EMT Cu data.

Data (fixed seeds, generated on first use and cached as extxyz in ``benchmarks/out/``):
fcc Cu cells of 32 and 108 atoms from short Langevin MD runs under ASE's EMT, each run at a
temperature drawn from 300–1500 K and with a random ±3% strain, a few decorrelated frames per
run (100 fs apart, after 200 fs of equilibration; 4 fs steps); 200 training cells, and 50 test
cells from independent runs (other seeds).

Both fits use the same SOAP (cutoff 5 Å with a 0.5 Å smooth transition, n_max 8, l_max 6, atom
width 0.5 Å), the same kernel (dot product, ζ = 4, δ = 0.2), the same number of sparse points
(1000, CUR) and the same noise σ's (energy 0.002 eV/atom, force 0.02 eV/Å, virial 0.02 eV/atom),
e0 from the average energy per atom. Reported for each, and as ratios kmlip/GAP in one run:
fit CPU and wall time and peak memory (each fit in a child process of its own: ``wait4``
resource usage for ``gap_fit``, the child's own timers and high-water mark for kmlip), test
energy and force MAE/RMSE and stress RMSE, and the speed of energy + forces through each
one's ASE calculator (``quippy.potential.Potential``, ``KMLIPCalculator``) on 108- and
1008-atom cells.

``gap_fit`` takes about ten minutes at the full settings; ``--reuse-gap`` reuses the fit and
figures recorded by an earlier run with identical data and settings (printed as such).
``--quick`` (20 training / 10 test cells, n_sparse 100) runs in well under a minute.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    OUT_DIR,
    cached_frames,
    emt_cu_dataset,
    fmt,
    format_table,
    installed,
    machine_info,
    package_version,
    peak_rss_mb,
    print_target_rows,
    ratio,
    reset_peak_rss,
    rss_mb,
    run_child,
    run_worker,
    save_json,
    thread_env,
    time_calls,
    use_repo_kmlip,
    verdict,
    write_report,
)

SCRIPT = Path(__file__).resolve()
KMLIP_PATH = use_repo_kmlip()

# Shared model settings.
R_CUT = 5.0
TRANSITION_WIDTH = 0.5
N_MAX = 8
L_MAX = 6
ATOM_SIGMA = 0.5
ZETA = 4
DELTA = 0.2
SIGMA_ENERGY = 0.002  # eV/atom
SIGMA_FORCE = 0.02  # eV/Å
SIGMA_VIRIAL = 0.02  # eV/atom

TRAIN_SEED = 20240
TEST_SEED = 90731
PREDICT_CELLS = {108: (3, 3, 3), 1008: (6, 6, 7)}  # cubic 4-atom fcc cell repeats

# The figures issue 3 quotes for GAP on this kind of data, and its targets for kmlip.
ISSUE_GAP = {"fit_cpu_s": 635.0, "fit_peak_mb": 3.1 * 1024, "force_mae": 10.2,
             "energy_mae": 0.27, "predict_atoms_per_cpu_s": 194.0}

GAP_REF_KEYS = {"energy": "REF_energy", "forces": "REF_forces", "virial": "REF_virial"}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def dataset_paths(n_train: int, n_test: int) -> tuple[Path, Path]:
    """Cache files of the training and test frames."""
    return (OUT_DIR / f"emt_cu_train_n{n_train}_s{TRAIN_SEED}.xyz",
            OUT_DIR / f"emt_cu_test_n{n_test}_s{TEST_SEED}.xyz")


def load_data(n_train: int, n_test: int) -> tuple[list, list]:
    """Training and test frames (generated with EMT on first use, then read from the cache)."""
    train_path, test_path = dataset_paths(n_train, n_test)
    train = cached_frames(train_path, lambda: emt_cu_dataset(n_train, TRAIN_SEED, 4))
    test = cached_frames(test_path, lambda: emt_cu_dataset(n_test, TEST_SEED, 2))
    return train, test


def write_gap_xyz(frames: list, path: Path) -> None:
    """Training file for gap_fit: ``REF_energy``, ``REF_forces``, ``REF_virial`` (= −stress·V)."""
    from ase import Atoms
    from ase.io import write

    out = []
    for a in frames:
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        stress = a.get_stress(voigt=False)
        b.info[GAP_REF_KEYS["energy"]] = float(a.get_potential_energy())
        # a flat 9-vector: ASE writes a 3x3 info array as "_JSON [[...]]", which gap_fit ignores
        b.info[GAP_REF_KEYS["virial"]] = (-stress * a.get_volume()).ravel()
        b.arrays[GAP_REF_KEYS["forces"]] = np.array(a.get_forces())
        out.append(b)
    tmp = path.with_suffix(".tmp.xyz")
    write(str(tmp), out, format="extxyz")
    os.replace(tmp, path)


def prediction_cell(n_atoms: int, seed: int = 5):
    """Rattled fcc Cu cell of ``n_atoms`` (108 or 1008) for the prediction speed."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(PREDICT_CELLS[n_atoms])
    atoms.rattle(stdev=0.08, seed=seed + n_atoms)
    return atoms


def file_digest(path: Path) -> str:
    """SHA-256 of a file (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# GAP
# --------------------------------------------------------------------------------------------
def gap_fit_executable() -> str | None:
    """The ``gap_fit`` binary of quippy-ase (the package ships it next to quippy's modules)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("quippy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        exe = Path(spec.origin).parent / "gap_fit"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("gap_fit")


def gap_fit_args(train_xyz: Path, gp_file: Path, n_sparse: int, seed: int = 1) -> list[str]:
    """gap_fit command-line arguments for the shared settings."""
    soap = (f"soap cutoff={R_CUT} cutoff_transition_width={TRANSITION_WIDTH} n_max={N_MAX} "
            f"l_max={L_MAX} atom_sigma={ATOM_SIGMA} zeta={ZETA} delta={DELTA} "
            f"n_sparse={n_sparse} sparse_method=cur_points covariance_type=dot_product "
            f"add_species=T")
    return [
        f"at_file={train_xyz}",
        f"gap={{{soap}}}",
        f"default_sigma={{{SIGMA_ENERGY} {SIGMA_FORCE} {SIGMA_VIRIAL} 0.0}}",
        f"energy_parameter_name={GAP_REF_KEYS['energy']}",
        f"force_parameter_name={GAP_REF_KEYS['forces']}",
        f"virial_parameter_name={GAP_REF_KEYS['virial']}",
        "e0_method=average",
        "sparse_jitter=1.0e-8",
        f"rnd_seed={seed}",
        "do_copy_at_file=F",
        "sparse_separate_file=T",
        f"gp_file={gp_file}",
    ]


def gap_targets(log: Path) -> dict[str, int]:
    """Label counts gap_fit reports having read ("Number of target forces ... found: N")."""
    import re

    counts: dict[str, int] = {}
    if log.exists():
        text = log.read_bytes().decode(errors="replace")
        for kind, n in re.findall(r"Number of target (\w+) \(property name: \S+\) found: (\d+)",
                                  text):
            counts[kind] = int(n)
    return counts


def fit_gap(train_frames: list, n_sparse: int, threads: int, reuse: bool,
            timeout: float) -> dict[str, Any]:
    """Run gap_fit in a child; returns its figures (or the recorded ones with ``reuse``)."""
    exe = gap_fit_executable()
    if exe is None:
        return {"status": "skipped", "reason": "gap_fit not found (quippy-ase not installed)"}
    work = OUT_DIR / f"gap_n{len(train_frames)}_m{n_sparse}"
    work.mkdir(parents=True, exist_ok=True)
    train_xyz = work / "train.xyz"
    write_gap_xyz(train_frames, train_xyz)
    gp_file = work / "gap.xml"
    args = gap_fit_args(train_xyz.name, gp_file.name, n_sparse)
    key = hashlib.sha256(json.dumps([file_digest(train_xyz), args, threads,
                                     package_version("quippy-ase")]).encode()).hexdigest()[:16]
    record = work / f"fit_{key}.json"
    if reuse and record.exists() and gp_file.exists():
        rec = json.loads(record.read_text())
        rec["reused"] = True
        rec.setdefault("targets", gap_targets(Path(rec["log"])))
        return rec
    log = work / "gap_fit.log"
    res = run_child([exe, *args], env=thread_env(threads), timeout=timeout, cwd=work,
                    stdout_path=log)
    if res.returncode != 0 or not gp_file.exists():
        return {"status": "error", "reason": f"gap_fit exit {res.returncode}: "
                                             f"{res.stderr_tail[-800:]}", "log": str(log)}
    rec = {"status": "ok", "fit_cpu_s": res.cpu_s, "fit_wall_s": res.wall_s,
           "fit_peak_mb": res.max_rss_mb, "model": str(gp_file), "log": str(log),
           "command": " ".join([exe, *args]), "threads": threads,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "reused": False,
           "version": package_version("quippy-ase"), "targets": gap_targets(log)}
    n_virials = 6 * len(train_frames)
    if rec["targets"].get("virials", 0) < n_virials:
        rec["warning"] = (f"gap_fit read {rec['targets'].get('virials', 0)} virial components, "
                          f"expected {n_virials}")
    save_json(record, rec)
    return rec


# --------------------------------------------------------------------------------------------
# workers (child processes)
# --------------------------------------------------------------------------------------------
def kmlip_model(n_sparse: int):
    """The kmlip estimator with the shared settings."""
    from kmlip import SOAP, KernelPotential

    return KernelPotential(
        descriptor=SOAP(species=["Cu"], r_cut=R_CUT, n_max=N_MAX, l_max=L_MAX, sigma=ATOM_SIGMA),
        zeta=ZETA, delta=DELTA, n_sparse=n_sparse, sparse_method="cur",
        sigma_energy=SIGMA_ENERGY, sigma_force=SIGMA_FORCE, sigma_stress=SIGMA_VIRIAL,
        energy_key="energy", forces_key="forces", stress_key="stress", random_state=0,
    )


def worker_kmlip_fit(task: dict[str, Any]) -> dict[str, Any]:
    """Fit kmlip on the cached training frames and save the model; time and memory of ``fit``."""
    from ase.io import read

    frames = read(task["train"], index=":")
    model = kmlip_model(int(task["n_sparse"]))
    rss0 = rss_mb()
    reset_peak_rss()
    timing, _ = time_calls(lambda: model.fit(frames), repeat=1, warmup=0)
    peak = peak_rss_mb()
    model.save(task["model"])
    return {"status": "ok", "fit_cpu_s": timing.cpu[0], "fit_wall_s": timing.wall[0],
            "fit_peak_mb": peak, "fit_compute_mb": peak - rss0, "model": task["model"],
            "version": package_version("kmlip")}


def make_calculator(code: str, model_path: str):
    """ASE calculator of a fitted model."""
    if code == "gap":
        from quippy.potential import Potential

        return Potential(param_filename=model_path)
    from kmlip import KMLIPCalculator, load

    return KMLIPCalculator(load(model_path))


def test_errors(calc, frames: list) -> dict[str, float]:
    """Energy (meV/atom), force (meV/Å) and stress (meV/Å³, GPa) errors of ``calc``."""
    from ase.calculators.calculator import all_changes
    from ase.units import GPa

    de, df, ds = [], [], []
    for a in frames:
        ref_e = a.get_potential_energy()
        ref_f = a.get_forces()
        ref_s = a.get_stress(voigt=True)
        b = a.copy()
        b.calc = None
        calc.calculate(b, properties=["energy", "forces", "stress"], system_changes=all_changes)
        r = calc.results
        de.append((r["energy"] - ref_e) / len(a))
        df.append((np.asarray(r["forces"]) - ref_f).ravel())
        ds.append(np.asarray(r["stress"]).ravel()[:6] - ref_s)
    de = np.asarray(de) * 1e3
    df = np.concatenate(df) * 1e3
    ds = np.concatenate(ds)
    return {
        "energy_mae": float(np.mean(np.abs(de))),
        "energy_rmse": float(np.sqrt(np.mean(de**2))),
        "force_mae": float(np.mean(np.abs(df))),
        "force_rmse": float(np.sqrt(np.mean(df**2))),
        "stress_rmse": float(np.sqrt(np.mean(ds**2)) * 1e3),
        "stress_rmse_gpa": float(np.sqrt(np.mean(ds**2)) / GPa),
        "n_test": len(frames),
    }


def prediction_speed(calc, n_atoms: int, repeat: int) -> dict[str, float]:
    """Energy + forces through ``calc.calculate``; atoms per wall/CPU second.

    Every call sees new positions (calculators, quippy's among them, return cached results for
    unchanged atoms): a rattled cell, displaced by a fresh random 0.01 Å each time.
    """
    from ase.calculators.calculator import all_changes

    atoms = prediction_cell(n_atoms)
    base = atoms.positions.copy()
    rng = np.random.default_rng(n_atoms)
    moves = iter([base + rng.normal(scale=0.01, size=base.shape) for _ in range(repeat + 1)])

    def run():
        atoms.positions = next(moves)
        calc.calculate(atoms, properties=["energy", "forces"], system_changes=all_changes)
        return np.array(calc.results["forces"])

    timing, forces = time_calls(run, repeat=repeat, warmup=1)
    assert np.shape(forces) == (n_atoms, 3)
    return {"wall_s": timing.wall_median, "cpu_s": timing.cpu_median,
            "atoms_per_wall_s": n_atoms / timing.wall_median,
            "atoms_per_cpu_s": n_atoms / timing.cpu_median}


def worker_eval(task: dict[str, Any]) -> dict[str, Any]:
    """Test-set errors and prediction speed of a fitted model (GAP or kmlip)."""
    from ase.io import read

    calc = make_calculator(task["code"], task["model"])
    test = read(task["test"], index=":")
    out: dict[str, Any] = {"status": "ok", **test_errors(calc, test)}
    for n in task["predict_sizes"]:
        out[f"predict_{n}"] = prediction_speed(calc, int(n), int(task["repeat"]))
    out["eval_peak_mb"] = peak_rss_mb()
    return out


def worker(task: dict[str, Any], report_path: str) -> int:
    """Child-process entry: run one task, write its JSON report."""
    try:
        rep = (worker_kmlip_fit if task["kind"] == "kmlip_fit" else worker_eval)(task)
    except Exception as exc:
        rep = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()}
    write_report(report_path, rep)
    return 0


def child(task: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Run a worker task in a child process; its report plus the child's resource usage."""
    res = run_worker(SCRIPT, task, threads, timeout=timeout)
    if not res.ok:
        why = "timeout" if res.returncode == -9 else f"exit {res.returncode}"
        return {"status": "error", "reason": f"child failed ({why}): {res.stderr_tail[-800:]}"}
    rep = dict(res.report)
    rep["child_cpu_s"], rep["child_max_rss_mb"] = res.cpu_s, res.max_rss_mb
    return rep


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
METRICS = [
    ("fit_cpu_s", "fit CPU s", False),
    ("fit_wall_s", "fit wall s", False),
    ("fit_peak_mb", "fit peak MB", False),
    ("energy_mae", "energy MAE meV/atom", False),
    ("energy_rmse", "energy RMSE meV/atom", False),
    ("force_mae", "force MAE meV/Å", False),
    ("force_rmse", "force RMSE meV/Å", False),
    ("stress_rmse", "stress RMSE meV/Å³", False),
    ("stress_rmse_gpa", "stress RMSE GPa", False),
]


def flat(rec: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """Flatten the nested prediction figures of a result."""
    out = dict(rec)
    for n in sizes:
        p = rec.get(f"predict_{n}") or {}
        out[f"pred{n}_cpu"] = p.get("atoms_per_cpu_s")
        out[f"pred{n}_wall"] = p.get("atoms_per_wall_s")
    return out


def print_report(gap: dict[str, Any], km: dict[str, Any], sizes: list[int],
                 n_sparse: int, quick: bool) -> None:
    """Side-by-side table, ratios and the targets of issue 3."""
    g, k = flat(gap, sizes), flat(km, sizes)
    metrics = list(METRICS)
    for n in sizes:
        metrics.append((f"pred{n}_cpu", f"E+F atoms/CPU-s, {n} atoms", True))
        metrics.append((f"pred{n}_wall", f"E+F atoms/wall-s, {n} atoms", True))
    rows = []
    for key, label, higher in metrics:
        gv, kv = g.get(key), k.get(key)
        rows.append({"what": label, "gap": gv, "kmlip": kv, "ratio": ratio(kv, gv),
                     "better": ("kmlip" if (ratio(kv, gv) > 1) == higher else "GAP")
                     if not math.isnan(ratio(kv, gv)) and ratio(kv, gv) != 1 else "-"})
    print(format_table(rows, [("what", "figure"), ("gap", "GAP"), ("kmlip", "kmlip"),
                              ("ratio", "kmlip/GAP"), ("better", "better")]))
    for name, rec in (("GAP", gap), ("kmlip", km)):
        if rec.get("status") != "ok":
            print(f"{name}: {rec.get('status')}: {rec.get('reason', '')}"[:1200])
    if gap.get("reused"):
        print(f"(GAP fit figures reused from the run of {gap.get('measured_at')}; --reuse-gap)")

    print("\n## Targets (issue 3)")
    print("issue 3's GAP figures (n_sparse 1000, full data): gap_fit 635 CPU-s, 3.1 GB; test force "
          "MAE 10.2 meV/Å, energy MAE 0.27 meV/atom; prediction 194 atoms/CPU-s")
    if quick:
        print("(--quick: small data and n_sparse; the targets refer to the full settings)")
    big = max(sizes) if sizes else None

    def rt(a, b):
        return ratio(k.get(a), g.get(b if b else a))

    lines = [
        ("test energy MAE kmlip/GAP", rt("energy_mae", None), "<= 1",
         verdict(rt("energy_mae", None), 1.0, False)),
        ("test force MAE kmlip/GAP", rt("force_mae", None), "<= 1",
         verdict(rt("force_mae", None), 1.0, False)),
        ("fit CPU time GAP/kmlip", ratio(g.get("fit_cpu_s"), k.get("fit_cpu_s")), ">= 20x",
         verdict(ratio(g.get("fit_cpu_s"), k.get("fit_cpu_s")), 20.0)),
        ("fit peak memory kmlip (MB)", k.get("fit_peak_mb"), "<= 2,048",
         verdict(k.get("fit_peak_mb"), 2048.0, False)),
    ]
    for n in sizes:
        lines.append((f"prediction E+F atoms/CPU-s kmlip/GAP, {n} atoms",
                      rt(f"pred{n}_cpu", None), ">= 10x", verdict(rt(f"pred{n}_cpu", None), 10.0)))
    if big is not None:
        v = k.get(f"pred{big}_cpu")
        lines.append((f"kmlip prediction E+F atoms/CPU-s, {big} atoms", v, ">= 2,000",
                      verdict(v, 2000.0)))
    print_target_rows(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="20 training / 10 test cells, n_sparse 100, prediction on 108 atoms")
    p.add_argument("--n-train", type=int, default=None, help="training cells (default 200)")
    p.add_argument("--n-test", type=int, default=None, help="test cells (default 50)")
    p.add_argument("--n-sparse", type=int, default=None, help="sparse points (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="threads of both codes (default 1)")
    p.add_argument("--codes", default="kmlip,gap", help="comma-separated: kmlip, gap")
    p.add_argument("--predict-sizes", default=None, help="cells for the prediction speed "
                   "(default 108,1008; 108 with --quick)")
    p.add_argument("--repeat", type=int, default=3, help="timed prediction calls (median)")
    p.add_argument("--reuse-gap", action="store_true",
                   help="reuse a recorded gap_fit run with identical data and settings")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per child")
    p.add_argument("--json", default=None, help="results file (default benchmarks/out/gap.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return worker(json.loads(args._worker), args._report)

    n_train = args.n_train or (20 if args.quick else 200)
    n_test = args.n_test or (10 if args.quick else 50)
    n_sparse = args.n_sparse or (100 if args.quick else 1000)
    sizes = [int(s) for s in (args.predict_sizes or ("108" if args.quick else "108,1008"))
             .split(",")]
    bad = [s for s in sizes if s not in PREDICT_CELLS]
    if bad:
        p.error(f"--predict-sizes: choose from {sorted(PREDICT_CELLS)}")
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]

    info = machine_info()
    print(f"# GAP benchmark: EMT fcc Cu, {n_train} training / {n_test} test cells (32 and 108 "
          f"atoms); SOAP cutoff {R_CUT} Å (transition {TRANSITION_WIDTH} Å), n_max {N_MAX}, "
          f"l_max {L_MAX}, atom_sigma {ATOM_SIGMA} Å; zeta {ZETA}, delta {DELTA}, n_sparse "
          f"{n_sparse} (CUR); sigma E/F/V {SIGMA_ENERGY}/{SIGMA_FORCE}/{SIGMA_VIRIAL}")
    print(f"# machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs, "
          f"{info.get('mem_gb', '?')} GB; threads {args.threads}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0 = time.perf_counter()
    train, test = load_data(n_train, n_test)
    train_path, test_path = dataset_paths(n_train, n_test)
    n_atoms = sum(len(a) for a in train)
    print(f"# data: {len(train)} training cells ({n_atoms} atoms), {len(test)} test cells "
          f"({sum(len(a) for a in test)} atoms); {time.perf_counter() - t0:.1f} s "
          f"(cached in {OUT_DIR})", flush=True)

    gap: dict[str, Any] = {"status": "skipped", "reason": "not requested"}
    km: dict[str, Any] = {"status": "skipped", "reason": "not requested"}
    if "gap" in codes:
        if not installed("quippy"):
            gap = {"status": "skipped", "reason": "quippy-ase not installed"}
        else:
            print("fitting GAP (gap_fit) ...", flush=True)
            gap = fit_gap(train, n_sparse, args.threads, args.reuse_gap, args.timeout)
            if gap.get("status") == "ok":
                print(f"  gap_fit: {fmt(gap['fit_cpu_s'])} CPU-s, {fmt(gap['fit_wall_s'])} s "
                      f"wall, {fmt(gap['fit_peak_mb'])} MB peak"
                      + (" (reused)" if gap.get("reused") else ""), flush=True)
                t = gap.get("targets", {})
                print(f"  labels gap_fit read: {t.get('energies', '?')} energies, "
                      f"{t.get('forces', '?')} force components, {t.get('virials', '?')} virial "
                      "components", flush=True)
                if gap.get("warning"):
                    print(f"  WARNING: {gap['warning']}", flush=True)
                ev = child({"kind": "eval", "code": "gap", "model": gap["model"],
                            "test": str(test_path), "predict_sizes": sizes,
                            "repeat": args.repeat}, args.threads, args.timeout)
                gap = {**gap, **ev, "status": ev.get("status"),
                       "reason": ev.get("reason", "")}
            else:
                print(f"  gap_fit: {gap.get('status')}: {gap.get('reason', '')}"[:800])
    if "kmlip" in codes:
        if KMLIP_PATH is None:
            km = {"status": "skipped", "reason": "kmlip not importable"}
        else:
            print("fitting kmlip ...", flush=True)
            model_path = OUT_DIR / f"kmlip_n{n_train}_m{n_sparse}.kmlip"
            km = child({"kind": "kmlip_fit", "train": str(train_path), "model": str(model_path),
                        "n_sparse": n_sparse}, args.threads, args.timeout)
            if km.get("status") == "ok":
                print(f"  kmlip fit: {fmt(km['fit_cpu_s'])} CPU-s, {fmt(km['fit_wall_s'])} s "
                      f"wall, {fmt(km['fit_peak_mb'])} MB peak", flush=True)
                ev = child({"kind": "eval", "code": "kmlip", "model": str(model_path),
                            "test": str(test_path), "predict_sizes": sizes,
                            "repeat": args.repeat}, args.threads, args.timeout)
                km = {**km, **ev, "status": ev.get("status"), "reason": ev.get("reason", "")}
            else:
                print(f"  kmlip fit: {km.get('status')}: {km.get('reason', '')}"[:800])
    print()
    print_report(gap, km, sizes, n_sparse, args.quick)
    out = Path(args.json) if args.json else OUT_DIR / ("gap_quick.json" if args.quick else
                                                        "gap.json")
    save_json(out, {"machine": info, "args": vars(args), "n_train": n_train, "n_test": n_test,
                    "n_sparse": n_sparse, "gap": gap, "kmlip": km})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
