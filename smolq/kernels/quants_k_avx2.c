/* The K-quant scale searches of quants_k_fast.h, eight sub-blocks side by
 * side: the same per-lane IEEE operations as its four-lane baseline build, so
 * the same bytes, in AVX2 registers. This file alone is compiled for AVX2
 * (the pragma below; setup.py's flags stay portable), and quants_k.c calls
 * into it only on a CPU that has AVX2. Elsewhere it is empty. */
#include "kernel_internal.h"

#if SMOLQ_KQ_AVX2
#pragma GCC target("avx2")
#define KQ_LANES 8
#include "quants_common.h"
#include "quants_k_fast.h"

void smolq_kq_qkx_batch_avx2(int nsub, int n, int nmax, const float *x, const float *weights, uint8_t *L,
                             float *scales, float *mins, float rmin, float rdelta, int nstep, int use_mad) {
    qkx_batch_fast(nsub, n, nmax, x, weights, L, scales, mins, rmin, rdelta, nstep, use_mad);
}

void smolq_kq_qx_batch_avx2(int nsub, int n, int nmax, const float *x, int8_t *L, const float *qw, float *scales) {
    qx_batch_fast(nsub, n, nmax, x, L, qw, scales);
}
#endif
