"""SOAP power-spectrum benchmark: kmlip against DScribe, featomic and quippy.

Same systems and parameters for every code (r_cut 5 Å, n_max 8, l_max 6, Gaussian width 0.5 Å,
GTO radial basis), descriptors alone ("desc") and with position gradients ("grad"). Each
measurement (code × system × mode × threads) runs in a child process of its own: wall and CPU
time of the timed calls (median of ``--repeat``, after one untimed warm-up call), atoms per wall-
and per CPU-second, and peak resident memory of that child (whole process, and above the RSS
before the first call). Ratios kmlip/peer are printed on the peer rows, with the targets of
issue 2 beside the figures.

Run ``python benchmarks/soap.py --quick`` for a check in seconds; the full run takes minutes
(DScribe's gradients on the crystals dominate). Codes that are not installed are skipped and
listed as such.

How each code is called (see the ``_setup_*`` functions):

kmlip
    ``SOAP(species, r_cut=5, n_max=8, l_max=6, sigma=0.5, n_threads=threads).transform(atoms,
    gradients=...)``, one call per structure.
featomic
    ``SoapPowerSpectrum`` with cutoff 5 Å and a shifted-cosine smoothing of width 0.5 Å, Gaussian
    density of width 0.5 Å, ``TensorProduct`` basis with ``max_angular`` 6 and a GTO radial basis
    with ``max_radial`` 7 (featomic counts n = 0..max_radial, so 8 functions); one ``compute``
    call on the list of structures. With gradients it is run twice: ``gradients=["positions",
    "strain"]`` (the reference of the ratios: like kmlip's per-pair gradients, which carry the
    pair vectors, it gives what forces *and* stress need; this is also the setting that
    reproduces issue 2's featomic figures) and ``["positions"]`` alone (row
    ``featomic[positions]``); ``--featomic-gradients`` changes that. Its output layout (keys
    per species triple) is kept: reshaping into one block is not timed.
DScribe
    ``dscribe.descriptors.SOAP(species, r_cut=5, n_max=8, l_max=6, sigma=0.5, rbf="gto",
    periodic=any(pbc))``: ``create`` for descriptors; ``derivatives(method="analytical",
    attach=True)`` for molecules. DScribe refuses analytic derivatives of periodic systems, so for
    crystals the *cluster workaround* is timed: for each centre, the non-periodic cluster of all
    atoms (with their periodic images) within DScribe's own cutoff r_cut + σ√(2 ln 1000) of it,
    ``derivatives(cluster, centers=[0], attach=True)``, images summed back onto their atoms.
    (``--dscribe-crystal-gradients none`` skips them.) Note that DScribe's GTO basis, its hard
    cutoff (r_cut + 1.86 Å here) and its density differ from the smooth-cutoff SOAP of the other
    codes: same nominal parameters, not the same numbers.
quippy
    ``quippy.descriptors.Descriptor("soap cutoff=5 cutoff_transition_width=0.5 n_max=8 l_max=6
    atom_sigma=0.5 n_species=K species_Z={...}").calc(atoms, grad=...)``, one call per structure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    OUT_DIR,
    fmt,
    format_table,
    installed,
    machine_info,
    output_nbytes,
    package_version,
    peak_rss_mb,
    print_target_rows,
    ratio,
    rattled_diamond_si,
    rattled_fcc_alloy,
    rattled_molecules,
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

SCRIPT = Path(__file__).resolve()
KMLIP_PATH = use_repo_kmlip()  # the checkout's kmlip when none is installed

# Shared SOAP parameters.
R_CUT = 5.0
N_MAX = 8
L_MAX = 6
SIGMA = 0.5
TRANSITION_WIDTH = 0.5  # smooth-cutoff width (GAP's default; kmlip's default)

CODES = ("kmlip", "featomic", "dscribe", "quippy")
MODULE_OF = {"kmlip": "kmlip", "featomic": "featomic", "dscribe": "dscribe", "quippy": "quippy"}
DIST_OF = {"kmlip": "kmlip", "featomic": "featomic", "dscribe": "dscribe", "quippy": "quippy-ase"}
PEERS = ("featomic", "dscribe", "quippy")

# Figures quoted by issue 2 (this machine kind, 1 thread, with gradients, atoms per CPU-second).
ISSUE_ANCHORS = (
    "issue 2 anchors (1 thread, gradients, atoms/CPU-s): featomic 752 (Si216), 306 (CuAl 1000, "
    "1.5 GB peak); DScribe 219 (Si216, cluster workaround), 35 (CuAl, 8.9 GB); quippy 273"
)


# --------------------------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------------------------
def _ethanol(count: int) -> Callable[[], list]:
    """Builder of ``count`` rattled ethanol molecules (fixed seeds)."""
    return lambda: rattled_molecules("CH3CH2OH", count=count, seed=3000, stdev=0.05)


SYSTEMS: dict[str, tuple[str, Callable[[], list]]] = {
    "si64": ("rattled diamond Si, 64 atoms", lambda: [rattled_diamond_si(2, seed=64)]),
    "si216": ("rattled diamond Si, 216 atoms", lambda: [rattled_diamond_si(3, seed=216)]),
    "cual1000": (
        "rattled random fcc Cu50Al50, 1000 atoms",
        lambda: [rattled_fcc_alloy((5, 5, 10), ("Cu", "Al"), 0.5, a=3.8, seed=1000)],
    ),
    "ethanol100": ("100 rattled ethanol molecules (9 atoms each)", _ethanol(100)),
    "ethanol10": ("10 rattled ethanol molecules (quick)", _ethanol(10)),
}
DEFAULT_SYSTEMS = ("si64", "si216", "cual1000", "ethanol100")
QUICK_SYSTEMS = ("si64", "ethanol10")


def species_of(frames: list) -> list[str]:
    """Chemical symbols present in ``frames``, sorted by atomic number."""
    from ase.data import chemical_symbols

    zs = sorted({int(z) for a in frames for z in a.numbers})
    return [chemical_symbols[z] for z in zs]


# --------------------------------------------------------------------------------------------
# one code each: returns (function to time, info about the output)
# --------------------------------------------------------------------------------------------
Setup = tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]


def _setup_kmlip(frames: list, gradients: bool, threads: int, opts: dict[str, Any]) -> Setup:
    """kmlip's SOAP, one ``transform`` per structure.

    Returns the function to time and a function describing its output.
    """
    from kmlip import SOAP

    soap = SOAP(
        species=species_of(frames), r_cut=R_CUT, n_max=N_MAX, l_max=L_MAX, sigma=SIGMA,
        n_threads=threads,
    )

    def run():
        return [soap.transform(a, gradients=gradients) for a in frames]

    def info(out):
        if gradients:
            return {
                "n_features": int(out[0][0].shape[1]),
                "n_gradient_entries": int(sum(g.values.shape[0] for _, g in out)),
            }
        return {"n_features": int(out[0].shape[1])}

    return run, info


def featomic_hypers() -> dict[str, Any]:
    """featomic 0.6 hyper-parameters equivalent to the shared SOAP settings."""
    return {
        "cutoff": {
            "radius": R_CUT,
            "smoothing": {"type": "ShiftedCosine", "width": TRANSITION_WIDTH},
        },
        "density": {"type": "Gaussian", "width": SIGMA},
        "basis": {
            "type": "TensorProduct",
            "max_angular": L_MAX,
            "radial": {"type": "Gto", "max_radial": N_MAX - 1},
        },
    }


def _setup_featomic(frames: list, gradients: bool, threads: int, opts: dict[str, Any]) -> Setup:
    """featomic's ``SoapPowerSpectrum``, one ``compute`` on all structures.

    Returns the function to time and a function describing its output.
    """
    from featomic import SoapPowerSpectrum

    calc = SoapPowerSpectrum(**featomic_hypers())
    grads = list(opts.get("featomic_gradients", ["positions"])) if gradients else []
    systems = frames if len(frames) > 1 else frames[0]

    def run():
        return calc.compute(systems, gradients=grads)

    def info(out):
        # features per centre once the species keys are moved to properties (not timed)
        merged = out.keys_to_samples("center_type").keys_to_properties(
            ["neighbor_1_type", "neighbor_2_type"]
        )
        block = merged.block()
        d = {"n_features": int(block.values.shape[1]), "featomic_gradients": grads}
        if "positions" in grads:
            d["n_gradient_entries"] = int(block.gradient("positions").values.shape[0])
        return d

    return run, info


def dscribe_env_cutoff() -> float:
    """DScribe's effective cutoff for the GTO basis: r_cut + σ√(2 ln 1000)."""
    return R_CUT + SIGMA * math.sqrt(-2.0 * math.log(1e-3))


