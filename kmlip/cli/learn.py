"""``kmlip learn``: on-the-fly learning of a potential from a reference calculator."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from kmlip._validate import check_structure
from kmlip.cli._files import read_structures
from kmlip.cli._options import add_soap_options

DESCRIPTION = (
    "Learn a SOAP + sparse-GP potential on the fly: run molecular dynamics with the model and "
    "call the reference calculator on the frames where an atom's uncertainty passes the "
    "threshold; each labelled frame updates the model (new labels and sparse points, no refit "
    "from scratch). Writes DIR/model.kmlip, DIR/trajectory.extxyz (per-atom uncertainty "
    "in every frame), DIR/reference.extxyz (every labelled frame) and DIR/log; an "
    "existing DIR run is resumed (also after kill -9) without repeating a reference call. "
    "Units: eV, Å, fs, K.")


#: The default descriptor's SOAP settings (those of
#: :func:`kmlip.active.learn.default_descriptor`), and what a ``--model`` term leaves out: the
#: learner's starting δ (eV) and ζ.
SOAP_DEFAULTS = {"r_cut": 4.5, "n_max": 6, "l_max": 4}
LEARN_DELTA = 0.5
LEARN_ZETA = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("start", help="start structure: any file ASE can read (the last frame is "
                                 "used)")
    p.add_argument("--reference", required=True, metavar="NAME",
                   help="reference calculator: 'emt' (ASE's EMT), 'xtb' (tblite GFN2-xTB; "
                        "needs the [xtb] extra) or 'module:callable' (a function returning an "
                        "ASE calculator, e.g. mypkg.calcs:make_dft)")
    p.add_argument("--steps", type=int, required=True, help="MD steps in total")
    p.add_argument("--temperature", type=float, required=True, metavar="K",
                   help="thermostat temperature and initial velocities, K")
    p.add_argument("--timestep", type=float, default=1.0, metavar="FS",
                   help="time step in fs (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="run directory (created; resumed when it holds a run)")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="ASE format of the start file (default: guessed)")
    g = p.add_argument_group("learning")
    g.add_argument("--ensemble", default="nvt", choices=["nvt", "nve"],
                   help="Langevin thermostat or velocity Verlet (default: %(default)s)")
    g.add_argument("--friction", type=float, default=0.01, metavar="PER_FS",
                   help="Langevin friction in 1/fs (default: %(default)s)")
    g.add_argument("--threshold", type=float, default=None, metavar="EV_PER_A",
                   help="absolute gate threshold t in eV/Å on the uncalibrated per-atom "
                        "uncertainty sqrt(sigma_F² + novelty), i.e. at a novelty of "
                        "t² - sigma_F² whatever the calibration (default: relative to the "
                        "fitted force noise, see --relative-threshold)")
    g.add_argument("--relative-threshold", type=float, default=3.0, metavar="X",
                   help="gate threshold as a multiple of the model's fitted force noise "
                        "sigma_F (default: %(default)s)")
    g.add_argument("--no-calibrate", action="store_true",
                   help="do not calibrate the uncertainty on the labelled frames (by default "
                        "each is first held out: the model's errors on it before the update "
                        "calibrate u = sqrt(b² + a² novelty), stored in run/model.kmlip)")
    g.add_argument("--max-new-points", type=int, default=32, metavar="N",
                   help="sparse points added per reference call (default: %(default)s)")
    g.add_argument("--max-calls", type=int, default=None, metavar="N",
                   help="cap on reference calls; the MD goes on with the model past it "
                        "(default: none)")
    g.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="stop (resumable) after this many wall-clock seconds (default: none)")
    g.add_argument("--frames", default=None, metavar="FILE",
                   help="labelled structures to start from (default: label the start "
                        "structure with the reference)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="SPEC.json",
                   help="a JSON model spec instead of the SOAP options below, as for 'kmlip "
                        "fit --model', e.g. GAP's two-body + SOAP sum: {\"terms\": "
                        "[{\"descriptor\": {\"type\": \"Distance2b\", \"params\": "
                        "{\"species\": [\"Cu\", \"Al\"], \"r_cut\": 4.0}}, \"delta\": 0.5}, "
                        "{\"descriptor\": {\"type\": \"SOAP\", \"params\": {...}}, "
                        "\"delta\": 0.2, \"zeta\": 4}], \"e0\": {\"Cu\": -0.1, \"Al\": "
                        "-0.2}}"
                        f"; a term's delta defaults to {LEARN_DELTA} eV and zeta to "
                        f"{LEARN_ZETA}; the learner "
                        "picks the sparse points (n_sparse, sparse_method are not used); give "
                        "e0 (isolated-atom energies, eV) when the start frames have a single "
                        "composition of several elements, which cannot determine it. A resumed "
                        "run keeps its model: a spec whose terms differ from it is refused "
                        "(default: one SOAP term from the options below)")
    g = p.add_argument_group("SOAP descriptor (default: over the elements present; not with "
                             "--model)")
    add_soap_options(g, SOAP_DEFAULTS)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initial velocities and the thermostat (default: "
                        "%(default)s)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    g.add_argument("--quiet", action="store_true",
                   help="do not echo the log to stderr (default: the log is echoed)")


def reference_calculator(name: str):
    """The ASE calculator named on the command line (ValueError with the cause otherwise)."""
    if not isinstance(name, str) or not name:
        raise ValueError("--reference must be 'emt', 'xtb' or 'module:callable'")
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise ValueError("--reference xtb needs tblite: pip install 'kmlip[xtb]'") from None
        return TBLite(method="GFN2-xTB", verbosity=0)
    if ":" not in name:
        raise ValueError(f"--reference {name!r}: expected 'emt', 'xtb' or 'module:callable'")
    module, _, attr = name.partition(":")
    from importlib import import_module

    try:
        factory = import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except ImportError as exc:
        raise ValueError(f"--reference {name!r}: cannot import {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"--reference {name!r}: {module!r} has no {attr!r}") from None
    if not callable(factory):
        raise ValueError(f"--reference {name!r}: {attr!r} is not callable")
    try:
        calc = factory()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - user code: any failure is a bad --reference
        from kmlip.cli._files import first_line

        raise ValueError(f"--reference {name!r}: {attr}() failed ({type(exc).__name__}: "
                         f"{first_line(exc)})") from None
    if not (callable(getattr(calc, "get_potential_energy", None))
            or callable(getattr(calc, "calculate", None))):
        raise ValueError(f"--reference {name!r}: returned a {type(calc).__name__}, not an ASE "
                         "calculator")
    return calc


def model_template(path: str, species) -> object:
    """The ``--model`` spec as a KernelPotential template for :func:`learn_on_the_fly`.

    Terms leave δ at :data:`LEARN_DELTA` and ζ at :data:`LEARN_ZETA` when they do not set them;
    their ``n_sparse`` and ``sparse_method`` are not used (a warning says so): the learner
    picks sparse points itself. The spec's ``e0`` is the model's e0.

    Raises
    ------
    ValueError
        A malformed spec (see :func:`kmlip.cli.fit.read_model_spec`) or one whose e0 lacks an
        element of ``species``.
    """
    import warnings

    from kmlip.cli.fit import read_model_spec
    from kmlip.model import KernelPotential

    defaults = argparse.Namespace(delta=LEARN_DELTA, zeta=LEARN_ZETA, n_sparse=None,
                                  sparse_method=None)
    descriptor, params = read_model_spec(path, defaults)
    multi = isinstance(descriptor, list)
    unused = {k for k in ("n_sparse", "sparse_method")
              if any(v is not None for v in (params[k] if multi else [params[k]]))}
    if unused:
        warnings.warn(f"{path}: {' and '.join(sorted(unused))} of the terms are not used: the "
                      "learner picks the sparse points itself", UserWarning, stacklevel=2)
    e0 = params.get("e0")
    if e0 is not None:
        missing = [s for s in species if s not in e0]
        if missing:  # else found by the first fit, after the first reference call
            raise ValueError(f"{path}: e0 has no value for {missing} of the start structure")
    return KernelPotential(descriptor, zeta=params["zeta"], delta=params["delta"], e0=e0)


def check_resumed_terms(directory: str, path: str, template) -> None:
    """Refuses a ``--model`` spec whose terms differ from those of the run being resumed.

    A run directory with a checkpoint (``manifest.json`` and ``model.kmlip``) resumes from its
    model, whatever the spec says; a spec with other descriptors, ζ or e0 would be ignored
    without a word, so it is an error (checked here, before the run's log is touched). δ is
    not compared (the run re-optimises it).

    Raises
    ------
    ValueError
        The spec and the checkpoint differ (naming the first differing term), or the
        checkpoint's model cannot be read.
    """
    if not (os.path.isfile(os.path.join(directory, "manifest.json"))
            and os.path.isfile(os.path.join(directory, "model.kmlip"))):
        return  # a new run, or one that has not checkpointed a model: the spec is used
    from kmlip.active.learn import terms_difference
    from kmlip.cli._files import load_model

    st = load_model(os.path.join(directory, "model.kmlip")).fitted_state_
    cfg, _ = template._terms_config()
    why = terms_difference(st, [(tc.descriptor, tc.zeta) for tc in cfg], template.e0)
    if why is not None:
        raise ValueError(f"--model {path}: {why}; {directory} resumes from its own model: "
                         "drop --model or give the run's spec, or start a new run with "
                         "another -o")


#: Files a learning run writes into its directory (the manifest last, see kmlip.active.learn);
#: a run that fails before its manifest exists removes those of them it created.
RUN_FILES = ("log", "reference.extxyz", "model.kmlip", "rowcache.npz", "trajectory.extxyz",
             "calibration.npz", "manifest.json")


def run(args: argparse.Namespace) -> int:
    from kmlip.active.learn import learn_on_the_fly
    from kmlip.descriptors.soap import SOAP

    out = os.fspath(args.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"{out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write to directory {parent} (permission denied)")
    if args.steps is None or args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:  # else found after the first reference call
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.model is not None:
        given = [opt for opt, v in (("--r-cut", args.r_cut), ("--n-max", args.n_max),
                                    ("--l-max", args.l_max)) if v is not None]
        if given:  # the spec's terms define the descriptors: these would be dropped unseen
            raise ValueError(f"{', '.join(given)} and --model cannot be combined (the options "
                             "set the default SOAP; the spec's terms set the descriptors)")
    start = read_structures(args.start, format=args.format)[-1]
    if "X" in start.get_chemical_symbols():
        raise ValueError(f"{args.start}: holds dummy atoms 'X' (Z = 0)")
    check_structure(start, args.start)
    frames = None
    if args.frames is not None:
        frames = read_structures(args.frames)
        for k, a in enumerate(frames):
            check_structure(a, f"{args.frames}: structure {k}")
    reference = reference_calculator(args.reference)
    species = sorted({s for a in [start] + (frames or []) for s in a.get_chemical_symbols()})
    if args.reference == "emt":
        from ase.calculators.emt import parameters

        missing = [s for s in species if s not in parameters]
        if missing:  # EMT's NotImplementedError would come after the run has started
            raise ValueError(f"--reference emt: ASE's EMT has no parameters for {missing} "
                             f"(it knows {sorted(parameters)})")
    descriptor = template = None
    if args.model is not None:
        template = model_template(args.model, species)
        check_resumed_terms(out, args.model, template)
    elif (args.r_cut, args.n_max, args.l_max) == (None, None, None):
        descriptor = None  # the learner's default over the elements; a resumed run keeps its own
    else:
        soap = {k: SOAP_DEFAULTS[k] if v is None else v
                for k, v in (("r_cut", args.r_cut), ("n_max", args.n_max),
                             ("l_max", args.l_max))}
        descriptor = SOAP(species, **soap)
    created = not os.path.exists(out)
    ours = RUN_FILES
    existed = {n for n in ours if os.path.exists(os.path.join(out, n))}
    try:
        res = learn_on_the_fly(
            start, reference, steps=args.steps, temperature=args.temperature,
            timestep=args.timestep, ensemble=args.ensemble, friction=args.friction,
            frames=frames, descriptor=descriptor, model=template, threshold=args.threshold,
            relative_threshold=args.relative_threshold, max_new_points=args.max_new_points,
            max_reference_calls=args.max_calls, max_wall_time=args.max_time, directory=out,
            calibrate=not args.no_calibrate, seed=args.seed, n_threads=args.threads,
            log=None if args.quiet else sys.stderr)
    except BaseException:
        # a run that failed before its first checkpoint leaves nothing behind; a later one
        # leaves a consistent, resumable run directory
        if not os.path.exists(os.path.join(out, "manifest.json")):
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for n in set(ours) - existed:
                    try:
                        os.unlink(os.path.join(out, n))
                    except FileNotFoundError:
                        pass
        raise
    written = ", ".join(os.path.join(out, n) for n in ("model.kmlip", "trajectory.extxyz",
                                                        "reference.extxyz", "log"))
    print(f"{res.steps} steps, {res.n_reference_calls} reference calls, "
          f"{res.model.fitted_state_.n_sparse} sparse points, "  # all terms of a sum
          f"{res.cpu_seconds:.1f} CPU s ({res.stopped}); wrote {written}")
    return 0
