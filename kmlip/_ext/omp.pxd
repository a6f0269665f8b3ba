from libc.stdint cimport int64_t

cdef extern from "kmlip_omp.h" nogil:
    int64_t kmlip_compiled_openmp()
    int64_t kmlip_omp_get_max_threads()
    int64_t kmlip_omp_get_thread_num()
    # Former Cython name, an alias of the prefixed C function while ewald.pyx still uses it (the
    # C header no longer defines an omp_get_thread_num fallback).
    int64_t omp_get_thread_num "kmlip_omp_get_thread_num"()
