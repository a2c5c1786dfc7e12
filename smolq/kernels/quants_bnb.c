/* bitsandbytes blockwise quantization, as its CPU path computes it
 * (bitsandbytes 0.50, backends/default/ops.py quantize_4bit and
 * csrc/cpu_ops.cpp quantize_cpu; the tables from functional.py).
 *
 * 4-bit (NF4 / FP4), one block of `blocksize` values:
 *   absmax = max |x|; r = 1 / max(absmax, 1e-38) (float32);
 *   s = clamp(x * r, -1, 1); a final partial block divides, s = x / max(absmax, 1e-38),
 *   and stores the clamped absmax;
 *   index = the number of midpoints of the sorted code that are < s (torch.bucketize);
 *   FP4 maps that sorted position back to its code index.
 *   Two values per byte, the first in the HIGH nibble; an odd count is padded with s = 0.
 * 8-bit (nested absmax, the signed "dynamic" map), one block:
 *   absmax = max |x|; a zero block is all index 0; otherwise s = x * (1 / absmax) and the
 *   index comes from a 65536-entry table over [-1, 1] (bitsandbytes' LUT): table slot
 *   u = (uint16)((clamp(s) + 1) * 0.5 * 65535 + 0.5) holds the number of code midpoints
 *   below -1 + 2u / 65535.
 * impl 0 (reference) scans the midpoints for every value; impl 1 (fast) uses a
 * 4-step branchless search (4-bit) or a table built once per call (8-bit). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_internal.h"

/* NF4: quantiles of N(0, 1) (QLoRA), as the float32 values bitsandbytes stores. */
static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* FP4 (e2m1, bias 2, bitsandbytes' own exponent table) in bit-pattern order, over 12.
 * Code 8 is +0: bitsandbytes writes it as the Python integer -0. */
static const float FP4_RAW[16] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f,
                                  0.0f, -0.0625f, -8.0f, -12.0f, -4.0f, -6.0f, -2.0f, -3.0f};
/* Code indices in ascending value order (torch.argsort; the two zeros in index order). */
static const uint8_t FP4_ORDER[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

static void code4(int quant_type, float code[16]) {
    for (int i = 0; i < 16; i++) code[i] = quant_type == SMOLQ_BNB_NF4 ? NF4_CODE[i] : FP4_RAW[i] / 12.0f;
}

/* torch.linspace(start, end, steps) in float32 as torch's CPU kernel computes it: each value a
 * single rounding of start + step*i (first half) or end - step*(steps-1-i) (second half). */
static void linspace_f32(float start, float end, int steps, float *out) {
    const float step = (end - start) / (float)(steps - 1);
    for (int i = 0; i < steps; i++)
        out[i] = i < steps / 2 ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - 1 - i), end);
}

static int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted. */
static void dynamic_map(float code[256]) {
    int n = 0;
    float bounds[65];
    for (int i = 0; i < 7; i++) {
        const int items = (1 << i) + 1;
        const float scale = (float)pow(10.0, -6 + i);
        linspace_f32(0.1f, 1.0f, items, bounds);
        for (int k = 0; k + 1 < items; k++) code[n++] = (bounds[k] + bounds[k + 1]) / 2.0f * scale;
        for (int k = 0; k + 1 < items; k++) code[n++] = (bounds[k] + bounds[k + 1]) / 2.0f * -scale;
    }
    code[n++] = 0.0f;
    code[n++] = 1.0f;
    qsort(code, (size_t)n, sizeof(float), cmp_float);
}

int smolq_bnb_code(int which, float *out) {
    if (!out) return SMOLQ_ERR_ARG;
    if (which == SMOLQ_BNB_NF4 || which == SMOLQ_BNB_FP4) {
        code4(which, out);
        return 16;
    }
    if (which == SMOLQ_BNB_DYNAMIC) {
        dynamic_map(out);
        return 256;
    }
    return SMOLQ_ERR_TYPE;
}

/* ------------------------------------------------------------------------ */
/* 4-bit                                                                      */

typedef struct {
    float mid[15];   /* midpoints of the sorted code */
    uint8_t map[16]; /* sorted position -> code index */
} bnb4_table;

