/* Row kernels of every non-K block type: F32, F16, BF16, the 32-element
 * ggjt-era types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 in their v1/v2/v3 layouts, the
 * read-only Q4_2/Q4_3, and the ternary TQ1_0/TQ2_0.
 *
 * Bit-exactness: the v3 reference quantizers do exactly the float operations
 * of llama.cpp's quantize_row_*_ref (ggml-quants.c) in the same order, so they
 * produce its bytes (and gguf.quants', which mirrors them). The build uses
 * -std=c99, which keeps GCC from contracting a*b+c into an FMA
 * (-ffp-contract=off in ISO mode): contraction would change roundings.
 *
 * The ggjt-era block layouts are data (BLOCK_FORMATS): one generic packer and
 * unpacker serve quantization, dequantization and relayout. Each era's
 * encoder differs only in how it rounds (ENCODERS).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_internal.h"
#include "quants_common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define SMOLQ_X86 1
#include <immintrin.h>
/* The fast paths are plain loops; this asks GCC for an AVX2 clone picked at
 * load time, with the baseline SSE2 clone elsewhere. Same float ops either way. */
#define FAST_FN __attribute__((target_clones("avx2", "default")))
#else
#define SMOLQ_X86 0
#define FAST_FN
#endif

/* ------------------------------------------------------------------------ */
/* The ggjt-era block layouts (formats.md 5.2.1-5.2.3) as data.             */

enum nibble_order {
    NIB_NONE,    /* 8-bit values, one byte each */
    NIB_PAIRS,   /* v1: byte k = element 2k (low nibble), 2k+1 (high nibble) */
    NIB_HALVES   /* v2/v3: byte k = element k (low), k + qk/2 (high) */
};

typedef struct {
    int qk;           /* elements per block */
    int bytes;        /* bytes per block */
    int scale_bytes;  /* 4: f32 d (and m); 2: f16 */
    int has_min;      /* x = q*d + m  (else x = (q - offset)*d) */
    int has_qh;       /* 5-bit: a LE u32 whose bit j is the fifth bit of element j */
    int nibbles;      /* enum nibble_order */
    int offset;       /* subtracted from q before scaling (symmetric types) */
} block_fmt;

typedef struct {
    int type, layout;
    block_fmt f;
} block_fmt_entry;

static const block_fmt_entry BLOCK_FORMATS[] = {
    /* type           layout  qk  bytes sc min qh nibbles     offset */
    {SMOLQ_T_Q4_0, 1, {32, 20, 4, 0, 0, NIB_PAIRS, 8}},
    {SMOLQ_T_Q4_0, 2, {32, 20, 4, 0, 0, NIB_HALVES, 8}},
    {SMOLQ_T_Q4_0, 3, {32, 18, 2, 0, 0, NIB_HALVES, 8}},
    {SMOLQ_T_Q4_1, 1, {32, 24, 4, 1, 0, NIB_PAIRS, 0}},
    {SMOLQ_T_Q4_1, 2, {32, 24, 4, 1, 0, NIB_HALVES, 0}},
    {SMOLQ_T_Q4_1, 3, {32, 20, 2, 1, 0, NIB_HALVES, 0}},
    {SMOLQ_T_Q5_0, 1, {32, 22, 2, 0, 1, NIB_PAIRS, 16}},
    {SMOLQ_T_Q5_0, 2, {32, 22, 2, 0, 1, NIB_HALVES, 16}},
    {SMOLQ_T_Q5_0, 3, {32, 22, 2, 0, 1, NIB_HALVES, 16}},
    {SMOLQ_T_Q5_1, 1, {32, 24, 2, 1, 1, NIB_PAIRS, 0}},
    {SMOLQ_T_Q5_1, 2, {32, 24, 2, 1, 1, NIB_HALVES, 0}},
    {SMOLQ_T_Q5_1, 3, {32, 24, 2, 1, 1, NIB_HALVES, 0}},
    {SMOLQ_T_Q8_0, 1, {32, 36, 4, 0, 0, NIB_NONE, 0}},
    {SMOLQ_T_Q8_0, 2, {32, 36, 4, 0, 0, NIB_NONE, 0}},
    {SMOLQ_T_Q8_0, 3, {32, 34, 2, 0, 0, NIB_NONE, 0}},
    /* removed 2023 types, v1 only, read-only */
    {SMOLQ_T_Q4_2, 1, {16, 10, 2, 0, 0, NIB_PAIRS, 8}},
    {SMOLQ_T_Q4_3, 1, {16, 12, 2, 1, 0, NIB_PAIRS, 0}},
};

static const block_fmt *find_fmt(int type, int layout) {
    for (size_t i = 0; i < sizeof(BLOCK_FORMATS) / sizeof(BLOCK_FORMATS[0]); i++)
        if (BLOCK_FORMATS[i].type == type && BLOCK_FORMATS[i].layout == layout) return &BLOCK_FORMATS[i].f;
    return NULL;
}

/* One block, decoded: float scales and integer quants (signed for Q8_0). */
typedef struct {
    float d, m;
    int q[32];
} qblock;

