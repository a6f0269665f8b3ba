"""Ewald benchmark: kmlip's ``Ewald`` against pymatgen's ``EwaldSummation`` at equal accuracy.

Rattled rock-salt NaCl supercells (a = 5.64 Å, 5³ and 10³ conventional cells: 1,000 and 8,000
ions, Gaussian rattle of 0.05 Å with fixed seeds), charges ±1, energy and forces (kmlip: stress
as well; pymatgen has none).

Equal accuracy, measured rather than assumed:

1. **Reference**: kmlip at accuracy 1e-13, cross-checked against pymatgen at ``acc_factor`` 12
   (both must agree to ~1e-11; sizes up to ``--cross-check-max`` ions, as pymatgen's call is
   slow and large at 8,000).
2. **kmlip** at its default accuracy (1e-6, ``--accuracy``): its relative energy error and its
   largest force-component error against the reference.
3. **pymatgen**: ``acc_factor`` scanned upwards over a grid (3.0, 3.5, ... 12) and the
   *cheapest* value whose relative energy error and largest force error are both no larger
   than kmlip's is the one timed: equal accuracy, in pymatgen's favour on the grid.

pymatgen converts e²/Å with its own Coulomb constant (14.3996454687 eV·Å, 3.3e-8 above kmlip's
14.399645): its energies and forces are rescaled to kmlip's constant before comparing, else
that difference would be a floor of 3.3e-8 under its errors.

Timing: CPU seconds (``time.process_time``, all threads), each measurement in a child process of
its own; kmlip and pymatgen children alternate over ``--rounds`` rounds and the median is
reported. A kmlip child times ``--repeat`` calls after one warm-up and reports their median, a
pymatgen child one call at 8,000 ions (minutes each) and ``--repeat`` calls below. kmlip builds
a new ``Ewald`` per call, so nothing cached for the cell (what MD reuses) is counted; pymatgen's
``Structure`` (oxidation states ±1) is built before timing. Peak memory is that of the child
process (whole, and above the RSS before the first call).

How each code is called:

kmlip
    ``Ewald(charges={"Na": 1, "Cl": -1}, accuracy=ε, n_threads=threads).compute(atoms)``
pymatgen
    ``EwaldSummation(structure, acc_factor=a, compute_forces=True)`` then ``.total_energy`` and
    ``.forces``.

Run ``python benchmarks/ewald.py --quick`` (216 and 1,000 ions: about a minute); the full run
takes ~15 minutes, pymatgen's scan at 8,000 ions dominating.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    OUT_DIR,
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
    run_worker,
    save_json,
    time_calls,
    use_repo_kmlip,
    verdict,
    write_report,
)

SCRIPT = Path(__file__).resolve()
KMLIP_PATH = use_repo_kmlip()
CHARGES = {"Na": 1, "Cl": -1}
A_NACL = 5.64
SIZES = {216: 3, 1000: 5, 8000: 10}  # ions -> repeats of the 8-ion conventional cell
DEFAULT_SIZES = (1000, 8000)
QUICK_SIZES = (216, 1000)
REFERENCE_ACCURACY = 1e-13
CROSS_CHECK_ACC_FACTOR = 12.0
ACC_FACTOR_GRID = tuple(3.0 + 0.5 * i for i in range(19))  # 3.0, 3.5, ..., 12.0
TARGET_SPEEDUP = 30.0
TARGET_MIN_IONS = 1000
# pymatgen's call at 8,000 ions takes tens of seconds: time it once per round there
SLOW_PYMATGEN_IONS = 4000


def nacl_supercell(n_ions: int, seed: int | None = None):
    """Rattled rock-salt NaCl of ``n_ions`` ions (216, 1000 or 8000), fixed seed per size."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=A_NACL, cubic=True).repeat(SIZES[n_ions])
    atoms.rattle(0.05, seed=n_ions if seed is None else seed)
    return atoms


