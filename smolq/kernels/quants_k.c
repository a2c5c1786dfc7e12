/* K-quants: STUB until the real implementation lands (keeps the link green).
 * Every function here zero-fills its output. */
#include <string.h>
#include "smolq_kernel.h"

#define STUB_Q(name, bytes) \
    void name(const float *x, void *y, int64_t n, const float *imatrix) { (void)x; (void)imatrix; memset(y, 0, (size_t)(n / 256) * (bytes)); }
#define STUB_D(name) \
    void name(const void *x, float *y, int64_t n) { (void)x; memset(y, 0, (size_t)n * sizeof(float)); }

STUB_Q(smolq_quantize_row_q2_K, 84)
STUB_Q(smolq_quantize_row_q3_K, 110)
STUB_Q(smolq_quantize_row_q4_K, 144)
STUB_Q(smolq_quantize_row_q5_K, 176)
STUB_Q(smolq_quantize_row_q6_K, 210)
STUB_D(smolq_dequantize_row_q2_K)
STUB_D(smolq_dequantize_row_q3_K)
STUB_D(smolq_dequantize_row_q4_K)
STUB_D(smolq_dequantize_row_q5_K)
STUB_D(smolq_dequantize_row_q6_K)

smolq_quantize_row_fn smolq_kquant_fast_quantize(int type) { (void)type; return NULL; }
smolq_dequantize_row_fn smolq_kquant_fast_dequantize(int type) { (void)type; return NULL; }