static void unpack_block(const block_fmt *f, const uint8_t *p, qblock *b) {
    const int sb = f->scale_bytes;
    b->d = sb == 4 ? rdf32(p) : f16_load(p);
    p += sb;
    b->m = 0.0f;
    if (f->has_min) {
        b->m = sb == 4 ? rdf32(p) : f16_load(p);
        p += sb;
    }
    uint32_t qh = 0;
    if (f->has_qh) {
        qh = rd32(p);
        p += 4;
    }
    const int half = f->qk / 2;
    switch (f->nibbles) {
    case NIB_NONE:
        for (int j = 0; j < f->qk; j++) b->q[j] = (int8_t)p[j];
        break;
    case NIB_PAIRS:
        for (int k = 0; k < half; k++) { b->q[2 * k] = p[k] & 15; b->q[2 * k + 1] = p[k] >> 4; }
        break;
    default:
        for (int k = 0; k < half; k++) { b->q[k] = p[k] & 15; b->q[k + half] = p[k] >> 4; }
        break;
    }
    if (f->has_qh)
        for (int j = 0; j < f->qk; j++) b->q[j] |= (int)((qh >> j) & 1) << 4;
}

/* Writes a scale; clears *lossless when f16 cannot hold it exactly. */
static uint8_t *put_scale(uint8_t *p, float v, int scale_bytes, int *lossless) {
    if (scale_bytes == 4) {
        wr32(p, smolq_f32_bits(v));
        return p + 4;
    }
    const uint16_t h = smolq_fp32_to_fp16(v);
    if (lossless && smolq_f32_bits(smolq_fp16_to_fp32(h)) != smolq_f32_bits(v)) *lossless = 0;
    wr16(p, h);
    return p + 2;
}

static void pack_block(const block_fmt *f, const qblock *b, uint8_t *p, int *lossless) {
    p = put_scale(p, b->d, f->scale_bytes, lossless);
    if (f->has_min) p = put_scale(p, b->m, f->scale_bytes, lossless);
    if (f->has_qh) {
        uint32_t qh = 0;
        for (int j = 0; j < f->qk; j++) qh |= (uint32_t)((b->q[j] >> 4) & 1) << j;
        wr32(p, qh);
        p += 4;
    }
    const int half = f->qk / 2;
    switch (f->nibbles) {
    case NIB_NONE:
        for (int j = 0; j < f->qk; j++) p[j] = (uint8_t)(int8_t)b->q[j];
        break;
    case NIB_PAIRS:
        for (int k = 0; k < half; k++) p[k] = (uint8_t)((b->q[2 * k] & 15) | ((b->q[2 * k + 1] & 15) << 4));
        break;
    default:
        for (int k = 0; k < half; k++) p[k] = (uint8_t)((b->q[k] & 15) | ((b->q[k + half] & 15) << 4));
        break;
    }
}

/* x = (q - offset)*d or q*d + m, as ggml's dequantize_row_* computes it:
 * the integer converted to float, one multiply, then the add. */
static void decode_block(const block_fmt *f, const qblock *b, float *y) {
    if (f->has_min)
        for (int j = 0; j < f->qk; j++) y[j] = (float)b->q[j] * b->d + b->m;
    else
        for (int j = 0; j < f->qk; j++) y[j] = (float)(b->q[j] - f->offset) * b->d;
}

/* ------------------------------------------------------------------------ */
/* Encoders: float block -> qblock. Each era's reference rounding.          */

enum encoder {
    ENC_SYM_ROUND,   /* v1 Q4_0: d = max/-2^(b-1); q = min(qmax, roundf(x*id) + off) */
    ENC_SYM_TRUNC,   /* v2/v3 Q4_0, Q5_0: q = min(qmax, (int)(x*id + off + 0.5)) */
    ENC_ASYM_ROUND,  /* v1 Q4_1: d = (max-min)/qmax; q = roundf((x-min)*id) */
    ENC_ASYM_TRUNC,  /* v2/v3 Q4_1, Q5_1: q = min(qmax, (int)((x-min)*id + 0.5)) */
    ENC_Q8           /* Q8_0: d = amax/127; q = roundf(x*id) */
};

typedef struct {
    int type, layout;
    int encoder;
    int bits;
} encoder_entry;

static const encoder_entry ENCODERS[] = {
    {SMOLQ_T_Q4_0, 1, ENC_SYM_ROUND, 4},  {SMOLQ_T_Q4_0, 2, ENC_SYM_TRUNC, 4},  {SMOLQ_T_Q4_0, 3, ENC_SYM_TRUNC, 4},
    {SMOLQ_T_Q4_1, 1, ENC_ASYM_ROUND, 4}, {SMOLQ_T_Q4_1, 2, ENC_ASYM_TRUNC, 4}, {SMOLQ_T_Q4_1, 3, ENC_ASYM_TRUNC, 4},
    {SMOLQ_T_Q5_0, 1, ENC_SYM_TRUNC, 5},  {SMOLQ_T_Q5_0, 2, ENC_SYM_TRUNC, 5},  {SMOLQ_T_Q5_0, 3, ENC_SYM_TRUNC, 5},
    {SMOLQ_T_Q5_1, 1, ENC_ASYM_TRUNC, 5}, {SMOLQ_T_Q5_1, 2, ENC_ASYM_TRUNC, 5}, {SMOLQ_T_Q5_1, 3, ENC_ASYM_TRUNC, 5},
    {SMOLQ_T_Q8_0, 1, ENC_Q8, 8},         {SMOLQ_T_Q8_0, 2, ENC_Q8, 8},         {SMOLQ_T_Q8_0, 3, ENC_Q8, 8},
};

static const encoder_entry *find_encoder(int type, int layout) {
    for (size_t i = 0; i < sizeof(ENCODERS) / sizeof(ENCODERS[0]); i++)
        if (ENCODERS[i].type == type && ENCODERS[i].layout == layout) return &ENCODERS[i];
    return NULL;
}

