"""ACSF benchmark: kmlip against DScribe, features alone and with position gradients.

The systems are those of ``benchmarks/soap.py`` (imported from it): rattled diamond Si (64 and
216 atoms), a 1000-atom rattled fcc Cu50Al50 alloy and 100 rattled ethanol molecules (10 with
``--quick``). Every code uses the same symmetry functions (r_cut 5 Å, Behler's cosine cutoff):

- G2 (eta, R_s): eta 0.5 1/Å², R_s in 0, 1, 1.5, 2, 2.5, 3, 3.5, 4 Å
- G3 (kappa): 1, 2 1/Å
- G4 (eta, zeta, lambda): (0.005, 1, ±1), (0.05, 4, ±1)
- G5 (eta, zeta, lambda): (0.005, 1, 1), (0.05, 4, -1)

so ``S (1 + 8 + 2) + S (S + 1) / 2 * 6`` features for S species (17 for Si, 69 for ethanol).
kmlip's ``convention="dscribe"`` gives DScribe's numbers, so both codes compute the same thing
(checked on each run: the first structure's features are compared, and the largest
difference is printed).

How each code is called:

kmlip
    ``ACSF(species, **params, n_threads=threads).transform(atoms, gradients=...)``, one call per
    structure; with gradients the output is the per-pair layout (which also gives the stress).
DScribe
    ``dscribe.descriptors.ACSF(species, periodic=any(pbc), **params)``: ``create(systems,
    n_jobs=1)`` for features; ``derivatives(systems, method="numerical", attach=True,
    n_jobs=1)`` with gradients (DScribe has no analytic ACSF derivatives: it takes central
    differences, and its output is dense, (centres, atoms, 3, F)). For structures with more
    atoms than ``--dscribe-grad-centres`` (default 16), DScribe's gradients are timed for that
    many centres only (``centers=range(n)``) and reported per centre, noted in the table: its
    cost per centre grows with the number of atoms (8.4 CPU-s per centre on the 1000-atom
    alloy, so the full structure would take 2.3 hours). These calls take seconds to minutes, so
    DScribe's gradients get one timed call and no warm-up (the ratios are in the hundreds to
    thousands). Periodic structures are wrapped into the cell first (DScribe's values assume
    it).

Figures: CPU time (``time.process_time`` in a child process per measurement, median of
``--repeat`` calls after one warm-up), atoms (centres) per CPU-second, and the ratio kmlip/DScribe
from the same run. ``python benchmarks/acsf.py --quick`` runs in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
    systems_codes_modes,
    time_calls,
    use_repo_kmlip,
    verdict,
    write_report,
)
from soap import DEFAULT_SYSTEMS, QUICK_SYSTEMS, SYSTEMS, species_of

SCRIPT = Path(__file__).resolve()
KMLIP_PATH = use_repo_kmlip()

PARAMS: dict[str, Any] = {
    "r_cut": 5.0,
    "g2_params": [(0.5, rs) for rs in (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)],
    "g3_params": [1.0, 2.0],
    "g4_params": [(0.005, 1.0, 1.0), (0.005, 1.0, -1.0), (0.05, 4.0, 1.0), (0.05, 4.0, -1.0)],
    "g5_params": [(0.005, 1.0, 1.0), (0.05, 4.0, -1.0)],
}
CODES = ("kmlip", "dscribe")
TARGET_GRAD_X = 10.0  # issue 11: kmlip ACSF with gradients >= 10x DScribe's, single thread


def _frames(system: str) -> list:
    frames = SYSTEMS[system][1]()
    for a in frames:
        if a.pbc.any():
            a.wrap()
    return frames


def _setup_kmlip(frames, gradients, threads, opts):
    from kmlip import ACSF

    acsf = ACSF(species=species_of(frames), **PARAMS, n_threads=threads)

    def run():
        return [acsf.transform(a, gradients=gradients) for a in frames]

    def info(out):
        X0 = out[0][0] if gradients else out[0]
        return {"n_features": int(X0.shape[1]), "n_centres": sum(len(a) for a in frames),
                "first_features": X0}

    return run, info


def _setup_dscribe(frames, gradients, threads, opts):
    from dscribe.descriptors import ACSF as DACSF

    periodic = any(bool(a.pbc.any()) for a in frames)
    desc = DACSF(species=species_of(frames), periodic=periodic, **PARAMS)
    n_feat = int(desc.get_number_of_features())
    systems = frames if len(frames) > 1 else frames[0]
    n_atoms = sum(len(a) for a in frames)
    if not gradients:
        def run():
            return desc.create(systems, n_jobs=1)

        def info(out):
            first = out[0] if len(frames) > 1 else out
            return {"n_features": n_feat, "n_centres": n_atoms, "first_features": first}
        return run, info

    limit = int(opts.get("dscribe_grad_centres", 16))
    if len(frames) == 1 and len(frames[0]) > limit:
        centres = list(range(limit))

        def run():
            return desc.derivatives(frames[0], centers=centres, method="numerical",
                                    attach=True, n_jobs=1)
        return run, lambda out: {"n_features": n_feat, "n_centres": limit,
                                 "method": f"numerical, {limit} of {n_atoms} centres"}

    def run():
        return desc.derivatives(systems, method="numerical", attach=True, n_jobs=1)
    return run, lambda out: {"n_features": n_feat, "n_centres": n_atoms, "method": "numerical"}


SETUPS = {"kmlip": _setup_kmlip, "dscribe": _setup_dscribe}


def worker(task: dict[str, Any], report_path: str) -> int:
    """Runs one measurement in this (child) process and writes its JSON report."""
    report: dict[str, Any] = {"task": task}
    try:
        frames = _frames(task["system"])
        run, info = SETUPS[task["code"]](frames, task["mode"] == "grad", int(task["threads"]),
                                         task.get("opts", {}))
        rss0 = rss_mb()
        reset_peak_rss()
        slow = task["code"] == "dscribe" and task["mode"] == "grad"  # numerical: minutes
        timing, out = time_calls(run, repeat=1 if slow else int(task["repeat"]),
                                 warmup=0 if slow else 1)
        report.update(status="ok", timing=timing.to_dict(), peak_mb=peak_rss_mb(),
                      rss_before_mb=rss0, version=package_version(task["code"]), **info(out))
        if "first_features" in report:
            report["first_features"] = np.asarray(report["first_features"]).tolist()
    except Exception as exc:  # reported in the table; the other measurements go on
        report.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
    write_report(report_path, report)
    return 0


def measure(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs ``task`` in a child process; one table row."""
    res = run_worker(SCRIPT, task, int(task["threads"]), timeout=timeout)
    row: dict[str, Any] = {k: task[k] for k in ("code", "system", "mode", "threads")}
    rep = res.report
    if not res.ok or rep.get("status") is None:
        why = "timeout" if res.returncode == -9 else f"exit {res.returncode}"
        row.update(status="error", reason=f"child failed ({why}): {res.stderr_tail[-400:]}")
        return row
    if rep["status"] != "ok":
        row.update(status=rep["status"], reason=rep.get("reason", ""))
        return row
    cpu, wall = rep["timing"]["cpu_median"], rep["timing"]["wall_median"]
    n = rep["n_centres"]
    row.update(status="ok", n_centres=n, cpu_s=cpu, wall_s=wall, atoms_per_cpu_s=n / cpu,
               atoms_per_wall_s=n / wall, peak_mb=rep["peak_mb"],
               n_features=rep.get("n_features"), version=rep.get("version"),
               timing=rep["timing"], note=rep.get("method", ""),
               first_features=rep.get("first_features"))
    return row


