"""``kmlip md``: molecular dynamics with a fitted model, optionally stopped by an
uncertainty gate."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from kmlip.cli._files import check_output, check_readable, first_line, load_model, read_structures

DESCRIPTION = (
    "Run molecular dynamics (ASE) with a fitted model from the last structure of a file. "
    "Ensembles: nvt (default; Langevin thermostat), nve (velocity Verlet) and npt (ASE's "
    "NPTBerendsen: Berendsen thermostat and isotropic barostat, time constants 500 fs and "
    "1000 fs). Velocities are drawn from the Maxwell-Boltzmann distribution at --temperature "
    "(with --seed; total momentum removed) unless --keep-velocities. The per-atom "
    "'uncertainty' (eV/Å, the model's estimate of each atom's force error) is computed every "
    "step and stored in every trajectory frame. With --gate-std or --gate-relative the run "
    "stops cleanly at the first step where an atom's uncertainty exceeds the threshold "
    "(stated in eV/Å in the log), writes that frame to <output stem>.tripped.extxyz and exits "
    "with status 0: a tripped gate is a result (the model is unsure there: label that frame "
    "and refit), not an error. The trajectory is written to a temporary file beside -o and "
    "renamed to -o only when the run ends (completed or gated); a failed run leaves no file "
    "at -o, and Ctrl-C keeps the frames so far in <output stem>.partial.extxyz.")

ENSEMBLES = ("nvt", "nve", "npt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")
    p.add_argument("start", help="starting structure: any file ASE can read; its last frame "
                                 "is used")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="trajectory to write (extxyz): positions, momenta, energy (eV), forces "
                        "(eV/Å), stress (eV/Å³, periodic cells) and the per-atom 'uncertainty' "
                        "(eV/Å) of every logged frame; info step, time_fs, temperature_K, "
                        "max_uncertainty")
    p.add_argument("--steps", type=int, required=True, metavar="N",
                   help="number of MD steps, >= 0")
    p.add_argument("--temperature", type=float, required=True, metavar="K",
                   help="temperature in kelvin, >= 0: of the thermostat (nvt, npt) and of the "
                        "initial Maxwell-Boltzmann velocities")
    p.add_argument("--timestep", type=float, default=1.0, metavar="FS",
                   help="time step in fs (default: %(default)s; use about 0.5 with hydrogen)")
    p.add_argument("--ensemble", default="nvt", choices=ENSEMBLES,
                   help="nvt: Langevin thermostat; nve: velocity Verlet; npt: Berendsen "
                        "thermostat and isotropic barostat (ASE NPTBerendsen; periodic cells "
                        "only) (default: %(default)s)")
    p.add_argument("--friction", type=float, default=None, metavar="1/FS",
                   help="Langevin friction in 1/fs, nvt only (default: 0.01 /fs, i.e. a "
                        "100 fs relaxation time)")
    p.add_argument("--pressure", type=float, default=None, metavar="GPA",
                   help="target pressure in GPa, npt only (default: 0.0 GPa; 1 GPa = "
                        "0.0062415 eV/Å³; 1 atm = 1.01325e-4 GPa)")
    p.add_argument("--compressibility", type=float, default=None, metavar="1/GPA",
                   help="isothermal compressibility in 1/GPa that scales the Berendsen "
                        "barostat's response, npt only (default: 0.01 /GPa, about that of "
                        "metals such as Cu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gate-std", type=float, default=None, metavar="EV_PER_A",
                   help="stop when an atom's uncertainty exceeds this many eV/Å "
                        "(default: no gate)")
    g.add_argument("--gate-relative", type=float, default=None, metavar="R",
                   help="stop when an atom's uncertainty exceeds R times the model's noise "
                        "level (the median uncertainty of its calibration frames, or "
                        "sigma_force when uncalibrated); the threshold in eV/Å is printed "
                        "(default: no gate)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial velocities and of the Langevin noise "
                        "(default: %(default)s)")
    p.add_argument("--keep-velocities", action="store_true",
                   help="start from the momenta stored in the start file instead of drawing "
                        "them (default: draw them at --temperature)")
    p.add_argument("--log-interval", type=int, default=10, metavar="K",
                   help="write a trajectory frame and a log line every K steps; the first and "
                        "the last step are always written (default: %(default)s)")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="ASE format name of the start file, e.g. extxyz "
                        "(default: guessed from the file name and content)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads of the model (default: the model's setting)")


def tripped_path(output: str) -> str:
    """``<output stem>.tripped.extxyz`` beside ``output``."""
    stem, _ = os.path.splitext(output)
    return f"{stem}.tripped.extxyz"


def _check_args(args) -> None:
    def bad(name, value, rule):
        raise ValueError(f"{name} must be {rule}, got {value!r}")

    if args.steps < 0:
        bad("--steps", args.steps, ">= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        bad("--temperature", args.temperature, "a finite number of kelvin >= 0")
    if not (math.isfinite(args.timestep) and 0 < args.timestep <= 100):
        bad("--timestep", args.timestep, "in (0, 100] fs")
    if args.log_interval < 1:
        bad("--log-interval", args.log_interval, ">= 1")
    if args.seed < 0:
        bad("--seed", args.seed, ">= 0")
    for name, value in (("--gate-std", args.gate_std), ("--gate-relative", args.gate_relative),
                        ("--friction", args.friction),
                        ("--compressibility", args.compressibility)):
        if value is not None and not (math.isfinite(value) and value > 0):
            bad(name, value, "a positive number")
    if args.pressure is not None and not math.isfinite(args.pressure):
        bad("--pressure", args.pressure, "a finite number of GPa")
    if args.friction is not None and args.ensemble != "nvt":
        raise ValueError(f"--friction applies to --ensemble nvt only, not {args.ensemble}")
    for name, value in (("--pressure", args.pressure),
                        ("--compressibility", args.compressibility)):
        if value is not None and args.ensemble != "npt":
            raise ValueError(f"{name} applies to --ensemble npt only, not {args.ensemble}")
    if args.threads is not None and args.threads < 1:
        bad("--threads", args.threads, ">= 1")


def draw_velocities(atoms, temperature: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at ``temperature`` (K) with zero total momentum.

    Each component is ``sqrt(m_i k_B T) N(0, 1)`` from ``numpy.random.default_rng(seed)``
    (drawn here rather than with ASE's helper, whose name changed in ASE 3.29).
    """
    from ase import units

    m = atoms.get_masses()
    z = np.random.default_rng(seed).standard_normal((len(atoms), 3))
    p = np.sqrt(m * units.kB * temperature)[:, None] * z
    if len(atoms) > 1:
        p -= m[:, None] * (p.sum(0) / m.sum())  # the centre of mass stays at rest
    atoms.set_momenta(p)