/* Largest |x| as ggml's Q8_0 and TQ quantizers find it (MAX: a NaN sticks). */
static float absmax(const float *x, int n) {
    float amax = 0.0f;
    for (int j = 0; j < n; j++) amax = MAX(amax, fabsf(x[j]));
    return amax;
}

static void encode_sym(const float *x, int n, int bits, int rounding, qblock *b) {
    const int off = 1 << (bits - 1), qmax = (1 << bits) - 1;
    const float max = signed_absmax(x, n);
    const float d = max / -off;
    const float id = d ? 1.0f / d : 0.0f;
    const float bias = (float)off + 0.5f; /* 8.5f, 16.5f */
    b->d = d;
    b->m = 0.0f;
    for (int j = 0; j < n; j++) {
        const float v = x[j] * id;
        const int q = rounding ? (int)roundf(v) + off : (int)(v + bias);
        b->q[j] = MIN(qmax, q);
    }
}

static void encode_asym(const float *x, int n, int bits, int rounding, qblock *b) {
    const int qmax = (1 << bits) - 1;
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        const float v = x[j];
        if (v < min) min = v;
        if (v > max) max = v;
    }
    const float d = (max - min) / qmax;
    const float id = d ? 1.0f / d : 0.0f;
    b->d = d;
    b->m = min;
    for (int j = 0; j < n; j++) {
        const float v = (x[j] - min) * id;
        const int q = rounding ? (int)roundf(v) : (int)(v + 0.5f);
        b->q[j] = MIN(qmax, q);
    }
}

static void encode_q8(const float *x, int n, qblock *b) {
    const float amax = absmax(x, n);
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    b->d = d;
    b->m = 0.0f;
    for (int j = 0; j < n; j++) b->q[j] = (int)roundf(x[j] * id);
}

static void encode_block(const encoder_entry *e, const float *x, int n, qblock *b) {
    switch (e->encoder) {
    case ENC_SYM_ROUND: encode_sym(x, n, e->bits, 1, b); break;
    case ENC_SYM_TRUNC: encode_sym(x, n, e->bits, 0, b); break;
    case ENC_ASYM_ROUND: encode_asym(x, n, e->bits, 1, b); break;
    case ENC_ASYM_TRUNC: encode_asym(x, n, e->bits, 0, b); break;
    default: encode_q8(x, n, b); break;
    }
}

/* ------------------------------------------------------------------------ */
/* Importance-weighted encoders: llama.cpp's quantize_row_q{4,5}_{0,1}_impl
 * with quant_weights (make_qx_quants / make_qkx3_quants), same float ops.   */

/* One block with importance weights; sigma2 is the row's mean square. The
 * searches write byte levels (their K-quant callers' type); qblock holds ints. */
static void encode_weighted(int type, const float *x, const float *qw, float sigma2, qblock *b) {
    float weight[32];
    imatrix_weights(x, qw, sigma2, 32, weight);
    b->m = 0.0f;
    if (type == SMOLQ_T_Q4_0 || type == SMOLQ_T_Q5_0) {
        int8_t L[32];
        b->d = make_qx_quants(32, type == SMOLQ_T_Q4_0 ? 8 : 16, x, L, weight);
        for (int j = 0; j < 32; ++j) b->q[j] = L[j];
    } else {
        uint8_t L[32], Laux[32];
        float min;
        b->d = make_qkx_quants(32, type == SMOLQ_T_Q4_1 ? 15 : 31, x, weight, L, &min, Laux, -0.9f, 0.05f, 36, 0);
        b->m = -min;
        for (int j = 0; j < 32; ++j) b->q[j] = L[j];
    }
}

static float row_mean_square(const float *x, int64_t n) { return sum_squares(x, n) / n; }

/* ------------------------------------------------------------------------ */
/* Generic reference rows for the ggjt-era types.                            */

static void quant_row_legacy(int type, int layout, const float *x, void *vy, int64_t n, const float *imatrix) {
    const block_fmt *f = find_fmt(type, layout);
    const encoder_entry *e = find_encoder(type, layout);
    uint8_t *y = vy;
    const int64_t nb = n / f->qk;
    /* Q8_0 has no weighted path in llama.cpp: quant_weights are ignored. */
    const int weighted = imatrix != NULL && type != SMOLQ_T_Q8_0;
    const float sigma2 = weighted ? row_mean_square(x, n) : 0.0f;
    qblock b;
    for (int64_t i = 0; i < nb; i++) {
        if (weighted)
            encode_weighted(type, x + i * f->qk, imatrix + i * f->qk, sigma2, &b);
        else
            encode_block(e, x + i * f->qk, f->qk, &b);
        pack_block(f, &b, y + i * f->bytes, NULL);
    }
}

static void dequant_row_legacy(int type, int layout, const void *vx, float *y, int64_t n) {
    const block_fmt *f = find_fmt(type, layout);
    const uint8_t *x = vx;
    const int64_t nb = n / f->qk;
    qblock b;
    for (int64_t i = 0; i < nb; i++) {
        unpack_block(f, x + i * f->bytes, &b);
        decode_block(f, &b, y + i * f->qk);
    }
}

#define LEGACY_ROWS(name, TYPE, LAYOUT)                                                          \
    static void name##_quant(const float *x, void *y, int64_t n, const float *w) {               \
        quant_row_legacy(TYPE, LAYOUT, x, y, n, w);                                              \
    }                                                                                            \
    static void name##_dequant(const void *x, float *y, int64_t n) { dequant_row_legacy(TYPE, LAYOUT, x, y, n); }

