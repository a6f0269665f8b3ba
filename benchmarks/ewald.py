"""Ewald benchmark: kmlip's ``Ewald`` against pymatgen's ``EwaldSummation``.

Rattled rock-salt NaCl supercells (a = 5.64 Å, 5³ and 10³ conventional cells: 1,000 and 8,000
ions, Gaussian rattle of 0.05 Å with fixed seeds), charges ±1, energy and forces at the same
requested accuracy (kmlip: stress as well; pymatgen has none). Each measurement runs in a child
process of its own: wall and CPU time of the timed call(s) (kmlip: median of ``--repeat`` after
one untimed warm-up; pymatgen: one call, it takes minutes at 8,000 ions), peak resident memory of
that child (whole process, and above the RSS before the first call), and the errors of energy and
forces against a tight reference (kmlip at accuracy 1e-13). The ratio pymatgen/kmlip of CPU
seconds is the target of issue 4 (≥ 30× at equal accuracy, with stress, memory O(N)).

How each code is called:

kmlip
    ``Ewald(charges={"Na": 1, "Cl": -1}, accuracy=ε, n_threads=threads).compute(atoms)``:
    energy, forces and stress, a new ``Ewald`` per call (no set-up reused between calls).
pymatgen
    ``EwaldSummation(structure, acc_factor=-log10(ε), compute_forces=True)`` then
    ``.total_energy`` and ``.forces``, the ``Structure`` (with oxidation states ±1) built before
    timing. pymatgen's ``acc_factor`` is a number of significant figures: its cutoffs are
    √(acc_factor ln 10)/√η and 2√η √(acc_factor ln 10), the same √(-ln ε) rule as kmlip's (which
    adds a safety factor 5 to ε); the measured errors are printed to show the accuracies match.

Run ``python benchmarks/ewald.py --quick`` (216 and 1,000 ions: seconds); the full run takes a
few minutes, pymatgen's 8,000-ion call dominating.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
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
TARGET_SPEEDUP = 30.0


def nacl_supercell(n_ions: int, seed: int | None = None):
    """Rattled rock-salt NaCl of ``n_ions`` ions (216, 1000 or 8000), fixed seed per size."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=A_NACL, cubic=True).repeat(SIZES[n_ions])
    atoms.rattle(0.05, seed=n_ions if seed is None else seed)
    return atoms


# --------------------------------------------------------------------------------------------
# worker (child process)
# --------------------------------------------------------------------------------------------
def _setup_kmlip(atoms, task: dict[str, Any]):
    from kmlip import Ewald

    def make():
        return Ewald(charges=CHARGES, accuracy=task["accuracy"], n_threads=task["threads"])

    make().compute(atoms[:8])  # loads the extension outside the timed region

    def run():
        # a new calculator per call: its cache of the cell's stencil and k vectors (what an MD
        # run at fixed cell reuses) does not count, as pymatgen sets everything up per call
        return make().compute(atoms)

    return run, make().parameters_for(atoms)


def _setup_pymatgen(atoms, task: dict[str, Any]):
    from pymatgen.core.ewald import EwaldSummation
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    structure.add_oxidation_state_by_element(CHARGES)
    acc_factor = -math.log10(task["accuracy"])

    def run():
        ew = EwaldSummation(structure, acc_factor=acc_factor, compute_forces=True)
        return ew.total_energy, ew.forces, None

    return run, {"acc_factor": acc_factor}