static void bnb4_table_init(int quant_type, bnb4_table *t) {
    float code[16], sorted[16];
    code4(quant_type, code);
    for (int i = 0; i < 16; i++) {
        t->map[i] = quant_type == SMOLQ_BNB_NF4 ? (uint8_t)i : FP4_ORDER[i];
        sorted[i] = code[t->map[i]];
    }
    for (int i = 0; i < 15; i++) t->mid[i] = (sorted[i] + sorted[i + 1]) / 2.0f;
}

static inline int position_ref(const bnb4_table *t, float s) {
    int pos = 0;
    for (int i = 0; i < 15; i++) pos += t->mid[i] < s;
    return pos;
}

/* The midpoints ascend, so the count is found in four halvings (pos + 8, + 4, + 2, + 1). */
static inline int position_fast(const bnb4_table *t, float s) {
    int pos = 0;
    pos += (t->mid[pos + 7] < s) << 3;
    pos += (t->mid[pos + 3] < s) << 2;
    pos += (t->mid[pos + 1] < s) << 1;
    pos += t->mid[pos] < s;
    return pos;
}

static inline float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

/* Nibble values of elements [lo, hi) of one block (block starts at `start`, `len` values). */
static void bnb4_block(const bnb4_table *t, const float *x, int64_t len, int partial, uint8_t *idx, float *absmax,
                       int impl) {
    float am = 0.0f;
    for (int64_t i = 0; i < len; i++) {
        const float a = fabsf(x[i]);
        am = a > am ? a : am;
    }
    const float safe = am < 1e-38f ? 1e-38f : am;
    const float r = 1.0f / safe;
    *absmax = partial ? safe : am;
    for (int64_t i = 0; i < len; i++) {
        const float s = clamp1(partial ? x[i] / safe : x[i] * r);
        const int pos = impl ? position_fast(t, s) : position_ref(t, s);
        idx[i] = t->map[pos];
    }
}

int64_t smolq_bnb4_quantize_blocks(int quant_type, const float *x, uint8_t *packed, float *absmax, int64_t n,
                                   int64_t blocksize, int64_t b0, int64_t b1, int impl) {
    bnb4_table t;
    bnb4_table_init(quant_type, &t);
    uint8_t *idx = malloc((size_t)blocksize + 1);
    if (!idx) return SMOLQ_ERR_ARG;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = n - start < blocksize ? n - start : blocksize;
        bnb4_block(&t, x + start, len, len < blocksize, idx, absmax + b, impl);
        if (len % 2) idx[len] = t.map[position_ref(&t, 0.0f)]; /* odd count: padded with 0 */
        for (int64_t i = 0; i < len; i += 2) packed[(start + i) / 2] = (uint8_t)(idx[i] << 4 | idx[i + 1]);
    }
    free(idx);
    return 0;
}

void smolq_bnb4_dequantize_blocks(int quant_type, const uint8_t *packed, const float *absmax, float *y, int64_t n,
                                  int64_t blocksize, int64_t b0, int64_t b1) {
    float code[16];
    code4(quant_type, code);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * blocksize;
        const int64_t end = n - start < blocksize ? n : start + blocksize;
        for (int64_t i = start; i < end; i++) {
            const uint8_t byte = packed[i / 2];
            y[i] = code[i % 2 ? byte & 15 : byte >> 4] * absmax[b];
        }
    }
}

/* ------------------------------------------------------------------------ */
/* 8-bit dynamic map (nested absmax)                                          */

#define LUT_SIZE 65536

static inline uint16_t lut_slot(float s) {
    s = clamp1(s);
    const float scaled = (s + 1.0f) * 0.5f;
    const float slot = scaled * (float)(LUT_SIZE - 1);
    return (uint16_t)(slot + 0.5f);
}

static inline float lut_value(int slot) { return -1.0f + (2.0f * (float)slot) / (float)(LUT_SIZE - 1); }

static inline uint8_t lut_entry_ref(const float mid[255], int slot) {
    const float v = lut_value(slot);
    int k = 0;
    while (k < 255 && mid[k] < v) k++;
    return (uint8_t)k;
}

static void code8_midpoints(float mid[255]) {
    float code[256];
    dynamic_map(code);
    for (int i = 0; i < 255; i++) mid[i] = 0.5f * (code[i] + code[i + 1]);
}