LEGACY_ROWS(q4_0_v1, SMOLQ_T_Q4_0, 1)
LEGACY_ROWS(q4_0_v2, SMOLQ_T_Q4_0, 2)
LEGACY_ROWS(q4_0_v3, SMOLQ_T_Q4_0, 3)
LEGACY_ROWS(q4_1_v1, SMOLQ_T_Q4_1, 1)
LEGACY_ROWS(q4_1_v2, SMOLQ_T_Q4_1, 2)
LEGACY_ROWS(q4_1_v3, SMOLQ_T_Q4_1, 3)
LEGACY_ROWS(q5_0_v1, SMOLQ_T_Q5_0, 1)
LEGACY_ROWS(q5_0_v2, SMOLQ_T_Q5_0, 2)
LEGACY_ROWS(q5_0_v3, SMOLQ_T_Q5_0, 3)
LEGACY_ROWS(q5_1_v1, SMOLQ_T_Q5_1, 1)
LEGACY_ROWS(q5_1_v2, SMOLQ_T_Q5_1, 2)
LEGACY_ROWS(q5_1_v3, SMOLQ_T_Q5_1, 3)
LEGACY_ROWS(q8_0_v1, SMOLQ_T_Q8_0, 1)
LEGACY_ROWS(q8_0_v2, SMOLQ_T_Q8_0, 2)
LEGACY_ROWS(q8_0_v3, SMOLQ_T_Q8_0, 3)

static void q4_2_dequant(const void *x, float *y, int64_t n) { dequant_row_legacy(SMOLQ_T_Q4_2, 1, x, y, n); }
static void q4_3_dequant(const void *x, float *y, int64_t n) { dequant_row_legacy(SMOLQ_T_Q4_3, 1, x, y, n); }

/* ------------------------------------------------------------------------ */
/* Fast v3 paths: the same float operations, arranged so loops vectorize.
 * Maxima are found on the integer bit patterns (|x| orders like its bits),
 * then the element the reference loop would have kept is looked up.        */

static inline uint32_t abs_bits(float v) { return smolq_f32_bits(v) & 0x7fffffffu; }

/* A signed integer that orders floats like '<' does (except -0 < +0). */
static inline int32_t order_key(float v) {
    const int32_t b = (int32_t)smolq_f32_bits(v);
    return b ^ ((b >> 31) & 0x7fffffff);
}
static inline float from_order_key(int32_t k) { return smolq_bits_f32((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }

static inline uint32_t block_absmax_bits(const float *restrict x) {
    uint32_t m = 0;
    for (int j = 0; j < 32; j++) {
        const uint32_t a = abs_bits(x[j]);
        m = a > m ? a : m;
    }
    return m;
}

/* The reference keeps the first element equal to an extreme; only a zero
 * extreme can differ in its bits (+0 vs -0) among equal-comparing values. */
static inline float first_equal(const float *x, int n, float v) {
    if (v != 0.0f) return v;
    for (int j = 0; j < n; j++)
        if (x[j] == 0.0f) return x[j];
    return v;
}

/* C roundf (half away from zero), exactly, from floors that vectorize:
 * a - floor(a) is exact, so 2*(a - floor(a)) >= 1 tells the halves apart
 * without the 0.49999997 + 0.5 == 1.0 trap. (gguf's np_roundf does the same.) */
static inline float round_half_away(float v) {
    const float a = fabsf(v);
    const float f = floorf(a);
    return copysignf(f + floorf(2.0f * (a - f)), v);
}

/* A v3 block's codes after its scales: [qh u32, the fifth bits, when
 * qh_bytes is 4]; qs[16], element j low and j + 16 high. */
static inline void pack_v3_codes(const int32_t *q, uint8_t *restrict p, int qh_bytes) {
    if (qh_bytes) {
        uint32_t qh = 0;
        for (int j = 0; j < 32; j++) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
        wr32(p, qh);
    }
    for (int j = 0; j < 16; j++) p[qh_bytes + j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

/* Q4_0 / Q5_0 (bits 4 / 5) in the v3 layout: d f16; [qh u32]; qs[16]. */
static inline void sym_v3_fast(const float *restrict x, uint8_t *restrict y, int64_t n, int bits) {
    const int off = 1 << (bits - 1), qmax = (1 << bits) - 1;
    const int qh_bytes = bits == 5 ? 4 : 0, bytes = 2 + qh_bytes + 16;
    const float bias = (float)off + 0.5f;
    for (int64_t i = 0; i < n / 32; i++, x += 32, y += bytes) {
        const uint32_t am = block_absmax_bits(x);
        /* the first element reaching the maximum, found without a branch per element */
        uint32_t hits = 0;
        for (int j = 0; j < 32; j++) hits |= (uint32_t)(abs_bits(x[j]) == am) << j;
        const float max = am ? x[__builtin_ctz(hits)] : 0.0f; /* the reference keeps 0.0f for all-zero blocks */
        const float d = max / -off;
        const float id = d ? 1.0f / d : 0.0f;
        f16_store(y, d);
        int32_t q[32];
        for (int j = 0; j < 32; j++) {
            const int32_t v = (int32_t)(x[j] * id + bias);
            q[j] = v < qmax ? v : qmax;
        }
        pack_v3_codes(q, y + 2, qh_bytes);
    }
}

/* Q4_1 / Q5_1 in the v3 layout: d f16; m f16; [qh u32]; qs[16]. */
static inline void asym_v3_fast(const float *restrict x, uint8_t *restrict y, int64_t n, int bits) {
    const int qmax = (1 << bits) - 1;
    const int qh_bytes = bits == 5 ? 4 : 0, bytes = 4 + qh_bytes + 16;
    for (int64_t i = 0; i < n / 32; i++, x += 32, y += bytes) {
        int32_t kmin = INT32_MAX, kmax = INT32_MIN;
        for (int j = 0; j < 32; j++) {
            const int32_t k = order_key(x[j]);
            kmin = k < kmin ? k : kmin;
            kmax = k > kmax ? k : kmax;
        }
        const float min = first_equal(x, 32, from_order_key(kmin));
        const float max = first_equal(x, 32, from_order_key(kmax));
        const float d = (max - min) / qmax;
        const float id = d ? 1.0f / d : 0.0f;
        f16_store(y, d);
        f16_store(y + 2, min);
        int32_t q[32];
        for (int j = 0; j < 32; j++) {
            const int32_t v = (int32_t)((x[j] - min) * id + 0.5f);
            q[j] = v < qmax ? v : qmax;
        }
        pack_v3_codes(q, y + 4, qh_bytes);
    }
}

/* With an imatrix the fast entry points hand over to the reference rows. */
#define FAST_V3(name, encoder, bits)                                                                       \
    FAST_FN static void name##_v3_fast(const float *restrict x, void *restrict y, int64_t n, const float *w) { \
        if (w) { name##_v3_quant(x, y, n, w); return; }                                                   \
        encoder(x, y, n, bits);                                                                           \
    }

#if SMOLQ_X86
/* A 32-element block's |x| as integer bits (into a[0..3]) and their maximum in
 * every lane: block_absmax_bits, eight lanes at a time (Q4_0 and Q8_0 below). */
__attribute__((target("avx2"))) static inline __m256i block_absmax_bits_avx2(const float *restrict x, __m256i a[4]) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    for (int k = 0; k < 4; k++) a[k] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 8 * k)), magnitude);
    __m256i m = _mm256_max_epu32(_mm256_max_epu32(a[0], a[1]), _mm256_max_epu32(a[2], a[3]));
    m = _mm256_max_epu32(m, _mm256_permute2x128_si256(m, m, 1));
    m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0x4e));
    return _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0xb1));
}