def worker(task: dict[str, Any], report_path: str) -> int:
    """Child process: one measurement, reported as JSON (forces saved to task['forces'])."""
    try:
        atoms = nacl_supercell(task["n"])
        setup = {"kmlip": _setup_kmlip, "pymatgen": _setup_pymatgen}[task["code"]]
        run, params = setup(atoms, task)
        base = rss_mb()
        reset_peak_rss()
        timing, (energy, forces, stress) = time_calls(
            run, repeat=task["repeat"], warmup=task["warmup"])
        peak = peak_rss_mb()
        np.save(task["forces"], np.asarray(forces, dtype=np.float64))
        write_report(report_path, {
            "ok": True, "timing": timing.to_dict(), "energy": float(energy),
            "stress": None if stress is None else np.asarray(stress).tolist(),
            "rss_before_mb": base, "peak_mb": peak, "params": params,
        })
        return 0
    except Exception:  # the parent prints the child's traceback
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def measure(code: str, n: int, accuracy: float, threads: int, repeat: int, warmup: int,
            tmp: str, timeout: float) -> dict[str, Any]:
    """Run one measurement in a child; returns its figures (ok=False and the error if failed)."""
    forces_path = os.path.join(tmp, f"{code}_{n}_{accuracy:g}.npy")
    task = {"code": code, "n": n, "accuracy": accuracy, "threads": threads, "repeat": repeat,
            "warmup": warmup, "forces": forces_path}
    res = run_worker(SCRIPT, task, threads, timeout=timeout)
    row: dict[str, Any] = {"code": code, "n": n, "accuracy": accuracy, "threads": threads,
                           "ok": res.ok}
    if not res.ok:
        row["error"] = res.stderr_tail.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return row
    rep = res.report
    row.update(wall_s=rep["timing"]["wall_median"], cpu_s=rep["timing"]["cpu_median"],
               peak_mb=rep["peak_mb"], added_mb=rep["peak_mb"] - rep["rss_before_mb"],
               energy=rep["energy"], stress=rep["stress"], params=rep["params"],
               forces=np.load(forces_path))
    return row


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{' and '.join(map(str, QUICK_SIZES))} ions, one repeat: seconds")
    p.add_argument("--sizes", default=None, help="comma-separated ion counts, from "
                   f"{', '.join(map(str, SIZES))} (default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--accuracy", type=float, default=1e-6,
                   help="requested relative accuracy of both codes (default 1e-6)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed kmlip calls (median; default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="threads of both codes (default 1)")
    p.add_argument("--no-pymatgen", action="store_true", help="time kmlip alone")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
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
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    acc = args.accuracy

    info = machine_info()
    print(f"# Ewald benchmark: rattled NaCl (a = {A_NACL} Å, rattle 0.05 Å), charges ±1, "
          f"requested accuracy {acc:g}; energy + forces (+ stress for kmlip)")
    print(f"# machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs, "
          f"{info.get('mem_gb', '?')} GB; Python {info['python']}; threads {args.threads}; "
          f"kmlip: median of {repeat} call(s) after 1 warm-up; pymatgen: 1 call; "
          "one child process per measurement")
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
              "#   pymatgen: NOT INSTALLED - skipped (pip install pymatgen)")
    if not have_kmlip:
        return 1
    sys.stdout.flush()

    results = []
    summary = []
    with tempfile.TemporaryDirectory(prefix="kmlip-ewald-") as tmp:
        for n in sizes:
            ref = measure("kmlip", n, REFERENCE_ACCURACY, args.threads, 1, 0, tmp, args.timeout)
            rows = [measure("kmlip", n, acc, args.threads, repeat, 1, tmp, args.timeout)]
            if have_pmg:
                rows.append(measure("pymatgen", n, acc, 1, 1, 0, tmp, args.timeout))
            for r in rows:
                if r["ok"] and ref["ok"]:
                    r["rel_energy_error"] = abs(r["energy"] / ref["energy"] - 1.0)
                    r["max_force_error"] = float(np.abs(r["forces"] - ref["forces"]).max())
            k = rows[0]
            for r in rows[1:]:
                r["cpu_ratio"] = ratio(r.get("cpu_s"), k.get("cpu_s"))
                r["wall_ratio"] = ratio(r.get("wall_s"), k.get("wall_s"))
                r["mem_ratio"] = ratio(r.get("added_mb"), k.get("added_mb"))
            print(f"\n## {n} ions (reference: kmlip at accuracy {REFERENCE_ACCURACY:g}, "
                  f"E = {ref.get('energy', math.nan):.6f} eV, "
                  f"{fmt(ref.get('cpu_s'))} CPU-s)")
            print(format_table(rows, [
                ("code", "code"), ("wall_s", "wall s"), ("cpu_s", "CPU s"),
                ("peak_mb", "peak MB"), ("added_mb", "+MB"),
                ("rel_energy_error", "|dE/E|"), ("max_force_error", "max|dF| eV/Å"),
                ("cpu_ratio", "CPU pmg/kmlip"), ("wall_ratio", "wall pmg/kmlip"),
                ("mem_ratio", "+MB pmg/kmlip")]))
            for r in rows:
                if not r["ok"]:
                    print(f"#   {r['code']} failed: {r.get('error')}")
            if k["ok"]:
                par = k["params"]
                print(f"#   kmlip: alpha {par['alpha']:.4f} 1/Å, r_cut {par['r_cut']:.2f} Å, "
                      f"k_cut {par['k_cut']:.3f} 1/Å; stress (eV/Å³) "
                      + " ".join(f"{v:.3e}" for v in k["stress"]))
            for r in rows[1:]:
                summary.append((n, r.get("cpu_ratio")))
            for r in rows + [ref]:
                r.pop("forces", None)
            results.append({"n": n, "reference": ref, "rows": rows})

    if summary:
        print(f"\n# target (issue 4): >= {TARGET_SPEEDUP:g}x pymatgen CPU time at equal accuracy")
        for n, sp in summary:
            print(f"#   {n} ions: {fmt(sp)}x  {verdict(sp, TARGET_SPEEDUP)}")
    out = Path(args.json) if args.json else OUT_DIR / "ewald.json"
    save_json(out, {"machine": info, "accuracy": acc, "threads": args.threads,
                    "results": results})
    print(f"# results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
