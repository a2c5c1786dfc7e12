/* The non-linear 4-bit types IQ4_NL and IQ4_XS, the microscaling MXFP4 and
 * the 3-bit lattice types IQ3_XXS and IQ3_S: quantize and dequantize, byte
 * for byte what llama.cpp's ggml-quants.c writes and reads.
 *
 * The quantizers are those of ggml_quantize_chunk (what llama-quantize runs):
 * quantize_iq4_nl, quantize_iq4_xs, quantize_mxfp4, quantize_iq3_xxs and
 * quantize_iq3_s, with their quant_weights path when an importance matrix is
 * given and their plain path (weights x^2) otherwise. MXFP4 has no weighted
 * search; llama.cpp ignores the importance matrix there, and so do we.
 * Bit-exactness: quants_common.h (same float operations in the same order,
 * no FMA contraction). Layouts: ggml-common.h's block_iq4_nl, block_iq4_xs,
 * block_mxfp4, block_iq3_xxs and block_iq3_s, little-endian.
 *
 * The lattices and value tables come from iq_tables.h (generated from
 * gguf-py's published data). What the IQ3 searches need on top, the map from
 * a point of the full 8^4 cube to its lattice point and each off-lattice
 * point's nearest lattice points (ggml's iq3xs_init_impl), is computed from
 * those lattices once, on first use. */
#include <float.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "iq_tables.h"
#include "kernel_internal.h"
#include "quants_common.h"

#define QK4_NL 32
#define QK_MXFP4 32
#define IQ4_NL_BYTES 18
#define IQ4_XS_BYTES 136
#define MXFP4_BYTES 17
#define IQ3_XXS_BYTES 98
#define IQ3_S_BYTES 110

/* ggml's llama-quantize path searches 2*7+1 scales around the max for both
 * IQ4 types, with and without an imatrix (quantize_iq4_nl/_xs pass ntry 7;
 * only the unused quantize_row_iq4_nl_ref passes -1). */
#define IQ4_NTRY 7

/* The fast paths: GCC vector extensions with 4 float lanes (one SSE/NEON
 * register: GCC lowers wider generic vectors poorly in target clones), and
 * an AVX2 clone picked at load time on x86 (VEX encoding, blends). Lanes run
 * over elements or over candidate scales; each lane does the scalar
 * reference's float operations on its own operands in the same order, so
 * tests hold them byte-equal. */
#if defined(__GNUC__)
#define IQ_HAVE_FAST 1
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define IQ_FAST_FN __attribute__((target_clones("avx2", "default")))
#else
#define IQ_FAST_FN
#endif
#define IQ_LANES 4
typedef float iq_vf __attribute__((vector_size(4 * IQ_LANES)));
typedef int32_t iq_vi __attribute__((vector_size(4 * IQ_LANES)));

/* A broadcast (-0 stays -0, unlike adding to a zero vector). */
static inline iq_vf vsplat(float f) { return (iq_vf){f, f, f, f}; }
static inline iq_vi vsplat_i(int32_t i) { return (iq_vi){i, i, i, i}; }

/* mask ? a : b, lane by lane (C has no vector ?:). */
static inline iq_vf vselect(iq_vi mask, iq_vf a, iq_vf b) {
    return (iq_vf)(((iq_vi)a & mask) | ((iq_vi)b & ~mask));
}
#else
#define IQ_HAVE_FAST 0
#endif

/* ggml's bisection best_index_int8: the entry of the sorted table val[0..n)
 * nearest to x, the upper one on a tie. */
static inline int best_index_int8(int n, const int8_t *val, float x) {
    if (x <= val[0]) return 0;
    if (x >= val[n - 1]) return n - 1;
    int ml = 0, mu = n - 1;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < val[mav]) mu = mav;
        else ml = mav;
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

/* The weights of ggml's i-quant searches: the importance weight times
 * sqrt(sigma2 + x^2) with an imatrix, else x^2. */
static inline void iq_weights(const float *x, const float *qw, float sigma2, int n, float *w) {
    if (qw) imatrix_weights(x, qw, sigma2, n, w);
    else for (int i = 0; i < n; ++i) w[i] = x[i] * x[i];
}

/* ======================================================================== */
/* IQ4_NL, IQ4_XS (ggml quantize_row_iq4_nl_impl)                           */

/* Weighted sums of one block for the inverse scale id: sum w*q*x and w*q*q,
 * q the table value nearest id*x. */
static inline void iq4_fit(const float *xb, const float *weight, float id, float *sumqx, float *sumq2) {
    float sqx = 0, sq2 = 0;
    for (int j = 0; j < QK4_NL; ++j) {
        const float q = smolq_kvalues_iq4nl[best_index_int8(16, smolq_kvalues_iq4nl, id * xb[j])];
        const float w = weight[j];
        sqx += w * q * xb[j];
        sq2 += w * q * q;
    }
    *sumqx = sqx;
    *sumq2 = sq2;
}

/* The scale of one 32-element block: least squares from the max-abs start,
 * then the best of 2*IQ4_NTRY+1 inverse scales (itry + values[0]) / max.
 * 0 for an all (near) zero block. */
