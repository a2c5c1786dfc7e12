/* IEEE half and bfloat16 conversions, bit-exact with ggml's scalar paths.
 * fp32 -> fp16 rounds to nearest even (as _cvtss_sh(x, 0) and numpy's
 * astype(float16) do); fp32 -> bf16 rounds to nearest even with NaN quieted
 * (ggml_compute_fp32_to_bf16). Shared by every kernel source. */
#ifndef SMOLQ_FP16_H
#define SMOLQ_FP16_H

#include <stdint.h>
#include <string.h>

static inline uint32_t smolq_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float smolq_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float smolq_fp16_to_fp32(uint16_t h) {
    /* Exact: every half is representable as a float. */
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return smolq_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return smolq_bits_f32(sign);
        /* subnormal: value = man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return smolq_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t smolq_fp32_to_fp16(float f) {
    const uint32_t x = smolq_f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) { /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 | ((absx >> 13) & 0x3ff) : 0));
    }
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
    if (absx < 0x38800000u) { /* result is subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign; /* < 2^-25: rounds to 0 */
        const uint32_t e = absx >> 23;
        const uint32_t m = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

static inline float smolq_bf16_to_fp32(uint16_t h) { return smolq_bits_f32((uint32_t)h << 16); }

static inline uint16_t smolq_fp32_to_bf16(float f) {
    uint32_t u = smolq_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* quiet nan */
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

#endif
