/* K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: quantize and dequantize, byte for
 * byte what llama.cpp's ggml-quants.c writes and reads.
 *
 * Without an importance matrix each quantizer follows quantize_row_qX_K_ref;
 * with one it follows quantize_qX_K's quant_weights path (quantize_row_qX_K_impl).
 * Layouts: formats.md 5.2.4.
 *
 * Bit-exactness rests on doing the same IEEE float operations in the same
 * order as ggml, so:
 *  - every sum is accumulated left to right, one element at a time, exactly as
 *    ggml writes it (GCC keeps that order without -ffast-math; never add it);
 *  - products and sums are grouped as in ggml's source, e.g. w*l*l is (w*l)*l;
 *  - no fused multiply-add: setup.py builds with -std=c99, for which GCC
 *    defaults to -ffp-contract=off (ggml's own CPU-independent build has no
 *    FMA either);
 *  - integer narrowing (int -> uint8_t/int8_t) happens where ggml narrows, even
 *    where it only matters for degenerate input.
 * The search helpers below are written only for the argument combinations the
 * K-quant quantizers use; each says which ggml function and mode it is. */
#include <math.h>
#include <string.h>
#include "kernel_internal.h"
#include "quants_common.h"

/* Block structs: byte arrays only, so no padding and no alignment demands on
 * the caller's buffer. fp16 fields are read and written through f16_load/f16_put. */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint8_t d[2]; uint8_t dmin[2]; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint8_t d[2]; } block_q3_K;
