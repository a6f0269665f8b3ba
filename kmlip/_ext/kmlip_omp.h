/* OpenMP shim: the kernels call these names whether or not the compiler has OpenMP.
 *
 * Prefixed wrappers rather than fallback definitions of omp_get_max_threads() & co., so that a
 * C++ caller that links an OpenMP runtime of its own never sees two definitions of the OpenMP
 * names. Thread counts and numbers are int64_t like every other count in the kmlip headers.
 */
#ifndef KMLIP_OMP_H
#define KMLIP_OMP_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if compiled with OpenMP, else 0. */
static inline int64_t kmlip_compiled_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Threads a parallel region would use now (omp_get_max_threads(); 1 without OpenMP). */
static inline int64_t kmlip_omp_get_max_threads(void)
{
#ifdef _OPENMP
    return (int64_t)omp_get_max_threads();
#else
    return 1;
#endif
}

/* Number of the calling thread in its team (omp_get_thread_num(); 0 without OpenMP). */
static inline int64_t kmlip_omp_get_thread_num(void)
{
#ifdef _OPENMP
    return (int64_t)omp_get_thread_num();
#else
    return 0;
#endif
}

#ifdef __cplusplus
}
#endif

#endif /* KMLIP_OMP_H */