def dscribe_cluster_gradients(desc, atoms, r_env: float) -> list[tuple[np.ndarray, ...]]:
    """DScribe analytic SOAP gradients of a periodic structure via non-periodic clusters.

    For each centre c: all atoms (periodic images included) within ``r_env`` of it form a
    non-periodic cluster with c first; ``desc.derivatives(cluster, centers=[0], attach=True)``
    gives the derivatives with respect to every cluster atom; images are summed onto the atom
    they copy.

    Parameters
    ----------
    desc : dscribe.descriptors.SOAP
        A non-periodic DScribe SOAP (``periodic=False``).
    atoms : ase.Atoms
        Periodic structure.
    r_env : float
        Radius of the clusters; at least DScribe's own cutoff (:func:`dscribe_env_cutoff`).

    Returns
    -------
    list of (features, neighbour indices, gradients)
        Per centre: ``(F,)`` features, ``(k,)`` distinct atoms j, ``(k, 3, F)`` dX_c/dr_j.
    """
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    n = len(atoms)
    i, j, S = neighbor_list("ijS", atoms, r_env)
    offsets = np.searchsorted(i, np.arange(n + 1))
    pos, cell, numbers = atoms.positions, atoms.cell.array, atoms.numbers
    out = []
    for c in range(n):
        s = slice(offsets[c], offsets[c + 1])
        jj = j[s]
        cluster = Atoms(
            numbers=np.concatenate([[numbers[c]], numbers[jj]]),
            positions=np.vstack([pos[c : c + 1], pos[jj] + S[s] @ cell]),
        )
        dX, X = desc.derivatives(
            cluster, centers=[0], method="analytical", attach=True, return_descriptor=True,
            n_jobs=1,
        )
        idx = np.concatenate([[c], jj])
        uniq, inv = np.unique(idx, return_inverse=True)
        g = np.zeros((uniq.shape[0], 3, dX.shape[-1]))
        np.add.at(g, inv, dX[0])
        out.append((X[0], uniq, g))
    return out