typedef struct { uint8_t d[2]; uint8_t dmin[2]; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { uint8_t d[2]; uint8_t dmin[2]; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint8_t d[2]; } block_q6_K;

typedef char assert_q2_K_size[sizeof(block_q2_K) == 84 ? 1 : -1];
typedef char assert_q3_K_size[sizeof(block_q3_K) == 110 ? 1 : -1];
typedef char assert_q4_K_size[sizeof(block_q4_K) == 144 ? 1 : -1];
typedef char assert_q5_K_size[sizeof(block_q5_K) == 176 ? 1 : -1];
typedef char assert_q6_K_size[sizeof(block_q6_K) == 210 ? 1 : -1];

/* --------------------------------------------------------- search helpers */

/* ggml make_q3_quants with do_rmse = true (Q3_K's reference path): start from
 * the max-abs scale, then up to 5 passes of coordinate descent, each element
 * trying the level that the least-squares scale without it suggests. */
static float make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    const float max = sym_group_max(n, x, L);
    if (max == 0) return 0.f;
    float sumlx, suml2;
    sym_levels(n, nmax, x, NULL, -nmax / max, L, 0, &sumlx, &suml2);
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MAX(-nmax, MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* The imatrix paths' element weights (quants_common.h) for nsub sub-blocks
 * of n elements, and each sub-block's weight sum, left to right: the
 * importance of its scale (and min) in the second-level search. */
static void subblock_weights(const float *x, const float *qw, float sigma2, int nsub, int n,
                             float *weight, float *sw) {
    for (int j = 0; j < nsub; ++j) {
        float *w = weight + n * j;
        imatrix_weights(x + n * j, qw + n * j, sigma2, n, w);
        float sumw = 0;
        for (int l = 0; l < n; ++l) sumw += w[l];
        sw[j] = sumw;
    }
}

/* The two searches that dominate the time, over all sub-blocks of a
 * super-block at once: nsub sub-blocks of n elements, stored one after the
 * other in x (and in weights / qw / L), results in scales[] and mins[].
 * Sub-blocks are independent, so the reference runs them one by one and the
 * fast variant (quants_k_fast.h) side by side in vector lanes, same bytes. */
typedef void (*qkx_batch_fn)(int nsub, int n, int nmax, const float *x, const float *weights,
                             uint8_t *L, float *scales, float *mins,
                             float rmin, float rdelta, int nstep, int use_mad);
typedef void (*qx_batch_fn)(int nsub, int n, int nmax, const float *x, int8_t *L,
                            const float *qw, float *scales);
typedef struct { qkx_batch_fn qkx; qx_batch_fn qx; } kq_search;

static void qkx_batch_ref(int nsub, int n, int nmax, const float *x, const float *weights,
                          uint8_t *L, float *scales, float *mins,
                          float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    for (int j = 0; j < nsub; ++j) {
        scales[j] = make_qkx_quants(n, nmax, x + n * j, weights + n * j, L + n * j, &mins[j], Laux,
                                    rmin, rdelta, nstep, use_mad);
    }
}

static void qx_batch_ref(int nsub, int n, int nmax, const float *x, int8_t *L,
                         const float *qw, float *scales) {
    for (int j = 0; j < nsub; ++j) scales[j] = make_qx_quants(n, nmax, x + n * j, L + n * j, qw ? qw + n * j : NULL);
}

static const kq_search REF_SEARCH = { qkx_batch_ref, qx_batch_ref };

#include "quants_k_fast.h"
#ifdef SMOLQ_KQ_HAVE_FAST
static const kq_search FAST_SEARCH = { qkx_batch_fast, qx_batch_fast };
#endif

/* ---------------------------------------------- shared packing and decoding */

/* 2-bit levels of a super-block into qs[64]: byte 32h+l holds elements
 * 128h+l, +32, +64, +96 in bit pairs 0, 2, 4, 6 (Q2_K and Q3_K). */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

/* Q3_K: put 6-bit scale code l (0..63) of sub-block j into the 12 bytes.
 * Must be called for j = 0..15 in order on zeroed bytes (j < 8 assigns). */
static void q3_put_scale(uint8_t *scales, int j, int l) {
    if (j < 8) scales[j] = (uint8_t)(l & 0xF);
    else scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
    l >>= 4;
    scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
}

/* Q3_K: signed scale (code - 32) of sub-block j. */
static inline int q3_get_scale(const uint8_t *scales, int j) {
    int8_t sc = (int8_t)(j < 8 ? scales[j] & 0xF : scales[j - 8] >> 4);
    sc = (int8_t)((sc | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
    return sc;
}

/* Q4_K/Q5_K: put 6-bit scale ls and min lm of sub-block j into the 12 bytes.
 * Must be called for j = 0..7 in order (j < 4 assigns what j >= 4 ORs into). */
static void k4_put_scale_min(uint8_t *s, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j - 0] |= (uint8_t)((lm >> 4) << 6);
    }
}

/* ggml get_scale_min_k4. */
static inline void k4_get_scale_min(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* ===================================================================== Q2_K */

/* With the final d, dmin and sub-block codes fixed, re-round every element
 * (sub-blocks with a zero scale keep the search's levels), then pack. */
static void q2_K_finish(const float *x, block_q2_K *y, uint8_t *L) {
    const float dall = f16_load(y->d);
    const float mall = f16_load(y->dmin);
    for (int j = 0; j < QK_K / 16; ++j) {
        const float d = dall * (y->scales[j] & 0xF);
        if (!d) continue;
        const float m = mall * (y->scales[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int((x[16 * j + ii] + m) / d);
            L[16 * j + ii] = (uint8_t)MAX(0, MIN(3, l));
        }
    }
    pack_2bit(L, y->qs);
}

/* quantize_row_q2_K_ref, one super-block. */
static void q2_K_ref_block(const float *x, block_q2_K *y, const kq_search *s) {
    uint8_t L[QK_K];
    float weights[QK_K], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int l = 0; l < QK_K; ++l) weights[l] = fabsf(x[l]);
    s->qkx(QK_K / 16, 16, 3, x, weights, L, scales, mins, -0.5f, 0.1f, 15, 1);
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
        float iscale = q4scale / max_scale;
        for (int j = 0; j < QK_K / 16; ++j) y->scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
        f16_put(y->d, max_scale / q4scale);
    } else {
        for (int j = 0; j < QK_K / 16; ++j) y->scales[j] = 0;
        f16_put(y->d, 0.f);
    }
    if (max_min > 0) {
        float iscale = q4scale / max_min;
        for (int j = 0; j < QK_K / 16; ++j) {
            int l = nearest_int(iscale * mins[j]);
            y->scales[j] = (uint8_t)(y->scales[j] | (l << 4));
        }
        f16_put(y->dmin, max_min / q4scale);
    } else {
        f16_put(y->dmin, 0.f);
    }
    q2_K_finish(x, y, L);
}

/* quantize_row_q2_K_impl (imatrix), one super-block; qw = its 256 weights. */
static void q2_K_imatrix_block(const float *x, block_q2_K *y, const float *qw, const kq_search *s) {
    uint8_t L[QK_K], Ls[QK_K / 16], Lm[QK_K / 16];
    float mins[QK_K / 16], scales[QK_K / 16], sw[QK_K / 16], weight[QK_K];
    const float sigma2 = sum_squares(x, QK_K) / QK_K;
    subblock_weights(x, qw, sigma2, QK_K / 16, 16, weight, sw);
    s->qkx(QK_K / 16, 16, 3, x, weight, L, scales, mins, -0.9f, 0.05f, 36, 0);
    float dm = make_qp_quants(QK_K / 16, 15, scales, Ls, sw);
    float mm = make_qp_quants(QK_K / 16, 15, mins, Lm, sw);
    f16_put(y->d, dm);
    f16_put(y->dmin, mm);
    for (int j = 0; j < QK_K / 16; ++j) y->scales[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    q2_K_finish(x, y, L);
}

/* ===================================================================== Q3_K */

/* Re-round every element with the final scales (zero-scale sub-blocks keep
 * the search's levels), split off the high bit into hmask, pack the rest. */
static void q3_K_finish(const float *x, block_q3_K *y, int8_t *L) {
    const float dall = f16_load(y->d);
    for (int j = 0; j < QK_K / 16; ++j) {
        const float d = dall * q3_get_scale(y->scales, j);
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(MAX(-4, MIN(3, l)) + 4);
        }
    }
    /* High bit of element j goes to hmask[j % 32], bit j / 32. */
    memset(y->hmask, 0, QK_K / 8);
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            y->hmask[j % (QK_K / 8)] |= (uint8_t)(1u << (j / (QK_K / 8)));
            L[j] -= 4;
        }
    }
    pack_2bit((const uint8_t *)L, y->qs); /* levels are 0..3 here */
}

