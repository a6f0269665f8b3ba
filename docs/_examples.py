"""Runs ``examples/*.py`` at documentation build time and writes their output for the docs.

Each example runs in a scratch directory with the Python that builds the docs; its output
(stdout and stderr, as a user sees them) goes to ``docs/_generated/examples/<name>.txt`` and the
page to ``docs/_generated/examples.rst``. Outputs are reused while the example and the package
sources are unchanged (the key is a hash of both), so the html and doctest builds of one CI run
execute each example once. An example that fails fails the build.
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import time

#: Seconds an example may take before the build gives up on it.
TIMEOUT = 600
#: Smaller settings for examples whose default run takes more than about half a minute (the
#: page shows the command line used).
SMALL_SETTINGS = {"learn_xtb": ["--steps", "400"]}


def _sources_hash(root: str, example: str) -> str:
    h = hashlib.sha256()
    files = [example] + sorted(
        f for pattern in ("kmlip/**/*.py", "kmlip/**/*.pyx", "kmlip/**/*.h")
        for f in glob.glob(os.path.join(root, pattern), recursive=True))
    for f in files:
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _title(path: str) -> tuple[str, str]:
    """First docstring line and the rest of the module docstring of an example."""
    import ast

    with open(path, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    first, _, rest = doc.partition("\n")
    return first.strip().rstrip("."), rest.strip()


def run_examples(root: str, directory: str, warn) -> list[str]:
    """Runs every example (or reuses its output) and writes ``examples.rst``."""
    out_dir = os.path.join(directory, "examples")
    os.makedirs(out_dir, exist_ok=True)
    names = []
    sections = []
    for path in sorted(glob.glob(os.path.join(root, "examples", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        names.append(name)
        args = SMALL_SETTINGS.get(name, [])
        key = _sources_hash(root, path) + " ".join(args)
        txt = os.path.join(out_dir, f"{name}.txt")
        stamp = os.path.join(out_dir, f"{name}.key")
        cached = os.path.exists(txt) and os.path.exists(stamp) \
            and open(stamp, encoding="utf-8").read() == key
        if not cached:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    proc = subprocess.run([sys.executable, path, *args], cwd=scratch,
                                          timeout=TIMEOUT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
                    output, status = proc.stdout, proc.returncode
                except subprocess.TimeoutExpired as exc:
                    output, status = (exc.stdout or b"").decode(errors="replace"), "timeout"
            seconds = time.perf_counter() - t0
            if status != 0:
                warn(f"example {name}.py failed ({status}):\n{output[-2000:]}")
            with open(txt, "w", encoding="utf-8") as fh:
                fh.write(output.replace(root + os.sep, ""))
            with open(os.path.join(out_dir, f"{name}.seconds"), "w") as fh:
                fh.write(f"{seconds:.0f}")
            if status == 0:
                with open(stamp, "w", encoding="utf-8") as fh:
                    fh.write(key)
        seconds_file = os.path.join(out_dir, f"{name}.seconds")
        seconds = open(seconds_file).read() if os.path.exists(seconds_file) else "?"
        title, rest = _title(path)
        heading = f"``{name}.py``: {title}"
        command = " ".join(["python", f"examples/{name}.py", *args])
        smaller = ", with smaller settings than its defaults" if args else ""
        sections += [heading, "-" * len(heading), "", rest, "",
                     f"Run: ``{command}`` (here {seconds} s wall{smaller}).", "",
                     f".. literalinclude:: /../examples/{name}.py",
                     "   :language: python", "   :caption: source", "",
                     f".. literalinclude:: /_generated/examples/{name}.txt",
                     "   :language: text", "   :caption: output of this build", ""]
    text = "\n".join(sections)
    page = os.path.join(directory, "examples.rst")
    if not os.path.exists(page) or open(page, encoding="utf-8").read() != text:
        with open(page, "w", encoding="utf-8") as fh:
            fh.write(text)
    return names
