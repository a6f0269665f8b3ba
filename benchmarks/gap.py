"""GAP benchmark: kmlip's sparse GP against ``gap_fit`` (quippy-ase) on the same EMT data.

Two settings (``--settings``):

``cu`` (issue 3): fcc Cu cells of 32 and 108 atoms from short Langevin MD runs under ASE's EMT,
each run at a temperature drawn from 300–1500 K and with a random ±3% strain, a few
decorrelated frames per run (100 fs apart, after 200 fs of equilibration; 4 fs steps); 200
training cells, and 50 test cells from independent runs (other seeds). SOAP cutoff 5 Å with a
0.5 Å smooth transition, n_max 8, l_max 6, atom width 0.5 Å; 1000 sparse points (CUR);
predictions on rattled 108- and 1008-atom cells.

``cuau`` (issue 9's smaller setting): random 50/50 Cu–Au fcc cells of 32 atoms (a = 3.85 Å,
rattled 0.1 Å, ±3% strain), EMT-labelled; 100 training and 20 test cells. SOAP n_max 6,
l_max 4 (same cutoff and width), 200 sparse points per species; predictions on a rattled
500-atom random Cu–Au cell.

Both codes use the same kernel (dot product, ζ = 4, δ = 0.2) and noise σ's (energy 0.002
eV/atom, force 0.02 eV/Å, virial 0.02 eV/atom), e0 from the average energy per atom. Reported
for each, and as ratios kmlip/GAP in one run: fit CPU and wall time and peak memory (each fit in
a child process of its own: ``wait4`` resource usage for ``gap_fit``, the child's own timers and
high-water mark for kmlip), test energy and force MAE/RMSE and stress RMSE, and the speed of
energy + forces + stress through each one's ASE calculator (``quippy.potential.Potential``,
``KMLIPCalculator``); for kmlip also with the local-energy variances (``energies_var``) on
every call, and NVE molecular dynamics (ASE ``VelocityVerlet``, 108-atom Cu, ``energies_var``
on every call). Every kmlip figure and GAP's predictions are measured with ``--threads``
threads (default 1) and with the libraries' default thread count (no thread variable set: one
thread per core), so the table shows what threads buy.

``gap_fit`` takes about half an hour at the full ``cu`` settings; ``--reuse-gap`` reuses the fit
and figures recorded by an earlier run with identical data and settings (printed as such).
``--quick`` (small data and n_sparse, short MD) runs in about a minute.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
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
    emt_alloy_dataset,
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
    threads_label,
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
ATOM_SIGMA = 0.5
ZETA = 4
DELTA = 0.2
SIGMA_ENERGY = 0.002  # eV/atom
SIGMA_FORCE = 0.02  # eV/Å
SIGMA_VIRIAL = 0.02  # eV/atom

TRAIN_SEED = 20240
TEST_SEED = 90731
MD_TIMESTEP_FS = 2.0
MD_TEMPERATURE_K = 600.0

# The settings: species, SOAP size, sparse points per species, data and prediction cells
# (full, quick).
SETTINGS: dict[str, dict[str, Any]] = {
    "cu": {"species": ("Cu",), "n_max": 8, "l_max": 6, "n_sparse": (1000, 100),
           "n_train": (200, 20), "n_test": (50, 10), "predict": ((108, 1008), (108,)),
           "what": "EMT fcc Cu MD, 32/108-atom cells"},
    "cuau": {"species": ("Cu", "Au"), "n_max": 6, "l_max": 4, "n_sparse": (200, 50),
             "n_train": (100, 20), "n_test": (20, 5), "predict": ((500,), (500,)),
             "what": "EMT random Cu-Au, 32-atom cells"},
}
PREDICT_CELLS = {108: (3, 3, 3), 500: (5, 5, 5), 1008: (6, 6, 7)}  # cubic fcc cell repeats

# The figures issue 3 quotes for GAP on this kind of data, and its targets for kmlip.
ISSUE_GAP = {"fit_cpu_s": 635.0, "fit_peak_mb": 3.1 * 1024, "force_mae": 10.2,
             "energy_mae": 0.27, "predict_atoms_per_cpu_s": 194.0}

GAP_REF_KEYS = {"energy": "REF_energy", "forces": "REF_forces", "virial": "REF_virial"}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def dataset_paths(setting: str, n_train: int, n_test: int) -> tuple[Path, Path]:
    """Cache files of the training and test frames."""
    tag = "emt_cu" if setting == "cu" else f"emt_{setting}"
    return (OUT_DIR / f"{tag}_train_n{n_train}_s{TRAIN_SEED}.xyz",
            OUT_DIR / f"{tag}_test_n{n_test}_s{TEST_SEED}.xyz")


def load_data(setting: str, n_train: int, n_test: int) -> tuple[list, list]:
    """Training and test frames (generated with EMT on first use, then read from the cache)."""
    train_path, test_path = dataset_paths(setting, n_train, n_test)
    if setting == "cu":
        def make_train():
            return emt_cu_dataset(n_train, TRAIN_SEED, 4)

        def make_test():
            return emt_cu_dataset(n_test, TEST_SEED, 2)
    else:
        symbols = SETTINGS[setting]["species"]

        def make_train():
            return emt_alloy_dataset(n_train, TRAIN_SEED, symbols)

        def make_test():
            return emt_alloy_dataset(n_test, TEST_SEED, symbols)
    return cached_frames(train_path, make_train), cached_frames(test_path, make_test)


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


def prediction_cell(setting: str, n_atoms: int, seed: int = 5):
    """Rattled fcc cell of ``n_atoms`` for the prediction speed (random 50/50 alloy for a
    two-species setting)."""
    from ase.build import bulk

    species = SETTINGS[setting]["species"]
    a = 3.61 if len(species) == 1 else 3.85
    atoms = bulk(species[0], "fcc", a=a, cubic=True).repeat(PREDICT_CELLS[n_atoms])
    if len(species) > 1:
        rng = np.random.default_rng(seed)
        atoms.symbols[rng.random(len(atoms)) < 0.5] = species[1]
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


def gap_fit_args(setting: str, train_xyz: Path, gp_file: Path, n_sparse: int,
                 seed: int = 1) -> list[str]:
    """gap_fit command-line arguments for the shared settings (``add_species=T``: one SOAP
    per centre species, each with ``n_sparse`` points)."""
    st = SETTINGS[setting]
    soap = (f"soap cutoff={R_CUT} cutoff_transition_width={TRANSITION_WIDTH} "
            f"n_max={st['n_max']} l_max={st['l_max']} atom_sigma={ATOM_SIGMA} zeta={ZETA} "
            f"delta={DELTA} n_sparse={n_sparse} sparse_method=cur_points "
            f"covariance_type=dot_product add_species=T")
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


def fit_gap(setting: str, train_frames: list, n_sparse: int, threads: int, reuse: bool,
            timeout: float) -> dict[str, Any]:
    """Run gap_fit in a child; returns its figures (or the recorded ones with ``reuse``)."""
    exe = gap_fit_executable()
    if exe is None:
        return {"status": "skipped", "reason": "gap_fit not found (quippy-ase not installed)"}
    tag = "" if setting == "cu" else f"{setting}_"
    work = OUT_DIR / f"gap_{tag}n{len(train_frames)}_m{n_sparse}"
    work.mkdir(parents=True, exist_ok=True)
    train_xyz = work / "train.xyz"
    write_gap_xyz(train_frames, train_xyz)
    gp_file = work / "gap.xml"
    args = gap_fit_args(setting, train_xyz.name, gp_file.name, n_sparse)
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
def kmlip_model(setting: str, n_sparse: int):
    """The kmlip estimator with the shared settings."""
    from kmlip import SOAP, KernelPotential

    st = SETTINGS[setting]
    return KernelPotential(
        descriptor=SOAP(species=list(st["species"]), r_cut=R_CUT, n_max=st["n_max"],
                        l_max=st["l_max"], sigma=ATOM_SIGMA),
        zeta=ZETA, delta=DELTA, n_sparse=n_sparse, sparse_method="cur",
        sigma_energy=SIGMA_ENERGY, sigma_force=SIGMA_FORCE, sigma_stress=SIGMA_VIRIAL,
        energy_key="energy", forces_key="forces", stress_key="stress", random_state=0,
    )


def worker_kmlip_fit(task: dict[str, Any]) -> dict[str, Any]:
    """Fit kmlip on the cached training frames and save the model; time and memory of ``fit``."""
    from ase.io import read

    frames = read(task["train"], index=":")
    model = kmlip_model(task["setting"], int(task["n_sparse"]))
    rss0 = rss_mb()
    reset_peak_rss()
    timing, _ = time_calls(lambda: model.fit(frames), repeat=1, warmup=0)
    peak = peak_rss_mb()
    model.save(task["model"])
    return {"status": "ok", "fit_cpu_s": timing.cpu[0], "fit_wall_s": timing.wall[0],
            "fit_peak_mb": peak, "fit_compute_mb": peak - rss0, "model": task["model"],
            "version": package_version("kmlip")}


def make_calculator(code: str, model_path: str, variances: bool = False):
    """ASE calculator of a fitted model; ``variances`` asks kmlip's for ``energies_var`` on
    every call."""
    if code == "gap":
        from quippy.potential import Potential

        return Potential(param_filename=model_path)
    from kmlip import KMLIPCalculator, load

    model = load(model_path)
    if variances and "variances" in inspect.signature(KMLIPCalculator).parameters:
        return KMLIPCalculator(model, variances=("energies",))
    # (a kmlip before issue 9 computes the variances on every call anyway)
    return KMLIPCalculator(model)


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


def prediction_speed(calc, setting: str, n_atoms: int, repeat: int,
                     properties: tuple[str, ...] = ("energy", "forces", "stress")
                     ) -> dict[str, float]:
    """``properties`` through ``calc.calculate``; atoms per wall/CPU second.

    Every call sees new positions (calculators, quippy's among them, return cached results for
    unchanged atoms): a rattled cell, displaced by a fresh random 0.01 Å each time.
    """
    from ase.calculators.calculator import all_changes

    atoms = prediction_cell(setting, n_atoms)
    base = atoms.positions.copy()
    rng = np.random.default_rng(n_atoms)
    moves = iter([base + rng.normal(scale=0.01, size=base.shape) for _ in range(repeat + 1)])

    def run():
        atoms.positions = next(moves)
        calc.calculate(atoms, properties=list(properties), system_changes=all_changes)
        return np.array(calc.results["forces"])

    timing, forces = time_calls(run, repeat=repeat, warmup=1)
    assert np.shape(forces) == (n_atoms, 3)
    return {"wall_s": timing.wall_median, "cpu_s": timing.cpu_median,
            "atoms_per_wall_s": n_atoms / timing.wall_median,
            "atoms_per_cpu_s": n_atoms / timing.cpu_median}


def md_speed(calc, n_steps: int) -> dict[str, float]:
    """NVE velocity-Verlet MD of 108-atom Cu (600 K start, 2 fs steps) with ``calc``:
    atom-steps per CPU- and wall-second, and the relative energy drift over the run."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = prediction_cell("cu", 108)
    MaxwellBoltzmannDistribution(atoms, temperature_K=MD_TEMPERATURE_K,
                                 rng=np.random.default_rng(7))
    Stationary(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=MD_TIMESTEP_FS * units.fs)
    dyn.run(2)  # warm-up (first calls, caches)
    e0 = atoms.get_total_energy()
    w0, c0 = time.perf_counter(), time.process_time()
    dyn.run(n_steps)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    drift = abs(atoms.get_total_energy() - e0) / len(atoms)
    return {"steps": n_steps, "cpu_s": cpu, "wall_s": wall,
            "atom_steps_per_cpu_s": len(atoms) * n_steps / cpu,
            "atom_steps_per_wall_s": len(atoms) * n_steps / wall,
            "energy_drift_ev_per_atom": float(drift)}


