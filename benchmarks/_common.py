"""Shared helpers of the benchmark scripts: isolated measurements, timing, tables, data.

Every measurement runs in a child process of its own (the benchmark script calls itself with a
hidden ``--_worker`` argument), so that peak memory is that child's alone and thread settings
(``OMP_NUM_THREADS``, ``RAYON_NUM_THREADS``, BLAS) are fixed before any library is loaded.
The parent reads the child's resource usage with :func:`os.wait4` (CPU time of all its threads,
maximum resident set size) and the figures the child reports as JSON.

Nothing here imports kmlip or a peer code: the scripts must run (and skip what is missing) on a
machine with only NumPy and ASE.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"

# Environment variables that fix the thread count of OpenMP, BLAS and Rayon (featomic).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",
)


# --------------------------------------------------------------------------------------------
# availability and environment
# --------------------------------------------------------------------------------------------
def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it).

    Parameters
    ----------
    module : str
        Top-level module name, e.g. ``"dscribe"``.

    Returns
    -------
    bool
        True when an import spec is found.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def use_repo_kmlip() -> str | None:
    """Make the checkout's ``kmlip`` importable when no installed one is found.

    The benchmarks live in the repository, next to ``kmlip/``; with an in-place build
    (``python setup.py build_ext --inplace``) and no ``pip install`` the package is only
    importable from the repository root, which this puts first on ``sys.path``.

    Returns
    -------
    str or None
        Directory of the ``kmlip`` package that ``import kmlip`` will use, None if none.
    """
    spec = importlib.util.find_spec("kmlip") if "kmlip" not in sys.modules else None
    repo = HERE.parent
    if spec is None and "kmlip" not in sys.modules and (repo / "kmlip" / "__init__.py").exists():
        sys.path.insert(0, str(repo))
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("kmlip")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent)


def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def thread_env(n_threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with every thread-count variable set to ``n_threads``.

    Parameters
    ----------
    n_threads : int or None
        Thread count for OpenMP, BLAS and Rayon; None removes the variables, so that every
        library runs with its default (what a user gets without setting anything: one thread
        per core for OpenMP and OpenBLAS).
    base : dict, optional
        Environment to start from (default ``os.environ``).

    Returns
    -------
    dict
        The environment for a child process.
    """
    env = dict(os.environ if base is None else base)
    for name in THREAD_VARIABLES:
        if n_threads is None:
            env.pop(name, None)
        else:
            env[name] = str(n_threads)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def threads_label(n_threads: int | None) -> str:
    """``"1 thread"``, ``"2 threads"`` or ``"default threads (N cores)"``."""
    if n_threads is None:
        return f"default threads ({os.cpu_count()} cores)"
    return f"{n_threads} thread" + ("s" if n_threads != 1 else "")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and Python version of this machine."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    info["mem_gb"] = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# memory of the current process (Linux /proc; harmless elsewhere)
# --------------------------------------------------------------------------------------------
def _status_kb(key: str) -> float:
    """A ``/proc/self/status`` field in kB (NaN where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def rss_mb() -> float:
    """Current resident set size of this process in MB (NaN where /proc is missing)."""
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    """Peak resident set size (high-water mark) of this process in MB."""
    hwm = _status_kb("VmHWM")
    if math.isnan(hwm):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return hwm / 1024.0


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall and CPU times (seconds) of repeated runs of one function.

    CPU time is :func:`time.process_time`: all threads of this process.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        """Median wall seconds (NaN without calls)."""
        return statistics.median(self.wall) if self.wall else math.nan

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds (NaN without calls)."""
        return statistics.median(self.cpu) if self.cpu else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: all times and the medians."""
        return {
            "wall": self.wall,
            "cpu": self.cpu,
            "wall_median": self.wall_median,
            "cpu_median": self.cpu_median,
        }


def time_calls(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> tuple[Timing, Any]:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls.

    The result of a call is dropped before the next call starts, so that the peak memory is
    that of one call and its output (what a user holding one result sees), not of two.

    Parameters
    ----------
    fn : callable
        Function without arguments.
    repeat : int
        Number of timed calls (at least 1).
    warmup : int
        Untimed calls before (JIT, caches, spline tables, thread pools).

    Returns
    -------
    timing : Timing
        Wall and CPU seconds of each timed call.
    result
        The value of the last call.
    """
    result = None
    for _ in range(max(0, warmup)):
        result = None
        result = fn()
    timing = Timing()
    for _ in range(max(1, repeat)):
        result = None  # free the previous output first
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        c1, w1 = time.process_time(), time.perf_counter()
        timing.wall.append(w1 - w0)
        timing.cpu.append(c1 - c0)
    return timing, result