def sci(value: float | None) -> str:
    """An error figure in scientific notation ("-" when missing)."""
    return "-" if value is None else f"{value:.1e}"


def errors(energy: float, forces: np.ndarray, ref_energy: float,
           ref_forces: np.ndarray) -> tuple[float, float]:
    """Relative energy error and largest force-component error (eV/Å) against a reference."""
    return (abs(energy / ref_energy - 1.0),
            float(np.abs(np.asarray(forces) - ref_forces).max()))


# --------------------------------------------------------------------------------------------
# worker (child process)
# --------------------------------------------------------------------------------------------
def _kmlip_call(atoms, task: dict[str, Any]):
    from kmlip import Ewald

    def make():
        return Ewald(charges=CHARGES, accuracy=task["accuracy"], n_threads=task["threads"])

    make().compute(atoms[:8])  # loads the extension outside the timed region

    def run():
        # a new calculator per call: its cache of the cell's stencil and k vectors (what an MD
        # run at fixed cell reuses) does not count, as pymatgen sets everything up per call
        return make().compute(atoms)

    return run, make().parameters_for(atoms)


def _pymatgen_call(atoms, acc_factor: float):
    from pymatgen.core.ewald import EwaldSummation
    from pymatgen.io.ase import AseAtomsAdaptor

    from kmlip.ewald import K_E

    structure = AseAtomsAdaptor.get_structure(atoms)
    structure.add_oxidation_state_by_element(CHARGES)
    scale = K_E / EwaldSummation.CONV_FACT  # to kmlip's Coulomb constant (see the docstring)

    def run():
        ew = EwaldSummation(structure, acc_factor=acc_factor, compute_forces=True)
        return ew.total_energy * scale, ew.forces * scale, None

    return run


def _worker_time(atoms, task: dict[str, Any]) -> dict[str, Any]:
    """Times one code at one setting; saves its forces to task['forces']."""
    if task["code"] == "kmlip":
        run, params = _kmlip_call(atoms, task)
    else:
        run, params = _pymatgen_call(atoms, task["acc_factor"]), {"acc_factor": task["acc_factor"]}
    base = rss_mb()
    reset_peak_rss()
    timing, (energy, forces, stress) = time_calls(run, repeat=task["repeat"], warmup=task["warmup"])
    peak = peak_rss_mb()
    np.save(task["forces"], np.asarray(forces, dtype=np.float64))
    return {"timing": timing.to_dict(), "energy": float(energy),
            "stress": None if stress is None else np.asarray(stress).tolist(),
            "rss_before_mb": base, "peak_mb": peak, "params": params}


def _worker_scan(atoms, task: dict[str, Any]) -> dict[str, Any]:
    """pymatgen over the acc_factor grid until both errors are within the targets."""
    ref_forces = np.load(task["ref_forces"])
    rows = []
    for af in task["grid"]:
        run = _pymatgen_call(atoms, af)
        c0 = time.process_time()
        energy, forces, _ = run()
        cpu = time.process_time() - c0
        de, df = errors(energy, forces, task["ref_energy"], ref_forces)
        ok = de <= task["max_energy_error"] and df <= task["max_force_error"]
        rows.append({"acc_factor": af, "cpu_s": cpu, "rel_energy_error": de,
                     "max_force_error": df, "meets": ok})
        if ok:
            break
    return {"scan": rows}


def worker(task: dict[str, Any], report_path: str) -> int:
    """Child process: one measurement, reported as JSON."""
    try:
        atoms = nacl_supercell(task["n"])
        rep = _worker_scan(atoms, task) if task["kind"] == "scan" else _worker_time(atoms, task)
        write_report(report_path, {"ok": True, **rep})
        return 0
    except Exception:  # the parent prints the child's traceback
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def _fail(res) -> str:
    return (res.stderr_tail.strip().splitlines()[-1:] or [f"exit {res.returncode}"])[0]