/* quantize_row_q3_K_ref, one super-block. */
static void q3_K_ref_block(const float *x, block_q3_K *y) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int j = 0; j < QK_K / 16; ++j) scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
    const float max_scale = signed_absmax(scales, QK_K / 16);
    memset(y->scales, 0, 12);
    if (max_scale) {
        float iscale = -32.f / max_scale;
        for (int j = 0; j < QK_K / 16; ++j) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l = (int8_t)(MAX(-32, MIN(31, l)) + 32);
            q3_put_scale(y->scales, j, l);
        }
        f16_put(y->d, 1 / iscale);
    } else {
        f16_put(y->d, 0.f);
    }
    q3_K_finish(x, y, L);
}

/* quantize_row_q3_K_impl (imatrix), one super-block. */
static void q3_K_imatrix_block(const float *x, block_q3_K *y, const float *qw, const kq_search *s) {
    int8_t L[QK_K], Ls[QK_K / 16];
    float scales[QK_K / 16], weight[QK_K], sw[QK_K / 16];
    const float sigma2 = 2 * sum_squares(x, QK_K) / QK_K;
    subblock_weights(x, qw, sigma2, QK_K / 16, 16, weight, sw);
    s->qx(QK_K / 16, 16, 4, x, L, weight, scales);
    memset(y->scales, 0, 12);
    float d_block = make_qx_quants(QK_K / 16, 32, scales, Ls, sw);
    for (int j = 0; j < QK_K / 16; ++j) q3_put_scale(y->scales, j, Ls[j]);
    f16_put(y->d, d_block);
    q3_K_finish(x, y, L);
}

/* ============================================================ Q4_K and Q5_K */

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): the 6-bit scales/mins, d and
 * dmin of one super-block, from the search's float scales and mins. */

/* Reference path: scale codes relative to the largest scale and min. */
static void k4_ref_scales(const float *x, int nmax, float rmin, float rdelta, int nstep, const kq_search *s,
                          uint8_t *L, uint8_t *scales12, uint8_t d16[2], uint8_t dmin16[2]) {
    float weights[QK_K], mins[QK_K / 32], scales[QK_K / 32];
    for (int j = 0; j < QK_K / 32; ++j) {
        float sum_x2 = sum_squares(x + 32 * j, 32);
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[32 * j + l] = av_x + fabsf(x[32 * j + l]);
    }
    s->qkx(QK_K / 32, 32, nmax, x, weights, L, scales, mins, rmin, rdelta, nstep, 0);
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = MIN(63, ls);
        lm = MIN(63, lm);
        k4_put_scale_min(scales12, j, ls, lm);
    }
    f16_put(d16, max_scale / 63.f);
    f16_put(dmin16, max_min / 63.f);
}

/* imatrix path (quantize_row_q4_K_impl / q5_K_impl). ggml's Q5_K clamps the
 * codes to 63 and Q4_K does not; codes only exceed 63 for degenerate input. */