def worker_eval(task: dict[str, Any]) -> dict[str, Any]:
    """Test-set errors, prediction speed (with and without variances) and MD speed of a
    fitted model (GAP or kmlip)."""
    from ase.io import read

    code, setting = task["code"], task["setting"]
    calc = make_calculator(code, task["model"])
    out: dict[str, Any] = {"status": "ok"}
    if task.get("errors"):
        out.update(test_errors(calc, read(task["test"], index=":")))
    var_calc = make_calculator(code, task["model"], variances=True) \
        if code == "kmlip" and task.get("variance") else None
    for n in task["predict_sizes"]:
        # interleaved: with and without variances alternate, so that a change in the
        # machine's speed during the run affects both alike
        rows: dict[str, list] = {"plain": [], "var": []}
        for _ in range(int(task.get("rounds", 1))):
            rows["plain"].append(prediction_speed(calc, setting, int(n), int(task["repeat"])))
            if var_calc is not None:
                rows["var"].append(prediction_speed(
                    var_calc, setting, int(n), int(task["repeat"]),
                    properties=("energy", "forces", "stress", "energies_var")))
        for name, key in (("plain", f"predict_{n}"), ("var", f"predict_{n}_var")):
            if rows[name]:
                best = sorted(rows[name], key=lambda r: r["cpu_s"])[len(rows[name]) // 2]
                out[key] = best
    if task.get("md_steps") and code == "kmlip":
        out["md"] = md_speed(make_calculator(code, task["model"], variances=True),
                             int(task["md_steps"]))
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


def child(task: dict[str, Any], threads: int | None, timeout: float) -> dict[str, Any]:
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
        for suffix in ("", "_var"):
            p = rec.get(f"predict_{n}{suffix}") or {}
            out[f"pred{n}{suffix}_cpu"] = p.get("atoms_per_cpu_s")
            out[f"pred{n}{suffix}_wall"] = p.get("atoms_per_wall_s")
            out[f"pred{n}{suffix}_cpu_s"] = p.get("cpu_s")
            out[f"pred{n}{suffix}_wall_s"] = p.get("wall_s")
    return out


def print_comparison(gap: dict[str, Any], km: dict[str, Any], sizes: list[int],
                     threads: str) -> None:
    """Side-by-side table of GAP and kmlip with ratios."""
    g, k = flat(gap, sizes), flat(km, sizes)
    metrics = list(METRICS)
    for n in sizes:
        metrics.append((f"pred{n}_cpu", f"E+F+S atoms/CPU-s, {n} atoms", True))
        metrics.append((f"pred{n}_wall", f"E+F+S atoms/wall-s, {n} atoms", True))
    rows = []
    for key, label, higher in metrics:
        gv, kv = g.get(key), k.get(key)
        r = ratio(kv, gv)
        rows.append({"what": label, "gap": gv, "kmlip": kv, "ratio": r,
                     "better": ("kmlip" if (r > 1) == higher else "GAP")
                     if not math.isnan(r) and r != 1 else "-"})
    print(f"GAP vs kmlip, {threads}:")
    print(format_table(rows, [("what", "figure"), ("gap", "GAP"), ("kmlip", "kmlip"),
                              ("ratio", "kmlip/GAP"), ("better", "better")]))


def print_threads(km1: dict[str, Any], kmd: dict[str, Any], gap1: dict[str, Any],
                  gapd: dict[str, Any], sizes: list[int], t1: str) -> None:
    """CPU and wall time of kmlip (and GAP's predictions) with ``t1`` and default threads."""
    a, b = flat(km1, sizes), flat(kmd, sizes)
    ga, gb = flat(gap1, sizes), flat(gapd, sizes)
    rows = [{"what": "kmlip fit", "cpu1": a.get("fit_cpu_s"), "wall1": a.get("fit_wall_s"),
             "cpud": b.get("fit_cpu_s"), "walld": b.get("fit_wall_s"),
             "speedup": ratio(a.get("fit_wall_s"), b.get("fit_wall_s"))}]
    for n in sizes:
        for suffix, label in (("", "E+F+S"), ("_var", "E+F+S+energies_var")):
            if a.get(f"pred{n}{suffix}_cpu_s") is None:
                continue
            rows.append({"what": f"kmlip {label}, {n} atoms (s/call)",
                         "cpu1": a.get(f"pred{n}{suffix}_cpu_s"),
                         "wall1": a.get(f"pred{n}{suffix}_wall_s"),
                         "cpud": b.get(f"pred{n}{suffix}_cpu_s"),
                         "walld": b.get(f"pred{n}{suffix}_wall_s"),
                         "speedup": ratio(a.get(f"pred{n}{suffix}_wall_s"),
                                          b.get(f"pred{n}{suffix}_wall_s"))})
        if ga.get(f"pred{n}_cpu_s") is not None:
            rows.append({"what": f"GAP E+F+S, {n} atoms (s/call)",
                         "cpu1": ga.get(f"pred{n}_cpu_s"), "wall1": ga.get(f"pred{n}_wall_s"),
                         "cpud": gb.get(f"pred{n}_cpu_s"), "walld": gb.get(f"pred{n}_wall_s"),
                         "speedup": ratio(ga.get(f"pred{n}_wall_s"), gb.get(f"pred{n}_wall_s"))})
    md1, mdd = km1.get("md") or {}, kmd.get("md") or {}

    def per_step(md, key):
        return md[key] / md["steps"] if md else None

    if md1 or mdd:
        rows.append({"what": "kmlip MD 108 Cu + energies_var (s/step)",
                     "cpu1": per_step(md1, "cpu_s"), "wall1": per_step(md1, "wall_s"),
                     "cpud": per_step(mdd, "cpu_s"), "walld": per_step(mdd, "wall_s"),
                     "speedup": ratio(per_step(md1, "wall_s"), per_step(mdd, "wall_s"))})
    print(f"\nThreads: {t1} vs default ({os.cpu_count()} cores); speed-up = wall({t1}) / "
          "wall(default):")
    print(format_table(rows, [("what", "figure"), ("cpu1", f"CPU s, {t1}"),
                              ("wall1", f"wall s, {t1}"), ("cpud", "CPU s, default"),
                              ("walld", "wall s, default"), ("speedup", "speed-up")]))


def target_lines(setting: str, gap: dict, km: dict, gapd: dict, kmd: dict, sizes: list[int],
                 quick: bool) -> list[tuple[str, Any, str, str]]:
    """(what, measured, wanted, verdict) rows of issues 3 and 9 for one setting."""
    g, k, gd, kd = (flat(r, sizes) for r in (gap, km, gapd, kmd))
    lines = []
    if setting == "cu":
        lines += [
            ("test energy MAE kmlip/GAP", ratio(k.get("energy_mae"), g.get("energy_mae")),
             "<= 1", verdict(ratio(k.get("energy_mae"), g.get("energy_mae")), 1.0, False)),
            ("test force MAE kmlip/GAP", ratio(k.get("force_mae"), g.get("force_mae")), "<= 1",
             verdict(ratio(k.get("force_mae"), g.get("force_mae")), 1.0, False)),
            ("fit CPU time GAP/kmlip", ratio(g.get("fit_cpu_s"), k.get("fit_cpu_s")), ">= 20x",
             verdict(ratio(g.get("fit_cpu_s"), k.get("fit_cpu_s")), 20.0)),
            ("fit peak memory kmlip (MB)", k.get("fit_peak_mb"), "<= 2,048",
             verdict(k.get("fit_peak_mb"), 2048.0, False)),
        ]
    want = 15.0 if setting == "cu" else 8.0
    for n in sizes:
        r = ratio(kd.get(f"pred{n}_cpu"), gd.get(f"pred{n}_cpu"))
        lines.append((f"E+F+S atoms/CPU-s kmlip/GAP, {n} atoms, default threads", r,
                      f">= {want:g}x", verdict(r, want)))
        r1 = ratio(k.get(f"pred{n}_cpu"), g.get(f"pred{n}_cpu"))
        lines.append(("  the same with 1 thread each", r1, f"(>= {want:g}x)",
                      verdict(r1, want)))
    fit_su = ratio(km.get("fit_wall_s"), kmd.get("fit_wall_s"))
    lines.append(("fit wall speed-up, default threads vs 1", fit_su, ">= 1.6x",
                  verdict(fit_su, 1.6)))
    for n in sizes:
        for suffix in ("", "_var"):
            su = ratio(k.get(f"pred{n}{suffix}_wall_s"), kd.get(f"pred{n}{suffix}_wall_s"))
            if math.isnan(su):
                continue
            label = "E+F+S" + (" + energies_var" if suffix else "")
            want_su = 1.6 if n >= 1000 else 1.0
            lines.append((f"{label} wall speed-up default vs 1 thread, {n} atoms", su,
                          f">= {want_su:g}x", verdict(su, want_su)))
    for n in sizes:
        for name, rec in (("1 thread", k), ("default", kd)):
            ov = ratio(rec.get(f"pred{n}_var_cpu_s"), rec.get(f"pred{n}_cpu_s"))
            if not math.isnan(ov):
                lines.append((f"energies_var overhead, {n} atoms, {name} (CPU)", ov, "<= 1.25x",
                              verdict(ov, 1.25, False)))
    for name, rec in (("1 thread", km), ("default", kmd)):
        md = rec.get("md") or {}
        if md:
            lines.append((f"MD 108 Cu, energies_var, atom-steps/CPU-s ({name})",
                          md["atom_steps_per_cpu_s"], ">= 2,500",
                          verdict(md["atom_steps_per_cpu_s"], 2500.0)))
    return lines


def run_setting(setting: str, args, codes: list[str]) -> dict[str, Any]:
    """Fits, evaluations and report of one setting; returns the results."""
    st = SETTINGS[setting]
    q = 1 if args.quick else 0
    n_train = args.n_train or st["n_train"][q]
    n_test = args.n_test or st["n_test"][q]
    n_sparse = args.n_sparse or st["n_sparse"][q]
    sizes = [int(x) for x in args.predict_sizes.split(",")] if args.predict_sizes \
        else list(st["predict"][q])
    bad = [x for x in sizes if x not in PREDICT_CELLS]
    if bad:
        raise SystemExit(f"--predict-sizes: choose from {sorted(PREDICT_CELLS)}")
    t1 = args.threads
    modes: list[int | None] = [t1] + ([] if args.no_default_threads else [None])
    md_steps = args.md_steps if args.md_steps is not None else (10 if args.quick else 60)
    print(f"\n# setting {setting}: {st['what']}; species {'-'.join(st['species'])}; SOAP "
          f"cutoff {R_CUT} Å (transition {TRANSITION_WIDTH} Å), n_max {st['n_max']}, l_max "
          f"{st['l_max']}, atom_sigma {ATOM_SIGMA} Å; zeta {ZETA}, delta {DELTA}, n_sparse "
          f"{n_sparse} per species (CUR); sigma E/F/V {SIGMA_ENERGY}/{SIGMA_FORCE}/"
          f"{SIGMA_VIRIAL}", flush=True)
    t0 = time.perf_counter()
    train, test = load_data(setting, n_train, n_test)
    train_path, test_path = dataset_paths(setting, n_train, n_test)
    print(f"# data: {len(train)} training cells ({sum(len(a) for a in train)} atoms), "
          f"{len(test)} test cells ({sum(len(a) for a in test)} atoms); "
          f"{time.perf_counter() - t0:.1f} s (cached in {OUT_DIR})", flush=True)

    skipped = {"status": "skipped", "reason": "not requested"}
    gap = {m: dict(skipped) for m in modes}
    km = {m: dict(skipped) for m in modes}
    eval_task = {"kind": "eval", "setting": setting, "test": str(test_path),
                 "predict_sizes": sizes, "repeat": args.repeat, "rounds": args.rounds}
    if "gap" in codes:
        if not installed("quippy"):
            gap = {m: {"status": "skipped", "reason": "quippy-ase not installed"} for m in modes}
        else:
            print("fitting GAP (gap_fit) ...", flush=True)
            rec = fit_gap(setting, train, n_sparse, t1, args.reuse_gap, args.timeout)
            if rec.get("status") == "ok":
                print(f"  gap_fit: {fmt(rec['fit_cpu_s'])} CPU-s, {fmt(rec['fit_wall_s'])} s "
                      f"wall, {fmt(rec['fit_peak_mb'])} MB peak"
                      + (" (reused)" if rec.get("reused") else ""), flush=True)
                t = rec.get("targets", {})
                print(f"  labels gap_fit read: {t.get('energies', '?')} energies, "
                      f"{t.get('forces', '?')} force components, {t.get('virials', '?')} virial "
                      "components", flush=True)
                if rec.get("warning"):
                    print(f"  WARNING: {rec['warning']}", flush=True)
                for m in modes:
                    ev = child({**eval_task, "code": "gap", "model": rec["model"],
                                "errors": m == t1}, m, args.timeout)
                    gap[m] = {**(rec if m == t1 else {}), **ev, "status": ev.get("status"),
                              "reason": ev.get("reason", "")}
            else:
                print(f"  gap_fit: {rec.get('status')}: {rec.get('reason', '')}"[:800])
                gap = {m: rec for m in modes}
    if "kmlip" in codes:
        if KMLIP_PATH is None:
            km = {m: {"status": "skipped", "reason": "kmlip not importable"} for m in modes}
        else:
            tag = "" if setting == "cu" else f"{setting}_"
            for m in modes:
                print(f"fitting kmlip ({threads_label(m)}) ...", flush=True)
                mname = "default" if m is None else f"t{m}"
                model_path = OUT_DIR / f"kmlip_{tag}n{n_train}_m{n_sparse}_{mname}.kmlip"
                rec = child({"kind": "kmlip_fit", "setting": setting, "train": str(train_path),
                             "model": str(model_path), "n_sparse": n_sparse}, m, args.timeout)
                if rec.get("status") != "ok":
                    print(f"  kmlip fit: {rec.get('status')}: {rec.get('reason', '')}"[:800])
                    km[m] = rec
                    continue
                print(f"  kmlip fit: {fmt(rec['fit_cpu_s'])} CPU-s, {fmt(rec['fit_wall_s'])} s "
                      f"wall, {fmt(rec['fit_peak_mb'])} MB peak", flush=True)
                km[m] = rec
            first = km[t1]
            if first.get("status") == "ok":
                for m in modes:
                    if km[m].get("status") != "ok":
                        continue
                    # every thread setting evaluates the same model (the first fit's)
                    ev = child({**eval_task, "code": "kmlip", "model": first["model"],
                                "errors": m == t1, "variance": True,
                                "md_steps": md_steps if setting == "cu" else 0},
                               m, args.timeout)
                    km[m] = {**km[m], **ev, "status": ev.get("status"),
                             "reason": ev.get("reason", "")}
    print()
    print_comparison(gap[t1], km[t1], sizes, threads_label(t1))
    if None in modes:
        print()
        print_comparison(gap[None], km[None], sizes, threads_label(None))
        print_threads(km[t1], km[None], gap[t1], gap[None], sizes, threads_label(t1))
    for name, rec in (("GAP", gap[t1]), ("kmlip", km[t1])):
        if rec.get("status") != "ok":
            print(f"{name}: {rec.get('status')}: {rec.get('reason', '')}"[:1200])
    if gap[t1].get("reused"):
        print(f"(GAP fit figures reused from the run of {gap[t1].get('measured_at')}; "
              "--reuse-gap)")
    md = (km[None] if None in modes else km[t1]).get("md")
    if md:
        print(f"MD: {md['steps']} NVE steps of 108-atom Cu, energy drift "
              f"{md['energy_drift_ev_per_atom']:.1e} eV/atom")
    print(f"\n## Targets ({setting}; issues 3 and 9)")
    if setting == "cu":
        print("issue 3's GAP figures (n_sparse 1000, full data): gap_fit 635 CPU-s, 3.1 GB; "
              "test force MAE 10.2 meV/Å, energy MAE 0.27 meV/atom; prediction 194 atoms/CPU-s")
    if args.quick:
        print("(--quick: small data and n_sparse; the targets refer to the full settings)")
    dflt = None if None in modes else t1
    print_target_rows(target_lines(setting, gap[t1], km[t1], gap[dflt], km[dflt], sizes,
                                   args.quick))
    return {"n_train": n_train, "n_test": n_test, "n_sparse": n_sparse, "sizes": sizes,
            "gap": {str(m): r for m, r in gap.items()},
            "kmlip": {str(m): r for m, r in km.items()}}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small data and n_sparse, 108- and 500-atom predictions, short MD")
    p.add_argument("--settings", default="cu,cuau", help="comma-separated: cu, cuau")
    p.add_argument("--n-train", type=int, default=None, help="training cells (per setting)")
    p.add_argument("--n-test", type=int, default=None, help="test cells (per setting)")
    p.add_argument("--n-sparse", type=int, default=None, help="sparse points per species")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of both codes (default 1); the default thread count is "
                        "measured as well unless --no-default-threads")
    p.add_argument("--no-default-threads", action="store_true",
                   help="skip the runs with the libraries' default thread count")
    p.add_argument("--codes", default="kmlip,gap", help="comma-separated: kmlip, gap")
    p.add_argument("--predict-sizes", default=None,
                   help=f"cells for the prediction speed (from {sorted(PREDICT_CELLS)})")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed prediction calls (median; default 5, 3 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of the with/without-variance timings (median; "
                        "default 3, 1 with --quick)")
    p.add_argument("--md-steps", type=int, default=None, help="MD steps (default 60; 10 quick)")
    p.add_argument("--reuse-gap", action="store_true",
                   help="reuse a recorded gap_fit run with identical data and settings")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per child")
    p.add_argument("--json", default=None, help="results file (default benchmarks/out/gap.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return worker(json.loads(args._worker), args._report)

    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    unknown = [x for x in settings if x not in SETTINGS]
    if unknown:
        p.error(f"--settings: choose from {sorted(SETTINGS)}")
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    info = machine_info()
    print(f"# GAP benchmark; machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs, "
          f"{info.get('mem_gb', '?')} GB; threads {args.threads}"
          + ("" if args.no_default_threads else " and default")
          + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {s: run_setting(s, args, codes) for s in settings}
    out = Path(args.json) if args.json else OUT_DIR / ("gap_quick.json" if args.quick else
                                                        "gap.json")
    save_json(out, {"machine": info, "args": vars(args), "settings": results})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
