"""Build script: compiles every ``kmlip/_ext/*.pyx`` with OpenMP where the compiler has it.

Set ``KMLIP_BUILD_ONLY=name1,name2`` to compile a subset (development only).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _openmp_flags():
    """Returns (compile, link) flags for OpenMP, or ([], []) with a warning if unsupported."""
    if os.environ.get("KMLIP_NO_OPENMP"):
        return [], []
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        cc = "gcc"
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as fh:
            fh.write(src)
        try:
            ok = subprocess.run([cc, "-fopenmp", path, "-o", os.path.join(tmp, "t")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        warnings.warn("kmlip: the C compiler has no OpenMP; building serial kernels", stacklevel=1)
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


omp_c, omp_l = _openmp_flags()
only = {s for s in os.environ.get("KMLIP_BUILD_ONLY", "").split(",") if s}
extra_c = ["-O3", "-ffp-contract=fast"] + omp_c
# KMLIP_MARCH=-march=native (say) tunes the kernels for the build machine; the default is
# portable code, which measured as fast as AVX2/AVX-512 builds on these small loops.
if os.environ.get("KMLIP_MARCH") and sys.platform != "win32":
    extra_c.append(os.environ["KMLIP_MARCH"])
if sys.platform == "win32":
    extra_c = ["/O2", "/openmp"] if omp_c else ["/O2"]
    omp_l = []

extensions = []
for pyx in sorted(glob.glob(os.path.join("kmlip", "_ext", "*.pyx"))):
    name = os.path.splitext(os.path.basename(pyx))[0]
    if only and name not in only:
        continue
    extensions.append(Extension(
        f"kmlip._ext.{name}", [pyx],
        include_dirs=[np.get_include(), os.path.join("kmlip", "_ext")],
        extra_compile_args=extra_c, extra_link_args=omp_l,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ))

setup(ext_modules=cythonize(
    extensions, language_level=3,
    compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                         "initializedcheck": False},
))