static float iq4_block_scale(const float *xb, const float *weight) {
    const float max = signed_absmax(xb, QK4_NL);
    if (fabsf(max) < GROUP_MAX_EPS) return 0;
    const int8_t *values = smolq_kvalues_iq4nl;
    float sumqx, sumq2;
    iq4_fit(xb, weight, 1 / (-max / values[0]), &sumqx, &sumq2);
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int itry = -IQ4_NTRY; itry <= IQ4_NTRY; ++itry) {
        iq4_fit(xb, weight, (itry + values[0]) / max, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* Levels of n elements for the inverse scale id. */
static inline void iq4_levels(const float *x, int n, float id, uint8_t *L) {
    for (int j = 0; j < n; ++j) L[j] = (uint8_t)best_index_int8(16, smolq_kvalues_iq4nl, id * x[j]);
}

/* Byte 16i + j holds element 32i + j (low nibble) and 32i + 16 + j (high). */
static inline void pack_nibble_halves(const uint8_t *L, int n, uint8_t *q4) {
    for (int i = 0; i < n / 32; ++i)
        for (int j = 0; j < 16; ++j) q4[16 * i + j] = (uint8_t)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

/* The two steps of the IQ4 quantizers that the fast path replaces. */
typedef struct {
    float (*block_scale)(const float *xb, const float *weight);
    void (*levels)(const float *x, int n, float id, uint8_t *L);
} iq4_steps;

static const iq4_steps IQ4_REF = {iq4_block_scale, iq4_levels};

/* block_iq4_nl: d (fp16), qs[16]. rscale (NULL or one float per 32
 * elements) receives the unrounded scale whose inverse picked the levels. */
static void iq4_nl_rows(const float *x, void *vy, int64_t n, const float *imatrix, const iq4_steps *s,
                        float *rscale) {
    uint8_t *y = vy;
    float weight[QK4_NL];
    uint8_t L[QK4_NL];
    for (int64_t ib = 0; ib < n / QK4_NL; ++ib, x += QK4_NL, y += IQ4_NL_BYTES) {
        float sigma2 = sum_squares(x, QK4_NL);
        sigma2 *= 2.f / QK4_NL;
        iq_weights(x, imatrix ? imatrix + QK4_NL * ib : NULL, sigma2, QK4_NL, weight);
        const float d = s->block_scale(x, weight);
        if (rscale) rscale[ib] = d;
        f16_put(y, d);
        s->levels(x, QK4_NL, d ? 1 / d : 0, L);
        pack_nibble_halves(L, QK4_NL, y + 2);
    }
}

/* block_iq4_xs: d (fp16), scales_h (u16: 2 high bits per block), scales_l[4]
 * (4 low bits per block), qs[128]. Block scales are 6-bit multiples of d. */
static void iq4_xs_rows(const float *x, void *vy, int64_t n, const float *imatrix, const iq4_steps *s,
                        float *rscale) {
    uint8_t *y = vy;
    float weight[32], scales[QK_K / 32];
    uint8_t L[QK_K];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, y += IQ4_XS_BYTES) {
        const float *qw = imatrix ? imatrix + QK_K * ibl : NULL;
        float sigma2 = sum_squares(x, QK_K);
        sigma2 *= 2.f / QK_K;
        float max_scale = 0, amax_scale = 0;
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            iq_weights(x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, 32, weight);
            scales[ib] = s->block_scale(x + 32 * ib, weight);
            if (fabsf(scales[ib]) > amax_scale) {
                amax_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        const float d = -max_scale / 32;
        f16_put(y, d);
        const float id = d ? 1 / d : 0.f;
        uint16_t scales_h = 0;
        uint8_t *scales_l = y + 4;
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            int l = nearest_int(id * scales[ib]);
            l = MAX(-32, MIN(31, l));
            const float dl = d * l;
            if (rscale) rscale[QK_K / 32 * ibl + ib] = dl;
            s->levels(x + 32 * ib, 32, dl ? 1 / dl : 0.f, L + 32 * ib);
            l += 32;
            if (ib % 2 == 0) scales_l[ib / 2] = (uint8_t)(l & 0xf);
            else scales_l[ib / 2] |= (uint8_t)((l & 0xf) << 4);
            scales_h |= (uint16_t)((l >> 4) << 2 * ib);
        }
        wr16(y + 2, scales_h);
        pack_nibble_halves(L, QK_K, y + 8);
    }
}

static void iq4_nl_quant(const float *x, void *y, int64_t n, const float *w) { iq4_nl_rows(x, y, n, w, &IQ4_REF, NULL); }
static void iq4_xs_quant(const float *x, void *y, int64_t n, const float *w) { iq4_xs_rows(x, y, n, w, &IQ4_REF, NULL); }

#if IQ_HAVE_FAST
/* best_index_int8 over kvalues_iq4nl as a count: for a non-NaN x, the
 * number of thresholds T[1..15] <= x, where T[i] is the least float at which
 * the tie test x - v[i-1] < v[i] - x fails (the test only turns false as x
 * grows, since both differences are rounded monotonically). Computed once by
 * asking that test itself around the midpoint. */
static float IQ4_THRESH[16], IQ4_STEP[16];
static pthread_once_t iq4_once = PTHREAD_ONCE_INIT;

static inline int iq4_picks_lower(int i, float x) {
    return x - smolq_kvalues_iq4nl[i - 1] < smolq_kvalues_iq4nl[i] - x;
}

static void iq4_build_thresholds(void) {
    for (int i = 1; i < 16; ++i) {
        float t = 0.5f * (smolq_kvalues_iq4nl[i - 1] + smolq_kvalues_iq4nl[i]);
        while (iq4_picks_lower(i, t)) t = nextafterf(t, INFINITY);
        while (!iq4_picks_lower(i, nextafterf(t, -INFINITY))) t = nextafterf(t, -INFINITY);
        IQ4_THRESH[i] = t;
        IQ4_STEP[i] = (float)(smolq_kvalues_iq4nl[i] - smolq_kvalues_iq4nl[i - 1]);
    }
}

#define IQ4_CANDIDATES (2 * IQ4_NTRY + 2)

/* iq4_block_scale with the 16 candidate inverse scales in lanes: each lane
 * sums its own w*q*x and w*q*q over j in order, then the candidates are
 * taken in the reference's order. q comes from the thresholds (exact: small
 * integers, never 0); the candidates' id*x are finite, never NaN. */
IQ_FAST_FN static float iq4_block_scale_fast(const float *xb, const float *weight) {
    enum { NC = (2 * IQ4_NTRY + 2) / IQ_LANES }; /* candidate vectors */
    const float max = signed_absmax(xb, QK4_NL);
    if (fabsf(max) < GROUP_MAX_EPS) return 0;
    const int8_t *values = smolq_kvalues_iq4nl;
    float ids[NC * IQ_LANES], sumqx[NC * IQ_LANES], sumq2[NC * IQ_LANES];
    ids[0] = 1 / (-max / values[0]);
    for (int itry = -IQ4_NTRY; itry <= IQ4_NTRY; ++itry) ids[itry + IQ4_NTRY + 1] = (itry + values[0]) / max;
    iq_vf id[NC], sqx[NC], sq2[NC], thresh[16], step[16];
    memcpy(id, ids, sizeof id);
    for (int c = 0; c < NC; ++c) sqx[c] = sq2[c] = vsplat(0);
    for (int i = 1; i < 16; ++i) {
        thresh[i] = vsplat(IQ4_THRESH[i]);
        step[i] = vsplat(IQ4_STEP[i]);
    }
    const iq_vf q0 = vsplat(values[0]);
    for (int j = 0; j < QK4_NL; ++j) {
        const iq_vf xj = vsplat(xb[j]), wj = vsplat(weight[j]);
        for (int c = 0; c < NC; ++c) {
            const iq_vf al = id[c] * xj;
            iq_vf q = q0;
            for (int i = 1; i < 16; ++i) q += (iq_vf)((iq_vi)step[i] & (al >= thresh[i]));
            const iq_vf wq = wj * q;
            sqx[c] += wq * xj;
            sq2[c] += wq * q;
        }
    }
    memcpy(sumqx, sqx, sizeof sumqx);
    memcpy(sumq2, sq2, sizeof sumq2);
    float d = sumq2[0] > 0 ? sumqx[0] / sumq2[0] : 0.f;
    float best = d * sumqx[0];
    for (int c = 1; c <= 2 * IQ4_NTRY + 1; ++c)
        if (sumq2[c] > 0 && sumqx[c] * sumqx[c] > best * sumq2[c]) {
            d = sumqx[c] / sumq2[c];
            best = d * sumqx[c];
        }
    return d;
}

/* iq4_levels by the thresholds, IQ_LANES elements at a time; a NaN id*x
 * takes 15 as the bisection does. */
IQ_FAST_FN static void iq4_levels_fast(const float *x, int n, float id, uint8_t *L) {
    const iq_vf idv = vsplat(id);
    for (int j0 = 0; j0 < n; j0 += IQ_LANES) {
        iq_vf xv;
        memcpy(&xv, x + j0, sizeof xv);
        const iq_vf al = idv * xv;
        iq_vi idx = vsplat_i(0);
        for (int i = 1; i < 16; ++i) idx -= al >= vsplat(IQ4_THRESH[i]); /* true is -1 */
        const iq_vi nan = al != al;
        idx = (idx & ~nan) | (vsplat_i(15) & nan);
        for (int k = 0; k < IQ_LANES; ++k) L[j0 + k] = (uint8_t)idx[k];
    }
}

static const iq4_steps IQ4_FAST = {iq4_block_scale_fast, iq4_levels_fast};

static void iq4_nl_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    pthread_once(&iq4_once, iq4_build_thresholds);
    iq4_nl_rows(x, y, n, w, &IQ4_FAST, NULL);
}

static void iq4_xs_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    pthread_once(&iq4_once, iq4_build_thresholds);
    iq4_xs_rows(x, y, n, w, &IQ4_FAST, NULL);
}
#else
#define iq4_nl_quant_fast iq4_nl_quant
#define iq4_xs_quant_fast iq4_xs_quant
#endif

