"""Dask fit scaling: ``KernelPotential.fit(frames, client=...)`` on 1 and 2 worker processes,
against the serial fit, with peak memory per worker, and a projection to 10^6 environments.

Data and model: 2,000 EMT-labelled Cu–Al cells of 8, 12 or 16 atoms (cubic fcc cells repeated
(2,1,1), (3,1,1), (2,2,1); 30% Al at random; symmetric strain 3%; rattle 0.1 Å; seed 0), energy,
forces and stress labels; SOAP r_cut 4.5 Å, n_max 6, l_max 4, ζ 4, 100 CUR sparse points per
species (M = 200).

Runs, interleaved ``--repeat`` times in a rotating order (the machine is shared, its speed
drifts; figures are medians, ratios within this run):

``serial``  the fit in this process, one OpenMP thread, no Dask;
``dask1``   a fresh ``LocalCluster(n_workers=1, threads_per_worker=1)``;
``dask2``   a fresh ``LocalCluster(n_workers=2, threads_per_worker=1)``.

Each fresh cluster first runs a 20-structure fit (imports, first-call caches), then its peak RSS
is reset (``/proc/self/clear_refs``) and the timed fit runs. Reported: wall time of ``fit``
(selection, data pass, solve; cluster start-up excluded), parallel efficiency
``t(dask1) / (2 t(dask2))`` (target >= 0.8), the workers' CPU time (``psutil``; the sum over
workers against dask1's shows work added by distribution, independent of the machine's load),
the peak RSS of every worker during the fit and its RSS before, and the bytes that travel.

Selection note: with the default sample (``max(20 M_k, 5000)`` environments per species per
worker, see ``kmlip.gp.distributed``) the 1- and 2-worker fits select among different samples,
and the serial fit among all environments, so their sparse points (and selection times) differ
slightly; the data pass is the same work in all three.

Projection to 10^6 environments (printed, and in ``benchmarks/out/scaling_dask.json``): time
from the measured CPU time per environment, memory per worker ``m0 + m1 n`` (fitted to the 1-
and 2-worker peaks, n environments per worker) plus the streaming-QR state at a production M,
communication from the measured bytes per environment and the factor size.

``python benchmarks/scaling_dask.py --quick`` (400 structures, 1 repeat) runs in about a minute.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _use_repo_kmlip() -> None:
    if importlib.util.find_spec("kmlip") is None:
        sys.path.insert(0, str(HERE.parent))


# -- data -------------------------------------------------------------------------------------
def make_frames(n: int, seed: int = 0) -> list:
    """``n`` EMT-labelled Cu–Al cells of 8, 12 or 16 atoms (energy, forces, stress)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    reps = [(2, 1, 1), (3, 1, 1), (2, 2, 1)]
    out = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(reps[int(rng.integers(3))])
        a.symbols[rng.random(len(a)) < 0.3] = "Al"
        eps = 0.03 * rng.standard_normal((3, 3))
        a.set_cell(a.cell @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.positions += rng.normal(0.0, 0.1, a.positions.shape)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append(a)
    return out


def make_model():
    from kmlip import SOAP, KernelPotential

    soap = SOAP(["Cu", "Al"], r_cut=4.5, n_max=6, l_max=4, sigma=0.5)
    return KernelPotential(soap, zeta=4, n_sparse=100, sparse_method="cur", sigma_energy=0.002,
                           sigma_force=0.02, sigma_stress=0.02, random_state=0, n_threads=1)


# -- probes run on the workers (local functions: cloudpickle sends them by value) ---------------
def _probes():
    def warm():
        import kmlip.descriptors.soap  # noqa: F401
        import kmlip.gp.distributed  # noqa: F401

    def reset_peak():
        import os

        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        return os.getpid()

    def memory():
        vals = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line.split(":")[0]] = float(line.split()[1]) / 1024.0
        return vals

    def cpu():
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system

    return warm, reset_peak, memory, cpu


# -- measurements -------------------------------------------------------------------------------
def fit_timings(model) -> dict:
    st = model.fitted_state_
    t = getattr(st, "fit_timings", None) or {}
    return {k: float(v) for k, v in t.items()}


def run_serial(frames) -> dict:
    import psutil

    m = make_model()
    proc = psutil.Process()
    c0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    m.fit(frames)
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu_client": sum(proc.cpu_times()[:2]) - c0,
            "timings": fit_timings(m)}


