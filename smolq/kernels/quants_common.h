/* Helpers shared by quants.c (legacy and ternary types), quants_k.c
 * (K-quants) and the i-quant files (quants_iq.c: IQ3/IQ4, MXFP4; quants_iq12.c:
 * IQ2/IQ1): ggml's rounding trick and clamping macros, little-endian field
 * access, ggml's fp16 store, and ggml's scale searches.
 * Not part of the public C API.
 *
 * Bit-exactness: each search does the float operations of its ggml
 * counterpart in ggml-quants.c in the same order and grouping (sums left to
 * right, w*l*l as (w*l)*l); the build's -std=c99 keeps GCC from contracting
 * them into FMAs. Never build this with -ffast-math. */
#ifndef SMOLQ_QUANTS_COMMON_H
#define SMOLQ_QUANTS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fp16.h"

#define QK_K 256
/* Below this a group counts as all zero (ggml's GROUP_MAX_EPS). */
#define GROUP_MAX_EPS 1e-15f

/* ggml's macros, same argument order (matters only for NaN). */
#undef MIN
#undef MAX
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ------------------------------------------------------------------------ */
/* Little-endian field access (the files are little-endian whatever the host). */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline float rdf32(const uint8_t *p) { return smolq_bits_f32(rd32(p)); }

/* An fp16 field: read as a float; written rounded to nearest even with NaN
 * payloads kept (fp16.h, F16C and numpy's conversion). */
static inline float f16_load(const uint8_t *p) { return smolq_fp16_to_fp32(rd16(p)); }
static inline void f16_store(uint8_t *p, float f) { wr16(p, smolq_fp32_to_fp16(f)); }

/* ggml's ggml_compute_fp32_to_fp16 (the GGML_FP32_TO_FP16 of its quantizers)
 * rounds to nearest even like fp16.h, but turns every NaN into the one quiet
 * NaN 0x7e00 (keeping the sign). */
static inline void f16_put(uint8_t h[2], float f) {
    if (f != f) wr16(h, (uint16_t)(((smolq_f32_bits(f) >> 16) & 0x8000) | 0x7e00));
    else f16_store(h, f);
}

/* Round through fp16 and back: what ggml does when it stores d and reads it. */
static inline float f16_store_load(uint8_t h[2], float f) {
    f16_put(h, f);
    return f16_load(h);
}

/* ------------------------------------------------------------------------ */
/* ggml's search helpers.                                                    */

/* ggml's nearest_int: round half to even through the float adder (the
 * 1.5*2^23 trick). Defined bit pattern for every input, so out-of-range
 * values also match ggml. */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

/* Sum of squares of x[0..n), left to right. */
static inline float sum_squares(const float *x, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

/* The element of largest magnitude, sign kept: the first one on ties, 0 if
 * all are 0; a NaN never wins (ggml's max/amax loop, e.g. in make_qx_quants). */
static inline float signed_absmax(const float *x, int n) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    return max;
}

/* Weight of element i in the symmetric search: the importance weight when
 * given, else x^2 (ggml's rmse_type 1). */
static inline float sym_weight(const float *qw, const float *x, int i) {
    return qw ? qw[i] : x[i] * x[i];
}

/* The start of ggml's symmetric searches: the group's max-abs element (sign
 * kept), or 0 with L zeroed when the group is all (near) zero. */
static inline float sym_group_max(int n, const float *x, int8_t *L) {
    const float max = signed_absmax(x, n);
    if (fabsf(max) < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    return max;
}

/* Levels l = clamp(nearest_int(iscale * x), -nmax, nmax - 1) of ggml's
 * symmetric searches and their weighted sums (w*x*l and w*l*l, left to
 * right); stores l + offset into L unless L is NULL. */
static inline void sym_levels(int n, int nmax, const float *x, const float *qw, float iscale,
                              int8_t *L, int offset, float *sumlx, float *suml2) {
    float slx = 0, sl2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        if (L) L[i] = (int8_t)(l + offset);
        float w = sym_weight(qw, x, i);
        slx += w * x[i] * l;
        sl2 += w * l * l;
    }
    *sumlx = slx;
    *suml2 = sl2;
}

/* ggml make_qx_quants with rmse_type = 1 (the only mode smolq uses; qw NULL
 * means weights x^2): symmetric quants L in [0, 2*nmax) around nmax, scale
 * by weighted least squares over 19 candidate inverse scales. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    const float max = sym_group_max(n, x, L);
    if (max == 0) return 0.f;
    float sumlx, suml2;
    sym_levels(n, nmax, x, qw, -nmax / max, L, nmax, &sumlx, &suml2);
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        const float iscale = -(nmax + 0.1f * is) / max;
        sym_levels(n, nmax, x, qw, iscale, NULL, 0, &sumlx, &suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAX(-nmax, MIN(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* ggml make_qkx2_quants, and make_qkx3_quants with non-NULL weights (the two
 * are then the same function: qkx3 tests max <= min where qkx2 tests
 * max == min, and after min is clamped to <= 0, max < min cannot happen).
 * Asymmetric quants L in [0, nmax] with x ~ scale*L - the_min; tries nstep+1
 * inverse scales around nmax/(max-min), refitting scale and min by weighted
 * least squares, and keeps the lowest weighted error (abs if use_mad, else
 * squared). Laux: n bytes of scratch. */
static float make_qkx_quants(int n, int nmax, const float *x, const float *weights,
                             uint8_t *L, float *the_min, uint8_t *Laux,
                             float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0];
    float max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)MAX(0, MIN(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = MAX(0, MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* ggml make_qp_quants: quantize non-negative values (sub-block scales or
 * mins) to [0, nmax] with a weighted search, for the imatrix paths
 * (K-quant sub-block scales; IQ2_XXS group scales). L is
 * uint8_t as in ggml, so a negative level wraps exactly as it does there. */
static float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *quant_weights) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        float w = quant_weights[i];
        best_mse += w * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is * x[i]);
            l = MIN(nmax, l);
            float diff = x[i] - scale_is * l;
            float w = quant_weights[i];
            mse += w * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MIN(nmax, l);
        L[i] = (uint8_t)l;
        float w = quant_weights[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = quant_weights[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MIN(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* The imatrix paths' element weights (quantize_row_*_impl): the importance
 * weight times sqrt(sigma2 + x^2), sigma2 a mean square of the row/block. */
static inline void imatrix_weights(const float *x, const float *qw, float sigma2, int n, float *w) {
    for (int i = 0; i < n; ++i) w[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
}

#endif