int64_t smolq_iq4_rounding_scales(int type, const float *src, void *dst, float *scales, int64_t nrows,
                                  int64_t n_per_row, const float *imatrix) {
    if (type != SMOLQ_T_IQ4_NL && type != SMOLQ_T_IQ4_XS) return SMOLQ_ERR_TYPE;
    if (!src || !dst || !scales || nrows < 0 || n_per_row < 0) return SMOLQ_ERR_ARG;
    const int xs = type == SMOLQ_T_IQ4_XS;
    const int64_t block = xs ? QK_K : QK4_NL, bytes = xs ? IQ4_XS_BYTES : IQ4_NL_BYTES;
    if (n_per_row % block) return SMOLQ_ERR_ROWLEN;
    const int64_t row_bytes = n_per_row / block * bytes;
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n_per_row;
        uint8_t *y = (uint8_t *)dst + r * row_bytes;
        float *rs = scales + r * (n_per_row / 32);
        if (xs) iq4_xs_rows(x, y, n_per_row, imatrix, &IQ4_REF, rs);
        else iq4_nl_rows(x, y, n_per_row, imatrix, &IQ4_REF, rs);
    }
    return nrows * row_bytes;
}

static void iq4_nl_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t ib = 0; ib < n / QK4_NL; ++ib, x += IQ4_NL_BYTES, y += QK4_NL) {
        const float d = f16_load(x);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * smolq_kvalues_iq4nl[x[2 + j] & 0xf];
            y[j + 16] = d * smolq_kvalues_iq4nl[x[2 + j] >> 4];
        }
    }
}

static void iq4_xs_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += IQ4_XS_BYTES) {
        const float d = f16_load(x);
        const uint16_t scales_h = rd16(x + 2);
        const uint8_t *qs = x + 8;
        for (int ib = 0; ib < QK_K / 32; ++ib, y += 32, qs += 16) {
            const int ls = ((x[4 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
            const float dl = d * (ls - 32);
            for (int j = 0; j < 16; ++j) {
                y[j] = dl * smolq_kvalues_iq4nl[qs[j] & 0xf];
                y[j + 16] = dl * smolq_kvalues_iq4nl[qs[j] >> 4];
            }
        }
    }
}

/* ======================================================================== */
/* MXFP4 (ggml quantize_row_mxfp4_ref): a shared power-of-two scale (E8M0)
 * and E2M1 values, stored doubled in kvalues_mxfp4 with the scale halved.   */

/* ggml_e8m0_to_fp32_half: 2^(e - 128), subnormal for e < 2. */
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    return smolq_bits_f32(bits);
}

/* The first table entry nearest x / d (absolute error, strict <). */
static inline int best_index_mxfp4(float x, float d) {
    int best = 0;
    float best_err = fabsf(smolq_kvalues_mxfp4[0] * d - x);
    for (int i = 1; i < 16; ++i) {
        const float err = fabsf(smolq_kvalues_mxfp4[i] * d - x);
        if (err < best_err) {
            best = i;
            best_err = err;
        }
    }
    return best;
}

/* The block's shared exponent: floor(log2(amax)) - 2 + 127, 0 for a zero
 * block. ggml converts the float straight to uint8_t; for a tiny amax the
 * value is negative, and x86 compilers go through a 32-bit int. */
static inline uint8_t mxfp4_exponent(float amax) {
    return amax > 0.0f ? (uint8_t)(int)(floorf(log2f(amax)) - 2 + 127) : 0;
}

/* block_mxfp4: e (E8M0), qs[16] (element j low nibble, j + 16 high). */
static void mxfp4_block(const float *x, uint8_t *y) {
    float amax = 0;
    for (int j = 0; j < QK_MXFP4; ++j)
        if (amax < fabsf(x[j])) amax = fabsf(x[j]);
    const uint8_t e = mxfp4_exponent(amax);
    const float d = e8m0_half(e);
    y[0] = e;
    for (int j = 0; j < QK_MXFP4 / 2; ++j)
        y[1 + j] = (uint8_t)(best_index_mxfp4(x[j], d) | best_index_mxfp4(x[QK_MXFP4 / 2 + j], d) << 4);
}

static void mxfp4_rows(const float *x, void *vy, int64_t n, void (*block)(const float *, uint8_t *)) {
    uint8_t *y = vy;
    for (int64_t ib = 0; ib < n / QK_MXFP4; ++ib) block(x + ib * QK_MXFP4, y + ib * MXFP4_BYTES);
}

/* llama.cpp's quantize_mxfp4 ignores quant_weights. */
static void mxfp4_quant(const float *x, void *y, int64_t n, const float *w) {
    (void)w;
    mxfp4_rows(x, y, n, mxfp4_block);
}

#if IQ_HAVE_FAST
/* mxfp4_block IQ_LANES elements at a time, on |x| against the 8 entries
 * 0, 1, ..., 12 of the positive half. Why that is the reference's choice:
 * the table is 0 and +-k (entry 8 is a second 0), and fl(-kd - x) =
 * -fl(kd - |x|) for x < 0, so the negative entries' errors are the positive
 * ones' errors for |x|, met in the same order; an entry of the other sign
 * (and entry 8) is never strictly better than entry 0. So the code is the
 * positive scan's index, plus 8 for x < 0 unless it is 0. The amax: a max of
 * non-negative values, the same in any order. */
IQ_FAST_FN static void mxfp4_block_fast(const float *x, uint8_t *y) {
    enum { NV = QK_MXFP4 / IQ_LANES };
    const iq_vi abs_mask = vsplat_i(0x7fffffff);
    iq_vf xv[NV], ax[NV], best[NV];
    iq_vi code[NV];
    memcpy(xv, x, sizeof xv);
    iq_vf vmax = vsplat(0);
    for (int v = 0; v < NV; ++v) {
        ax[v] = (iq_vf)((iq_vi)xv[v] & abs_mask);
        vmax = vselect(vmax < ax[v], ax[v], vmax);
    }
    float amax = 0;
    for (int k = 0; k < IQ_LANES; ++k)
        if (amax < vmax[k]) amax = vmax[k];
    const uint8_t e = mxfp4_exponent(amax);
    const float d = e8m0_half(e);
    y[0] = e;
    for (int v = 0; v < NV; ++v) {
        best[v] = ax[v]; /* |0*d - |x|| */
        code[v] = vsplat_i(0);
    }
    for (int i = 1; i < 8; ++i) {
        const iq_vf kd = vsplat(smolq_kvalues_mxfp4[i] * d);
        const iq_vi iv = vsplat_i(i);
        for (int v = 0; v < NV; ++v) {
            const iq_vf err = (iq_vf)((iq_vi)(kd - ax[v]) & abs_mask);
            const iq_vi better = err < best[v];
            best[v] = vselect(better, err, best[v]);
            code[v] = (iv & better) | (code[v] & ~better);
        }
    }
    for (int v = 0; v < NV; ++v) code[v] += vsplat_i(8) & (xv[v] < vsplat(0)) & (code[v] != vsplat_i(0));
    int32_t codes[QK_MXFP4];
    memcpy(codes, code, sizeof codes);
    for (int j = 0; j < QK_MXFP4 / 2; ++j) y[1 + j] = (uint8_t)(codes[j] | codes[QK_MXFP4 / 2 + j] << 4);
}

static void mxfp4_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    (void)w;
    mxfp4_rows(x, y, n, mxfp4_block_fast);
}
#else
#define mxfp4_quant_fast mxfp4_quant
#endif

