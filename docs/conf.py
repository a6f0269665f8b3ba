"""Sphinx configuration of the kmlip documentation.

Build: ``pip install ".[docs]" && sphinx-build -W -b html docs docs/_build/html``;
the code blocks run with ``sphinx-build -b doctest docs docs/_build/doctest``.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

import kmlip

# The command-line reference shows the real ``--help`` text of every subcommand; it is written
# here at build time so that it cannot drift from the parser.
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))
from _api_pages import MANUAL, reexports, write_api_pages  # noqa: E402
from _cli_help import write_cli_help  # noqa: E402
from _examples import run_examples  # noqa: E402
from _shell import SETUP as _SHELL_SETUP  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
write_cli_help(os.path.join(_HERE, "_generated"))
PUBLIC_MODULES = write_api_pages(os.path.join(_HERE, "api", "generated"))

project = "kmlip"
author = "kmlip developers"
copyright = "2026, kmlip developers"
release = kmlip.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "_shell",
]

exclude_patterns = ["_build", "_generated", "api/generated/toc.rst"]
html_theme = "furo"
html_title = f"kmlip {release}"
html_static_path: list[str] = []

# NumPy-style docstrings (the project's convention) through napoleon.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autosummary_generate = False
# Type fields such as "ndarray, shape (n_atoms, 3)" turn every word into a cross-reference, and
# names like n_atoms are attributes of several classes: the ambiguity is harmless (the text is
# rendered either way), so these "more than one target" warnings are not errors.
suppress_warnings = ["ref.python"]

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "ase": ("https://wiki.fysik.dtu.dk/ase", None),
}
# Offline builds (CI without network) must not fail on the inventories: intersphinx only
# warns when one cannot be fetched, so it is enabled only when asked for.
if not os.environ.get("KMLIP_DOCS_INTERSPHINX"):
    extensions.remove("sphinx.ext.intersphinx")
    intersphinx_mapping = {}

# Doctests run from a scratch directory so that saved files never land in the checkout.
# Docstring examples assume the top-level names are imported, as a user would.
doctest_global_setup = """
import os, tempfile, warnings
import numpy as np
from kmlip import ACSF, SOAP, Ewald, KernelPotential, KMLIPCalculator, load, neighbor_list
_kmlip_docs_cwd = os.getcwd()
_kmlip_docs_tmp = tempfile.TemporaryDirectory()
os.chdir(_kmlip_docs_tmp.name)
np.set_printoptions(precision=4, suppress=True)
""" + _SHELL_SETUP
doctest_global_cleanup = """
os.chdir(_kmlip_docs_cwd)
_kmlip_docs_tmp.cleanup()
"""

def _public_names(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == modname]
    return list(names)


def _check_api_coverage(app, env) -> None:
    """Warns for every public name that no page of the API reference documents."""
    from sphinx.util import logging

    logger = logging.getLogger("kmlip.api")
    documented = set(env.get_domain("py").objects)
    documented |= {f"{m}" for m in env.get_domain("py").modules}
    for modname in PUBLIC_MODULES + list(MANUAL):
        mod = importlib.import_module(modname)
        for name in _public_names(modname):
            obj = getattr(mod, name)
            candidates = {f"{modname}.{name}"}
            home = getattr(obj, "__module__", None)
            if home and hasattr(obj, "__qualname__"):
                candidates.add(f"{home}.{obj.__qualname__}")
            if name == "__version__":
                candidates = {"kmlip.__version__"}
            if name in reexports(modname):  # listed on the package's page, linked to home
                candidates = {reexports(modname)[name][1]}
            if not candidates & documented:
                logger.warning("API reference: public name %s.%s is not documented",
                               modname, name)


def _skip_member(app, what, name, obj, skip, options):
    # scikit-learn generates set_*_request methods on every estimator subclass (metadata
    # routing); their docstrings point into scikit-learn's own docs
    if re.fullmatch(r"set_\w+_request", name):
        return True
    return None


def _run_examples(app, config) -> None:
    from sphinx.util import logging

    logger = logging.getLogger("kmlip.examples")
    run_examples(os.path.dirname(_HERE), os.path.join(_HERE, "_generated"), logger.warning)


def setup(app):
    app.connect("config-inited", _run_examples)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("env-check-consistency", _check_api_coverage)
