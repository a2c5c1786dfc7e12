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
#define SMOLQ_ERR_IMATRIX (-4)   /* the type needs an importance matrix (llama.cpp asserts one) */
#define SMOLQ_ERR_RANGE   (-5)   /* values the type's search cannot handle (llama.cpp aborts on them) */
#define SMOLQ_ERR_NONFINITE (-6) /* a NaN or infinity where a quantized type cannot hold one */

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
/* Rows of (src_type, src_layout) decoded and quantized to (dst_type, dst_layout)
 * a row at a time: the bytes of smolq_dequantize then smolq_quantize, in one
 * pass. check_finite: refuse rows holding a NaN or infinity (SMOLQ_ERR_NONFINITE).
 * Returns the bytes written, or < 0. */
int64_t smolq_requantize(int src_type, int src_layout, const void *src, int dst_type, int dst_layout, void *dst,
                         int64_t nrows, int64_t n_per_row, const float *imatrix, int check_finite, int nthreads,
                         int impl);
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

/* ---- additions by the kernel (kernel.c); the declarations above are fixed ---- */

/* Bumped when a signature below changes; the binding checks it. */
int smolq_kernel_abi_version(void);

/* Re-layout nblocks blocks of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 between layouts 1, 2
 * and 3 (src and dst must not overlap). Nibble moves are exact; *lossless_out
 * (may be NULL) is 1 unless some f32 scale had no exact f16 (v1/v2 -> v3).
 * Returns the bytes written to dst, or < 0. */
int64_t smolq_relayout(int type, int src_layout, int dst_layout, const void *src, void *dst,
                       int64_t nblocks, int *lossless_out);

/* GPTQ integer packing (AutoGPTQ / GPTQModel "gptq" layout): along `axis` of
 * a row-major rows x cols array of values in [0, 2^bits), value i sits at bit
 * i*bits of a little-endian bit stream cut into int32 words (so 3-bit values
 * 10 and 21 of each 32 straddle words). axis 0 packs rows (qweight:
 * [in, out] -> [in*bits/32, out]); axis 1 packs columns (qzeros:
 * [G, out] -> [G, out*bits/32]). rows/cols are the UNPACKED shape; the packed
 * length along axis must be a whole number of words. bits: 2, 3, 4 or 8.
 * Returns the number of int32 words written, or < 0. */
int64_t smolq_gptq_pack(const int32_t *values, int32_t *packed, int64_t rows, int64_t cols, int bits, int axis);
int64_t smolq_gptq_unpack(const int32_t *packed, int32_t *values, int64_t rows, int64_t cols, int bits, int axis);

/* GPTQ's column loop over columns [start, stop) of a lazy batch of `end`
 * columns (smolq/transforms/gptq.py): row r of w (stride ldw) is rounded one
 * column k at a time with parameters p*[(k - start) * rows + r], the level goes
 * to levels[r * (stop - start) + k - start], the dequantized value to
 * q[r * ldq + k], e = (w - deq) / hinv[k, k] to err[r * ldw + k], and
 * w[r, k:end] -= e * hinv[k, k:end] (hinv row stride ldh). row_loss[r] += sum
 * e^2 / 2. Modes: INT  q = clamp(rint(w / p0) + p1, lo, hi), deq = p0 (q - p1);
 * NEAREST / FLOOR / HALF_AWAY: t = (w - p0) p1, q = clamp(rint(t) |
 * floor(t + 0.5 - lo) + lo | sign(t) floor(|t| + 0.5), lo, hi), deq = p2 q - p3.
 * Rows are split across nthreads (0: all cores). Returns 0 or < 0. */
enum { SMOLQ_GPTQ_INT = 0, SMOLQ_GPTQ_NEAREST = 1, SMOLQ_GPTQ_FLOOR = 2, SMOLQ_GPTQ_HALF_AWAY = 3 };
int smolq_gptq_columns(float *w, int64_t ldw, float *q, int64_t ldq, float *err, const float *hinv, int64_t ldh,
                       int64_t rows, int64_t start, int64_t stop, int64_t end, int mode, const float *p0,
                       const float *p1, const float *p2, const float *p3, float lo, float hi, float *levels,
                       double *row_loss, int nthreads);

/* Round-trip error of `test` against `ref` (n floats), in double precision:
 * out[0] rmse, out[1] max |ref - test|, out[2] SNR dB = 10 log10(sum ref^2 /
 * sum err^2) (+inf when err is 0), out[3] cosine similarity (1 when both are
 * all zero, 0 when one is). Summed in fixed chunks of 65536 elements combined
 * in order, so the result does not depend on nthreads. Returns 0 or < 0. */
int smolq_error_stats(const float *ref, const float *test, int64_t n, int nthreads, double out[4]);

/* 64-bit checksum of raw bytes: FNV-1a 64 of every 1 MiB chunk, then FNV-1a 64
 * over the chunk hashes (8 bytes LE each) followed by the total length (8
 * bytes LE). Independent of nthreads. */
