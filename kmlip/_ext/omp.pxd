cdef extern from "kmlip_omp.h" nogil:
    int omp_get_max_threads()
    int omp_get_thread_num()
    int kmlip_compiled_openmp()