def make_dynamics(atoms, args):
    """The ASE dynamics named by ``args.ensemble`` (see :data:`DESCRIPTION`)."""
    from ase import units

    dt = args.timestep * units.fs
    if args.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt), "velocity Verlet (NVE)"
    if args.ensemble == "nvt":
        from ase.md.langevin import Langevin

        friction = 0.01 if args.friction is None else args.friction
        if not atoms.constraints and len(atoms) > 1:
            # ASE's fixcm=True in Langevin biases small systems (deprecated since 3.28);
            # the FixCom constraint keeps the centre of mass at rest without that bias
            from ase.constraints import FixCom

            atoms.set_constraint(FixCom())
        return (Langevin(atoms, timestep=dt, temperature_K=args.temperature,
                         friction=friction / units.fs, fixcm=False,
                         rng=np.random.default_rng(args.seed + 1)),
                f"Langevin (NVT) at {args.temperature:g} K, friction {friction:g} /fs")
    from ase.md.nptberendsen import NPTBerendsen

    pressure = 0.0 if args.pressure is None else args.pressure
    comp = 0.01 if args.compressibility is None else args.compressibility
    return (NPTBerendsen(atoms, timestep=dt, temperature_K=args.temperature,
                         pressure_au=pressure * units.GPa, taut=500 * units.fs,
                         taup=1000 * units.fs, compressibility_au=comp / units.GPa),
            f"Berendsen NPT (ASE NPTBerendsen) at {args.temperature:g} K and {pressure:g} GPa, "
            f"time constants 500 fs (T) and 1000 fs (p), compressibility {comp:g} /GPa")