/* Q4_0 eight lanes at a time: sym_v3_fast's operations exactly (the |x| maximum
 * compared as integer bits, the first element at it, x*id then + 8.5 with no
 * FMA, truncation, the signed clamp at 15), so the bytes are the same; the
 * auto-vectorised loop above manages ~0.7 G weights/s, this one several times
 * that, and Q4_0 requantization is otherwise bound by it (#18). */
__attribute__((target("avx2,f16c"))) static void q4_0_v3_avx2(const float *restrict x, uint8_t *restrict y, int64_t n) {
    const __m256i fifteen = _mm256_set1_epi32(15);
    const __m256 bias = _mm256_set1_ps(8.5f);
    for (int64_t i = 0; i < n / 32; i++, x += 32, y += 18) {
        __m256i a[4];
        const __m256i m = block_absmax_bits_avx2(x, a);
        const uint32_t am = (uint32_t)_mm256_cvtsi256_si32(m);
        uint32_t hits = 0;
        for (int k = 0; k < 4; k++)
            hits |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a[k], m))) << (8 * k);
        const float max = am ? x[__builtin_ctz(hits)] : 0.0f;
        const float d = max * -0.125f; /* exactly max / -8: a power of two scales without rounding twice */
        const float id = d ? 1.0f / d : 0.0f;
        wr16(y, (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0));
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            const __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), vid), bias);
            q[k] = _mm256_and_si256(_mm256_min_epi32(_mm256_cvttps_epi32(t), fifteen), fifteen);
        }
        /* byte j = element j (low nibble) | element j + 16 (high nibble) */
        const __m256i lo = _mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4));
        const __m256i hi = _mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4));
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
        _mm_storeu_si128((__m128i *)(y + 2),
                         _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    }
}

/* Q8_0 eight lanes at a time: q8_0_v3_vec's operations exactly (the |x|
 * maximum as integer bits, d = amax / 127, x*id with no FMA), and roundf as
 * truncation plus one step away from zero where the dropped part is at least
 * one half: v - trunc(v) is exact for every float, so this is roundf itself,
 * not an approximation of it. */
__attribute__((target("avx2,f16c"))) static void q8_0_v3_avx2(const float *restrict x, uint8_t *restrict y, int64_t n) {
    const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), low_byte = _mm256_set1_epi32(0xff);
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 32; i++, x += 32, y += 34) {
        __m256i a[4];
        const __m256i m = block_absmax_bits_avx2(x, a);
        const float d = smolq_bits_f32((uint32_t)_mm256_cvtsi256_si32(m)) / 127;
        const float id = d ? 1.0f / d : 0.0f;
        wr16(y, (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0));
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), vid);
            const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 dropped = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
            const __m256 step = _mm256_and_ps(_mm256_cmp_ps(dropped, half, _CMP_GE_OQ),
                                              _mm256_or_ps(one, _mm256_and_ps(v, sign)));
            /* the low byte, as the reference's int32 -> int8 cast keeps it: where a
             * subnormal scale makes id infinite, x*id is inf or NaN and converts to
             * INT32_MIN, whose low byte is 0 (a saturating pack would give -128) */
            q[k] = _mm256_and_si256(_mm256_cvttps_epi32(_mm256_add_ps(t, step)), low_byte);
        }
        /* bytes 0..255 pass the unsigned packs unchanged; the packs work per 128-bit
         * half, and the permutation puts the four-element dwords back in order */
        const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(y + 2), _mm256_permutevar8x32_epi32(b, lane_order));
    }
}