def output_nbytes(obj: Any, _depth: int = 0) -> int:
    """Bytes of the NumPy arrays held by ``obj`` (arrays, sequences, dicts, dataclasses,
    metatensor TensorMaps with their gradients); an estimate of an output's size."""
    if _depth > 6 or obj is None:
        return 0
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(output_nbytes(o, _depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(output_nbytes(o, _depth + 1) for o in obj.values())
    if hasattr(obj, "blocks") and callable(obj.blocks):  # metatensor.TensorMap
        total = 0
        for block in obj.blocks():
            total += int(np.asarray(block.values).nbytes)
            for _, grad in block.gradients():
                total += int(np.asarray(grad.values).nbytes)
        return total
    if hasattr(obj, "__dataclass_fields__"):
        return sum(output_nbytes(getattr(obj, f), _depth + 1) for f in obj.__dataclass_fields__)
    return 0


# --------------------------------------------------------------------------------------------
# isolated child processes
# --------------------------------------------------------------------------------------------
@dataclass
class ChildResult:
    """What a child process reported, and what the kernel says it used.

    Attributes
    ----------
    ok : bool
        Exit status 0 and a JSON report.
    report : dict
        The JSON the child wrote (empty on failure).
    returncode : int
        Exit status (negative: killed by that signal).
    cpu_s : float
        User + system CPU seconds of the child and all its threads (from ``wait4``).
    wall_s : float
        Wall seconds from start to exit.
    max_rss_mb : float
        Peak resident set size of the child (``ru_maxrss``), MB.
    stderr_tail : str
        Last lines of the child's stderr (for error messages).
    """

    ok: bool
    report: dict[str, Any]
    returncode: int
    cpu_s: float
    wall_s: float
    max_rss_mb: float
    stderr_tail: str = ""


def run_child(
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    report_path: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    stdout_path: str | os.PathLike | None = None,
) -> ChildResult:
    """Run ``argv`` as a child and measure its CPU time and peak memory with ``wait4``.

    If ``report_path`` is given the child is expected to write a JSON object there (the
    benchmark workers do); otherwise ``report`` is empty and only the resource figures count.

    Parameters
    ----------
    argv : sequence of str
        Command line.
    env : dict, optional
        Environment of the child.
    timeout : float, optional
        Seconds after which the child is killed (reported as not ok).
    report_path : path, optional
        JSON file the child writes.
    cwd : path, optional
        Working directory of the child.
    stdout_path : path, optional
        File receiving the child's stdout and stderr (default: a temporary file).

    Returns
    -------
    ChildResult
    """
    own_log = stdout_path is None
    if own_log:
        fd, stdout_path = tempfile.mkstemp(prefix="kmlip-bench-", suffix=".log")
        os.close(fd)
    t0 = time.perf_counter()
    with open(stdout_path, "wb") as log:
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        status, rusage = 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid != 0:
                break
            if deadline and time.perf_counter() > deadline:
                proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    with open(stdout_path, "rb") as fh:
        tail = fh.read()[-4000:].decode(errors="replace")
    if own_log:
        os.unlink(stdout_path)
    report: dict[str, Any] = {}
    if report_path is not None and Path(report_path).exists():
        try:
            report = json.loads(Path(report_path).read_text())
        except json.JSONDecodeError:
            report = {}
    ok = proc.returncode == 0 and (report_path is None or bool(report))
    return ChildResult(
        ok=ok,
        report=report,
        returncode=proc.returncode,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        wall_s=wall,
        max_rss_mb=rusage.ru_maxrss / 1024.0,
        stderr_tail=tail,
    )


def run_worker(
    script: str | os.PathLike,
    task: dict[str, Any],
    n_threads: int | None,
    timeout: float | None = None,
) -> ChildResult:
    """Run ``python script --_worker TASK_JSON --_report FILE`` with ``n_threads`` threads.

    Parameters
    ----------
    script : path
        The benchmark script (it must handle ``--_worker``).
    task : dict
        JSON-serialisable description of the measurement.
    n_threads : int or None
        Thread count exported to the child's environment (None: the libraries' defaults).
    timeout : float, optional
        Seconds before the child is killed.

    Returns
    -------
    ChildResult
    """
    fd, report = tempfile.mkstemp(prefix="kmlip-bench-", suffix=".json")
    os.close(fd)
    os.unlink(report)
    try:
        argv = [sys.executable, str(script), "--_worker", json.dumps(task), "--_report", report]
        return run_child(argv, env=thread_env(n_threads), timeout=timeout, report_path=report)
    finally:
        if os.path.exists(report):
            os.unlink(report)


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write a worker's JSON report (atomically) for :func:`run_child` to read."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, default=_json_default)
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# tables and formatting
# --------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """Format a number with ``digits`` significant digits (thousands without exponent)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table.

    Parameters
    ----------
    rows : sequence of dict
        One dict per row.
    columns : sequence of (key, header)
        Columns in order; values are formatted with :func:`fmt`.

    Returns
    -------
    str
        The table, right-aligned numbers, one header line and a rule.
    """
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values: Sequence[str]) -> str:
        # first column left-aligned (labels), the others right-aligned (numbers)
        return "  ".join(v.rjust(w) if i else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    lines = [line(heads), "  ".join("-" * w for w in widths)]
    lines.extend(line(c) for c in cells)
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, NaN when either is missing or ``b`` is 0."""
    if a is None or b is None:
        return math.nan
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """``"PASS"``/``"FAIL"`` of ``value`` against ``target``, ``"n/a"`` when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


def save_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (NumPy scalars and arrays converted)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)


# --------------------------------------------------------------------------------------------
# structures (fixed seeds)
# --------------------------------------------------------------------------------------------
def rattled_diamond_si(repeat: int, seed: int = 0, stdev: float = 0.05):
    """Diamond Si, conventional cubic cell (8 atoms, a = 5.43 Å) repeated ``repeat``³, rattled.

    ``repeat=2`` gives 64 atoms, ``repeat=3`` 216 atoms.
    """
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


def rattled_fcc_alloy(
    reps: tuple[int, int, int] = (5, 5, 10),
    symbols: tuple[str, str] = ("Cu", "Al"),
    fraction: float = 0.5,
    a: float = 3.8,
    seed: int = 0,
    stdev: float = 0.08,
):
    """Random substitutional fcc alloy (cubic 4-atom cell repeated ``reps``), rattled.

    The default (5, 5, 10) gives 1000 atoms, half Cu and half Al at random (a = 3.8 Å, between
    Cu's 3.61 Å and Al's 4.05 Å).
    """
    from ase.build import bulk

    atoms = bulk(symbols[0], "fcc", a=a, cubic=True).repeat(reps)
    rng = np.random.default_rng(seed)
    n = len(atoms)
    chosen = rng.permutation(n)[: int(round(fraction * n))]
    numbers = atoms.numbers.copy()
    from ase.data import atomic_numbers

    numbers[chosen] = atomic_numbers[symbols[1]]
    atoms.numbers = numbers
    atoms.rattle(stdev=stdev, seed=seed + 1)
    return atoms


def rattled_molecules(name: str = "CH3CH2OH", count: int = 100, seed: int = 0, stdev: float = 0.05):
    """``count`` copies of ``ase.build.molecule(name)``, each rattled with its own seed.

    Each is a separate non-periodic :class:`ase.Atoms` (zero cell, ``pbc=False``).
    """
    from ase.build import molecule

    out = []
    for k in range(count):
        m = molecule(name)
        m.rattle(stdev=stdev, seed=seed + k)
        out.append(m)
    return out


# --------------------------------------------------------------------------------------------
# EMT Cu molecular dynamics data (gap.py)
# --------------------------------------------------------------------------------------------
def random_strain(rng: np.random.Generator, max_strain: float) -> np.ndarray:
    """Symmetric strain tensor with components uniform in ±``max_strain``."""
    e = rng.uniform(-max_strain, max_strain, size=(3, 3))
    return 0.5 * (e + e.T)


def emt_cu_trajectory(
    repeat: int,
    temperature: float,
    strain: np.ndarray,
    n_frames: int,
    seed: int,
    equilibrate: int = 50,
    interval: int = 25,
    timestep_fs: float = 4.0,
    friction_per_fs: float = 0.02,
    a: float = 3.61,
):
    """Frames from one Langevin MD run of fcc Cu under ASE's EMT.

    Parameters
    ----------
    repeat : int
        Cubic 4-atom cell repeated ``repeat``³ (2: 32 atoms, 3: 108 atoms).
    temperature : float
        Thermostat temperature in K.
    strain : ndarray (3, 3)
        Homogeneous strain applied to the cell (atoms scaled with it) before the run.
    n_frames : int
        Frames taken, one every ``interval`` steps after ``equilibrate`` steps (defaults:
        4 fs steps, 200 fs of equilibration with a 50 fs Langevin friction time, then a frame
        every 100 fs, about one vibrational period of Cu).
    seed : int
        Seed of the initial velocities and of the Langevin noise.

    Returns
    -------
    list of ase.Atoms
        Each with a SinglePointCalculator holding energy, forces, stress (EMT) and
        ``info["temperature"]``, ``info["seed"]``.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    cell = atoms.cell.array @ (np.eye(3) + strain)
    atoms.set_cell(cell, scale_atoms=True)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature,
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=np.random.default_rng(seed + 1),
    )
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(interval)
        snap = atoms.copy()
        snap.calc = SinglePointCalculator(
            snap,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces().copy(),
            stress=atoms.get_stress(voigt=True).copy(),
        )
        snap.info["temperature"] = float(temperature)
        snap.info["seed"] = int(seed)
        frames.append(snap)
    return frames


def emt_cu_dataset(
    n_cells: int,
    seed: int,
    frames_per_run: int = 4,
    repeats: Sequence[int] = (2, 3),
    t_range: tuple[float, float] = (300.0, 1500.0),
    max_strain: float = 0.03,
):
    """``n_cells`` EMT Cu frames from independent short Langevin runs.

    Runs alternate between the sizes in ``repeats`` (32 and 108 atoms by default); each draws
    its temperature uniformly from ``t_range`` and a random ±``max_strain`` strain.

    Returns
    -------
    list of ase.Atoms
    """
    rng = np.random.default_rng(seed)
    frames: list = []
    run = 0
    while len(frames) < n_cells:
        repeat = int(repeats[run % len(repeats)])
        temperature = float(rng.uniform(*t_range))
        strain = random_strain(rng, max_strain)
        take = min(frames_per_run, n_cells - len(frames))
        frames.extend(
            emt_cu_trajectory(repeat, temperature, strain, take, seed=int(rng.integers(2**31)))
        )
        run += 1
    return frames


def emt_alloy_dataset(
    n_cells: int,
    seed: int,
    symbols: tuple[str, str] = ("Cu", "Au"),
    repeat: int = 2,
    a: float = 3.85,
    rattle: float = 0.1,
    max_strain: float = 0.03,
):
    """``n_cells`` random substitutional fcc alloys (50/50 on average), rattled and strained,
    labelled by ASE's EMT (energy, forces, stress).

    Parameters
    ----------
    n_cells : int
        Number of cells.
    seed : int
        Seed of every random choice.
    symbols : (str, str)
        The two species (EMT knows Al, Cu, Ag, Au, Ni, Pd, Pt).
    repeat : int
        Cubic 4-atom fcc cell repeated ``repeat``³ (2: 32 atoms).
    a : float
        Lattice constant in Å (3.85: between Cu's 3.61 and Au's 4.08).
    rattle : float
        Standard deviation of the Gaussian displacements in Å.
    max_strain : float
        Bound of the random symmetric strain components.

    Returns
    -------
    list of ase.Atoms
        Each with a SinglePointCalculator holding energy, forces and stress.
    """
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_cells):
        atoms = bulk(symbols[0], "fcc", a=a, cubic=True).repeat(repeat)
        other = rng.random(len(atoms)) < 0.5
        atoms.symbols[other] = symbols[1]
        cell = atoms.cell.array @ (np.eye(3) + random_strain(rng, max_strain))
        atoms.set_cell(cell, scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
        frames.append(emt_snapshot(atoms))
    return frames


def emt_snapshot(atoms):
    """A copy of ``atoms`` holding its EMT energy, forces and stress (SinglePointCalculator)."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.calc = EMT()
    snap = atoms.copy()
    snap.calc = SinglePointCalculator(snap, energy=atoms.get_potential_energy(),
                                      forces=atoms.get_forces().copy(),
                                      stress=atoms.get_stress(voigt=True).copy())
    return snap


def cached_frames(path: Path, make: Callable[[], list]) -> list:
    """Read frames from extxyz ``path``, or make and write them there first."""
    from ase.io import read, write

    if path.exists():
        return read(str(path), index=":")
    frames = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.xyz")
    write(str(tmp), frames, format="extxyz")
    os.replace(tmp, path)
    return read(str(path), index=":")


def systems_codes_modes(parser, args, default_systems, systems, codes):
    """The ``--systems``, ``--codes`` and ``--modes`` lists of a descriptor benchmark (comma
    separated), each checked against what the script knows (a usage error otherwise)."""
    def split(text):
        return [x.strip() for x in text.split(",") if x.strip()]

    chosen = list(default_systems) if args.systems is None else split(args.systems)
    out = (chosen, split(args.codes), split(args.modes))
    for names, allowed, what in zip(out, (systems, codes, ("desc", "grad")),
                                    ("system", "code", "mode"), strict=True):
        bad = [x for x in names if x not in allowed]
        if bad:
            parser.error(f"unknown {what}(s) {bad}; choose from {list(allowed)}")
    return out


def print_target_rows(lines: list[tuple[str, Any, str, str]]) -> None:
    """Prints (what, measured, wanted, verdict) rows of an issue's targets as a table."""
    print(format_table([{"what": a, "measured": b, "target": c, "verdict": d}
                        for a, b, c, d in lines],
                       [("what", "target"), ("measured", "measured"), ("target", "wanted"),
                        ("verdict", "")]))