static void mxfp4_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t ib = 0; ib < n / QK_MXFP4; ++ib, x += MXFP4_BYTES, y += QK_MXFP4) {
        const float d = e8m0_half(x[0]);
        for (int j = 0; j < QK_MXFP4 / 2; ++j) {
            y[j] = smolq_kvalues_mxfp4[x[1 + j] & 0x0f] * d;
            y[j + QK_MXFP4 / 2] = smolq_kvalues_mxfp4[x[1 + j] >> 4] * d;
        }
    }
}

/* ======================================================================== */
/* IQ3 lattices: each point is 4 levels 0..7 (value 2l+1 before scaling).   */

#define IQ3_CUBE 4096 /* 8^4 points, key l0 | l1 << 3 | l2 << 6 | l3 << 9 */

typedef struct {
    int size;                 /* lattice points: 256 (IQ3_XXS), 512 (IQ3_S) */
    uint8_t odd[512][4];      /* point k as its odd values 2l+1 */
    int map[IQ3_CUBE];        /* key -> point, or -(1 + offset into neighbours) */
    uint16_t *neighbours;     /* at an offset: count, then the points, nearest first */
    /* The same neighbours' odd values as floats, 4 neighbours at a time as
     * 4 x 4 (value i of the 4 points, then i + 1); starts at coords_at[key]. */
    float *coords;
    int coords_at[IQ3_CUBE];
} iq3_lattice;

static iq3_lattice IQ3XXS_LATTICE, IQ3S_LATTICE;
static pthread_once_t iq3_once = PTHREAD_ONCE_INIT;

static void out_of_memory(void) {
    fputs("smolq kernel: out of memory building the IQ3 neighbour tables\n", stderr);
    abort();
}

/* Levels from the published grid: each byte's rank among the grid's 8
 * distinct byte values (IQ3_XXS stores 4, 12, ..., 52, 62; IQ3_S 1, 3, ..., 15). */
static void lattice_points(iq3_lattice *t, const uint32_t *grid, int size) {
    uint8_t seen[256] = {0};
    for (int k = 0; k < size; ++k)
        for (int j = 0; j < 4; ++j) seen[(grid[k] >> 8 * j) & 0xff] = 1;
    uint8_t rank[256];
    int nlevels = 0;
    for (int v = 0; v < 256; ++v)
        if (seen[v]) rank[v] = (uint8_t)nlevels++;
    if (nlevels != 8) abort(); /* iq_tables.h is generated and tested; never happens */
    t->size = size;
    for (int i = 0; i < IQ3_CUBE; ++i) t->map[i] = -1;
    for (int k = 0; k < size; ++k) {
        int key = 0;
        for (int j = 0; j < 4; ++j) {
            const int l = rank[(grid[k] >> 8 * j) & 0xff];
            t->odd[k][j] = (uint8_t)(2 * l + 1);
            key |= l << 3 * j;
        }
        t->map[key] = k;
    }
}

/* For every key off the lattice: the lattice points at the nwant smallest
 * squared distances, by distance then index (ggml sorts (d2, index) pairs). */
static void lattice_neighbours(iq3_lattice *t, int nwant) {
    size_t cap = 1 << 16, used = 0;
    uint16_t *nb = malloc(cap * sizeof(uint16_t));
    int d2[512];
    if (!nb) out_of_memory();
    for (int key = 0; key < IQ3_CUBE; ++key) {
        if (t->map[key] >= 0) continue;
        for (int k = 0; k < t->size; ++k) {
            int s = 0;
            for (int j = 0; j < 4; ++j) {
                const int diff = t->odd[k][j] - (2 * ((key >> 3 * j) & 7) + 1);
                s += diff * diff;
            }
            d2[k] = s;
        }
        if (used + 1 + (size_t)t->size > cap) {
            cap *= 2;
            uint16_t *grown = realloc(nb, cap * sizeof(uint16_t));
            if (!grown) out_of_memory();
            nb = grown;
        }
        const size_t start = used++;
        int below = -1; /* distances <= below are taken */
        for (int have = 0; have < nwant; ++have) {
            int next = INT32_MAX;
            for (int k = 0; k < t->size; ++k)
                if (d2[k] > below && d2[k] < next) next = d2[k];
            if (next == INT32_MAX) break;
            for (int k = 0; k < t->size; ++k)
                if (d2[k] == next) nb[used++] = (uint16_t)k;
            below = next;
        }
        nb[start] = (uint16_t)(used - start - 1);
        t->map[key] = -(int)(start + 1);
    }
    t->neighbours = nb;
}