#endif

static void q4_0_v3_fast(const float *restrict x, void *restrict y, int64_t n, const float *w) {
    if (w) { q4_0_v3_quant(x, y, n, w); return; }
#if SMOLQ_X86
    if (smolq_use_avx2()) { q4_0_v3_avx2(x, y, n); return; }
#endif
    sym_v3_fast(x, y, n, 4);
}
FAST_V3(q5_0, sym_v3_fast, 5)
FAST_V3(q4_1, asym_v3_fast, 4)
FAST_V3(q5_1, asym_v3_fast, 5)

FAST_FN static void q8_0_v3_vec(const float *restrict x, void *restrict vy, int64_t n) {
    uint8_t *restrict y = vy;
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i++, x += 32, y += 34) {
        const float amax = smolq_bits_f32(block_absmax_bits(x));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        f16_store(y, d);
        int32_t q[32];
        for (int j = 0; j < 32; j++) q[j] = (int32_t)round_half_away(x[j] * id);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)q[j];
    }
}

static void q8_0_v3_fast(const float *restrict x, void *restrict y, int64_t n, const float *imatrix) {
    (void)imatrix; /* llama.cpp's quantize_q8_0 ignores quant_weights */
#if SMOLQ_X86
    if (smolq_use_avx2()) { q8_0_v3_avx2(x, y, n); return; }
#endif
    q8_0_v3_vec(x, y, n);
}

/* Q5_0/Q5_1 v3 blocks: unpack the codes, then one float loop. (For the 4-bit
 * types the generic decoder above already vectorizes best.) */
static inline void q5_v3_dequant(const uint8_t *restrict x, float *restrict y, int64_t n, int has_min) {
    const int head = 2 + 2 * has_min + 4, bytes = head + 16;
    for (int64_t i = 0; i < n / 32; i++, x += bytes, y += 32) {
        const float d = f16_load(x);
        const float m = has_min ? f16_load(x + 2) : 0.0f;
        const uint32_t qh = rd32(x + 2 + 2 * has_min);
        int32_t q[32];
        for (int j = 0; j < 16; j++) q[j] = x[head + j] & 15;
        for (int j = 0; j < 16; j++) q[j + 16] = x[head + j] >> 4;
        for (int j = 0; j < 32; j++) q[j] |= (int32_t)((qh >> j) & 1) << 4;
        if (has_min)
            for (int j = 0; j < 32; j++) y[j] = (float)q[j] * d + m;
        else /* (no "+ 0.0f" here: it would turn -0.0 into +0.0) */
            for (int j = 0; j < 32; j++) y[j] = (float)(q[j] - 16) * d;
    }
}

FAST_FN static void q5_0_v3_dequant_fast(const void *restrict x, float *restrict y, int64_t n) { q5_v3_dequant(x, y, n, 0); }
FAST_FN static void q5_1_v3_dequant_fast(const void *restrict x, float *restrict y, int64_t n) { q5_v3_dequant(x, y, n, 1); }

FAST_FN static void q8_0_v3_dequant_fast(const void *restrict vx, float *restrict y, int64_t n) {
    const uint8_t *restrict x = vx;
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i++, x += 34, y += 32) {
        const float d = f16_load(x);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)x[2 + j] * d;
    }
}

/* ------------------------------------------------------------------------ */
/* F32, F16, BF16.                                                           */

static void f32_quant(const float *x, void *y, int64_t n, const float *w) { (void)w; memcpy(y, x, (size_t)n * 4); }
static void f32_dequant(const void *x, float *y, int64_t n) { memcpy(y, x, (size_t)n * 4); }

static void f16_quant(const float *x, void *vy, int64_t n, const float *w) {
    (void)w;
    uint8_t *y = vy;
    for (int64_t i = 0; i < n; i++) f16_store(y + 2 * i, x[i]);
}
static void f16_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n; i++) y[i] = f16_load(x + 2 * i);
}

#if SMOLQ_X86
/* F16C converts with round-to-nearest-even and quiets NaNs keeping the top
 * mantissa bits: the same bits as fp16.h (tests hold them equal). */
__attribute__((target("avx,f16c"))) static void f16_quant_f16c(const float *x, uint8_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(y + 2 * i), h);
    }
    for (; i < n; i++) f16_store(y + 2 * i, x[i]);
}
/* F16C quiets signaling NaNs on the way up; fp16.h (and numpy) keep their
 * bits, so chunks holding one (exponent 31, quiet bit 0x200 clear, mantissa
 * non-zero) take the scalar route. */
__attribute__((target("avx,f16c"))) static void f16_dequant_f16c(const uint8_t *x, float *y, int64_t n) {
    int64_t i = 0;
    const __m128i magnitude = _mm_set1_epi16(0x7fff);
    const __m128i inf = _mm_set1_epi16(0x7c00), quiet = _mm_set1_epi16(0x7e00);
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(x + 2 * i));
        const __m128i a = _mm_and_si128(h, magnitude);
        const __m128i snan = _mm_and_si128(_mm_cmpgt_epi16(a, inf), _mm_cmplt_epi16(a, quiet));
        if (_mm_movemask_epi8(snan)) {
            for (int k = 0; k < 8; k++) y[i + k] = f16_load(x + 2 * (i + k));
        } else {
            _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
        }
    }
    for (; i < n; i++) y[i] = f16_load(x + 2 * i);
}
static int have_f16c(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    return cached;
}
#endif