uint64_t smolq_checksum(const void *buf, int64_t nbytes, int nthreads);

/* IQ4_NL / IQ4_XS rows exactly as smolq_quantize writes them (imatrix as
 * there), plus, per 32-element block, the float scale whose inverse picked the
 * block's levels: ggml rounds with the unrounded scale and stores only an fp16
 * of it, so a GPTQ grid that re-rounds the block needs this one. Scalar
 * reference path, one thread. Returns the bytes written, or < 0. */
int64_t smolq_iq4_rounding_scales(int type, const float *src, void *dst, float *scales, int64_t nrows,
                                  int64_t n_per_row, const float *imatrix);

/* IQ3_XXS / IQ3_S rows exactly as smolq_quantize writes them, plus how ggml
 * picked them, for a GPTQ grid that re-rounds 4-element groups: per group
 * (n/4 a row) the inverse scale and scale its levels were picked with, per
 * element the sign that makes xval = sign * x and the search weight
 * sqrt(w), per 32-element block the scale its values decode with (db) and
 * 1 where ggml skipped the block as all zero. Scalar path, one thread.
 * Returns the bytes written, or < 0. */
int64_t smolq_iq3_rounding_plan(int type, const float *src, void *dst, float *group_id, float *group_scale,
                                float *sign, float *waux, float *db, uint8_t *skipped, int64_t nrows,
                                int64_t n_per_row, const float *imatrix);
/* n 4-element groups onto the type's lattice as ggml rounds them (levels at
 * the inverse scale id, an off-lattice result snapped to the neighbour of
 * least waux-weighted error at `scale`): xval, waux [4n], id, scale [n] ->
 * the point index and its 4 published grid bytes. Returns n, or < 0. */
int64_t smolq_iq3_round_groups(int type, const float *xval, const float *waux, const float *id, const float *scale,
                               int64_t n, uint16_t *points, uint8_t *magnitudes);

/* The same for IQ2_XXS / IQ2_XS / IQ2_S and 8-element groups (group_id,
 * group_scale: n/8 a row; db, skipped: per 32-element block for IQ2_XXS,
 * per 16 for IQ2_XS / IQ2_S; skipped also marks a block whose levels no
 * single group rounding reproduces). IQ2_XXS / IQ2_XS need an imatrix. */
int64_t smolq_iq2_rounding_plan(int type, const float *src, void *dst, float *group_id, float *group_scale,
                                float *sign, float *waux, float *db, uint8_t *skipped, int64_t nrows,
                                int64_t n_per_row, const float *imatrix);
/* xval, waux [8n], id, scale [n] -> point index and its 8 grid bytes. */
int64_t smolq_iq2_round_groups(int type, const float *xval, const float *waux, const float *id, const float *scale,
                               int64_t n, uint16_t *points, uint8_t *magnitudes);

/* Number of NaN / inf values among n floats. */
int64_t smolq_count_nonfinite(const float *x, int64_t n, int nthreads);

/* bitsandbytes blockwise quantization (quants_bnb.c), byte-equal with bitsandbytes'
 * CPU path. which / quant_type: SMOLQ_BNB_NF4, SMOLQ_BNB_FP4; SMOLQ_BNB_DYNAMIC is the
 * signed 8-bit dynamic map of the nested (double-quantized) absmax. */
#define SMOLQ_BNB_NF4     0
#define SMOLQ_BNB_FP4     1
#define SMOLQ_BNB_DYNAMIC 2
/* The code table (16 or 256 floats, as bitsandbytes stores quant_map); returns its length. */
int smolq_bnb_code(int which, float *out);
/* n values -> ceil(n/2) bytes (first value in the high nibble) and ceil(n/blocksize)
 * absmax floats. blocksize: 32 ... 4096, a power of two. Returns the packed bytes. */
int64_t smolq_bnb4_quantize(int quant_type, const float *src, uint8_t *packed, float *absmax, int64_t n,
                            int64_t blocksize, int nthreads, int impl);
int64_t smolq_bnb4_dequantize(int quant_type, const uint8_t *packed, const float *absmax, float *dst, int64_t n,
                              int64_t blocksize, int nthreads);
/* 8-bit blockwise with the dynamic map (bitsandbytes' CPU quantize_blockwise). Returns n. */
int64_t smolq_bnb8_quantize(const float *src, uint8_t *q, float *absmax, int64_t n, int64_t blocksize, int impl);
int64_t smolq_bnb8_dequantize(const uint8_t *q, const float *absmax, float *dst, int64_t n, int64_t blocksize);
/* torch's float32 CPU mean of n floats (lanes 8: AVX2 builds, 16: AVX-512; threads: torch's
 * intra-op threads), the offset of double quantization. 0 or < 0. */
int smolq_bnb_mean(const float *x, int64_t n, int lanes, int threads, float *out);

#endif