static void k4_imatrix_scales(const float *x, const float *qw, int nmax, int clamp63, const kq_search *s,
                              uint8_t *L, uint8_t *scales12, uint8_t d16[2], uint8_t dmin16[2]) {
    uint8_t Ls[QK_K / 32], Lm[QK_K / 32];
    float weights[QK_K], sw[QK_K / 32], mins[QK_K / 32], scales[QK_K / 32];
    const float sigma2 = 2 * sum_squares(x, QK_K) / QK_K;
    subblock_weights(x, qw, sigma2, QK_K / 32, 32, weights, sw);
    s->qkx(QK_K / 32, 32, nmax, x, weights, L, scales, mins, -0.9f, 0.05f, 36, 0);
    float d_block = make_qp_quants(QK_K / 32, 63, scales, Ls, sw);
    float m_block = make_qp_quants(QK_K / 32, 63, mins, Lm, sw);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t ls = Ls[j], lm = Lm[j];
        if (clamp63) {
            ls = MIN(63, ls);
            lm = MIN(63, lm);
        }
        k4_put_scale_min(scales12, j, ls, lm);
    }
    f16_put(d16, d_block);
    f16_put(dmin16, m_block);
}

/* Re-round every element to [0, nmax] with the final scales and mins
 * (zero-scale sub-blocks keep the search's levels). */
static void k4_requantize(const float *x, int nmax, const uint8_t *scales12,
                          const uint8_t d16[2], const uint8_t dmin16[2], uint8_t *L) {
    const float dall = f16_load(d16);
    const float mall = f16_load(dmin16);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t sc, m;
        k4_get_scale_min(j, scales12, &sc, &m);
        const float d = dall * sc;
        if (!d) continue;
        const float dm = mall * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAX(0, MIN(nmax, l));
        }
    }
}