def _setup_dscribe(frames: list, gradients: bool, threads: int, opts: dict[str, Any]) -> Setup:
    """DScribe's SOAP: ``create``, ``derivatives`` or the cluster workaround.

    Returns the function to time and a function describing its output.
    """
    from dscribe.descriptors import SOAP as DSOAP

    species = species_of(frames)
    periodic = any(bool(np.any(a.pbc)) for a in frames)
    kw = dict(species=species, r_cut=R_CUT, n_max=N_MAX, l_max=L_MAX, sigma=SIGMA, rbf="gto")
    desc = DSOAP(periodic=periodic, **kw)
    systems = frames if len(frames) > 1 else frames[0]
    n_feat = int(desc.get_number_of_features())

    if not gradients:
        def run():
            return desc.create(systems, n_jobs=1)
        return run, lambda out: {"n_features": n_feat}

    if not periodic:
        def run():
            return desc.derivatives(systems, method="analytical", attach=True, n_jobs=1)
        return run, lambda out: {"n_features": n_feat, "method": "analytical"}

    if opts.get("dscribe_crystal_gradients", "cluster") != "cluster":
        raise _Skip("DScribe: no analytic gradients for periodic systems (--dscribe-crystal-"
                    "gradients none)")
    cluster_desc = DSOAP(periodic=False, **kw)
    r_env = dscribe_env_cutoff() + 1e-6

    def run():
        return [dscribe_cluster_gradients(cluster_desc, a, r_env) for a in frames]

    return run, lambda out: {"n_features": n_feat, "method": "analytical, cluster workaround",
                             "cluster_radius": r_env}


def quippy_descriptor_string(species: list[str]) -> str:
    """quippy SOAP descriptor string for the shared settings and ``species``."""
    from ase.data import atomic_numbers

    zs = " ".join(str(atomic_numbers[s]) for s in species)
    return (f"soap cutoff={R_CUT} cutoff_transition_width={TRANSITION_WIDTH} n_max={N_MAX} "
            f"l_max={L_MAX} atom_sigma={SIGMA} n_species={len(species)} species_Z={{{zs}}}")


def _setup_quippy(frames: list, gradients: bool, threads: int, opts: dict[str, Any]) -> Setup:
    """quippy's SOAP ``Descriptor``, one ``calc`` per structure.

    Returns the function to time and a function describing its output.
    """
    from quippy.descriptors import Descriptor

    desc = Descriptor(quippy_descriptor_string(species_of(frames)))

    def run():
        return [desc.calc(a, grad=gradients) for a in frames]

    def info(out):
        d = {"n_features": int(np.shape(out[0]["data"])[1])}
        if gradients:
            d["n_gradient_entries"] = int(sum(np.shape(o["grad_data"])[0] for o in out))
        return d

    return run, info


