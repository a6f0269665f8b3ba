"""``kmlip fit``: fits a SOAP + sparse-GP potential to labelled structures."""
from __future__ import annotations

import argparse
import contextlib
import math
import time

from kmlip._validate import check_structure
from kmlip.cli._files import check_output, check_readable, read_structures
from kmlip.cli._options import add_soap_options

DESCRIPTION = (
    "Fit a SOAP + sparse Gaussian-process potential to the energies, forces and (optionally) "
    "stresses of labelled structures, print the training errors and save the model. "
    "Units: eV, Å, eV/Å, eV/Å³.")


def noise_level(text: str) -> float | None:
    """A ``--sigma-*`` value: a positive number, or ``none`` (that label class is not fitted).

    Raises
    ------
    argparse.ArgumentTypeError
        Anything else (argparse prints it as a one-line usage error, exit status 2).
    """
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") \
            from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


#: SOAP settings of the default model (options of the "SOAP descriptor" group).
SOAP_DEFAULTS = {"r_cut": 5.0, "n_max": 8, "l_max": 6, "sigma": 0.5}
#: Options that set the default SOAP only: refused with ``--model`` (whose terms set the
#: descriptors), rather than dropped without a word.
SOAP_OPTIONS = {"--species": "species", "--r-cut": "r_cut", "--n-max": "n_max",
                "--l-max": "l_max", "--sigma": "sigma"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", help="labelled training structures: any file ASE can read that "
                                 "holds energies and forces (e.g. extxyz), all frames are used")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="model file to write (exactly this path; written atomically, an "
                        "existing file is replaced only on success)")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="ASE format name of the training file, e.g. extxyz "
                        "(default: guessed from the file name and content)")
    p.add_argument("--model", default=None, metavar="SPEC.json",
                   help="a JSON model spec instead of the SOAP options below, e.g. a sum of "
                        "kernels: {\"terms\": [{\"descriptor\": {\"type\": \"Distance2b\", "
                        "\"params\": {\"species\": [\"Cu\"], \"r_cut\": 5.0}}, \"delta\": 0.5, "
                        "\"n_sparse\": 20, \"sparse_method\": \"uniform\"}, {\"descriptor\": "
                        "{\"type\": \"SOAP\", \"params\": {...}}, \"delta\": 0.2, \"zeta\": 4}]}; "
                        "per-term keys: descriptor, delta, zeta, n_sparse, sparse_method "
                        "(the sparse-GP options below fill what a term leaves out); an "
                        "optional top-level \"e0\": {\"Cu\": -0.1, ...} fixes the "
                        "isolated-atom energies in eV (default: one SOAP term from the options "
                        "below, e0 fitted by least squares)")
    g = p.add_argument_group("SOAP descriptor (not with --model)")
    g.add_argument("--species", nargs="+", default=None, metavar="SYMBOL",
                   help="chemical symbols the potential accepts "
                        "(default: those in the training file)")
    add_soap_options(g, SOAP_DEFAULTS)
    g = p.add_argument_group("sparse GP")
    g.add_argument("--zeta", type=int, default=4,
                   help="kernel exponent: k = delta² (p·q)^zeta (default: %(default)s)")
    g.add_argument("--delta", type=float, default=0.2,
                   help="kernel scale delta in eV, the prior std of a local energy "
                        "(default: %(default)s)")
    g.add_argument("--n-sparse", type=int, default=1000, metavar="M",
                   help="sparse points per species (default: %(default)s; capped at the "
                        "number of atomic environments)")
    g.add_argument("--sparse-method", default="cur",
                   choices=["cur", "fps", "random", "uniform"],
                   help="how sparse points are chosen: CUR leverage scores, farthest-point "
                        "sampling, random or uniform (default: %(default)s)")
    g.add_argument("--sigma-energy", type=noise_level, default=0.002, metavar="EV|none",
                   help="energy noise in eV per atom, or 'none' not to fit energies "
                        "(default: %(default)s)")
    g.add_argument("--sigma-force", type=noise_level, default=0.02, metavar="EV_PER_A|none",
                   help="force noise in eV/Å per component, or 'none' not to fit forces, e.g. "
                        "for energy-only data (default: %(default)s)")
    g.add_argument("--sigma-stress", type=noise_level, default=None, metavar="EV|none",
                   help="virial noise in eV per atom; stresses are fitted only when given "
                        "(default: none, stresses not used)")
    g.add_argument("--optimize", action="store_true",
                   help="maximise the log marginal likelihood over delta and the sigmas "
                        "(default: off, use the values given)")
    g = p.add_argument_group("labels and run")
    g.add_argument("--energy-key", default="energy", metavar="KEY",
                   help="name of the energy label in the file (default: %(default)s)")
    g.add_argument("--forces-key", default="forces", metavar="KEY",
                   help="name of the forces label in the file (default: %(default)s)")
    g.add_argument("--stress-key", default="stress", metavar="KEY",
                   help="name of the stress label in the file (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads (default: OMP_NUM_THREADS or all cores)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed of the sparse-point selection (default: %(default)s)")
    g = p.add_argument_group("distributed fit (Dask; needs dask[distributed])")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="fit on the workers of a running Dask scheduler, e.g. "
                        "tcp://10.0.0.1:8786 (descriptors and kernel rows on the workers, "
                        "the solve here; default: fit in this process)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="fit on a local Dask cluster of N worker processes, 1 thread each "
                        "(default: fit in this process)")