static void f16_quant_fast(const float *x, void *y, int64_t n, const float *w) {
#if SMOLQ_X86
    if (have_f16c()) { (void)w; f16_quant_f16c(x, y, n); return; }
#endif
    f16_quant(x, y, n, w);
}
static void f16_dequant_fast(const void *x, float *y, int64_t n) {
#if SMOLQ_X86
    if (have_f16c()) { f16_dequant_f16c(x, y, n); return; }
#endif
    f16_dequant(x, y, n);
}

FAST_FN static void bf16_quant(const float *restrict x, void *restrict vy, int64_t n, const float *w) {
    (void)w;
    uint8_t *restrict y = vy;
    for (int64_t i = 0; i < n; i++) wr16(y + 2 * i, smolq_fp32_to_bf16(x[i]));
}
FAST_FN static void bf16_dequant(const void *restrict vx, float *restrict y, int64_t n) {
    const uint8_t *restrict x = vx;
    for (int64_t i = 0; i < n; i++) y[i] = smolq_bf16_to_fp32(rd16(x + 2 * i));
}

/* ------------------------------------------------------------------------ */
/* Ternary TQ1_0 / TQ2_0 (llama.cpp quantize_row_tq{1,2}_0_ref).            */

static float ternary_scale(const float *x, float *id) {
    const float amax = absmax(x, QK_K);
    *id = amax ? 1.0f / amax : 0.0f;
    return amax;
}

/* -1, 0, 1 -> 0, 1, 2. The reference rounds with lroundf; the fast rows with
 * round_half_away, the same function without the libm call. */
static inline int trit(float v, float id, int fast) {
    return (fast ? (int)round_half_away(v * id) : (int)lroundf(v * id)) + 1;
}

/* n trits, most significant first, scaled so the first is the top trit of a
 * byte: ceil(q * 256 / 243), TQ1_0's "fixed point" base-3 digits. */
static inline uint8_t trit_byte(const float *x, int stride, int n, int extra_shift, float id, int fast) {
    uint8_t q = 0;
    for (int k = 0; k < n; k++) q = (uint8_t)(q * 3 + trit(x[k * stride], id, fast));
    if (extra_shift) q = (uint8_t)(q * 3);
    return (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243);
}

static inline void tq1_0_rows(const float *x, void *vy, int64_t n, int fast) {
    uint8_t *y = vy;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K, y += 54) {
        float id;
        const float d = ternary_scale(x, &id);
        /* qs[0..31]: elements m + 32k (k < 5); qs[32..47]: 160 + m + 16k;
         * qh[0..3]: 240 + m + 4k (k < 4). */
        for (int m = 0; m < 32; m++) y[m] = trit_byte(x + m, 32, 5, 0, id, fast);
        for (int m = 0; m < 16; m++) y[32 + m] = trit_byte(x + 160 + m, 16, 5, 0, id, fast);
        for (int m = 0; m < 4; m++) y[48 + m] = trit_byte(x + 240 + m, 4, 4, 1, id, fast);
        f16_store(y + 52, d);
    }
}

static void tq1_0_quant(const float *x, void *y, int64_t n, const float *w) { (void)w; tq1_0_rows(x, y, n, 0); }
FAST_FN static void tq1_0_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    (void)w;
    tq1_0_rows(x, y, n, 1);
}

static inline float trit_value(uint8_t byte, int k, float d) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint8_t q = (uint8_t)(byte * pow3[k]);
    const int16_t xi = (int16_t)(((uint16_t)q * 3) >> 8);
    return (float)(xi - 1) * d;
}

static void tq1_0_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; i++, x += 54, y += QK_K) {
        const float d = f16_load(x + 52);
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 32; m++) y[32 * k + m] = trit_value(x[m], k, d);
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 16; m++) y[160 + 16 * k + m] = trit_value(x[32 + m], k, d);
        for (int k = 0; k < 4; k++)
            for (int m = 0; m < 4; m++) y[240 + 4 * k + m] = trit_value(x[48 + m], k, d);
    }
}

static inline void tq2_0_rows(const float *x, void *vy, int64_t n, int fast) {
    uint8_t *y = vy;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K, y += 66) {
        float id;
        const float d = ternary_scale(x, &id);
        /* byte 32c + m holds elements 128c + m + 32k at bits 2k. */
        for (int c = 0; c < 2; c++)
            for (int m = 0; m < 32; m++) {
                uint8_t q = 0;
                for (int k = 0; k < 4; k++) q |= (uint8_t)((trit(x[128 * c + m + 32 * k], id, fast) & 3) << (2 * k));
                y[32 * c + m] = q;
            }
        f16_store(y + 64, d);
    }
}

static void tq2_0_quant(const float *x, void *y, int64_t n, const float *w) { (void)w; tq2_0_rows(x, y, n, 0); }
FAST_FN static void tq2_0_quant_fast(const float *x, void *y, int64_t n, const float *w) {
    (void)w;
    tq2_0_rows(x, y, n, 1);
}

static void tq2_0_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; i++, x += 66, y += QK_K) {
        const float d = f16_load(x + 64);
        for (int c = 0; c < 2; c++)
            for (int k = 0; k < 4; k++)
                for (int m = 0; m < 32; m++)
                    y[128 * c + 32 * k + m] = (float)(((x[32 * c + m] >> (2 * k)) & 3) - 1) * d;
    }
}

