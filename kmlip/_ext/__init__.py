"""Compiled kernels (Cython over plain-C cores)."""
import os

# Idle OpenMP threads sleep instead of spinning, unless the user chose a policy: libgomp reads
# the variable once, when the first extension below loads (see kmlip._threads for the figures).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
