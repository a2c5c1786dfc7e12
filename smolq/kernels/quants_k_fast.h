/* Fast, byte-identical versions of the two scale searches that dominate
 * K-quant time: make_qkx_quants (Q2_K, Q4_K, Q5_K) and make_qx_quants (Q6_K,
 * Q3_K with an imatrix). Included by quants_k.c (4 lanes) and quants_k_avx2.c
 * (8 lanes, AVX2), after the reference
 * helpers (quants_common.h: nearest_int, MIN/MAX, GROUP_MAX_EPS).
 *
 * Why the bytes are the same: the sub-blocks of a super-block are searched
 * independently, so KQ_LANES of them run side by side, one per vector lane.
 * Each lane performs exactly the scalar sequence of IEEE float operations of
 * the reference for its sub-block: same operands, same grouping, sums
 * accumulated element by element in the same order, every data-dependent
 * branch turned into a per-lane select on the same comparison. (Running the
 * candidate scales of one sub-block in lanes instead would not work for
 * make_qkx_quants: each accepted candidate moves `min` for the next ones.)
 *
 * Uses GCC/Clang generic vector extensions, which the compiler maps onto
 * SSE2/AVX/NEON. Without them no fast variant is offered. */
#ifndef SMOLQ_QUANTS_K_FAST_H
#define SMOLQ_QUANTS_K_FAST_H

#if defined(__GNUC__)
#define SMOLQ_KQ_HAVE_FAST 1

/* 4 lanes: one SSE2/NEON register, so no ABI games on the baseline target;
 * quants_k_avx2.c includes this file again with 8 for AVX2. Sub-block
 * counts (8, 16) are multiples of either. */
#ifndef KQ_LANES
#define KQ_LANES 4
#endif
typedef float kq_vf __attribute__((vector_size(4 * KQ_LANES)));
typedef int32_t kq_vi __attribute__((vector_size(4 * KQ_LANES)));

/* Lane-by-lane assignment: adding to a zero vector would turn -0 into +0. */
static inline kq_vf kq_splat_f(float f) {
    kq_vf v;
    for (int k = 0; k < KQ_LANES; ++k) v[k] = f;
    return v;
}

static inline kq_vi kq_splat_i(int32_t i) {
    kq_vi v;
    for (int k = 0; k < KQ_LANES; ++k) v[k] = i;
    return v;
}

/* Lanes where mask is all ones take a, the others b. */
static inline kq_vi kq_select_i(kq_vi mask, kq_vi a, kq_vi b) { return (a & mask) | (b & ~mask); }

static inline kq_vf kq_select_f(kq_vi mask, kq_vf a, kq_vf b) {
    return (kq_vf)kq_select_i(mask, (kq_vi)a, (kq_vi)b);
}

/* nearest_int, lane by lane (same bit trick). */
static inline kq_vi kq_nearest_int(kq_vf v) {
    const kq_vf t = v + kq_splat_f(12582912.f);
    return ((kq_vi)t & kq_splat_i(0x007fffff)) - kq_splat_i(0x00400000);
}

/* MAX(lo, MIN(hi, l)), lane by lane. */
static inline kq_vi kq_clamp(kq_vi l, int lo, int hi) {
    const kq_vi vhi = kq_splat_i(hi), vlo = kq_splat_i(lo);
    l = kq_select_i(vhi < l, vhi, l);
    return kq_select_i(l < vlo, vlo, l);
}

static inline kq_vf kq_to_float(kq_vi l) { return __builtin_convertvector(l, kq_vf); }

static inline kq_vf kq_fabs(kq_vf v) { return (kq_vf)((kq_vi)v & kq_splat_i(0x7fffffff)); }

/* make_qkx_quants for KQ_LANES sub-blocks of n (<= 32) elements starting at
 * x, weights, L; results in scales[0..KQ_LANES) and mins[0..KQ_LANES). */