/* coords: the neighbour lists again, laid out for the fast search (a
 * partial last group repeats its last point; the search ignores it). */
static void lattice_coords(iq3_lattice *t) {
    size_t total = 0;
    for (int key = 0; key < IQ3_CUBE; ++key)
        if (t->map[key] < 0) total += 16 * (size_t)((t->neighbours[-t->map[key] - 1] + 3) / 4);
    t->coords = malloc(total * sizeof(float));
    if (!t->coords) out_of_memory();
    size_t at = 0;
    for (int key = 0; key < IQ3_CUBE; ++key) {
        if (t->map[key] >= 0) continue;
        const uint16_t *nb = t->neighbours - t->map[key] - 1;
        t->coords_at[key] = (int)at;
        for (int g = 0; g < (nb[0] + 3) / 4; ++g, at += 16)
            for (int i = 0; i < 4; ++i)
                for (int k = 0; k < 4; ++k) t->coords[at + 4 * i + k] = t->odd[nb[1 + MIN(4 * g + k, nb[0] - 1)]][i];
    }
}

static void iq3_build_lattices(void) {
    lattice_points(&IQ3XXS_LATTICE, smolq_iq3xxs_grid, SMOLQ_IQ3XXS_GRID_SIZE);
    lattice_neighbours(&IQ3XXS_LATTICE, 2);
    lattice_coords(&IQ3XXS_LATTICE);
    lattice_points(&IQ3S_LATTICE, smolq_iq3s_grid, SMOLQ_IQ3S_GRID_SIZE);
    lattice_neighbours(&IQ3S_LATTICE, 3);
    lattice_coords(&IQ3S_LATTICE);
}

static void iq3_init(void) { pthread_once(&iq3_once, iq3_build_lattices); }

/* ggml iq3_find_best_neighbour: the neighbour of least weighted squared
 * error at `scale`; writes its levels to L and returns it. Where every
 * error is inf or NaN ggml aborts; we take the first neighbour. */
