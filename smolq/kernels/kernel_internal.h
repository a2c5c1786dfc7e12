/* Internal interface between kernel.c (dispatch, threads, tensors) and
 * the row kernels (quants.c, quants_k.c, quants_iq.c). Not part of the public C API. */
#ifndef SMOLQ_KERNEL_INTERNAL_H
#define SMOLQ_KERNEL_INTERNAL_H

#include "smolq_kernel.h"

/* A row quantizer that can refuse its row where llama.cpp would abort:
 * returns 0, or an SMOLQ_ERR_* code (the row's bytes are then undefined). */
typedef int (*smolq_quantize_row_checked_fn)(const float *x, void *y, int64_t n, const float *imatrix);

/* Row kernels of one (type, layout): [0] the scalar reference, [1] the fast
 * path (may be the same function). A type has quant or checked (the i-quants),
 * or neither if it is read-only. */
typedef struct {
    int type;
    int layout;                 /* 1, 2, 3; 0 = the same bytes in every layout */
    int block;                  /* elements per block */
    int bytes;                  /* bytes per block */
    smolq_quantize_row_fn quant[2];
    smolq_dequantize_row_fn dequant[2];
    int needs_imatrix;          /* llama.cpp refuses to quantize it without quant_weights */
    smolq_quantize_row_checked_fn checked[2];
} smolq_type_ops;

/* The ops of a non-K (type, layout) (quants.c) or NULL. */
const smolq_type_ops *smolq_find_nonk_ops(int type, int layout);

/* The ops of IQ4_NL, IQ4_XS, MXFP4, IQ3_XXS, IQ3_S (quants_iq.c) or NULL;
 * one layout, so `layout` is not looked at. */
const smolq_type_ops *smolq_find_iq_ops(int type, int layout);

/* Relayout of the 32-element ggjt-era block types (quants.c). */
int64_t smolq_relayout_blocks(int type, int src_layout, int dst_layout,
                              const void *src, void *dst, int64_t nblocks, int *lossless_out);

/* Blocks [b0, b1) of a bitsandbytes 4-bit tensor (quants_bnb.c). */
int64_t smolq_bnb4_quantize_blocks(int quant_type, const float *x, uint8_t *packed, float *absmax, int64_t n,
                                   int64_t blocksize, int64_t b0, int64_t b1, int impl);
void smolq_bnb4_dequantize_blocks(int quant_type, const uint8_t *packed, const float *absmax, float *y, int64_t n,
                                  int64_t blocksize, int64_t b0, int64_t b1);

/* Whether the hand-written AVX2 paths may run (kernel.c; SMOLQ_NO_AVX2 turns them off). */
int smolq_use_avx2(void);

/* The K-quant scale searches eight lanes wide (quants_k_avx2.c, compiled for
 * AVX2 with GCC on x86-64); quants_k.c calls them only where the CPU has AVX2. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SMOLQ_KQ_AVX2 1
void smolq_kq_qkx_batch_avx2(int nsub, int n, int nmax, const float *x, const float *weights, uint8_t *L,
                             float *scales, float *mins, float rmin, float rdelta, int nstep, int use_mad);
void smolq_kq_qx_batch_avx2(int nsub, int n, int nmax, const float *x, int8_t *L, const float *qw, float *scales);
#else
#define SMOLQ_KQ_AVX2 0
#endif

enum {
    SMOLQ_T_F32 = 0, SMOLQ_T_F16 = 1, SMOLQ_T_Q4_0 = 2, SMOLQ_T_Q4_1 = 3,
    SMOLQ_T_Q4_2 = 4, SMOLQ_T_Q4_3 = 5, SMOLQ_T_Q5_0 = 6, SMOLQ_T_Q5_1 = 7,
    SMOLQ_T_Q8_0 = 8, SMOLQ_T_Q2_K = 10, SMOLQ_T_Q3_K = 11, SMOLQ_T_Q4_K = 12,
    SMOLQ_T_Q5_K = 13, SMOLQ_T_Q6_K = 14, SMOLQ_T_BF16 = 30,
    SMOLQ_T_TQ1_0 = 34, SMOLQ_T_TQ2_0 = 35,
    SMOLQ_T_IQ2_XXS = 16, SMOLQ_T_IQ2_XS = 17, SMOLQ_T_IQ3_XXS = 18, SMOLQ_T_IQ1_S = 19, SMOLQ_T_IQ4_NL = 20,
    SMOLQ_T_IQ3_S = 21, SMOLQ_T_IQ2_S = 22, SMOLQ_T_IQ4_XS = 23, SMOLQ_T_IQ1_M = 29, SMOLQ_T_MXFP4 = 39
};

#endif