def run_dask(frames, warm_frames, n_workers: int) -> dict:
    import psutil
    from dask.distributed import Client, LocalCluster

    warm, reset_peak, memory, cpu = _probes()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        client.run(warm)
        make_model().fit(warm_frames, client=client)
        client.run(reset_peak)
        before = client.run(memory)
        cpu0 = client.run(cpu)
        proc = psutil.Process()
        c0 = sum(proc.cpu_times()[:2])
        m = make_model()
        t0 = time.perf_counter()
        m.fit(frames, client=client)
        wall = time.perf_counter() - t0
        cpu_client = sum(proc.cpu_times()[:2]) - c0
        cpu1 = client.run(cpu)
        after = client.run(memory)
    workers = sorted(before)
    return {"wall": wall, "cpu_client": cpu_client, "timings": fit_timings(m),
            "cpu_workers": [cpu1[w] - cpu0[w] for w in workers],
            "rss_before_mb": [before[w]["VmRSS"] for w in workers],
            "peak_mb": [after[w]["VmHWM"] for w in workers],
            "sparse_points": {k: np.asarray(v).shape[0] for k, v in m.sparse_points_.items()}}


def traffic(frames, model_for_sizes) -> dict:
    """Bytes that travel in a distributed fit of ``frames`` (pickled sizes)."""
    from kmlip import labels as lab
    from kmlip.gp import distributed, training

    bare = [distributed._bare(a) for a in frames]
    keys = lab.LabelKeys(use_stress=True)
    labels = [lab.read_labels(a, k, keys) for k, a in enumerate(frames)]
    base = [training.baseline_values(None, a) for a in frames]
    st = model_for_sizes.fitted_state_
    factors = st.factors
    return {
        "structures": len(pickle.dumps(bare, protocol=5)),
        "labels": len(pickle.dumps((labels, base), protocol=5)),
        "kernel": len(pickle.dumps(st.kernel, protocol=5)),
        "factors": int(sum(f.T.nbytes for f in factors.values())),
        "label_rows": int(sum(1 + 3 * len(a) + (6 if lb.stress is not None else 0)
                              for a, lb in zip(frames, labels, strict=True))),
        "n_classes": len(factors),
        "n_features": int(st.kernel.terms[0].descriptor.n_features),
        "M": int(st.kernel.n_sparse),
    }


def merge_seconds(M: int) -> float:
    """Wall time of one TSQR merge of two (M+1)^2 triangular factors (one class)."""
    from kmlip.gp.distributed import merge_factors
    from kmlip.gp.sparse import ClassFactor

    rng = np.random.default_rng(0)
    T = [np.triu(rng.standard_normal((M + 1, M + 1))) for _ in range(2)]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        merge_factors({"forces": ClassFactor(T[0], 1, 0.0)}, {"forces": ClassFactor(T[1], 1, 0.0)})
        best = min(best, time.perf_counter() - t0)
    return best


# -- report ---------------------------------------------------------------------------------------
def med(xs):
    return statistics.median(xs) if xs else math.nan