@contextlib.contextmanager
def _dask_client(args: argparse.Namespace):
    """The Dask client of ``--scheduler`` / ``--workers`` (closed afterwards), or None."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--scheduler/--workers need Dask: pip install 'dask[distributed]'") \
            from None
    if args.scheduler is not None:
        with Client(args.scheduler) as client:
            yield client
        return
    # the scheduler always serves HTTP (health, metrics; the dashboard with bokeh): None means
    # its default port 8787, which a second cluster finds taken (a warning); a free port on
    # the loopback interface (":0" would listen on every interface) clashes with nothing
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


#: Keys of one term of a ``--model`` spec and the option that fills each when left out.
TERM_KEYS = {"descriptor": None, "delta": "delta", "zeta": "zeta", "n_sparse": "n_sparse",
             "sparse_method": "sparse_method"}
#: Top-level keys of a ``--model`` spec: the terms and, optionally, isolated-atom energies.
SPEC_KEYS = ("terms", "e0")


def read_model_spec(path: str, args: argparse.Namespace):
    """Descriptor(s) and keyword arguments of :class:`~kmlip.model.KernelPotential` of a JSON
    model spec (see ``--model``).

    Parameters
    ----------
    path : str
        The spec: ``{"terms": [{"descriptor": {"type", "params"}, "delta", "zeta",
        "n_sparse", "sparse_method"}, ...], "e0": {symbol: eV}}`` (``e0`` optional).
    args : argparse.Namespace
        ``delta``, ``zeta``, ``n_sparse`` and ``sparse_method``: the values of what a term
        leaves out (ζ is None for a descriptor whose kernel is its own, e.g. Distance2b).

    Returns
    -------
    descriptor : Descriptor or list of Descriptor
        One descriptor for a one-term spec, else the list (a sum of kernels).
    params : dict
        ``delta``, ``zeta``, ``n_sparse``, ``sparse_method`` (scalars for one term, else a
        list per term) and ``e0`` (``{symbol: eV}``) when the spec gives it.

    Raises
    ------
    ValueError
        Unreadable JSON or a malformed spec, naming the file and the cause.
    """
    import json

    from kmlip.descriptors.base import Descriptor
    from kmlip.gp.e0 import validate_e0

    check_readable(path, "model spec")  # missing, a directory, a pipe, empty: one line
    try:
        with open(path, encoding="utf-8") as fh:
            spec = json.load(fh)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the model spec ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (a JSON model spec)") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply for a model spec") from None
    terms = spec.get("terms") if isinstance(spec, dict) else None
    if not isinstance(terms, list) or not terms:
        raise ValueError(f"{path}: the model spec needs a non-empty list 'terms'")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:  # a misspelt "e0" would otherwise be dropped without a word
        raise ValueError(f"{path}: the model spec has unknown keys {unknown}; known: "
                         f"{list(SPEC_KEYS)}")
    try:
        e0 = validate_e0(spec.get("e0"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    descs, params = [], {k: [] for k in TERM_KEYS if k != "descriptor"}
    for t, term in enumerate(terms):
        if not isinstance(term, dict):
            raise ValueError(f"{path}: terms[{t}] must be an object")
        unknown = sorted(set(term) - set(TERM_KEYS))
        if unknown:
            raise ValueError(f"{path}: terms[{t}] has unknown keys {unknown}; known: "
                             f"{sorted(TERM_KEYS)}")
        try:
            descs.append(Descriptor.from_dict(term.get("descriptor")))
        except ValueError as exc:
            raise ValueError(f"{path}: terms[{t}]: {exc}") from None
        for k, opt in TERM_KEYS.items():
            if opt is not None:
                default = None if (k == "zeta" and not descs[-1].uses_zeta) \
                    else getattr(args, opt)
                params[k].append(term.get(k, default))
    extra = {} if e0 is None else {"e0": e0}
    if len(descs) == 1:
        return descs[0], {**{k: v[0] for k, v in params.items()}, **extra}
    return descs, {**params, **extra}


def run(args: argparse.Namespace) -> int:
    from kmlip import SOAP, KernelPotential

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.model is not None:
        given = [opt for opt, dest in SOAP_OPTIONS.items() if getattr(args, dest) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} and --model cannot be combined (the options "
                             "set the default SOAP; the spec's terms set the descriptors)")
    check_output(args.output, {"training file": args.train,  # fail now, not after the fit
                               **({"model spec": args.model} if args.model else {})})
    frames = read_structures(args.train, format=args.format)
    for k, a in enumerate(frames):  # name the file and frame of a bad structure, before any work
        check_structure(a, f"{args.train}: frame {k}")
    species = args.species
    if species is None:
        species = sorted({s for a in frames for s in a.get_chemical_symbols()})
        if "X" in species:
            raise ValueError(f"{args.train}: holds dummy atoms 'X' (Z = 0), which no potential "
                             "can describe")
    if args.model is not None:
        descriptor, per_term = read_model_spec(args.model, args)
    else:
        soap = {k: SOAP_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                for k in SOAP_DEFAULTS}
        descriptor = SOAP(species=species, **soap)
        per_term = {"zeta": args.zeta, "delta": args.delta, "n_sparse": args.n_sparse,
                    "sparse_method": args.sparse_method}
    model = KernelPotential(descriptor=descriptor, **per_term,
                            sigma_energy=args.sigma_energy, sigma_force=args.sigma_force,
                            sigma_stress=args.sigma_stress, energy_key=args.energy_key,
                            forces_key=args.forces_key, stress_key=args.stress_key,
                            n_threads=args.threads, random_state=args.seed,
                            progress=None)  # a bar on a terminal only, not in logs
    t0 = time.perf_counter()
    try:
        with _dask_client(args) as client:
            model.fit(frames, optimize=args.optimize, client=client)
    except ValueError as exc:
        if str(exc).startswith("frame "):  # a defect of the file: say which file
            raise ValueError(f"{args.train}: {exc}") from None
        raise
    print(f"fitted {len(frames)} structures in {time.perf_counter() - t0:.1f} s")
    if args.optimize:
        print(f"hyperparameters: {model.hyperparameters_}")
    err = model.evaluate(frames)
    print("training errors: " + ", ".join(f"{k} {v:.4g}" for k, v in err.items()))
    model.save(args.output)
    print(f"wrote {args.output}")
    return 0
