"""Writes one API page per public module of kmlip, found by walking the package.

Run by ``docs/conf.py`` at build time into ``docs/api/generated/`` (not in git): a module added to
the package gets its page without anyone editing the docs, and the build's coverage check
(``conf.py``) then fails if one of its public names lacks documentation.
"""
from __future__ import annotations

import os
import pkgutil

#: Sections of the API reference, by module-name prefix (first match wins).
SECTIONS = [
    ("Descriptors", ("kmlip.descriptors", "kmlip.neighbors")),
    ("Uncertainty and active learning", ("kmlip.uncertainty", "kmlip.active")),
    ("Baselines", ("kmlip.ewald",)),
    ("Sparse GP building blocks", ("kmlip.gp",)),
    ("LAMMPS", ("kmlip.lammps",)),
    ("Command line", ("kmlip.cli",)),
    ("Model, prediction and files", ("kmlip",)),
]
#: Names documented by hand on the API index page (``docs/api/index.rst``).
MANUAL = ("kmlip",)


def public_modules() -> list[str]:
    """Every non-private module and package of kmlip, except the per-subcommand modules of the
    CLI (the command-line page shows their options)."""
    import kmlip

    names = []
    for info in pkgutil.walk_packages(kmlip.__path__, "kmlip."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        if info.name.startswith("kmlip.cli.") and info.name != "kmlip.cli.main":
            continue
        if info.name == "kmlip.cli":
            continue
        names.append(info.name)
    return sorted(names)


def reexports(modname: str) -> dict[str, tuple[str, str]]:
    """``{name: (role, canonical name)}`` when ``modname`` is a package whose ``__all__`` only
    holds classes and functions defined in other modules; else ``{}``."""
    import importlib
    import inspect

    mod = importlib.import_module(modname)
    if not hasattr(mod, "__path__") or not getattr(mod, "__all__", None):
        return {}
    out = {}
    for name in mod.__all__:
        obj = getattr(mod, name)
        home = getattr(obj, "__module__", None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or home in (None, modname):
            return {}
        role = "class" if inspect.isclass(obj) else "func"
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            role = "exc"
        out[name] = (role, f"{home}.{obj.__qualname__}")
    return out


def _undocumented_data(modname: str) -> list[str]:
    """Public constants without a ``#:`` comment, which automodule leaves out."""
    import importlib
    import inspect

    from sphinx.pycode import ModuleAnalyzer

    mod = importlib.import_module(modname)
    try:
        attr_docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # noqa: BLE001 - no source: nothing to add
        return []
    out = []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name, None)
        if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
            continue
        if ("", name) not in attr_docs:
            out.append(name)
    return out


def section_of(modname: str) -> str:
    for title, prefixes in SECTIONS:
        if any(modname == p or modname.startswith(p + ".") for p in prefixes):
            return title
    return SECTIONS[-1][0]


def write_api_pages(directory: str) -> list[str]:
    """Writes ``<module>.rst`` per module and ``toc.rst`` (the sections' toctrees)."""
    os.makedirs(directory, exist_ok=True)
    modules = public_modules()
    wanted = {f"{m}.rst" for m in modules} | {"toc.rst"}
    for stale in set(os.listdir(directory)) - wanted:
        os.unlink(os.path.join(directory, stale))
    for m in modules:
        title = f"``{m}``"
        text = f"{title}\n{'=' * len(title)}\n\n"
        homes = reexports(m)
        if homes:
            # a package that gathers names of its modules: link to where they are documented
            text += f".. automodule:: {m}\n   :no-members:\n\n"
            text += "Names it exports, documented in their modules:\n\n"
            text += "".join(f"* :{role}:`{m}.{name} <{home}>`\n"
                            for name, (role, home) in homes.items())
        else:
            text += f".. automodule:: {m}\n"
            for name in _undocumented_data(m):
                text += f"\n.. autodata:: {m}.{name}\n"
        _write(os.path.join(directory, f"{m}.rst"), text)
    toc = []
    for title, _ in SECTIONS:
        members = [m for m in modules if section_of(m) == title]
        if members:
            toc += [title, "-" * len(title), "", ".. toctree::", "   :maxdepth: 1", ""]
            toc += [f"   generated/{m}" for m in members] + [""]
    _write(os.path.join(directory, "toc.rst"), "\n".join(toc))
    return modules


def _write(path: str, text: str) -> None:
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # unchanged pages keep their time stamp: no needless rebuilds
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
