/* The 2-bit and 1-bit i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M
 * (quants_iq12.c), bit-exact with llama.cpp's ggml-quants.c. Not part of the
 * public C API: kernel.c dispatches to them through smolq_find_iq12_ops. */
#ifndef SMOLQ_QUANTS_IQ12_H
#define SMOLQ_QUANTS_IQ12_H

#include "kernel_internal.h"

/* The dispatch entry of one of the five types, or NULL. */
const smolq_type_ops *smolq_find_iq12_ops(int type);

/* One row of n elements (a multiple of 256); imatrix: n importance weights,
 * or NULL where llama.cpp has a fallback (IQ2_S, IQ1_M). Returns 0, or
 * SMOLQ_ERR_IMATRIX (IQ2_XXS, IQ2_XS, IQ1_S without weights),
 * SMOLQ_ERR_RANGE where llama.cpp would abort (a search that overflowed and
 * found no grid point), SMOLQ_ERR_ARG if the search tables could not be
 * allocated. */
int smolq_quantize_row_iq2_xxs(const float *x, void *y, int64_t n, const float *imatrix);
int smolq_quantize_row_iq2_xs(const float *x, void *y, int64_t n, const float *imatrix);
int smolq_quantize_row_iq2_s(const float *x, void *y, int64_t n, const float *imatrix);
int smolq_quantize_row_iq1_s(const float *x, void *y, int64_t n, const float *imatrix);
int smolq_quantize_row_iq1_m(const float *x, void *y, int64_t n, const float *imatrix);

void smolq_dequantize_row_iq2_xxs(const void *x, float *y, int64_t n);
void smolq_dequantize_row_iq2_xs(const void *x, float *y, int64_t n);
void smolq_dequantize_row_iq2_s(const void *x, float *y, int64_t n);
void smolq_dequantize_row_iq1_s(const void *x, float *y, int64_t n);
void smolq_dequantize_row_iq1_m(const void *x, float *y, int64_t n);

#endif