def measure(code: str, n: int, tmp: str, threads: int, repeat: int, warmup: int,
            timeout: float, accuracy: float | None = None,
            acc_factor: float | None = None) -> dict[str, Any]:
    """Time one code in a child; returns its figures and forces (ok=False and the error if
    the child failed)."""
    tag = f"{code}_{n}_{accuracy if acc_factor is None else acc_factor}"
    forces_path = os.path.join(tmp, f"{tag}.npy")
    task = {"kind": "time", "code": code, "n": n, "accuracy": accuracy,
            "acc_factor": acc_factor, "threads": threads, "repeat": repeat, "warmup": warmup,
            "forces": forces_path}
    res = run_worker(SCRIPT, task, threads, timeout=timeout)
    row: dict[str, Any] = {"code": code, "n": n, "ok": res.ok}
    if not res.ok:
        row["error"] = _fail(res)
        return row
    rep = res.report
    row.update(wall_s=rep["timing"]["wall_median"], cpu_s=rep["timing"]["cpu_median"],
               peak_mb=rep["peak_mb"], added_mb=rep["peak_mb"] - rep["rss_before_mb"],
               energy=rep["energy"], stress=rep["stress"], params=rep["params"],
               forces=np.load(forces_path))
    return row


def _median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one code: medians of the times, the largest memory."""
    ok = [r for r in rows if r["ok"]]
    if not ok:
        return rows[0]
    out = dict(ok[-1])
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in ok)
    out["wall_s"] = statistics.median(r["wall_s"] for r in ok)
    out["cpu_rounds"] = [r["cpu_s"] for r in ok]
    out["peak_mb"] = max(r["peak_mb"] for r in ok)
    out["added_mb"] = max(r["added_mb"] for r in ok)
    return out


def run_size(n: int, args, tmp: str, have_pmg: bool) -> dict[str, Any]:
    """Reference, kmlip's accuracy, pymatgen's scan and the interleaved timing of one size."""
    quick = args.quick
    repeat = args.repeat if args.repeat is not None else (1 if quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    out: dict[str, Any] = {"n": n}
    print(f"\n## {n} ions")
    ref = measure("kmlip", n, tmp, args.threads, 1, 0, args.timeout,
                  accuracy=REFERENCE_ACCURACY)
    if not ref["ok"]:
        print(f"#   reference failed: {ref.get('error')}")
        return out
    out["reference"] = {"energy": ref["energy"], "accuracy": REFERENCE_ACCURACY}
    ref_path = os.path.join(tmp, f"ref_{n}.npy")
    np.save(ref_path, ref["forces"])
    print(f"# reference: kmlip at accuracy {REFERENCE_ACCURACY:g}, E = {ref['energy']:.8f} eV")
    if have_pmg and n <= args.cross_check_max:
        cc = measure("pymatgen", n, tmp, 1, 1, 0, args.timeout,
                     acc_factor=CROSS_CHECK_ACC_FACTOR)
        if cc["ok"]:
            de, df = errors(cc["energy"], cc["forces"], ref["energy"], ref["forces"])
            out["cross_check"] = {"acc_factor": CROSS_CHECK_ACC_FACTOR,
                                  "rel_energy_diff": de, "max_force_diff": df}
            agree = "agree" if de < 1e-9 and df < 1e-8 else "DISAGREE"
            print(f"# cross-check: pymatgen at acc_factor {CROSS_CHECK_ACC_FACTOR:g} differs "
                  f"from the reference by {de:.1e} (energy, relative) and {df:.1e} eV/Å "
                  f"(largest force component): {agree}")
        else:
            print(f"# cross-check with pymatgen failed: {cc.get('error')}")
    elif have_pmg:
        print(f"# cross-check with pymatgen skipped above {args.cross_check_max} ions "
              "(--cross-check-max)")

    # kmlip's accuracy at the requested setting (and a first timing)
    k0 = measure("kmlip", n, tmp, args.threads, repeat, 1, args.timeout, accuracy=args.accuracy)
    if not k0["ok"]:
        print(f"#   kmlip failed: {k0.get('error')}")
        return out
    k_de, k_df = errors(k0["energy"], k0["forces"], ref["energy"], ref["forces"])
    print(f"# kmlip at accuracy {args.accuracy:g}: |dE/E| = {k_de:.2e}, max|dF| = {k_df:.2e} eV/Å")

    chosen = None
    if have_pmg:
        task = {"kind": "scan", "n": n, "grid": list(ACC_FACTOR_GRID),
                "ref_energy": ref["energy"], "ref_forces": ref_path,
                "max_energy_error": k_de, "max_force_error": k_df}
        res = run_worker(SCRIPT, task, 1, timeout=args.timeout)
        if not res.ok:
            print(f"#   pymatgen scan failed: {_fail(res)}")
        else:
            scan = res.report["scan"]
            out["pymatgen_scan"] = scan
            print("# pymatgen acc_factor scan (one call each; stops at the first that meets "
                  "both of kmlip's errors):")
            print(format_table(
                [{**r, "de": sci(r["rel_energy_error"]), "df": sci(r["max_force_error"])}
                 for r in scan],
                [("acc_factor", "acc_factor"), ("cpu_s", "CPU s"), ("de", "|dE/E|"),
                 ("df", "max|dF| eV/Å"), ("meets", "meets")]))
            if scan and scan[-1]["meets"]:
                chosen = scan[-1]
            else:
                print(f"#   no acc_factor up to {ACC_FACTOR_GRID[-1]:g} reaches kmlip's accuracy")

    # interleaved timing rounds at the chosen settings
    k_rows, p_rows = [k0], []
    pm_repeat = 1 if n >= SLOW_PYMATGEN_IONS else max(1, min(repeat, 3))
    for rnd in range(rounds):
        if chosen is not None:
            p_rows.append(measure("pymatgen", n, tmp, 1, pm_repeat, 0, args.timeout,
                                  acc_factor=chosen["acc_factor"]))
        if rnd + 1 < rounds or chosen is not None:
            k_rows.append(measure("kmlip", n, tmp, args.threads, repeat, 1, args.timeout,
                                  accuracy=args.accuracy))
    k = _median_rows(k_rows)
    k.update(setting=f"accuracy {args.accuracy:g}", rel_energy_error=k_de, max_force_error=k_df)
    rows = [k]
    if p_rows:
        p = _median_rows(p_rows)
        if p["ok"]:
            p["rel_energy_error"], p["max_force_error"] = errors(
                p["energy"], p["forces"], ref["energy"], ref["forces"])
        p["setting"] = f"acc_factor {chosen['acc_factor']:g}"
        p["cpu_ratio"] = ratio(p.get("cpu_s"), k.get("cpu_s"))
        p["wall_ratio"] = ratio(p.get("wall_s"), k.get("wall_s"))
        p["mem_ratio"] = ratio(p.get("added_mb"), k.get("added_mb"))
        rows.append(p)
    print(f"# timing: median of {len(k_rows)} kmlip and {len(p_rows)} pymatgen children, "
          "alternating")
    for r in rows:
        r["de"], r["df"] = sci(r.get("rel_energy_error")), sci(r.get("max_force_error"))
    print(format_table(rows, [
        ("code", "code"), ("setting", "setting"), ("de", "|dE/E|"),
        ("df", "max|dF| eV/Å"), ("cpu_s", "CPU s"), ("wall_s", "wall s"),
        ("peak_mb", "peak MB"), ("added_mb", "+MB"), ("cpu_ratio", "CPU pmg/kmlip"),
        ("mem_ratio", "+MB pmg/kmlip")]))
    for r in rows:
        if not r["ok"]:
            print(f"#   {r['code']} failed: {r.get('error')}")
    par = k.get("params")
    if par:
        print(f"#   kmlip: alpha {par['alpha']:.4f} 1/Å, r_cut {par['r_cut']:.2f} Å, "
              f"k_cut {par['k_cut']:.3f} 1/Å; stress (eV/Å³) "
              + " ".join(f"{v:.3e}" for v in k["stress"]))
    for r in rows:
        for key in ("forces", "de", "df"):
            r.pop(key, None)
    out["rows"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{' and '.join(map(str, QUICK_SIZES))} ions, one round, one repeat")
    p.add_argument("--sizes", default=None, help="comma-separated ion counts, from "
                   f"{', '.join(map(str, SIZES))} (default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--accuracy", type=float, default=1e-6,
                   help="kmlip's requested relative accuracy (default 1e-6, its default)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per kmlip child (median; default 5, 1 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating kmlip/pymatgen timing rounds (default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="kmlip's threads (default 1)")
    p.add_argument("--cross-check-max", type=int, default=1000,
                   help="largest size at which the reference is cross-checked with pymatgen "
                   "at acc_factor 12 (default 1000)")
    p.add_argument("--no-pymatgen", action="store_true", help="time kmlip alone")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--json", default=None,
                   help="write all results there (default benchmarks/out/ewald.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return worker(json.loads(args._worker), args._report)

    sizes = (QUICK_SIZES if args.quick else DEFAULT_SIZES) if args.sizes is None else \
        tuple(int(s) for s in args.sizes.split(",") if s.strip())
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        p.error(f"unknown size(s) {bad}; choose from {list(SIZES)}")

    info = machine_info()
    print(f"# Ewald benchmark: rattled NaCl (a = {A_NACL} Å, rattle 0.05 Å), charges ±1; "
          "energy + forces (+ stress for kmlip) at equal measured accuracy")
    print(f"# machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs, "
          f"{info.get('mem_gb', '?')} GB; Python {info['python']}; kmlip threads "
          f"{args.threads}, pymatgen 1; one child process per measurement")
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (busy machine: wall times are unreliable; CPU times hold)"
             if load[0] > 0.5 else ""))
    have_kmlip = KMLIP_PATH is not None
    have_pmg = installed("pymatgen") and not args.no_pymatgen
    print(f"#   kmlip: {package_version('kmlip') or 'checkout'} ({KMLIP_PATH})" if have_kmlip
          else "#   kmlip: NOT IMPORTABLE")
    if args.no_pymatgen:
        print("#   pymatgen: skipped (--no-pymatgen)")
    else:
        print(f"#   pymatgen: {package_version('pymatgen')}" if have_pmg else
              "#   pymatgen: NOT INSTALLED - skipped, kmlip timed alone (pip install pymatgen)")
    if not have_kmlip:
        return 1
    sys.stdout.flush()

    results = []
    with tempfile.TemporaryDirectory(prefix="kmlip-ewald-") as tmp:
        for n in sizes:
            results.append(run_size(n, args, tmp, have_pmg))
            sys.stdout.flush()

    lines = []
    for res in results:
        rows = res.get("rows", [])
        for r in rows[1:]:
            k = rows[0]
            # the target is set for 1,000 ions and up; smaller cells are shown for information
            targeted = res["n"] >= TARGET_MIN_IONS
            lines.append((f"Ewald {res['n']:,} ions: CPU pymatgen ({r['setting']}) / kmlip "
                          f"({k['setting']}), equal accuracy",
                          f"{fmt(r.get('cpu_ratio'))}x",
                          f">= {TARGET_SPEEDUP:g}x" if targeted else "(info)",
                          verdict(r.get("cpu_ratio"), TARGET_SPEEDUP) if targeted else "-"))
    if lines:
        print("\n# targets (issue 9, item 8)")
        print_target_rows(lines)
    elif not have_pmg:
        print("\n# targets (issue 9, item 8): n/a, pymatgen not measured")
    out = Path(args.json) if args.json else OUT_DIR / "ewald.json"
    save_json(out, {"machine": info, "accuracy": args.accuracy, "threads": args.threads,
                    "reference_accuracy": REFERENCE_ACCURACY, "results": results})
    print(f"# results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
