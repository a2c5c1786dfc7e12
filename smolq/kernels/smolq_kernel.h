/* The smolq C kernel: blocks of numbers, never files.
 *
 * Type ids are today's enum ggml_type (GGUF ids; Q4_2=4, Q4_3=5 for the
 * removed 2023 types). `layout` is 1, 2 or 3 for the ggjt-era block layouts
 * of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (formats.md 5.2); 3 is also GGUF and the only
 * layout of every other type.
 *
 * `impl` picks the scalar reference path (0) or the fast path (1); tests hold
 * them byte-equal. `nthreads` <= 0 means all cores. Rows are split between
 * threads; every row is computed the same way whatever the split, so the
 * output does not depend on the thread count.
 *
 * Return values: >= 0 bytes (or elements) produced; < 0 an error code below.
 */
#ifndef SMOLQ_KERNEL_H
#define SMOLQ_KERNEL_H

#include <stdint.h>
#include <stddef.h>

#define SMOLQ_ERR_TYPE    (-1)   /* type/layout not supported for this operation */
#define SMOLQ_ERR_ROWLEN  (-2)   /* n_per_row not a multiple of the block size */
#define SMOLQ_ERR_ARG     (-3)   /* bad argument (NULL, negative size, bits) */

/* One row: n elements, a multiple of the type's block size. imatrix is NULL
 * or n importance weights (llama.cpp's quant_weights). */
typedef void (*smolq_quantize_row_fn)(const float *x, void *y, int64_t n, const float *imatrix);
typedef void (*smolq_dequantize_row_fn)(const void *x, float *y, int64_t n);

/* ---- whole-tensor entry points (kernel.c) ---- */
int64_t smolq_quantize(int type, int layout, const float *src, void *dst,
                       int64_t nrows, int64_t n_per_row, const float *imatrix,
                       int nthreads, int impl);
int64_t smolq_dequantize(int type, int layout, const void *src, float *dst,
                         int64_t nrows, int64_t n_per_row, int nthreads, int impl);
/* Bytes per row, or < 0. */
int64_t smolq_row_size(int type, int layout, int64_t n_per_row);

/* ---- K-quants (quants_k.c), bit-exact with llama.cpp's ggml-quants.c ----
 * imatrix == NULL: quantize_row_qX_K_ref; otherwise llama.cpp's
 * quantize_qX_K path with quant_weights. */
void smolq_quantize_row_q2_K(const float *x, void *y, int64_t n, const float *imatrix);
void smolq_quantize_row_q3_K(const float *x, void *y, int64_t n, const float *imatrix);
void smolq_quantize_row_q4_K(const float *x, void *y, int64_t n, const float *imatrix);
void smolq_quantize_row_q5_K(const float *x, void *y, int64_t n, const float *imatrix);
void smolq_quantize_row_q6_K(const float *x, void *y, int64_t n, const float *imatrix);
void smolq_dequantize_row_q2_K(const void *x, float *y, int64_t n);
void smolq_dequantize_row_q3_K(const void *x, float *y, int64_t n);
void smolq_dequantize_row_q4_K(const void *x, float *y, int64_t n);
void smolq_dequantize_row_q5_K(const void *x, float *y, int64_t n);
void smolq_dequantize_row_q6_K(const void *x, float *y, int64_t n);
/* Optional faster variants; quants_k.c returns NULL where it has none. */
smolq_quantize_row_fn smolq_kquant_fast_quantize(int type);
smolq_dequantize_row_fn smolq_kquant_fast_dequantize(int type);

#endif
