/* OpenMP shim: the kernels call these names whether or not the compiler has OpenMP. */
#ifndef KMLIP_OMP_H
#define KMLIP_OMP_H
#ifdef _OPENMP
#include <omp.h>
static inline int kmlip_compiled_openmp(void) { return 1; }
#else
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int kmlip_compiled_openmp(void) { return 0; }
#endif
#endif