static int iq3_best_neighbour(const iq3_lattice *t, int key, const float *xval, const float *waux, float scale,
                              int8_t *L) {
    const uint16_t *nb = t->neighbours - t->map[key] - 1;
    float best_d2 = FLT_MAX;
    int best = nb[1];
    for (int j = 1; j <= nb[0]; ++j) {
        const uint8_t *pg = t->odd[nb[j]];
        float d2 = 0;
        for (int i = 0; i < 4; ++i) {
            const float diff = scale * pg[i] - xval[i];
            d2 += waux[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            best = nb[j];
        }
    }
    for (int i = 0; i < 4; ++i) L[i] = (int8_t)((t->odd[best][i] - 1) / 2);
    return best;
}

typedef int (*iq3_finder)(const iq3_lattice *t, int key, const float *xval, const float *waux, float scale,
                          int8_t *L);

#if IQ_HAVE_FAST
/* iq3_best_neighbour with 4 neighbours' errors in lanes (each lane the
 * reference's sum over i = 0..3 for its point). The reference keeps the
 * first error strictly below all before it and below FLT_MAX: the first
 * point of least error. Each lane keeps its own first least error, and the
 * lanes are merged by error, then by position. A partial last group repeats
 * the last point, whose equal error at a later position never wins. */
static int iq3_best_neighbour_fast(const iq3_lattice *t, int key, const float *xval, const float *waux, float scale,
                                   int8_t *L) {
    const uint16_t *nb = t->neighbours - t->map[key] - 1;
    const int n = nb[0];
    const float *coords = t->coords + t->coords_at[key];
    const iq_vf sv = vsplat(scale);
    iq_vf xv[4], wv[4];
    for (int i = 0; i < 4; ++i) {
        xv[i] = vsplat(xval[i]);
        wv[i] = vsplat(waux[i]);
    }
    iq_vf best_d2 = vsplat(FLT_MAX);
    iq_vi best_at = vsplat_i(-1), at = {0, 1, 2, 3};
    for (int g = 0; g < (n + 3) / 4; ++g, coords += 16, at += vsplat_i(4)) {
        iq_vf d2 = vsplat(0);
        for (int i = 0; i < 4; ++i) {
            iq_vf q;
            memcpy(&q, coords + 4 * i, sizeof q);
            const iq_vf diff = sv * q - xv[i];
            d2 += wv[i] * diff * diff;
        }
        const iq_vi better = d2 < best_d2;
        best_d2 = vselect(better, d2, best_d2);
        best_at = (at & better) | (best_at & ~better);
    }
    float min_d2 = FLT_MAX;
    int first = -1;
    for (int k = 0; k < IQ_LANES; ++k)
        if (best_at[k] >= 0 && (best_d2[k] < min_d2 || (best_d2[k] == min_d2 && best_at[k] < first))) {
            min_d2 = best_d2[k];
            first = best_at[k];
        }
    const int best = nb[1 + (first < 0 ? 0 : first)];
    for (int i = 0; i < 4; ++i) L[i] = (int8_t)((t->odd[best][i] - 1) / 2);
    return best;
}
#endif

/* The key of a group's levels. */
static inline int iq3_key(const int8_t *L) { return L[0] | L[1] << 3 | L[2] << 6 | L[3] << 9; }

/* Levels of a 4-element group at inverse scale id, snapped to the lattice
 * (nearest neighbour at `scale` when off it). Returns 1 when already on it. */
static inline int iq3_group(const iq3_lattice *t, iq3_finder find, const float *xval, const float *waux, float id,
                            float scale, int8_t *L) {
    for (int i = 0; i < 4; ++i) {
        const int l = nearest_int(0.5f * (id * xval[i] - 1));
        L[i] = (int8_t)MAX(0, MIN(7, l));
    }
    const int key = iq3_key(L);
    if (t->map[key] >= 0) return 1;
    find(t, key, xval, waux, scale, L);
    return 0;
}

/* Weighted sums w*x*q and w*q*q over 32 elements, q = 2l+1. */
static inline void iq3_fit(const float *weight, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float sqx = 0, sq2 = 0;
    for (int i = 0; i < 32; ++i) {
        const float w = weight[i];
        const float q = 2 * L[i] + 1;
        sqx += w * xval[i] * q;
        sq2 += w * q * q;
    }
    *sumqx = sqx;
    *sumq2 = sq2;
}

/* What differs between the two IQ3 types' block searches. */
typedef struct {
    const iq3_lattice *lattice;
    int scan;           /* candidate inverse scales (15 + 0.2 is) / max, is in -scan..scan */
    int xxs;            /* IQ3_XXS: 7 stored sign bits per 8 (even parity forced), a 1e-8 all-zero
                           threshold, and after the scan only groups off the lattice are refitted
                           (IQ3_S: 8 sign bits, exact zero, every group refitted) */
} iq3_kind;

#define GROUP_MAX_EPS_IQ3_XXS 1e-8f

/* Splits a 32-element block into magnitudes and sign bytes (ggml: xval,
 * block_signs). IQ3_XXS keeps 7 bits per 8 elements: with an odd number of
 * negatives, the element of least w*x*x keeps the wrong sign. */
static void iq3_signs(int xxs, const float *xb, const float *weight, float *xval, uint8_t signs[4], float *sgn) {
    for (int k = 0; k < 4; ++k) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
            if (xb[8 * k + i] >= 0) xval[8 * k + i] = xb[8 * k + i];
            else {
                xval[8 * k + i] = -xb[8 * k + i];
                ++nflip;
                s |= (uint8_t)(1 << i);
            }
        }
        if (xxs && nflip % 2) {
            int imin = 0;
            float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
            for (int i = 1; i < 8; ++i) {
                const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                if (ax < min) {
                    min = ax;
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            s ^= (uint8_t)(1 << imin);
        }
        if (sgn)
            for (int i = 0; i < 8; ++i) sgn[8 * k + i] = s >> i & 1 ? -1.f : 1.f;
        signs[k] = xxs ? s & 127 : s;
    }
}

/* What a GPTQ grid needs to re-round a 32-element block the way ggml picked
 * it (NULL when not wanted): per 4-element group the inverse scale and scale
 * its levels were picked with (iq3_group's id, scale), per element the sign
 * that makes xval = sign * x and the search weight sqrt(w). */
typedef struct {
    float *id, *scale; /* [8] */
    float *sign, *waux; /* [32] */
} iq3_block_plan;

/* One 32-element block of a super-block (ggml quantize_row_iq3_xxs_impl /
 * quantize_row_iq3_s_impl, the loop body over ib): the block scale (>= 0),
 * its 8 lattice points and 4 sign bytes. Returns -1 (nothing written) for an
 * all (near) zero block, which ggml skips. */
static float iq3_block(const iq3_kind *kind, iq3_finder find, const float *xb, const float *qw, float sigma2, uint16_t points[8],
                       uint8_t signs[4], const iq3_block_plan *plan) {
    const iq3_lattice *t = kind->lattice;
    float weight[32], waux[32], xval[32];
    int8_t L[32], Laux[32];
    int on_grid[8], on_grid_aux[8];
    iq_weights(xb, qw, sigma2, 32, weight);
    for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
    iq3_signs(kind->xxs, xb, weight, xval, signs, plan ? plan->sign : NULL);
    float gid[8] = {0}, gscale[8] = {0}, gid_aux[8], gscale_aux[8]; /* (id, scale) each group was picked with */
    if (plan) memcpy(plan->waux, waux, sizeof waux);
    float max = xval[0];
    for (int i = 1; i < 32; ++i) max = MAX(max, xval[i]);
    if (kind->xxs ? max < GROUP_MAX_EPS_IQ3_XXS : !max) return -1;
    memset(L, 0, sizeof L);
    float best = 0, scale = max / 15;
    for (int k = 0; k < 8; ++k) on_grid[k] = kind->xxs;
    for (int is = -kind->scan; is <= kind->scan; ++is) {
        const float id = (15 + is * 0.2f) / max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 8; ++k) {
            on_grid_aux[k] = iq3_group(t, find, xval + 4 * k, waux + 4 * k, id, this_scale, Laux + 4 * k);
            gid_aux[k] = id;
            gscale_aux[k] = this_scale;
        }
        float sumqx, sumq2;
        iq3_fit(weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, sizeof L);
            memcpy(on_grid, on_grid_aux, sizeof on_grid);
            memcpy(gid, gid_aux, sizeof gid);
            memcpy(gscale, gscale_aux, sizeof gscale);
        }
    }
    int n_off = 0;
    for (int k = 0; k < 8; ++k) n_off += !on_grid[k];
    if (n_off > 0 && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 8; ++k)
            if (!(kind->xxs && on_grid[k])) {
                iq3_group(t, find, xval + 4 * k, waux + 4 * k, id, scale, L + 4 * k);
                gid[k] = id;
                gscale[k] = scale;
            }
        float sumqx, sumq2;
        iq3_fit(weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) { /* ggml: "should never happen"; flip the scale and the signs */
        scale = -scale;
        for (int k = 0; k < 4; ++k) signs[k] = kind->xxs ? (uint8_t)(~signs[k] & 127) : (uint8_t)~signs[k];
        for (int k = 0; k < 8; ++k) { /* -xval picked with -id, -scale: the same levels */
            gid[k] = -gid[k];
            gscale[k] = -gscale[k];
        }
        if (plan)
            for (int i = 0; i < 32; ++i) plan->sign[i] = -plan->sign[i];
    }
    if (plan) {
        memcpy(plan->id, gid, sizeof gid);
        memcpy(plan->scale, gscale, sizeof gscale);
    }
    for (int k = 0; k < 8; ++k) points[k] = (uint16_t)t->map[iq3_key(L + 4 * k)]; /* on the lattice by now */
    return scale;
}

/* The block scales' quantization: 4-bit odd multiples of d = max_scale/31. */
static inline int iq3_scale_level(float id, float scale) {
    const int l = nearest_int(0.5f * (id * scale - 1));
    return MAX(0, MIN(15, l));
}

static float iq3_sigma2(const float *x) {
    const float sumx2 = sum_squares(x, QK_K);
    return 2 * sumx2 / QK_K;
}

/* A row's iq3_block_plans (id, scale: n/4; sign, waux: n) plus, per 32-element
 * block, the scale its values decode with (db) and whether ggml skipped it as
 * all zero (its bytes then decode to something else; IQ3_S even shifts the
 * later blocks' points). NULL when not wanted. */
typedef struct {
    float *id, *scale, *sign, *waux, *db;
    uint8_t *skipped;
} iq3_row_plan;