static void qkx_lanes(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                      float *scales, float *mins, float rmin, float rdelta, int nstep, int use_mad) {
    if (n < 1 || n > 32) return; /* callers: n = 16 or 32 */
    kq_vf xt[32], wt[32], lv[32], laux[32];
    for (int i = 0; i < n; ++i) {
        for (int k = 0; k < KQ_LANES; ++k) {
            xt[i][k] = x[n * k + i];
            wt[i][k] = weights[n * k + i];
        }
    }
    const kq_vf zero = kq_splat_f(0);
    kq_vf min = xt[0], max = xt[0];
    kq_vf sum_w = wt[0];
    kq_vf sum_x = sum_w * xt[0];
    for (int i = 1; i < n; ++i) {
        min = kq_select_f(xt[i] < min, xt[i], min);
        max = kq_select_f(xt[i] > max, xt[i], max);
        sum_w += wt[i];
        sum_x += wt[i] * xt[i];
    }
    min = kq_select_f(min > zero, zero, min);
    const kq_vi flat = max == min; /* reference: L = 0, scale 0, the_min = -min */
    const kq_vf flat_min = min;
    kq_vf iscale = (float)nmax / (max - min);
    kq_vf scale = 1 / iscale;
    kq_vf best_error = zero;
    for (int i = 0; i < n; ++i) {
        lv[i] = kq_to_float(kq_clamp(kq_nearest_int(iscale * (xt[i] - min)), 0, nmax));
        kq_vf diff = scale * lv[i] + min - xt[i];
        diff = use_mad ? kq_fabs(diff) : diff * diff;
        best_error += wt[i] * diff;
    }
    for (int is = 0; nstep >= 1 && is <= nstep; ++is) { /* reference: no retries if nstep < 1 */
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        kq_vf sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            const kq_vf l = kq_to_float(kq_clamp(kq_nearest_int(iscale * (xt[i] - min)), 0, nmax));
            laux[i] = l;
            const kq_vf wl = wt[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * xt[i];
        }
        const kq_vf D = sum_w * sum_l2 - sum_l * sum_l;
        kq_vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        kq_vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        const kq_vi positive_min = this_min > zero;
        this_scale = kq_select_f(positive_min, sum_xl / sum_l2, this_scale);
        this_min = kq_select_f(positive_min, zero, this_min);
        kq_vf cur_error = zero;
        for (int i = 0; i < n; ++i) {
            kq_vf diff = this_scale * laux[i] + this_min - xt[i];
            diff = use_mad ? kq_fabs(diff) : diff * diff;
            cur_error += wt[i] * diff;
        }
        const kq_vi better = (D > zero) & (cur_error < best_error);
        for (int i = 0; i < n; ++i) lv[i] = kq_select_f(better, laux[i], lv[i]);
        best_error = kq_select_f(better, cur_error, best_error);
        scale = kq_select_f(better, this_scale, scale);
        min = kq_select_f(better, this_min, min);
    }
    for (int k = 0; k < KQ_LANES; ++k) {
        const int is_flat = flat[k] != 0;
        for (int i = 0; i < n; ++i) L[n * k + i] = is_flat ? 0 : (uint8_t)lv[i][k];
        scales[k] = is_flat ? 0.f : scale[k];
        mins[k] = -(is_flat ? flat_min[k] : min[k]);
    }
}

/* make_qx_quants (rmse_type 1) for KQ_LANES sub-blocks of n (<= 16) elements;
 * qw NULL or their importance weights. */
static void qx_lanes(int n, int nmax, const float *x, int8_t *L, const float *qw, float *scales) {
    if (n < 1 || n > 16) return; /* callers: n = 16 */
    kq_vf xt[16], w[16], wx[16], lv[16];
    for (int i = 0; i < n; ++i) {
        for (int k = 0; k < KQ_LANES; ++k) {
            const float xi = x[n * k + i];
            xt[i][k] = xi;
            w[i][k] = qw ? qw[n * k + i] : xi * xi;
        }
        wx[i] = w[i] * xt[i];
    }
    const kq_vf zero = kq_splat_f(0);
    kq_vf max = zero, amax = zero;
    for (int i = 0; i < n; ++i) {
        const kq_vf ax = kq_fabs(xt[i]);
        const kq_vi bigger = ax > amax;
        amax = kq_select_f(bigger, ax, amax);
        max = kq_select_f(bigger, xt[i], max);
    }
    const kq_vi all_zero = amax < kq_splat_f(GROUP_MAX_EPS);
    kq_vf iscale = (float)(-nmax) / max;
    kq_vf sumlx = zero, suml2 = zero;
    for (int i = 0; i < n; ++i) {
        const kq_vi li = kq_clamp(kq_nearest_int(iscale * xt[i]), -nmax, nmax - 1);
        const kq_vf l = kq_to_float(li);
        lv[i] = kq_to_float(li + kq_splat_i(nmax));
        sumlx += wx[i] * l;
        suml2 += w[i] * l * l;
    }
    kq_vf scale = kq_select_f(suml2 != zero, sumlx / suml2, zero);
    kq_vf best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        kq_vf slx = zero, sl2 = zero;
        kq_vf cand[16];
        for (int i = 0; i < n; ++i) {
            const kq_vi li = kq_clamp(kq_nearest_int(iscale * xt[i]), -nmax, nmax - 1);
            const kq_vf l = kq_to_float(li);
            cand[i] = kq_to_float(li + kq_splat_i(nmax));
            slx += wx[i] * l;
            sl2 += w[i] * l * l;
        }
        const kq_vi better = (sl2 > zero) & (slx * slx > best * sl2);
        for (int i = 0; i < n; ++i) lv[i] = kq_select_f(better, cand[i], lv[i]);
        scale = kq_select_f(better, slx / sl2, scale);
        best = kq_select_f(better, scale * slx, best);
    }
    for (int k = 0; k < KQ_LANES; ++k) {
        const int is_zero = all_zero[k] != 0;
        for (int i = 0; i < n; ++i) L[n * k + i] = is_zero ? 0 : (int8_t)lv[i][k];
        scales[k] = is_zero ? 0.f : scale[k];
    }
}

static void qkx_batch_fast(int nsub, int n, int nmax, const float *x, const float *weights,
                           uint8_t *L, float *scales, float *mins,
                           float rmin, float rdelta, int nstep, int use_mad) {
    for (int j = 0; j < nsub; j += KQ_LANES) {
        qkx_lanes(n, nmax, x + n * j, weights + n * j, L + n * j, scales + j, mins + j, rmin, rdelta, nstep, use_mad);
    }
}

static void qx_batch_fast(int nsub, int n, int nmax, const float *x, int8_t *L,
                          const float *qw, float *scales) {
    for (int j = 0; j < nsub; j += KQ_LANES) qx_lanes(n, nmax, x + n * j, L + n * j, qw ? qw + n * j : NULL, scales + j);
}

#endif /* __GNUC__ */
#endif