SETUPS = {
    "kmlip": _setup_kmlip,
    "featomic": _setup_featomic,
    "dscribe": _setup_dscribe,
    "quippy": _setup_quippy,
}


class _Skip(Exception):
    """A measurement that does not apply (reported, not an error)."""


# --------------------------------------------------------------------------------------------
# worker (child process)
# --------------------------------------------------------------------------------------------
def worker(task: dict[str, Any], report_path: str) -> int:
    """Run one measurement and write its JSON report; exit status 0 unless it crashed."""
    report: dict[str, Any] = {"task": task}
    try:
        frames = SYSTEMS[task["system"]][1]()
        n_atoms = int(sum(len(a) for a in frames))
        run, info = SETUPS[task["code"]](
            frames, task["mode"] == "grad", int(task["threads"]), task.get("opts", {})
        )
        rss0 = rss_mb()
        reset_peak_rss()
        timing, out = time_calls(run, repeat=int(task["repeat"]), warmup=1)
        peak = peak_rss_mb()
        report.update(
            status="ok",
            output_mb=output_nbytes(out) / 2**20,
            n_atoms=n_atoms,
            timing=timing.to_dict(),
            rss_before_mb=rss0,
            peak_mb=peak,
            compute_mb=peak - rss0,
            version=package_version(DIST_OF[task["code"]]),
            **info(out),
        )
    except _Skip as exc:
        report.update(status="skipped", reason=str(exc))
    except Exception as exc:  # reported in the table, the other measurements go on
        report.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
    write_report(report_path, report)
    return 0


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def measure(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``task`` in a child and combine its report with the child's resource usage."""
    res = run_worker(SCRIPT, task, int(task["threads"]), timeout=timeout)
    row: dict[str, Any] = {"code": task.get("label", task["code"]), "system": task["system"],
                           "mode": task["mode"], "threads": task["threads"]}
    rep = res.report
    if not res.ok or rep.get("status") is None:
        why = "timeout" if res.returncode == -9 else f"exit {res.returncode}"
        row.update(status="error", reason=f"child failed ({why}): {res.stderr_tail[-600:]}")
        return row
    if rep["status"] != "ok":
        row.update(status=rep["status"], reason=rep.get("reason", ""))
        if rep.get("traceback"):
            row["traceback"] = rep["traceback"]
        return row
    wall = rep["timing"]["wall_median"]
    cpu = rep["timing"]["cpu_median"]
    row.update(
        status="ok",
        n_atoms=rep["n_atoms"],
        wall_s=wall,
        cpu_s=cpu,
        atoms_per_wall_s=rep["n_atoms"] / wall,
        atoms_per_cpu_s=rep["n_atoms"] / cpu,
        peak_mb=rep["peak_mb"],
        compute_mb=rep["compute_mb"],
        output_mb=rep.get("output_mb"),
        child_max_rss_mb=res.max_rss_mb,
        child_cpu_s=res.cpu_s,
        n_features=rep.get("n_features"),
        n_gradient_entries=rep.get("n_gradient_entries"),
        version=rep.get("version"),
        timing=rep["timing"],
    )
    for key in ("method", "featomic_gradients"):
        if key in rep:
            row[key] = rep[key]
    return row


def add_ratios(rows: list[dict[str, Any]], base_threads: int) -> None:
    """Add kmlip/peer speed (atoms per CPU-s) and memory (peak) ratios to each peer row."""
    ref = {(r["system"], r["mode"]): r for r in rows
           if r["code"] == "kmlip" and r["threads"] == base_threads and r["status"] == "ok"}
    for r in rows:
        k = ref.get((r["system"], r["mode"]))
        if r["status"] != "ok" or k is None:
            continue
        if r["code"] == "kmlip":
            if r["threads"] != base_threads:
                r["speedup_wall"] = ratio(r["atoms_per_wall_s"], k["atoms_per_wall_s"])
            continue
        r["kmlip_speed_x"] = ratio(k["atoms_per_cpu_s"], r["atoms_per_cpu_s"])
        r["kmlip_wall_x"] = ratio(k["atoms_per_wall_s"], r["atoms_per_wall_s"])
        r["kmlip_mem_x"] = ratio(k["peak_mb"], r["peak_mb"])
        r["kmlip_compute_mem_x"] = ratio(k["compute_mb"], r["compute_mb"])


COLUMNS = [
    ("code", "code"),
    ("threads", "thr"),
    ("n_atoms", "atoms"),
    ("wall_s", "wall s"),
    ("cpu_s", "CPU s"),
    ("atoms_per_wall_s", "atoms/wall-s"),
    ("atoms_per_cpu_s", "atoms/CPU-s"),
    ("peak_mb", "peak MB"),
    ("compute_mb", "+MB"),
    ("output_mb", "out MB"),
    ("n_features", "features"),
    ("kmlip_speed_x", "kmlip speed x"),
    ("kmlip_mem_x", "kmlip/peer mem"),
    ("speedup_wall", "speed-up"),
    ("note", "note"),
]


def print_tables(rows: list[dict[str, Any]], systems: list[str], modes: list[str]) -> None:
    """One table per system and mode; skipped/failed measurements as notes."""
    for system in systems:
        for mode in modes:
            sel = [r for r in rows if r["system"] == system and r["mode"] == mode]
            if not sel:
                continue
            label = "descriptors" if mode == "desc" else "descriptors + gradients"
            print(f"\n## {system}: {SYSTEMS[system][0]} — {label}")
            shown = []
            for r in sel:
                r = dict(r)
                if r["status"] != "ok":
                    r["note"] = f"{r['status']}: {r.get('reason', '')}"[:160]
                elif r.get("method"):
                    r["note"] = r["method"]
                elif r.get("featomic_gradients") and r["mode"] == "grad":
                    r["note"] = "gradients: " + ",".join(r["featomic_gradients"])
                shown.append(r)
            print(format_table(shown, COLUMNS))


def print_targets(rows: list[dict[str, Any]], base_threads: int, scaling_threads: int) -> None:
    """The targets of issue 2 beside the measured figures."""

    def get(code: str, system: str, mode: str = "grad", threads: int = base_threads):
        for r in rows:
            if (r["code"], r["system"], r["mode"], r["threads"]) == (code, system, mode, threads) \
                    and r["status"] == "ok":
                return r
        return None

    print("\n## Targets (issue 2)")
    print(ISSUE_ANCHORS)
    if base_threads != 1:
        print(f"(note: measured with {base_threads} threads; the targets are single-threaded)")
    lines = []
    for system in ("si216", "si64", "cual1000", "ethanol100", "ethanol10"):
        k, f = get("kmlip", system), get("featomic", system)
        if k is None and f is None:
            continue
        sp = ratio(k and k["atoms_per_cpu_s"], f and f["atoms_per_cpu_s"])
        lines.append((f"kmlip/featomic atoms per CPU-s, gradients, {system}", f"{fmt(sp)}x",
                      ">= 4x", verdict(sp, 4.0)))
        mem = ratio(k and k["peak_mb"], f and f["peak_mb"])
        lines.append((f"kmlip/featomic peak memory, gradients, {system}", fmt(mem), "< 1",
                      verdict(mem, 1.0 - 1e-12, higher_is_better=False)))
        for r in rows:  # the other featomic gradient variants, for information
            if r["code"].startswith("featomic[") and (r["system"], r["mode"], r["threads"]) \
                    == (system, "grad", base_threads) and r["status"] == "ok":
                sp2 = ratio(k and k["atoms_per_cpu_s"], r["atoms_per_cpu_s"])
                lines.append((f"  (kmlip/{r['code']} atoms per CPU-s, {system})", f"{fmt(sp2)}x",
                              "(>= 4x)", verdict(sp2, 4.0).lower()))
    k = get("kmlip", "si216")
    v = k["atoms_per_cpu_s"] if k else math.nan
    lines.insert(0, ("kmlip atoms per CPU-s, gradients, si216", fmt(v), ">= 3,000",
                     verdict(v, 3000.0)))
    for system in ("si216", "cual1000", "si64"):
        k2 = get("kmlip", system, threads=scaling_threads)
        if k2 is None or "speedup_wall" not in k2:
            continue
        lines.append((f"kmlip speed-up {base_threads} -> {scaling_threads} threads (wall), "
                      f"{system}",
                      f"{fmt(k2['speedup_wall'])}x", ">= 1.8x", verdict(k2["speedup_wall"], 1.8)))
    print_target_rows(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small subset ({', '.join(QUICK_SYSTEMS)}), one repeat: seconds")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default: "
                        f"{','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--codes", default=",".join(CODES), help="comma-separated, from "
                   + ", ".join(CODES))
    p.add_argument("--modes", default="desc,grad", help="desc (descriptors), grad (+gradients)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per measurement "
                   "(median reported; default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="threads of every code (default 1)")
    p.add_argument("--scaling-threads", type=int, default=2,
                   help="also run kmlip with this many threads (0: no); the speed-up is a target")
    p.add_argument("--featomic-gradients", default="positions,strain;positions",
                   help="featomic gradient variants, ';'-separated (default: "
                        "'positions,strain;positions'); the first is the reference of the "
                        "ratios and targets, the others get rows of their own")
    p.add_argument("--dscribe-crystal-gradients", choices=("cluster", "none"), default="cluster",
                   help="DScribe gradients of crystals via the cluster workaround, or skip them")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--json", default=None, help="write all results there (default "
                   "benchmarks/out/soap.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker is not None:
        return worker(json.loads(args._worker), args._report)

    systems, codes, modes = systems_codes_modes(
        p, args, QUICK_SYSTEMS if args.quick else DEFAULT_SYSTEMS, SYSTEMS, CODES)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    featomic_variants = [[g.strip() for g in v.split(",") if g.strip()]
                         for v in args.featomic_gradients.split(";") if v.strip()]
    opts = {"featomic_gradients": featomic_variants[0],
            "dscribe_crystal_gradients": args.dscribe_crystal_gradients}

    info = machine_info()
    print(f"# SOAP benchmark: r_cut {R_CUT} Å, n_max {N_MAX}, l_max {L_MAX}, sigma {SIGMA} Å, "
          f"GTO basis, smooth cutoff width {TRANSITION_WIDTH} Å (kmlip, featomic, quippy)")
    print(f"# machine: {info.get('cpu', '?')}, {info.get('cpu_count')} CPUs, "
          f"{info.get('mem_gb', '?')} GB; Python {info['python']}; threads {args.threads}; "
          f"median of {repeat} timed call(s) after 1 warm-up, one child process per measurement")
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (busy machine: wall times and thread speed-ups are unreliable; CPU times hold)"
             if load[0] > 0.5 else ""))
    available = {}
    for c in codes:
        available[c] = KMLIP_PATH is not None if c == "kmlip" else installed(MODULE_OF[c])
        v = package_version(DIST_OF[c])
        where = f" ({KMLIP_PATH})" if c == "kmlip" and KMLIP_PATH else ""
        print(f"#   {c}: " + (f"{v or 'installed'}{where}" if available[c] else
                              "NOT INSTALLED - skipped"))
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    for system in systems:
        for mode in modes:
            plan = [(c, args.threads) for c in codes if available[c]]
            if ("kmlip", args.threads) in plan and args.scaling_threads \
                    and args.scaling_threads != args.threads:
                plan.insert(plan.index(("kmlip", args.threads)) + 1,
                            ("kmlip", args.scaling_threads))
            runs = []
            for code, threads in plan:
                if code == "featomic" and mode == "grad":
                    # one row per gradient variant; the first is "featomic", the reference
                    for k, grads in enumerate(featomic_variants):
                        label = "featomic" if k == 0 else f"featomic[{'+'.join(grads)}]"
                        runs.append((code, label, threads, {**opts, "featomic_gradients": grads}))
                else:
                    runs.append((code, code, threads, opts))
            for code, label, threads, task_opts in runs:
                task = {"code": code, "label": label, "system": system, "mode": mode,
                        "threads": threads, "repeat": repeat, "opts": task_opts}
                row = measure(task, args.timeout)
                rows.append(row)
                msg = (f"{fmt(row['atoms_per_cpu_s'])} atoms/CPU-s, {fmt(row['peak_mb'])} MB"
                       if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}")
                print(f"  {system:<11} {mode:<5} {label:<9} {threads} thr: {msg[:200]}",
                      flush=True)
    for c in codes:
        if not available[c]:
            rows.append({"code": c, "system": "-", "mode": "-", "threads": args.threads,
                         "status": "skipped", "reason": "not installed"})
    add_ratios(rows, args.threads)
    print_tables(rows, systems, modes)
    print("\nkmlip speed x = kmlip atoms/CPU-s over the peer's (same system, mode, threads); "
          "kmlip/peer mem = ratio of peak RSS of the two child processes; +MB = peak above the "
          "RSS before the first call; out MB = size of the arrays returned; speed-up = kmlip "
          "wall atoms/s over kmlip at "
          f"{args.threads} thread(s).")
    print_targets(rows, args.threads, args.scaling_threads)
    out = Path(args.json) if args.json else OUT_DIR / "soap.json"
    save_json(out, {"machine": info, "args": vars(args), "rows": rows})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
