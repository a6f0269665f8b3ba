"""Thread-count helpers shared by every kernel."""
from kmlip._ext.omp cimport kmlip_compiled_openmp, kmlip_omp_get_max_threads


def max_threads() -> int:
    """Threads an OpenMP region would use now (follows OMP_NUM_THREADS; 1 without OpenMP)."""
    return kmlip_omp_get_max_threads()


def have_openmp() -> bool:
    """True when the extensions were compiled with OpenMP."""
    return bool(kmlip_compiled_openmp())
