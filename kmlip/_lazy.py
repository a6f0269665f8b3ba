"""Package attributes imported on first use (PEP 562), for ``kmlip`` and ``kmlip.lammps``."""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_attributes(package: str, table: Mapping[str, str],
                    extra: tuple[str, ...] = ()) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: each name of ``table`` is imported
    from its module on first access and then kept in the package's namespace; ``extra`` names
    (defined in the package itself) are listed too."""
    names = sorted(table) + list(extra)

    def __getattr__(name: str):
        if name in table:
            value = getattr(import_module(table[name]), name)
            vars(sys.modules[package])[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return names

    return __getattr__, __dir__, names