/* The plan of block ib of super-block ibl, or NULL. */
static const iq3_block_plan *iq3_plan_at(const iq3_row_plan *rp, int64_t ibl, int ib, iq3_block_plan *out) {
    if (!rp) return NULL;
    const int64_t b = QK_K / 32 * ibl + ib;
    *out = (iq3_block_plan){rp->id + 8 * b, rp->scale + 8 * b, rp->sign + 32 * b, rp->waux + 32 * b};
    return out;
}

/* db and the skipped flags of super-block ibl once its bytes are final. */
static void iq3_plan_scales(const iq3_row_plan *rp, int64_t ibl, const float scales[QK_K / 32], const float db[QK_K / 32]) {
    if (!rp) return;
    for (int ib = 0; ib < QK_K / 32; ++ib) {
        const int64_t b = QK_K / 32 * ibl + ib;
        rp->skipped[b] = scales[ib] < 0;
        rp->db[b] = db[ib];
    }
}

static const iq3_kind IQ3_XXS_KIND = {&IQ3XXS_LATTICE, 15, 1};
static const iq3_kind IQ3_S_KIND = {&IQ3S_LATTICE, 9, 0};

/* block_iq3_xxs: d (fp16), qs[64] (a point per 4 elements), then 8 u32: 4x7
 * sign bits and the 4-bit block scale in the top bits. */
static void iq3_xxs_rows(const float *x, void *vy, int64_t n, const float *imatrix, iq3_finder find,
                         const iq3_row_plan *rp) {
    iq3_init();
    uint8_t *y = vy;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, y += IQ3_XXS_BYTES) {
        const float *qw = imatrix ? imatrix + QK_K * ibl : NULL;
        const float sigma2 = iq3_sigma2(x);
        uint8_t *qs = y + 2;
        uint32_t scales_and_signs[QK_K / 32] = {0};
        float scales[QK_K / 32];
        float max_scale = 0;
        memset(y, 0, IQ3_XXS_BYTES);
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            uint16_t points[8];
            uint8_t signs[4];
            iq3_block_plan bp;
            const float scale = iq3_block(&IQ3_XXS_KIND, find, x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, points, signs,
                                          iq3_plan_at(rp, ibl, ib, &bp));
            scales[ib] = scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) qs[8 * ib + k] = (uint8_t)points[k];
            scales_and_signs[ib] = signs[0] | signs[1] << 7 | signs[2] << 14 | (uint32_t)signs[3] << 21;
            max_scale = MAX(max_scale, scale);
        }
        float db[QK_K / 32] = {0};
        if (!max_scale) {
            memset(y, 0, IQ3_XXS_BYTES);
            for (int ib = 0; ib < QK_K / 32; ++ib) scales[ib] = -1; /* every block skipped */
            iq3_plan_scales(rp, ibl, scales, db);
            continue;
        }
        const float d = max_scale / 31;
        f16_put(y, d * 1.0125f);
        const float id = 1 / d, dstored = f16_load(y);
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            const int ls = iq3_scale_level(id, MAX(scales[ib], 0));
            wr32(qs + QK_K / 4 + 4 * ib, scales_and_signs[ib] | (uint32_t)ls << 28);
            db[ib] = dstored * (0.5f + ls) * 0.5f;
        }
        iq3_plan_scales(rp, ibl, scales, db);
    }
}

/* block_iq3_s: d (fp16), qs[64] (low 8 bits of a point per 4 elements),
 * qh[8] (their 9th bits), signs[32], scales[4] (4 bits per block).
 * As in ggml, qs and signs advance only past the blocks written: after an
 * all-zero block the next blocks' bytes sit one block early. */
static void iq3_s_rows(const float *x, void *vy, int64_t n, const float *imatrix, iq3_finder find,
                       const iq3_row_plan *rp) {
    iq3_init();
    uint8_t *y = vy;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, y += IQ3_S_BYTES) {
        const float *qw = imatrix ? imatrix + QK_K * ibl : NULL;
        const float sigma2 = iq3_sigma2(x);
        uint8_t *qs = y + 2, *qh = y + 66, *sg = y + 74, *sc = y + 106;
        float scales[QK_K / 32];
        float max_scale = 0;
        memset(y, 0, IQ3_S_BYTES);
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            uint16_t points[8];
            uint8_t signs[4];
            iq3_block_plan bp;
            const float scale = iq3_block(&IQ3_S_KIND, find, x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, points, signs,
                                          iq3_plan_at(rp, ibl, ib, &bp));
            scales[ib] = scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) {
                qs[k] = (uint8_t)(points[k] & 255);
                qh[ib] |= (uint8_t)((points[k] >> 8) << k);
            }
            memcpy(sg, signs, 4);
            qs += 8;
            sg += 4;
            max_scale = MAX(max_scale, scale);
        }
        float db[QK_K / 32] = {0};
        if (!max_scale) {
            for (int ib = 0; ib < QK_K / 32; ++ib) scales[ib] = -1; /* every block skipped */
            iq3_plan_scales(rp, ibl, scales, db);
            continue;
        }
        const float d = max_scale / 31;
        f16_put(y, d * 1.033f);
        const float id = 1 / d, dstored = f16_load(y);
        int ls[QK_K / 32];
        for (int ib = 0; ib < QK_K / 32; ++ib) {
            ls[ib] = iq3_scale_level(id, MAX(scales[ib], 0));
            db[ib] = dstored * (1 + 2 * ls[ib]);
        }
        for (int ib = 0; ib < QK_K / 32; ib += 2) sc[ib / 2] = (uint8_t)(ls[ib] | ls[ib + 1] << 4);
        iq3_plan_scales(rp, ibl, scales, db);
    }
}

static void iq3_xxs_quant(const float *x, void *y, int64_t n, const float *w) {
    iq3_xxs_rows(x, y, n, w, iq3_best_neighbour, NULL);
}

static void iq3_s_quant(const float *x, void *y, int64_t n, const float *w) {
    iq3_s_rows(x, y, n, w, iq3_best_neighbour, NULL);
}

#if IQ_HAVE_FAST
static void iq3_xxs_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    iq3_xxs_rows(x, y, n, w, iq3_best_neighbour_fast, NULL);
}

static void iq3_s_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    iq3_s_rows(x, y, n, w, iq3_best_neighbour_fast, NULL);
}
#else
#define iq3_xxs_quant_fast iq3_xxs_quant
#define iq3_s_quant_fast iq3_s_quant
#endif

