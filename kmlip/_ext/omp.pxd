from libc.stdint cimport int64_t

cdef extern from "kmlip_omp.h" nogil:
    int64_t kmlip_compiled_openmp()
    int64_t kmlip_omp_get_max_threads()
    int64_t kmlip_omp_get_thread_num()
    # The former Cython names, kept as aliases of the prefixed C functions so that modules not
    # yet renamed still build (the C header no longer defines omp_* fallbacks).
    int64_t omp_get_max_threads "kmlip_omp_get_max_threads"()
    int64_t omp_get_thread_num "kmlip_omp_get_thread_num"()
