"""``kmlip info``: prints what a model file holds."""
from __future__ import annotations

import argparse

from kmlip.cli._files import load_model

DESCRIPTION = ("Describe a saved model file: its parameters, descriptor(s), per-species e0 (eV), "
               "fitted hyperparameters, sparse points per kernel term and key, and labels. A file "
               "that cannot be loaded gives a one-line error.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit', 'kmlip learn' or "
                                 "KernelPotential.save")


def _short(value):
    """``value`` with every array replaced by its shape (a model's given sparse points, e.g.
    those 'kmlip learn' picked, would print thousands of numbers)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return f"<array {'x'.join(map(str, value.shape))}>"
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_short(v) for v in value)
    return value


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    print(f"model: {args.model}")
    for k, v in model.get_params(deep=False).items():
        if k != "descriptor":
            print(f"  {k}: {_short(v)!r}")
    print(f"  descriptor: {model.descriptor!r}")
    st = getattr(model, "fitted_state_", None)
    if st is None:
        return 0
    print("fitted:")
    print(f"  species_: {list(st.species)!r}")
    print(f"  e0_: {dict(st.e0)!r}")
    for k, v in model.hyperparameters_.items():
        print(f"  {k}: {v!r}")
    # per term of a sum of kernels (a single-term model: one line), by kernel key
    for t, term in enumerate(st.kernel.terms):
        counts = {term.descriptor.key_name(k): int(len(term.basis.points[k]))
                  for k in term.basis.species_z}
        where = "" if st.single else f" (term {t}, {type(term.descriptor).__name__})"
        print(f"  sparse points{where}: {counts!r}")
    print(f"  sparse points in all: {st.n_sparse}")
    print(f"  n_labels_: {dict(st.n_labels)!r}")
    print(f"  calibrated uncertainty: {'yes' if st.calibration is not None else 'no'}")
    return 0