COLUMNS = [("code", "code"), ("threads", "thr"), ("n_centres", "centres"), ("cpu_s", "CPU s"),
           ("wall_s", "wall s"), ("atoms_per_cpu_s", "atoms/CPU-s"), ("peak_mb", "peak MB"),
           ("n_features", "features"), ("kmlip_speed_x", "kmlip speed x"), ("note", "note")]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small subset ({', '.join(QUICK_SYSTEMS)}), one repeat: seconds")
    p.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEMS)}"
                   f" (default: {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--codes", default=",".join(CODES))
    p.add_argument("--modes", default="desc,grad", help="desc (features), grad (+gradients)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per measurement (median; default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="threads of every code (default 1)")
    p.add_argument("--dscribe-grad-centres", type=int, default=16,
                   help="DScribe gradients of larger structures on this many centres only")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument("--json", default=None, help="results file (default benchmarks/out/acsf.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return worker(json.loads(args._worker), args._report)

    systems, codes, modes = systems_codes_modes(
        p, args, QUICK_SYSTEMS if args.quick else DEFAULT_SYSTEMS, SYSTEMS, CODES)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    opts = {"dscribe_grad_centres": args.dscribe_grad_centres}

    info = machine_info()
    print(f"# ACSF benchmark: {PARAMS}")
    print(f"# machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs; threads "
          f"{args.threads}; median of {repeat} timed call(s) after 1 warm-up, one child process "
          "per measurement")
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} (CPU times hold on a busy machine, wall times do not)")
    available = {c: (KMLIP_PATH is not None) if c == "kmlip" else installed(c) for c in codes}
    for c in codes:
        print(f"#   {c}: " + (package_version(c) or "installed" if available[c]
                              else "NOT INSTALLED - skipped"))
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    for system in systems:
        for mode in modes:
            for code in codes:
                if not available[code]:
                    continue
                task = {"code": code, "system": system, "mode": mode, "threads": args.threads,
                        "repeat": repeat, "opts": opts}
                row = measure(task, args.timeout)
                rows.append(row)
                msg = (f"{fmt(row['atoms_per_cpu_s'])} atoms/CPU-s" if row["status"] == "ok"
                       else f"{row['status']}: {row.get('reason', '')}"[:200])
                print(f"  {system:<11} {mode:<5} {code:<8} {msg}", flush=True)

    # ratios and the agreement of the two codes' features (same run)
    ref = {(r["system"], r["mode"]): r for r in rows if r["code"] == "kmlip"
           and r["status"] == "ok"}
    for r in rows:
        k = ref.get((r["system"], r["mode"]))
        if r["code"] != "kmlip" and r["status"] == "ok" and k is not None:
            r["kmlip_speed_x"] = ratio(k["atoms_per_cpu_s"], r["atoms_per_cpu_s"])
            if r["mode"] == "desc" and r.get("first_features") and k.get("first_features"):
                a, b = np.asarray(k["first_features"]), np.asarray(r["first_features"])
                if a.shape == b.shape:
                    r["max_rel_diff"] = float(np.abs(a - b).max() / np.abs(b).max())
                    r["note"] = f"first structure: max |diff| / max |X| = {r['max_rel_diff']:.1e}"
    for system in systems:
        for mode in modes:
            sel = [dict(r) for r in rows if r["system"] == system and r["mode"] == mode]
            for r in sel:
                if r["status"] != "ok":
                    r["note"] = f"{r['status']}: {r.get('reason', '')}"[:160]
            if sel:
                label = "features" if mode == "desc" else "features + gradients"
                print(f"\n## {system}: {SYSTEMS[system][0]} — {label}")
                print(format_table(sel, COLUMNS))
    print("\nkmlip speed x = kmlip atoms (centres) per CPU-s over DScribe's, same system, mode "
          "and threads, same run.")

    print("\n## Target (issue 11)")
    lines = []
    for system in systems:
        d = next((r for r in rows if (r["code"], r["system"], r["mode"]) ==
                  ("dscribe", system, "grad") and r["status"] == "ok"), None)
        sp = d["kmlip_speed_x"] if d and "kmlip_speed_x" in d else float("nan")
        lines.append((f"kmlip/DScribe atoms per CPU-s, gradients, {system}", f"{fmt(sp)}x",
                      f">= {TARGET_GRAD_X:g}x", verdict(sp, TARGET_GRAD_X)))
    print_target_rows(lines)
    for r in rows:
        r.pop("first_features", None)
    out = Path(args.json) if args.json else OUT_DIR / "acsf.json"
    save_json(out, {"machine": info, "args": vars(args), "params": PARAMS, "rows": rows})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