/* ------------------------------------------------------------------------ */
/* The table kernel.c dispatches on. layout 0 = the same in every layout.   */

static const smolq_type_ops OPS[] = {
    {SMOLQ_T_F32, 0, 1, 4, {f32_quant, f32_quant}, {f32_dequant, f32_dequant}},
    {SMOLQ_T_F16, 0, 1, 2, {f16_quant, f16_quant_fast}, {f16_dequant, f16_dequant_fast}},
    {SMOLQ_T_BF16, 0, 1, 2, {bf16_quant, bf16_quant}, {bf16_dequant, bf16_dequant}},
    {SMOLQ_T_Q4_0, 1, 32, 20, {q4_0_v1_quant, q4_0_v1_quant}, {q4_0_v1_dequant, q4_0_v1_dequant}},
    {SMOLQ_T_Q4_0, 2, 32, 20, {q4_0_v2_quant, q4_0_v2_quant}, {q4_0_v2_dequant, q4_0_v2_dequant}},
    {SMOLQ_T_Q4_0, 3, 32, 18, {q4_0_v3_quant, q4_0_v3_fast}, {q4_0_v3_dequant, q4_0_v3_dequant}},
    {SMOLQ_T_Q4_1, 1, 32, 24, {q4_1_v1_quant, q4_1_v1_quant}, {q4_1_v1_dequant, q4_1_v1_dequant}},
    {SMOLQ_T_Q4_1, 2, 32, 24, {q4_1_v2_quant, q4_1_v2_quant}, {q4_1_v2_dequant, q4_1_v2_dequant}},
    {SMOLQ_T_Q4_1, 3, 32, 20, {q4_1_v3_quant, q4_1_v3_fast}, {q4_1_v3_dequant, q4_1_v3_dequant}},
    {SMOLQ_T_Q5_0, 1, 32, 22, {q5_0_v1_quant, q5_0_v1_quant}, {q5_0_v1_dequant, q5_0_v1_dequant}},
    {SMOLQ_T_Q5_0, 2, 32, 22, {q5_0_v2_quant, q5_0_v2_quant}, {q5_0_v2_dequant, q5_0_v2_dequant}},
    {SMOLQ_T_Q5_0, 3, 32, 22, {q5_0_v3_quant, q5_0_v3_fast}, {q5_0_v3_dequant, q5_0_v3_dequant_fast}},
    {SMOLQ_T_Q5_1, 1, 32, 24, {q5_1_v1_quant, q5_1_v1_quant}, {q5_1_v1_dequant, q5_1_v1_dequant}},
    {SMOLQ_T_Q5_1, 2, 32, 24, {q5_1_v2_quant, q5_1_v2_quant}, {q5_1_v2_dequant, q5_1_v2_dequant}},
    {SMOLQ_T_Q5_1, 3, 32, 24, {q5_1_v3_quant, q5_1_v3_fast}, {q5_1_v3_dequant, q5_1_v3_dequant_fast}},
    {SMOLQ_T_Q8_0, 1, 32, 36, {q8_0_v1_quant, q8_0_v1_quant}, {q8_0_v1_dequant, q8_0_v1_dequant}},
    {SMOLQ_T_Q8_0, 2, 32, 36, {q8_0_v2_quant, q8_0_v2_quant}, {q8_0_v2_dequant, q8_0_v2_dequant}},
    {SMOLQ_T_Q8_0, 3, 32, 34, {q8_0_v3_quant, q8_0_v3_fast}, {q8_0_v3_dequant, q8_0_v3_dequant_fast}},
    {SMOLQ_T_Q4_2, 1, 16, 10, {NULL, NULL}, {q4_2_dequant, q4_2_dequant}},
    {SMOLQ_T_Q4_3, 1, 16, 12, {NULL, NULL}, {q4_3_dequant, q4_3_dequant}},
    {SMOLQ_T_TQ1_0, 0, QK_K, 54, {tq1_0_quant, tq1_0_quant_fast}, {tq1_0_dequant, tq1_0_dequant}},
    {SMOLQ_T_TQ2_0, 0, QK_K, 66, {tq2_0_quant, tq2_0_quant_fast}, {tq2_0_dequant, tq2_0_dequant}},
};

const smolq_type_ops *smolq_find_nonk_ops(int type, int layout) {
    for (size_t i = 0; i < sizeof(OPS) / sizeof(OPS[0]); i++)
        if (OPS[i].type == type && (OPS[i].layout == 0 || OPS[i].layout == layout)) return &OPS[i];
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Relayout: unpack in one layout, pack in another. Nibble moves are exact;
 * f32 -> f16 scales clear *lossless_out unless every one fits exactly.      */

int64_t smolq_relayout_blocks(int type, int src_layout, int dst_layout, const void *src, void *dst,
                              int64_t nblocks, int *lossless_out) {
    const block_fmt *fs = find_fmt(type, src_layout);
    const block_fmt *fd = find_fmt(type, dst_layout);
    if (!fs || !fd || fs->qk != fd->qk) return SMOLQ_ERR_TYPE;
    if (nblocks < 0 || (nblocks > 0 && (!src || !dst))) return SMOLQ_ERR_ARG;
    int lossless = 1;
    const uint8_t *s = src;
    uint8_t *d = dst;
    qblock b;
    for (int64_t i = 0; i < nblocks; i++) {
        unpack_block(fs, s + i * fs->bytes, &b);
        pack_block(fd, &b, d + i * fd->bytes, &lossless);
    }
    if (lossless_out) *lossless_out = lossless;
    return nblocks * fd->bytes;
}