/* Q4_K nibbles: byte 32c+l holds element 64c+l (low) and 64c+32+l (high). */
static void q4_K_pack(const uint8_t *L, block_q4_K *y) {
    uint8_t *q = y->qs;
    for (int j = 0; j < QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

/* Q5_K: low nibbles as Q4_K; fifth bits in qh[l], bit 2c (low) / 2c+1 (high). */
static void q5_K_pack(const uint8_t *L, block_q5_K *y) {
    uint8_t *qh = y->qh;
    uint8_t *ql = y->qs;
    memset(qh, 0, QK_K / 8);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            int l2 = L[n + j + 32];
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 = (uint8_t)(m1 << 2);
        m2 = (uint8_t)(m2 << 2);
        ql += 32;
    }
}

/* What sets Q4_K and Q5_K apart besides the packing (ggml's constants). */
typedef struct {
    int nmax;        /* levels 0..nmax */
    int clamp63;     /* imatrix path clamps the 6-bit codes (Q5_K does, Q4_K not) */
    float rmin;      /* reference search: first candidate offset ... */
    int nstep;       /* ... and the number of steps of 0.1 after it */
} k4_kind;

static const k4_kind Q4_K_KIND = {15, 0, -1.f, 20};
static const k4_kind Q5_K_KIND = {31, 1, -0.5f, 15};

/* Scales, mins, d, dmin and the final levels L of one Q4_K/Q5_K super-block. */
static void k4_levels(const float *x, const float *qw, const k4_kind *k, const kq_search *s,
                      uint8_t *scales12, uint8_t d16[2], uint8_t dmin16[2], uint8_t *L) {
    if (qw) k4_imatrix_scales(x, qw, k->nmax, k->clamp63, s, L, scales12, d16, dmin16);
    else k4_ref_scales(x, k->nmax, k->rmin, 0.1f, k->nstep, s, L, scales12, d16, dmin16);
    k4_requantize(x, k->nmax, scales12, d16, dmin16, L);
}

static void q4_K_block(const float *x, block_q4_K *y, const float *qw, const kq_search *s) {
    uint8_t L[QK_K];
    k4_levels(x, qw, &Q4_K_KIND, s, y->scales, y->d, y->dmin, L);
    q4_K_pack(L, y);
}

static void q5_K_block(const float *x, block_q5_K *y, const float *qw, const kq_search *s) {
    uint8_t L[QK_K];
    k4_levels(x, qw, &Q5_K_KIND, s, y->scales, y->d, y->dmin, L);
    q5_K_pack(L, y);
}

/* ===================================================================== Q6_K */

/* quantize_row_q6_K_ref (qw NULL) and quantize_row_q6_K_impl (qw = the
 * block's raw importance weights, used as-is), one super-block. */
static void q6_K_block(const float *x, block_q6_K *y, const float *qw, const kq_search *s) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    s->qx(QK_K / 16, 16, 32, x, L, qw, scales);
    const float max_scale = signed_absmax(scales, QK_K / 16);
    if (fabsf(max_scale) < GROUP_MAX_EPS) {
        memset(y, 0, sizeof(*y));
        f16_put(y->d, 0.f);
        return;
    }
    float iscale = -128.f / max_scale;
    const float dall = f16_store_load(y->d, 1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) y->scales[ib] = (int8_t)MIN(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < QK_K / 16; ++j) {
        float d = dall * y->scales[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(MAX(-32, MIN(31, l)) + 32);
        }
    }
    /* Low nibbles: ql[64h+l] holds elements 128h+l (low) and +64 (high),
     * ql[64h+32+l] holds +32 and +96; qh[32h+l] holds the four top bit pairs. */
    uint8_t *ql = y->ql;
    uint8_t *qh = y->qh;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF;
            const uint8_t q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF;
            const uint8_t q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

/* =========================================================== row entry points */

/* imatrix, when given, has one weight per element of the row; super-block i
 * uses weights [256 i, 256 i + 256), as quantize_qX_K does for every row. */

static void quantize_q2_K(const float *x, void *vy, int64_t n, const float *imatrix, const kq_search *s) {
    block_q2_K *y = (block_q2_K *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        if (imatrix) q2_K_imatrix_block(x + QK_K * i, y + i, imatrix + QK_K * i, s);
        else q2_K_ref_block(x + QK_K * i, y + i, s);
    }
}

static void quantize_q3_K(const float *x, void *vy, int64_t n, const float *imatrix, const kq_search *s) {
    block_q3_K *y = (block_q3_K *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        if (imatrix) q3_K_imatrix_block(x + QK_K * i, y + i, imatrix + QK_K * i, s);
        else q3_K_ref_block(x + QK_K * i, y + i);
    }
}

static void quantize_q4_K(const float *x, void *vy, int64_t n, const float *imatrix, const kq_search *s) {
    block_q4_K *y = (block_q4_K *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i) q4_K_block(x + QK_K * i, y + i, imatrix ? imatrix + QK_K * i : NULL, s);
}

static void quantize_q5_K(const float *x, void *vy, int64_t n, const float *imatrix, const kq_search *s) {
    block_q5_K *y = (block_q5_K *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i) q5_K_block(x + QK_K * i, y + i, imatrix ? imatrix + QK_K * i : NULL, s);
}

static void quantize_q6_K(const float *x, void *vy, int64_t n, const float *imatrix, const kq_search *s) {
    block_q6_K *y = (block_q6_K *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i) q6_K_block(x + QK_K * i, y + i, imatrix ? imatrix + QK_K * i : NULL, s);
}

/* The exported reference quantizers, and their fast twins. */
#define KQ_ENTRY_POINTS(name)                                                                   \
    void smolq_quantize_row_##name(const float *x, void *y, int64_t n, const float *imatrix) { \
        quantize_##name(x, y, n, imatrix, &REF_SEARCH);                                          \
    }                                                                                            \
    static void fast_quantize_row_##name(const float *x, void *y, int64_t n, const float *imatrix) { \
        quantize_##name(x, y, n, imatrix, FAST_OR_REF);                                          \
    }

#if SMOLQ_KQ_AVX2
static const kq_search AVX2_SEARCH = { smolq_kq_qkx_batch_avx2, smolq_kq_qx_batch_avx2 };

static const kq_search *fast_search(void) { return smolq_use_avx2() ? &AVX2_SEARCH : &FAST_SEARCH; }
#define FAST_OR_REF fast_search()
#elif defined(SMOLQ_KQ_HAVE_FAST)
#define FAST_OR_REF (&FAST_SEARCH)
#else
#define FAST_OR_REF (&REF_SEARCH)
#endif

KQ_ENTRY_POINTS(q2_K)
KQ_ENTRY_POINTS(q3_K)
KQ_ENTRY_POINTS(q4_K)
KQ_ENTRY_POINTS(q5_K)
KQ_ENTRY_POINTS(q6_K)

/* ============================================================== dequantize */

/* Every dequantizer computes value = (d * sub-scale) * q - (dmin * sub-min)
 * in float, as ggml's dequantize_row_qX_K and gguf.quants do. */

/* Q2_K and Q3_K share the element order: half h (128 elements) uses qs bytes
 * 32h..32h+31; shift pair jj gives 32 elements, 16 from bytes 32h+l and 16
 * from bytes 32h+16+l, each 16 with its own sub-block scale 8h+2jj(+1). */