class _LineStream:
    """A text stream whose complete lines go through ``tqdm.write`` (keeps the bar intact)."""

    def __init__(self, bar, stream):
        self.bar, self.stream, self.buf = bar, stream, ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _frame(atoms, step: int, dt_fs: float):
    """A copy of ``atoms`` with the calculator's results frozen, for the trajectory."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom

    calc = atoms.calc
    r = {"energy": calc.get_property("energy", atoms),
         "forces": calc.get_property("forces", atoms)}
    if atoms.pbc.all():
        r["stress"] = calc.get_property("stress", atoms)
    u = np.asarray(calc.get_property("uncertainty", atoms))
    b = atoms.copy()
    # the FixCom added for Langevin is a property of the run, not of the structure
    b.set_constraint([c for c in atoms.constraints if not isinstance(c, FixCom)])
    b.arrays["uncertainty"] = u.copy()
    b.info.update(step=step, time_fs=step * dt_fs,
                  temperature_K=float(atoms.get_temperature()) if len(atoms) else 0.0,
                  max_uncertainty=float(u.max()))
    b.calc = SinglePointCalculator(b, **r)
    return b


def run(args: argparse.Namespace) -> int:
    from ase.io import write

    from kmlip.calculator import KMLIPCalculator

    _check_args(args)
    inputs = {"model file": args.model, "start file": args.start}
    check_output(args.output, inputs)
    gated = args.gate_std is not None or args.gate_relative is not None
    trip_path = tripped_path(args.output)
    if gated:
        check_output(trip_path, inputs)
    check_readable(args.model, "model file")
    atoms = read_structures(args.start, format=args.format)[-1]
    if args.ensemble == "npt" and not atoms.pbc.all():
        raise ValueError(f"{args.start}: --ensemble npt needs a cell periodic in all three "
                         "directions")
    if atoms.pbc.any() and atoms.cell.rank < int(atoms.pbc.sum()):
        raise ValueError(f"{args.start}: periodic directions without cell vectors")
    model = load_model(args.model)
    if args.threads is not None:
        model.set_params(n_threads=args.threads)
    momenta = atoms.get_momenta() if args.keep_velocities else None
    if momenta is not None and not np.all(np.isfinite(momenta)):
        bad = np.unique(np.nonzero(~np.isfinite(momenta))[0])[:5].tolist()
        raise ValueError(f"{args.start}: momenta contain NaN or inf (atoms {bad}); they are "
                         "used as given with --keep-velocities")
    atoms = atoms.copy()
    atoms.calc = KMLIPCalculator(model, variances=("uncertainty",))
    try:  # the first call checks that the model knows this structure (species, cell)
        atoms.get_forces()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{args.start}: {first_line(exc)}") from None
    if args.keep_velocities:
        atoms.set_momenta(momenta)
    else:
        draw_velocities(atoms, args.temperature, args.seed)
    dyn, how = make_dynamics(atoms, args)

    from tqdm.auto import tqdm

    show_bar = bool(getattr(sys.stderr, "isatty", lambda: False)()) and args.steps > 0
    bar = tqdm(total=args.steps, desc="kmlip md", unit="step", disable=not show_bar,
               file=sys.stderr, leave=False) if show_bar else None
    log = _LineStream(bar, sys.stdout)
    print(f"{len(atoms)} atoms from {args.start}; {how}; time step {args.timestep:g} fs, "
          f"{args.steps} steps", file=log)
    gate = None
    if gated:
        from kmlip.active import UncertaintyGate

        gate = UncertaintyGate(atoms, threshold=args.gate_std, relative=args.gate_relative,
                               output=trip_path, log=log)
    else:
        print("no uncertainty gate (give --gate-std eV/Å or --gate-relative to stop where the "
              "model is unsure)", file=log)
    print(f"{'step':>8} {'time/fs':>9} {'E_pot/eV':>14} {'T/K':>9} {'max u/(eV/Å)':>13}",
          file=log)
    state = {"step": 0, "last_written": -1, "frames": 0}

    def write_frame(fh):
        step = state["step"]
        b = _frame(atoms, step, args.timestep)
        write(fh, b, format="extxyz")
        fh.flush()
        state["last_written"] = step
        state["frames"] += 1
        print(f"{step:>8d} {step * args.timestep:>9.1f} {b.get_potential_energy():>14.6f} "
              f"{b.info['temperature_K']:>9.1f} {b.info['max_uncertainty']:>13.4g}", file=log)

    t0 = time.process_time()
    tmp = _TempBeside(args.output)
    try:
        with tmp.open() as fh:
            def observer():
                state["step"] = dyn.nsteps
                if dyn.nsteps % args.log_interval == 0:
                    write_frame(fh)

            dyn.attach(observer, interval=1)
            done = 0
            if gate is not None:
                from kmlip.active import run_gated

                def counted():
                    for _ in dyn.irun(args.steps):
                        if bar is not None and dyn.nsteps:
                            bar.update(1)
                        yield
                done = run_gated(_Irun(counted), args.steps, gate)
            else:
                for _ in dyn.irun(args.steps):
                    if bar is not None and dyn.nsteps:
                        bar.update(1)
                done = dyn.nsteps
            if state["last_written"] != dyn.nsteps:
                state["step"] = dyn.nsteps
                write_frame(fh)
        tmp.commit()
    except KeyboardInterrupt:
        kept = tmp.keep_partial(state["frames"])
        if bar is not None:
            bar.close()
        if kept:
            print(f"interrupted: the {state['frames']} frames written so far are in {kept}",
                  file=sys.stderr)
        raise
    except BaseException:
        tmp.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    cpu = time.process_time() - t0
    print(f"wrote {state['frames']} frame{'s' * (state['frames'] != 1)} to {args.output} "
          f"({cpu:.2f} CPU-s)")
    if gate is not None and gate.tripped is not None:
        t = gate.tripped
        worst = int(np.argmax(t.atoms.arrays["uncertainty"]))
        print(f"stopped by the uncertainty gate at step {t.step} of {args.steps} "
              f"(t = {t.step * args.timestep:g} fs): atom {worst} "
              f"({t.atoms.get_chemical_symbols()[worst]}) has uncertainty "
              f"{t.max_uncertainty:.4g} eV/Å > threshold {t.threshold:.4g} eV/Å; "
              f"the frame is in {trip_path}")
    elif gate is not None:
        print(f"completed {done} steps; the largest uncertainty was "
              f"{max(gate.history):.4g} eV/Å (threshold {gate.threshold:.4g} eV/Å)")
        if os.path.exists(trip_path):
            import warnings

            warnings.warn(f"{trip_path} is from an earlier run (this run did not trip the gate)",
                          stacklevel=1)
    return 0


class _Irun:
    """Adapter giving :func:`run_gated` an ``irun`` that also advances the progress bar."""

    def __init__(self, gen):
        self.gen = gen

    def irun(self, steps):
        return self.gen()


class _TempBeside:
    """A temporary text file beside ``path``, renamed over it by :meth:`commit`."""

    def __init__(self, path: str):
        import tempfile

        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.",
                                        suffix=".tmp", dir=directory)
        os.close(fd)

    def open(self):
        return open(self.tmp, "w", encoding="utf-8")

    def commit(self) -> None:
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def keep_partial(self, n_frames: int) -> str | None:
        if n_frames == 0:
            self.discard()
            return None
        partial = f"{os.path.splitext(self.path)[0]}.partial.extxyz"
        try:
            os.replace(self.tmp, partial)
        except OSError:
            self.discard()
            return None
        return partial
