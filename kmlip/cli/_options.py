"""Command-line options shared by several subcommands."""
from __future__ import annotations


def add_soap_options(group, defaults: dict) -> None:
    """The SOAP size options ``--r-cut``, ``--n-max``, ``--l-max`` (and ``--sigma`` when
    ``defaults`` has it) of ``kmlip fit`` and ``kmlip learn``; None when not given, so that a
    command can tell "not given" from the default it states."""
    group.add_argument("--r-cut", type=float, default=None,
                       help=f"cutoff radius in Å, >= 1 (default: {defaults['r_cut']})")
    group.add_argument("--n-max", type=int, default=None, metavar="N",
                       help=f"radial basis functions, 1..20 (default: {defaults['n_max']})")
    group.add_argument("--l-max", type=int, default=None, metavar="L",
                       help=f"maximum angular momentum, 0..20 (default: {defaults['l_max']})")
    if "sigma" in defaults:
        group.add_argument("--sigma", type=float, default=None,
                           help=f"Gaussian atom width in Å (default: {defaults['sigma']})")