/* 8 elements of a lattice point pair with their sign byte: db * value * ±1. */
static inline void iq3_put8(float db, const uint8_t *g1, const uint8_t *g2, uint8_t signs, float *y) {
    for (int j = 0; j < 4; ++j) {
        y[j] = db * g1[j] * (signs & (1 << j) ? -1.f : 1.f);
        y[j + 4] = db * g2[j] * (signs & (1 << (j + 4)) ? -1.f : 1.f);
    }
}

/* A published grid point as its 4 bytes (element j in byte j). */
static inline void grid_bytes(uint32_t g, uint8_t b[4]) {
    for (int j = 0; j < 4; ++j) b[j] = (uint8_t)(g >> 8 * j);
}

static void iq3_xxs_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += IQ3_XXS_BYTES) {
        const float d = f16_load(x);
        const uint8_t *qs = x + 2;
        for (int ib = 0; ib < QK_K / 32; ++ib, qs += 8) {
            const uint32_t aux32 = rd32(x + 2 + QK_K / 4 + 4 * ib);
            const float db = d * (0.5f + (aux32 >> 28)) * 0.5f;
            for (int l = 0; l < 4; ++l, y += 8) {
                uint8_t g1[4], g2[4];
                grid_bytes(smolq_iq3xxs_grid[qs[2 * l]], g1);
                grid_bytes(smolq_iq3xxs_grid[qs[2 * l + 1]], g2);
                iq3_put8(db, g1, g2, smolq_ksigns_iq2xs[(aux32 >> 7 * l) & 127], y);
            }
        }
    }
}

static void iq3_s_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += IQ3_S_BYTES) {
        const float d = f16_load(x);
        const uint8_t *qs = x + 2, *qh = x + 66, *sg = x + 74, *sc = x + 106;
        for (int ib = 0; ib < QK_K / 32; ++ib, qs += 8, sg += 4) {
            const int ls = ib % 2 ? sc[ib / 2] >> 4 : sc[ib / 2] & 0xf;
            const float db = d * (1 + 2 * ls);
            for (int l = 0; l < 4; ++l, y += 8) {
                uint8_t g1[4], g2[4];
                grid_bytes(smolq_iq3s_grid[qs[2 * l] | ((qh[ib] << (8 - 2 * l)) & 256)], g1);
                grid_bytes(smolq_iq3s_grid[qs[2 * l + 1] | ((qh[ib] << (7 - 2 * l)) & 256)], g2);
                iq3_put8(db, g1, g2, sg[l], y);
            }
        }
    }
}

/* ======================================================================== */

static const smolq_type_ops IQ_OPS[] = {
    {SMOLQ_T_IQ4_NL, 0, QK4_NL, IQ4_NL_BYTES, {iq4_nl_quant, iq4_nl_quant_fast}, {iq4_nl_dequant, iq4_nl_dequant}},
    {SMOLQ_T_IQ4_XS, 0, QK_K, IQ4_XS_BYTES, {iq4_xs_quant, iq4_xs_quant_fast}, {iq4_xs_dequant, iq4_xs_dequant}},
    {SMOLQ_T_MXFP4, 0, QK_MXFP4, MXFP4_BYTES, {mxfp4_quant, mxfp4_quant_fast}, {mxfp4_dequant, mxfp4_dequant}},
    {SMOLQ_T_IQ3_XXS, 0, QK_K, IQ3_XXS_BYTES, {iq3_xxs_quant, iq3_xxs_quant_fast}, {iq3_xxs_dequant, iq3_xxs_dequant}},
    {SMOLQ_T_IQ3_S, 0, QK_K, IQ3_S_BYTES, {iq3_s_quant, iq3_s_quant_fast}, {iq3_s_dequant, iq3_s_dequant}},
};

const smolq_type_ops *smolq_find_iq_ops(int type, int layout) {
    (void)layout; /* one layout */
    for (size_t i = 0; i < sizeof(IQ_OPS) / sizeof(IQ_OPS[0]); i++)
        if (IQ_OPS[i].type == type) return &IQ_OPS[i];
    return NULL;
}

/* ======================================================================== */
/* IQ3 re-rounding for GPTQ grids (smolq_kernel.h)                          */

int64_t smolq_iq3_rounding_plan(int type, const float *src, void *dst, float *group_id, float *group_scale,
                                float *sign, float *waux, float *db, uint8_t *skipped, int64_t nrows,
                                int64_t n_per_row, const float *imatrix) {
    if (type != SMOLQ_T_IQ3_XXS && type != SMOLQ_T_IQ3_S) return SMOLQ_ERR_TYPE;
    if (!src || !dst || !group_id || !group_scale || !sign || !waux || !db || !skipped || nrows < 0 || n_per_row < 0)
        return SMOLQ_ERR_ARG;
    if (n_per_row % QK_K) return SMOLQ_ERR_ROWLEN;
    const int xxs = type == SMOLQ_T_IQ3_XXS;
    const int64_t row_bytes = n_per_row / QK_K * (xxs ? IQ3_XXS_BYTES : IQ3_S_BYTES);
    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t n4 = r * (n_per_row / 4), n32 = r * (n_per_row / 32);
        const iq3_row_plan rp = {group_id + n4, group_scale + n4, sign + r * n_per_row, waux + r * n_per_row,
                                 db + n32, skipped + n32};
        uint8_t *y = (uint8_t *)dst + r * row_bytes;
        if (xxs) iq3_xxs_rows(src + r * n_per_row, y, n_per_row, imatrix, iq3_best_neighbour, &rp);
        else iq3_s_rows(src + r * n_per_row, y, n_per_row, imatrix, iq3_best_neighbour, &rp);
    }
    return nrows * row_bytes;
}

int64_t smolq_iq3_round_groups(int type, const float *xval, const float *waux, const float *id, const float *scale,
                               int64_t n, uint16_t *points, uint8_t *magnitudes) {
    if (type != SMOLQ_T_IQ3_XXS && type != SMOLQ_T_IQ3_S) return SMOLQ_ERR_TYPE;
    if (n < 0 || (n && (!xval || !waux || !id || !scale || !points || !magnitudes))) return SMOLQ_ERR_ARG;
    iq3_init();
    const int xxs = type == SMOLQ_T_IQ3_XXS;
    const iq3_lattice *t = xxs ? &IQ3XXS_LATTICE : &IQ3S_LATTICE;
    const uint32_t *grid = xxs ? smolq_iq3xxs_grid : smolq_iq3s_grid;
    for (int64_t g = 0; g < n; ++g) {
        int8_t L[4];
        iq3_group(t, iq3_best_neighbour, xval + 4 * g, waux + 4 * g, id[g], scale[g], L);
        const int p = t->map[iq3_key(L)];
        points[g] = (uint16_t)p;
        grid_bytes(grid[p], magnitudes + 4 * g);
    }
    return n;
}