void smolq_dequantize_row_q2_K(const void *vx, float *y, int64_t n) {
    const block_q2_K *x = (const block_q2_K *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float d = f16_load(x[i].d);
        const float dmin = f16_load(x[i].dmin);
        for (int e = 0; e < QK_K; e += 16) {
            const int h = e / 128, jj = (e % 128) / 32, half16 = (e % 32) / 16;
            const uint8_t sc = x[i].scales[e / 16];
            const float dl = d * (sc & 0xF);
            const float ml = dmin * (sc >> 4);
            const uint8_t *q = x[i].qs + 32 * h + 16 * half16;
            for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l] >> (2 * jj)) & 3) - ml;
        }
    }
}

void smolq_dequantize_row_q3_K(const void *vx, float *y, int64_t n) {
    const block_q3_K *x = (const block_q3_K *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float d_all = f16_load(x[i].d);
        for (int e = 0; e < QK_K; e += 16) {
            const int h = e / 128, jj = (e % 128) / 32, half16 = (e % 32) / 16;
            const float dl = d_all * q3_get_scale(x[i].scales, e / 16);
            const uint8_t *q = x[i].qs + 32 * h + 16 * half16;
            const uint8_t *hm = x[i].hmask + 16 * half16;
            const uint8_t bit = (uint8_t)(1u << (4 * h + jj));
            for (int l = 0; l < 16; ++l) {
                const int v = ((q[l] >> (2 * jj)) & 3) - ((hm[l] & bit) ? 0 : 4);
                *y++ = dl * v;
            }
        }
    }
}

/* Q4_K and Q5_K share the element order: chunk c (64 elements) reads qs
 * bytes 32c..32c+31, low nibbles with sub-block 2c, high ones with 2c+1;
 * Q5_K (qh not NULL) adds 16 where qh[l] has bit 2c (low) or 2c+1 (high).
 * The level is an integer before it meets the float, so Q4_K's bytes see
 * the same operations as before the two shared this. */
static inline void k4_dequantize_block(const uint8_t d16[2], const uint8_t dmin16[2], const uint8_t *scales12,
                                       const uint8_t *qs, const uint8_t *qh, float *y) {
    const float d = f16_load(d16);
    const float dmin = f16_load(dmin16);
    for (int c = 0; c < 4; ++c) {
        uint8_t sc, m;
        k4_get_scale_min(2 * c, scales12, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        k4_get_scale_min(2 * c + 1, scales12, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        const uint8_t u1 = (uint8_t)(1u << (2 * c)), u2 = (uint8_t)(2u << (2 * c));
        for (int l = 0; l < 32; ++l) *y++ = d1 * ((qs[l] & 0xF) + (qh && (qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * ((qs[l] >> 4) + (qh && (qh[l] & u2) ? 16 : 0)) - m2;
        qs += 32;
    }
}

void smolq_dequantize_row_q4_K(const void *vx, float *y, int64_t n) {
    const block_q4_K *x = (const block_q4_K *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i) k4_dequantize_block(x[i].d, x[i].dmin, x[i].scales, x[i].qs, NULL, y + QK_K * i);
}

void smolq_dequantize_row_q5_K(const void *vx, float *y, int64_t n) {
    const block_q5_K *x = (const block_q5_K *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i) k4_dequantize_block(x[i].d, x[i].dmin, x[i].scales, x[i].qs, x[i].qh, y + QK_K * i);
}

void smolq_dequantize_row_q6_K(const void *vx, float *y, int64_t n) {
    const block_q6_K *x = (const block_q6_K *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float d = f16_load(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int h = 0; h < 2; ++h) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

/* ============================================================ fast variants */

/* Fast quantizers: same bytes, the scale searches run candidates in vector
 * lanes. Q3_K without an imatrix has no lane-parallel search (its make_q3_quants
 * is a sequential coordinate descent) and runs the reference code. There is
 * no separate fast dequantizer: the reference loops already vectorize. */
smolq_quantize_row_fn smolq_kquant_fast_quantize(int type) {
#ifdef SMOLQ_KQ_HAVE_FAST
    switch (type) {
    case 10: return fast_quantize_row_q2_K;
    case 11: return fast_quantize_row_q3_K;
    case 12: return fast_quantize_row_q4_K;
    case 13: return fast_quantize_row_q5_K;
    case 14: return fast_quantize_row_q6_K;
    }
#endif
    (void)type;
    return NULL;
}

smolq_dequantize_row_fn smolq_kquant_fast_dequantize(int type) { (void)type; return NULL; }