int64_t smolq_bnb8_quantize(const float *x, uint8_t *q, float *absmax, int64_t n, int64_t blocksize, int impl) {
    if (n < 0 || blocksize <= 0 || (impl != 0 && impl != 1)) return SMOLQ_ERR_ARG;
    if (n == 0) return 0;
    if (!x || !q || !absmax) return SMOLQ_ERR_ARG;
    float mid[255];
    code8_midpoints(mid);
    uint8_t *lut = NULL;
    if (impl) {
        lut = malloc(LUT_SIZE);
        if (!lut) return SMOLQ_ERR_ARG;
        int k = 0;
        for (int i = 0; i < LUT_SIZE; i++) {
            const float v = lut_value(i);
            while (k < 255 && mid[k] < v) k++;
            lut[i] = (uint8_t)k;
        }
    }
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize, end = n - start < blocksize ? n : start + blocksize;
        float am = 0.0f;
        for (int64_t i = start; i < end; i++) am = fabsf(x[i]) > am ? fabsf(x[i]) : am;
        absmax[b] = am;
        if (am == 0.0f) {
            memset(q + start, 0, (size_t)(end - start));
            continue;
        }
        const float r = 1.0f / am;
        for (int64_t i = start; i < end; i++) {
            const uint16_t slot = lut_slot(x[i] * r);
            q[i] = lut ? lut[slot] : lut_entry_ref(mid, slot);
        }
    }
    free(lut);
    return n;
}

int64_t smolq_bnb8_dequantize(const uint8_t *q, const float *absmax, float *y, int64_t n, int64_t blocksize) {
    if (n < 0 || blocksize <= 0) return SMOLQ_ERR_ARG;
    if (n == 0) return 0;
    if (!q || !absmax || !y) return SMOLQ_ERR_ARG;
    float code[256];
    dynamic_map(code);
    for (int64_t i = 0; i < n; i++) y[i] = code[q[i]] * absmax[i / blocksize];
    return n;
}

/* ------------------------------------------------------------------------ */
/* torch's float32 CPU sum (aten/src/ATen/native/cpu/SumKernel.cpp), to compute the
 * double-quantization offset (absmax.mean()) to the bit: `lanes`-wide vector
 * accumulators, four of them in parallel, cascaded in levels of 16 steps; the scalar
 * tail first, then the lanes in order. Ranges above 32768 values are split as
 * at::parallel_for splits them over `threads` threads and their sums added in order. */

static float cascade_sum(const float *x, int64_t n, int lanes) {
    enum { ILP = 4, LEVELS = 4, MAXL = 16 };
    const int64_t nvec = n / lanes, groups = nvec / ILP;
    int64_t ceil_log2 = 0;
    while (((int64_t)1 << ceil_log2) < groups) ceil_log2++;
    const int64_t power = ceil_log2 / LEVELS > 4 ? ceil_log2 / LEVELS : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[LEVELS][ILP][MAXL];
    memset(acc, 0, sizeof(acc));
    int64_t i = 0;
    while (i + step <= groups) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) acc[0][k][l] += x[(i * ILP + k) * lanes + l];
        for (int lv = 1; lv < LEVELS; lv++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[lv][k][l] += acc[lv - 1][k][l];
                    acc[lv - 1][k][l] = 0.0f;
                }
            if (i & (mask << (lv * power))) break;
        }
    }
    for (; i < groups; i++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += x[(i * ILP + k) * lanes + l];
    for (int lv = 1; lv < LEVELS; lv++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += acc[lv][k][l];
    float *p = acc[0][0];
    for (int64_t v = groups * ILP; v < nvec; v++)
        for (int l = 0; l < lanes; l++) p[l] += x[v * lanes + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < lanes; l++) p[l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = nvec * lanes; t < n; t++) total += x[t];
    for (int l = 0; l < lanes; l++) total += p[l];
    return total;
}

int smolq_bnb_mean(const float *x, int64_t n, int lanes, int threads, float *out) {
    if (n <= 0 || !x || !out || (lanes != 8 && lanes != 16) || threads < 1) return SMOLQ_ERR_ARG;
    const int64_t grain = 32768;
    float sum;
    if (n <= grain || threads == 1) {
        sum = cascade_sum(x, n, lanes);
    } else {
        int64_t tasks = (n + grain - 1) / grain;
        if (tasks > threads) tasks = threads;
        const int64_t chunk = (n + tasks - 1) / tasks;
        sum = cascade_sum(x, chunk, lanes);
        for (int64_t at = chunk; at < n; at += chunk) sum += cascade_sum(x + at, n - at < chunk ? n - at : chunk, lanes);
    }
    *out = sum / (float)n;
    return 0;
}