def projection(res: dict, n_env: int, sizes: dict, t_merge_1000: float) -> list[str]:
    """Text lines: 10^6 environments on P workers, from the measured per-environment costs.

    Time per environment on a worker = descriptor + kernel rows (measured CPU at the benchmark's
    M, the rows part scaled linearly in M) + streaming QR (2 (M+1)^2 flops per label row at the
    flop rate of the measured merge). Memory per worker = RSS before the fit + structures held
    + the larger of the selection piece (features of 20,000 atoms) and the QR state at M, plus
    what the 1-worker run added beyond those (scratch, allocator).
    """
    from kmlip.gp.distributed import SAMPLE_FACTOR, SAMPLE_MIN, SELECT_PIECE_ATOMS
    from kmlip.gp.training import block_rows_for

    N = 10**6
    d1 = res["dask1"]
    F, M0, classes = sizes["n_features"], sizes["M"], sizes["n_classes"]
    rows_env = sizes["label_rows"] / n_env
    t_sel = med([x["timings"].get("selection", 0.0) for x in d1])
    t_rows = med([x["timings"].get("kernel_rows", 0.0) for x in d1])
    t_qr = med([x["timings"].get("qr", 0.0) for x in d1])
    cpu_w = med([sum(x["cpu_workers"]) for x in d1])
    # the wall times above ran on a shared machine: scale them to the worker's CPU time
    busy = cpu_w / max(t_sel + t_rows + t_qr, 1e-9)
    sel_env, rows_env_t = t_sel * busy / n_env, t_rows * busy / n_env
    rate = (2.0 / 3.0) * 1001**3 / t_merge_1000  # flop/s of one core in the triangular QR
    before = med([max(x["rss_before_mb"]) for x in d1])
    peak = med([max(x["peak_mb"]) for x in d1])
    b_env = (sizes["structures"] + sizes["labels"]) / n_env

    def qr_mb(M):
        n1 = M + 1
        return classes * (2 * n1 * n1 + block_rows_for(M, None) * n1) * 8 / 2**20

    def piece_mb(n):
        return min(n, SELECT_PIECE_ATOMS) * F * 8 / 2**20

    extra = max(0.0, peak - before - b_env * n_env / 2**20
                - max(piece_mb(n_env), qr_mb(M0)))
    lines = [
        f"measured per environment (M = {M0}, {F} features, {rows_env:.2f} label rows): "
        f"selection {sel_env * 1e3:.3f} ms, kernel rows {rows_env_t * 1e3:.3f} ms CPU; QR "
        f"{rate / 1e9:.1f} Gflop/s; structures + labels {b_env:.0f} B; worker RSS "
        f"{before:.0f} MB before the fit, {peak:.0f} MB peak ({extra:.0f} MB beyond the model "
        f"below: scratch, allocator)"]
    for M in (M0, 2000, 10000):
        n1 = M + 1
        factor = classes * n1 * n1 * 8 / 2**20
        t_env = sel_env + rows_env_t * M / M0 + rows_env * 2 * n1 * n1 / rate
        t_merge = classes * t_merge_1000 * (n1 / 1001) ** 3
        budget = sum(max(SAMPLE_FACTOR * M // 2, SAMPLE_MIN) for _ in range(2))
        sample_mb = budget * F * 8 / 2**20
        lines.append(
            f"M = {M} (2 species): {t_env * 1e3:.2f} ms CPU per environment; factors "
            f"{factor:.0f} MB per worker result, one merge {t_merge:.1f} s; QR state "
            f"{qr_mb(M):.0f} MB per worker; selection sample to the client {sample_mb:.0f} MB "
            f"({budget} environments, any P)")
        for P in (8, 32, 128):
            n = N / P
            mem = before + b_env * n / 2**20 + max(piece_mb(n), qr_mb(M) + factor) + extra
            levels = math.ceil(math.log2(P))
            t = t_env * n + levels * t_merge
            lines.append(
                f"  P = {P:3d}: {n:7.0f} env/worker, ~{mem:6.0f} MB/worker, ~{t / 60:6.1f} min "
                f"({levels} merge levels, {levels * t_merge / 60:.1f} min); traffic: "
                f"{b_env * N / 2**20:.0f} MB of structures + labels once, {P - 1} factors of "
                f"{factor:.0f} MB between workers")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="400 structures, 1 repeat")
    p.add_argument("--n", type=int, default=None, help="structures (default 2000; 400 quick)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 3)")
    args, _ = p.parse_known_args(argv)
    _use_repo_kmlip()
    try:
        import dask.distributed  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        print(f"Dask benchmark skipped: {exc} (pip install 'dask[distributed]' psutil)")
        return 0
    n = args.n or (400 if args.quick else 2000)
    repeat = args.repeat or (1 if args.quick else 3)
    t0 = time.perf_counter()
    frames = make_frames(n, seed=0)
    warm_frames = make_frames(20, seed=1)
    n_env = sum(len(a) for a in frames)
    print(f"{n} structures, {n_env} environments (EMT labels in {time.perf_counter() - t0:.0f} s)",
          flush=True)
    kinds = ["serial", "dask1", "dask2"]
    res = {k: [] for k in kinds}
    loads = []
    for r in range(repeat):
        order = kinds[r % 3:] + kinds[:r % 3]
        for k in order:
            out = run_serial(frames) if k == "serial" else run_dask(frames, warm_frames,
                                                                    int(k[-1]))
            res[k].append(out)
            loads.append(os.getloadavg()[0])
            extra = "" if k == "serial" else (
                f", worker CPU {sum(out['cpu_workers']):.1f} s, peak "
                + "/".join(f"{x:.0f}" for x in out["peak_mb"]) + " MB")
            print(f"  repeat {r} {k:6s}: fit {out['wall']:.2f} s (" + ", ".join(
                f"{a} {b:.2f}" for a, b in out["timings"].items() if a != "total") + ")"
                + extra, flush=True)

    m = make_model().fit(frames[:50])
    sizes = traffic(frames, m)
    t_merge = merge_seconds(1000)
    w = {k: med([x["wall"] for x in v]) for k, v in res.items()}
    cpu1 = med([sum(x["cpu_workers"]) for x in res["dask1"]])
    cpu2 = med([sum(x["cpu_workers"]) for x in res["dask2"]])
    eff = w["dask1"] / (2 * w["dask2"])
    data1 = med([x["timings"].get("kernel_rows", 0) + x["timings"].get("qr", 0)
                 for x in res["dask1"]])
    data2 = med([x["timings"].get("kernel_rows", 0) + x["timings"].get("qr", 0)
                 for x in res["dask2"]])
    spread = {k: (min(x["wall"] for x in v), max(x["wall"] for x in v)) for k, v in res.items()}
    print("\nDask fit, medians of", repeat, "interleaved repeats (min..max):")
    for k in kinds:
        print(f"  {k:6s} {w[k]:7.2f} s  ({spread[k][0]:.2f}..{spread[k][1]:.2f})")
    print(f"  parallel efficiency t(dask1) / (2 t(dask2)) = {eff:.2f} (target >= 0.80: "
          f"{'met' if eff >= 0.8 else 'NOT met'}); data pass alone (rows + QR): "
          f"{data1 / (2 * data2) if data2 else math.nan:.2f}")
    cpu_serial = med([x["cpu_client"] for x in res["serial"]])
    cpu_d1 = cpu1 + med([x["cpu_client"] for x in res["dask1"]])
    print(f"  Dask overhead on 1 worker: t(dask1) / t(serial) = {w['dask1'] / w['serial']:.2f}; "
          f"CPU (worker + client) / serial CPU = {cpu_d1:.1f} / {cpu_serial:.1f} s = "
          f"{cpu_d1 / cpu_serial:.2f}")
    crit1 = med([x["cpu_client"] + max(x["cpu_workers"]) for x in res["dask1"]])
    crit2 = med([x["cpu_client"] + max(x["cpu_workers"]) for x in res["dask2"]])
    eff_cpu = crit1 / (2 * crit2)
    print(f"  CPU-time efficiency (critical path: client CPU + busiest worker's CPU, i.e. with a "
          f"core per process): {crit1:.1f} s / (2 x {crit2:.1f} s) = {eff_cpu:.2f}")
    print(f"  load average during the runs: {', '.join(f'{x:.1f}' for x in loads)} "
          f"(2 cores; above 2 the workers shared the cores with other jobs)")
    print(f"  worker CPU: dask1 {cpu1:.1f} s, dask2 {cpu2:.1f} s summed over workers "
          f"(ratio {cpu2 / cpu1:.2f}: work added by distribution)")
    print("  peak RSS per worker: dask1 "
          + f"{med([max(x['peak_mb']) for x in res['dask1']]):.0f} MB, dask2 "
          + f"{med([max(x['peak_mb']) for x in res['dask2']]):.0f} MB (RSS before the fit "
          + f"{med([max(x['rss_before_mb']) for x in res['dask2']]):.0f} MB)")
    print(f"  traffic: structures {sizes['structures'] / 2**20:.1f} MB + labels "
          f"{sizes['labels'] / 2**20:.1f} MB (once), kernel {sizes['kernel'] / 2**10:.0f} kB "
          f"per worker, factors {sizes['factors'] / 2**10:.0f} kB per worker result")
    print("\nProjection to 10^6 environments:")
    lines = projection(res, n_env, sizes, t_merge)
    for line in lines:
        print("  " + line)
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling_dask.json").write_text(json.dumps({
        "n_structures": n, "n_environments": n_env, "repeat": repeat, "runs": res,
        "median_wall": w, "efficiency": eff, "efficiency_cpu": eff_cpu, "load_average": loads,
        "traffic_bytes": sizes,
        "merge_seconds_M1000": t_merge, "projection": lines}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
