/* Whole-tensor entry points: type dispatch, row threading, relayout, GPTQ
 * word packing, round-trip statistics and checksums. Blocks of numbers only;
 * this file never knows about files. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernel_internal.h"
#include "quants_iq12.h"

#define ABI_VERSION 6

int smolq_kernel_abi_version(void) { return ABI_VERSION; }

/* The hand-written AVX2 paths run where the CPU has AVX2, unless SMOLQ_NO_AVX2
 * is set (not "0") when the library is first used: then the portable fast
 * paths run instead, so tests hold those to the reference on this machine too. */
int smolq_use_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
        const char *off = getenv("SMOLQ_NO_AVX2");
        cached = __builtin_cpu_supports("avx2") && !(off && *off && strcmp(off, "0") != 0);
#else
        cached = 0;
#endif
    }
    return cached;
}

/* ------------------------------------------------------------------------ */
/* Threads: a parallel for over [0, n) in contiguous ranges. Each item is
 * computed the same way whichever thread gets it, so results never depend
 * on the split. The calling thread takes the last range.                    */

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
} range_job;

static void *run_range(void *arg) {
    range_job *j = arg;
    j->fn(j->ctx, j->begin, j->end);
    return NULL;
}

static int resolve_threads(int nthreads) {
    if (nthreads > 0) return nthreads;
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

#define MAX_THREADS 256

/* min_items: fewest items worth a thread of their own. */
static void parallel_for(int64_t n, int64_t min_items, int nthreads, range_fn fn, void *ctx) {
    if (n <= 0) return;
    int nt = resolve_threads(nthreads);
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (min_items < 1) min_items = 1;
    if ((int64_t)nt > n / min_items) nt = (int)(n / min_items);
    if (nt <= 1) {
        fn(ctx, 0, n);
        return;
    }
    range_job jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    const int64_t per = n / nt, extra = n % nt;
    int64_t at = 0;
    for (int t = 0; t < nt; t++) {
        const int64_t len = per + (t < extra ? 1 : 0);
        jobs[t] = (range_job){fn, ctx, at, at + len};
        at += len;
    }
    for (int t = 0; t < nt - 1; t++) started[t] = pthread_create(&tids[t], NULL, run_range, &jobs[t]) == 0;
    run_range(&jobs[nt - 1]);
    for (int t = 0; t < nt - 1; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_range(&jobs[t]); /* no thread to be had: do it here */
    }
}

/* ------------------------------------------------------------------------ */
/* Type dispatch: non-K types from quants.c, IQ3/IQ4 i-quants and MXFP4
 * from quants_iq.c, IQ2/IQ1 i-quants from quants_iq12.c, K-quants from
 * quants_k.c.                                                               */

typedef struct {
    int type, bytes;
    smolq_quantize_row_fn quant;
    smolq_dequantize_row_fn dequant;
} kquant_entry;

static const kquant_entry KQUANTS[] = {
    {SMOLQ_T_Q2_K, 84, smolq_quantize_row_q2_K, smolq_dequantize_row_q2_K},
    {SMOLQ_T_Q3_K, 110, smolq_quantize_row_q3_K, smolq_dequantize_row_q3_K},
    {SMOLQ_T_Q4_K, 144, smolq_quantize_row_q4_K, smolq_dequantize_row_q4_K},
    {SMOLQ_T_Q5_K, 176, smolq_quantize_row_q5_K, smolq_dequantize_row_q5_K},
    {SMOLQ_T_Q6_K, 210, smolq_quantize_row_q6_K, smolq_dequantize_row_q6_K},
};

/* The row-kernel tables of the other files, asked in turn. */
typedef const smolq_type_ops *(*ops_finder)(int type, int layout);
static const smolq_type_ops *find_iq12_ops(int type, int layout) {
    (void)layout; /* one layout */
    return smolq_find_iq12_ops(type);
}

static const ops_finder OPS_FINDERS[] = {smolq_find_nonk_ops, smolq_find_iq_ops, find_iq12_ops};

/* Fills *ops for (type, layout); 0 on success, SMOLQ_ERR_TYPE otherwise. */
static int lookup_ops(int type, int layout, smolq_type_ops *ops) {
    if (layout < 1 || layout > 3) return SMOLQ_ERR_TYPE;
    for (size_t i = 0; i < sizeof(OPS_FINDERS) / sizeof(OPS_FINDERS[0]); i++) {
        const smolq_type_ops *o = OPS_FINDERS[i](type, layout);
        if (o) {
            *ops = *o;
            return 0;
        }
    }
    for (size_t i = 0; i < sizeof(KQUANTS) / sizeof(KQUANTS[0]); i++) {
        const kquant_entry *k = &KQUANTS[i];
        if (k->type != type) continue;
        smolq_quantize_row_fn fq = smolq_kquant_fast_quantize(type);
        smolq_dequantize_row_fn fd = smolq_kquant_fast_dequantize(type);
        *ops = (smolq_type_ops){type, 0, 256, k->bytes, {k->quant, fq ? fq : k->quant},
                                {k->dequant, fd ? fd : k->dequant}, 0, {NULL, NULL}};
        return 0;
    }
    return SMOLQ_ERR_TYPE;
}

int64_t smolq_row_size(int type, int layout, int64_t n_per_row) {
    smolq_type_ops ops;
    const int err = lookup_ops(type, layout, &ops);
    if (err) return err;
    if (n_per_row < 0) return SMOLQ_ERR_ARG;
    if (n_per_row % ops.block) return SMOLQ_ERR_ROWLEN;
    return n_per_row / ops.block * ops.bytes;
}

typedef struct {
    smolq_quantize_row_fn quant;
    smolq_dequantize_row_fn dequant;
    const float *fsrc;
    const uint8_t *qsrc;
    float *fdst;
    uint8_t *qdst;
    int64_t n_per_row, row_bytes;
    const float *imatrix;
    smolq_quantize_row_checked_fn checked; /* instead of quant, for rows that can be refused */
    int status;                            /* 0, or the error of some refused row */
} rows_job;

static void quantize_rows(void *ctx, int64_t begin, int64_t end) {
    rows_job *j = ctx;
    for (int64_t r = begin; r < end; r++) {
        const float *x = j->fsrc + r * j->n_per_row;
        uint8_t *y = j->qdst + r * j->row_bytes;
        if (!j->checked) {
            j->quant(x, y, j->n_per_row, j->imatrix);
            continue;
        }
        const int err = j->checked(x, y, j->n_per_row, j->imatrix);
        if (err) {
            __atomic_store_n(&j->status, err, __ATOMIC_RELAXED); /* threads may race; any error will do */
            return;
        }
    }
}

static void dequantize_rows(void *ctx, int64_t begin, int64_t end) {
    const rows_job *j = ctx;
    for (int64_t r = begin; r < end; r++)
        j->dequant(j->qsrc + r * j->row_bytes, j->fdst + r * j->n_per_row, j->n_per_row);
}

/* Enough elements per thread that starting it pays off. */
#define MIN_ELEMS_PER_THREAD (1 << 16)

static int64_t rows_per_thread(int64_t n_per_row) {
    return n_per_row > 0 ? (MIN_ELEMS_PER_THREAD + n_per_row - 1) / n_per_row : 1;
}

int64_t smolq_quantize(int type, int layout, const float *src, void *dst, int64_t nrows, int64_t n_per_row,
                       const float *imatrix, int nthreads, int impl) {
    smolq_type_ops ops;
    const int err = lookup_ops(type, layout, &ops);
    if (err) return err;
    if (nrows < 0 || n_per_row < 0 || (impl != 0 && impl != 1)) return SMOLQ_ERR_ARG;
    if (n_per_row % ops.block) return SMOLQ_ERR_ROWLEN;
    if (!ops.quant[0] && !ops.checked[0]) return SMOLQ_ERR_TYPE;
    if (ops.needs_imatrix && !imatrix) return SMOLQ_ERR_IMATRIX;
    const int64_t row_bytes = n_per_row / ops.block * ops.bytes;
    if (nrows == 0 || n_per_row == 0) return 0;
    if (!src || !dst) return SMOLQ_ERR_ARG;
    rows_job j = {ops.quant[impl], NULL, src, NULL, NULL, dst, n_per_row, row_bytes, imatrix, ops.checked[impl], 0};
    parallel_for(nrows, rows_per_thread(n_per_row), nthreads, quantize_rows, &j);
    return j.status ? j.status : nrows * row_bytes;
}

int64_t smolq_dequantize(int type, int layout, const void *src, float *dst, int64_t nrows, int64_t n_per_row,
                         int nthreads, int impl) {
    smolq_type_ops ops;
    const int err = lookup_ops(type, layout, &ops);
    if (err) return err;
    if (nrows < 0 || n_per_row < 0 || (impl != 0 && impl != 1)) return SMOLQ_ERR_ARG;
    if (n_per_row % ops.block) return SMOLQ_ERR_ROWLEN;
    const int64_t row_bytes = n_per_row / ops.block * ops.bytes;
    if (nrows == 0 || n_per_row == 0) return 0;
    if (!src || !dst) return SMOLQ_ERR_ARG;
    rows_job j = {NULL, ops.dequant[impl], NULL, src, dst, NULL, n_per_row, row_bytes, NULL, NULL, 0};
    parallel_for(nrows, rows_per_thread(n_per_row), nthreads, dequantize_rows, &j);
    return nrows * n_per_row;
}

/* ------------------------------------------------------------------------ */

int64_t smolq_relayout(int type, int src_layout, int dst_layout, const void *src, void *dst, int64_t nblocks,
                       int *lossless_out) {
    return smolq_relayout_blocks(type, src_layout, dst_layout, src, dst, nblocks, lossless_out);
}

/* ------------------------------------------------------------------------ */
/* GPTQ words. Value i of a packed line starts at bit i*bits of the line's
 * little-endian bit stream; word w holds stream bits [32w, 32w + 32).       */

static int gptq_shape_ok(int64_t rows, int64_t cols, int bits, int axis) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 0;
    if (rows < 0 || cols < 0 || (axis != 0 && axis != 1)) return 0;
    const int64_t len = axis == 0 ? rows : cols;
    return (len * bits) % 32 == 0;
}

/* Packs one line of n values (stride vstride) into words (stride wstride). */
static void pack_line(const int32_t *v, int64_t vstride, uint32_t *w, int64_t wstride, int64_t n, int bits) {
    const uint32_t mask = (1u << bits) - 1;
    for (int64_t k = 0; k < n * bits / 32; k++) w[k * wstride] = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t x = (uint32_t)v[i * vstride] & mask;
        const int64_t pos = i * bits, word = pos / 32;
        const int sh = (int)(pos % 32);
        w[word * wstride] |= x << sh;
        if (sh + bits > 32) w[(word + 1) * wstride] |= x >> (32 - sh);
    }
}

static void unpack_line(const uint32_t *w, int64_t wstride, int32_t *v, int64_t vstride, int64_t n, int bits) {
    const uint32_t mask = (1u << bits) - 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t pos = i * bits, word = pos / 32;
        const int sh = (int)(pos % 32);
        uint32_t x = w[word * wstride] >> sh;
        if (sh + bits > 32) x |= w[(word + 1) * wstride] << (32 - sh);
        v[i * vstride] = (int32_t)(x & mask);
    }
}

int64_t smolq_gptq_pack(const int32_t *values, int32_t *packed, int64_t rows, int64_t cols, int bits, int axis) {
    if (!gptq_shape_ok(rows, cols, bits, axis)) return SMOLQ_ERR_ARG;
    const int64_t words = rows * cols * bits / 32;
    if (words == 0) return 0;
    if (!values || !packed) return SMOLQ_ERR_ARG;
    uint32_t *w = (uint32_t *)packed;
    if (axis == 0) /* each column is a line; packed is [rows*bits/32, cols] */
        for (int64_t c = 0; c < cols; c++) pack_line(values + c, cols, w + c, cols, rows, bits);
    else /* each row is a line; packed is [rows, cols*bits/32] */
        for (int64_t r = 0; r < rows; r++) pack_line(values + r * cols, 1, w + r * (cols * bits / 32), 1, cols, bits);
    return words;
}

int64_t smolq_gptq_unpack(const int32_t *packed, int32_t *values, int64_t rows, int64_t cols, int bits, int axis) {
    if (!gptq_shape_ok(rows, cols, bits, axis)) return SMOLQ_ERR_ARG;
    if (rows * cols == 0) return 0;
    if (!values || !packed) return SMOLQ_ERR_ARG;
    const uint32_t *w = (const uint32_t *)packed;
    if (axis == 0)
        for (int64_t c = 0; c < cols; c++) unpack_line(w + c, cols, values + c, cols, rows, bits);
    else
        for (int64_t r = 0; r < rows; r++)
            unpack_line(w + r * (cols * bits / 32), 1, values + r * cols, 1, cols, bits);
    return rows * cols;
}

/* ------------------------------------------------------------------------ */
/* Round-trip statistics in fixed chunks (deterministic for any nthreads).  */

#define STAT_CHUNK (1 << 16)

typedef struct {
    double err2, maxabs, ref2, test2, dot;
} stat_sums;

/* max that keeps a NaN once it has seen one (like numpy's max). */
static inline double nan_max(double m, double a) {
    if (m != m) return m;
    return a <= m ? m : a; /* a NaN a fails the test and is taken */
}

typedef struct {
    const float *ref, *test;
    int64_t n;
    stat_sums *chunks;
} stats_job;

static void stats_chunks(void *ctx, int64_t begin, int64_t end) {
    const stats_job *j = ctx;
    for (int64_t c = begin; c < end; c++) {
        const int64_t lo = c * STAT_CHUNK, hi = lo + STAT_CHUNK < j->n ? lo + STAT_CHUNK : j->n;
        stat_sums s = {0, 0, 0, 0, 0};
        for (int64_t i = lo; i < hi; i++) {
            const double r = j->ref[i], t = j->test[i], e = r - t;
            s.err2 += e * e;
            s.ref2 += r * r;
            s.test2 += t * t;
            s.dot += r * t;
            s.maxabs = nan_max(s.maxabs, fabs(e));
        }
        j->chunks[c] = s;
    }
}

int smolq_error_stats(const float *ref, const float *test, int64_t n, int nthreads, double out[4]) {
    if (n < 0 || !out || (n > 0 && (!ref || !test))) return SMOLQ_ERR_ARG;
    const int64_t nchunks = (n + STAT_CHUNK - 1) / STAT_CHUNK;
    stat_sums *chunks = calloc(nchunks > 0 ? (size_t)nchunks : 1, sizeof(stat_sums));
    if (!chunks) return SMOLQ_ERR_ARG;
    stats_job j = {ref, test, n, chunks};
    parallel_for(nchunks, 1, nthreads, stats_chunks, &j);
    stat_sums s = {0, 0, 0, 0, 0};
    for (int64_t c = 0; c < nchunks; c++) {
        s.err2 += chunks[c].err2;
        s.ref2 += chunks[c].ref2;
        s.test2 += chunks[c].test2;
        s.dot += chunks[c].dot;
        s.maxabs = nan_max(s.maxabs, chunks[c].maxabs);
    }
    free(chunks);
    out[0] = n > 0 ? sqrt(s.err2 / (double)n) : 0.0;
    out[1] = s.maxabs;
    out[2] = s.err2 == 0.0 ? INFINITY : 10.0 * log10(s.ref2 / s.err2);
    if (s.ref2 == 0.0 && s.test2 == 0.0)
        out[3] = 1.0;
    else if (s.ref2 == 0.0 || s.test2 == 0.0)
        out[3] = 0.0;
    else
        out[3] = s.dot / (sqrt(s.ref2) * sqrt(s.test2));
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Checksum: FNV-1a 64 per 1 MiB chunk, then over the chunk hashes + length. */

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull
#define HASH_CHUNK ((int64_t)1 << 20)

static uint64_t fnv1a(uint64_t h, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t fnv1a_u64le(uint64_t h, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    return fnv1a(h, b, 8);
}

typedef struct {
    const uint8_t *buf;
    int64_t n;
    uint64_t *hashes;
} hash_job;

static void hash_chunks(void *ctx, int64_t begin, int64_t end) {
    const hash_job *j = ctx;
    for (int64_t c = begin; c < end; c++) {
        const int64_t lo = c * HASH_CHUNK, len = j->n - lo < HASH_CHUNK ? j->n - lo : HASH_CHUNK;
        j->hashes[c] = fnv1a(FNV_OFFSET, j->buf + lo, len);
    }
}

uint64_t smolq_checksum(const void *buf, int64_t nbytes, int nthreads) {
    if (nbytes < 0 || (nbytes > 0 && !buf)) return 0;
    const int64_t nchunks = (nbytes + HASH_CHUNK - 1) / HASH_CHUNK;
    uint64_t h = FNV_OFFSET;
    if (nchunks > 0) {
        uint64_t *hashes = malloc((size_t)nchunks * sizeof(uint64_t));
        if (!hashes) return 0;
        hash_job j = {buf, nbytes, hashes};
        parallel_for(nchunks, 1, nthreads, hash_chunks, &j);
        for (int64_t c = 0; c < nchunks; c++) h = fnv1a_u64le(h, hashes[c]);
        free(hashes);
    }
    return fnv1a_u64le(h, (uint64_t)nbytes);
}

/* ------------------------------------------------------------------------ */

typedef struct {
    const float *x;
    int64_t n;
    int64_t *counts;
} finite_job;

/* Every quantize call runs this over its input first, so it is kept vectorisable: a
 * 32-bit count per chunk (STAT_CHUNK < 2^32) and an AVX2 clone where the CPU has it. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static uint32_t nonfinite_in(const float *restrict x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        bad += (u & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

static void count_nonfinite_chunks(void *ctx, int64_t begin, int64_t end) {
    const finite_job *j = ctx;
    for (int64_t c = begin; c < end; c++) {
        const int64_t lo = c * STAT_CHUNK, hi = lo + STAT_CHUNK < j->n ? lo + STAT_CHUNK : j->n;
        j->counts[c] = nonfinite_in(j->x + lo, hi - lo);
    }
}

int64_t smolq_count_nonfinite(const float *x, int64_t n, int nthreads) {
    if (n < 0 || (n > 0 && !x)) return SMOLQ_ERR_ARG;
    const int64_t nchunks = (n + STAT_CHUNK - 1) / STAT_CHUNK;
    if (nchunks == 0) return 0;
    int64_t *counts = calloc((size_t)nchunks, sizeof(int64_t));
    if (!counts) return SMOLQ_ERR_ARG;
    finite_job j = {x, n, counts};
    parallel_for(nchunks, 16, nthreads, count_nonfinite_chunks, &j);
    int64_t total = 0;
    for (int64_t c = 0; c < nchunks; c++) total += counts[c];
    free(counts);
    return total;
}

/* ------------------------------------------------------------------------ */
/* Requantization: decode a row, check it, quantize it, with the row kept in a
 * per-thread buffer that stays in cache. Round-to-nearest requantization of
 * a GGUF (f16 -> Q4_0, Q8_0 -> Q4_K, ...) is then one pass over the input
 * instead of three over memory (decode to a float array, the non-finite
 * check, quantize), which is most of what `smolq quantize` costs (#18). Each
 * row goes through the same row functions as smolq_dequantize and
 * smolq_quantize, so the bytes are theirs.                                  */

typedef struct {
    smolq_dequantize_row_fn dequant;
    smolq_quantize_row_fn quant;
    smolq_quantize_row_checked_fn checked;
    const uint8_t *src;
    uint8_t *dst;
    int64_t n_per_row, src_row_bytes, dst_row_bytes;
    const float *imatrix;
    int check_finite;
    int status;
} requant_job;

static void requantize_rows(void *ctx, int64_t begin, int64_t end) {
    requant_job *j = ctx;
    float *row = malloc((size_t)j->n_per_row * sizeof(float));
    if (!row) {
        __atomic_store_n(&j->status, SMOLQ_ERR_ARG, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t r = begin; r < end; r++) {
        j->dequant(j->src + r * j->src_row_bytes, row, j->n_per_row);
        int err = j->check_finite && nonfinite_in(row, j->n_per_row) ? SMOLQ_ERR_NONFINITE : 0;
        uint8_t *y = j->dst + r * j->dst_row_bytes;
        if (!err && j->checked) err = j->checked(row, y, j->n_per_row, j->imatrix);
        else if (!err) j->quant(row, y, j->n_per_row, j->imatrix);
        if (err) {
            __atomic_store_n(&j->status, err, __ATOMIC_RELAXED); /* threads may race; any error will do */
            break;
        }
    }
    free(row);
}

int64_t smolq_requantize(int src_type, int src_layout, const void *src, int dst_type, int dst_layout, void *dst,
                         int64_t nrows, int64_t n_per_row, const float *imatrix, int check_finite, int nthreads,
                         int impl) {
    smolq_type_ops in, out;
    int err = lookup_ops(src_type, src_layout, &in);
    if (!err) err = lookup_ops(dst_type, dst_layout, &out);
    if (err) return err;
    if (nrows < 0 || n_per_row < 0 || (impl != 0 && impl != 1)) return SMOLQ_ERR_ARG;
    if (n_per_row % in.block || n_per_row % out.block) return SMOLQ_ERR_ROWLEN;
    if (!in.dequant[impl] || (!out.quant[impl] && !out.checked[impl])) return SMOLQ_ERR_TYPE;
    if (out.needs_imatrix && !imatrix) return SMOLQ_ERR_IMATRIX;
    if (nrows == 0 || n_per_row == 0) return 0;
    if (!src || !dst) return SMOLQ_ERR_ARG;
    requant_job j = {in.dequant[impl], out.quant[impl], out.checked[impl], src, dst, n_per_row,
                     n_per_row / in.block * in.bytes, n_per_row / out.block * out.bytes, imatrix, check_finite, 0};
    parallel_for(nrows, rows_per_thread(n_per_row), nthreads, requantize_rows, &j);
    return j.status ? j.status : nrows * j.dst_row_bytes;
}

/* ------------------------------------------------------------------------ */
/* bitsandbytes 4-bit: blocks split between threads (quants_bnb.c).          */

typedef struct {
    int quant_type, impl;
    const float *x;
    const uint8_t *qsrc;
    uint8_t *packed;
    const float *absmax_in;
    float *absmax, *y;
    int64_t n, blocksize;
} bnb4_job;

static void bnb4_quantize_range(void *ctx, int64_t begin, int64_t end) {
    const bnb4_job *j = ctx;
    smolq_bnb4_quantize_blocks(j->quant_type, j->x, j->packed, j->absmax, j->n, j->blocksize, begin, end, j->impl);
}

static void bnb4_dequantize_range(void *ctx, int64_t begin, int64_t end) {
    const bnb4_job *j = ctx;
    smolq_bnb4_dequantize_blocks(j->quant_type, j->qsrc, j->absmax_in, j->y, j->n, j->blocksize, begin, end);
}

static int bnb4_args_ok(int quant_type, int64_t n, int64_t blocksize) {
    if (quant_type != SMOLQ_BNB_NF4 && quant_type != SMOLQ_BNB_FP4) return SMOLQ_ERR_TYPE;
    if (n < 0 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1))) return SMOLQ_ERR_ARG;
    return 0;
}

int64_t smolq_bnb4_quantize(int quant_type, const float *src, uint8_t *packed, float *absmax, int64_t n,
                            int64_t blocksize, int nthreads, int impl) {
    const int err = bnb4_args_ok(quant_type, n, blocksize);
    if (err) return err;
    if (impl != 0 && impl != 1) return SMOLQ_ERR_ARG;
    if (n == 0) return 0;
    if (!src || !packed || !absmax) return SMOLQ_ERR_ARG;
    bnb4_job j = {quant_type, impl, src, NULL, packed, NULL, absmax, NULL, n, blocksize};
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    parallel_for(nblocks, MIN_ELEMS_PER_THREAD / blocksize, nthreads, bnb4_quantize_range, &j);
    return (n + 1) / 2;
}

int64_t smolq_bnb4_dequantize(int quant_type, const uint8_t *packed, const float *absmax, float *dst, int64_t n,
                              int64_t blocksize, int nthreads) {
    const int err = bnb4_args_ok(quant_type, n, blocksize);
    if (err) return err;
    if (n == 0) return 0;
    if (!packed || !absmax || !dst) return SMOLQ_ERR_ARG;
    bnb4_job j = {quant_type, 0, NULL, packed, NULL, absmax, NULL, dst, n, blocksize};
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    parallel_for(nblocks, MIN_ELEMS_PER_THREAD / blocksize, nthreads, bnb4_dequantize_range, &j);
    return n;
}

/* ------------------------------------------------------------------------ */
/* GPTQ column loop (smolq/transforms/gptq.py, _solve_columns): columns
 * [start, stop) of one lazy batch, each rounded with its own per-row
 * parameters and its error pushed onto the batch's later columns. Rows are
 * independent, so they are split across threads. Every float operation is the
 * torch loop's, one rounding each, in its order (no contraction: -std=c99
 * turns it off in GCC, and the pragma in clang), so the results are the
 * same bits.                                                                 */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

typedef struct {
    float *w, *q, *err, *levels;
    const float *hinv, *p0, *p1, *p2, *p3;
    double *row_loss;
    int64_t rows, ldw, ldq, ldh, start, stop, end;
    int mode;
    float lo, hi;
} gptq_cols_job;

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline float gptq_round_one(const gptq_cols_job *j, float x, int64_t at, float *deq) {
    float r;
    if (j->mode == SMOLQ_GPTQ_INT) { /* clamp(round(w / scale) + zero, lo, hi); scale * (q - zero) */
        r = clampf(rintf(x / j->p0[at]) + j->p1[at], j->lo, j->hi);
        *deq = j->p0[at] * (r - j->p1[at]);
        return r;
    }
    const float t = (x - j->p0[at]) * j->p1[at]; /* (w - roff) * rid */
    if (j->mode == SMOLQ_GPTQ_NEAREST)
        r = rintf(t);
    else if (j->mode == SMOLQ_GPTQ_FLOOR) /* gguf.quants' trunc(x*id + 8.5) - 8 for Q4_0 */
        r = floorf((t + 0.5f) - j->lo) + j->lo;
    else /* SMOLQ_GPTQ_HALF_AWAY: sign(t) * floor(|t| + 0.5), C's roundf as torch spells it */
        r = (float)((t > 0.0f) - (t < 0.0f)) * floorf(fabsf(t) + 0.5f);
    r = clampf(r, j->lo, j->hi);
    *deq = j->p2[at] * r - j->p3[at]; /* mul * q - sub */
    return r;
}

static void gptq_cols_rows(void *ctx, int64_t begin, int64_t end) {
    const gptq_cols_job *j = ctx;
    const int64_t span = j->stop - j->start;
    for (int64_t r = begin; r < end; r++) {
        float *w = j->w + r * j->ldw;
        double loss = 0.0;
        for (int64_t k = j->start; k < j->stop; k++) {
            const int64_t at = (k - j->start) * j->rows + r;
            const float x = w[k];
            float deq;
            j->levels[r * span + (k - j->start)] = gptq_round_one(j, x, at, &deq);
            j->q[r * j->ldq + k] = deq;
            const float *h = j->hinv + k * j->ldh;
            const float e = (x - deq) / h[k];
            loss += (double)e * (double)e;
            for (int64_t c = k; c < j->end; c++) w[c] -= e * h[c];
            j->err[r * j->ldw + k] = e;
        }
        j->row_loss[r] += loss / 2;
    }
}

int smolq_gptq_columns(float *w, int64_t ldw, float *q, int64_t ldq, float *err, const float *hinv, int64_t ldh,
                       int64_t rows, int64_t start, int64_t stop, int64_t end, int mode, const float *p0,
                       const float *p1, const float *p2, const float *p3, float lo, float hi, float *levels,
                       double *row_loss, int nthreads) {
    if (mode < SMOLQ_GPTQ_INT || mode > SMOLQ_GPTQ_HALF_AWAY) return SMOLQ_ERR_ARG;
    if (rows < 0 || start < 0 || stop < start || end < stop || ldw < end || ldh < end || !(lo <= hi))
        return SMOLQ_ERR_ARG;
    if (rows == 0 || stop == start) return 0;
    if (!w || !q || !err || !hinv || !p0 || !p1 || !levels || !row_loss) return SMOLQ_ERR_ARG;
    if (mode != SMOLQ_GPTQ_INT && (!p2 || !p3)) return SMOLQ_ERR_ARG;
    gptq_cols_job j = {w, q, err, levels, hinv, p0, p1, p2, p3, row_loss, rows, ldw, ldq, ldh, start, stop, end,
                       mode, lo, hi};
    /* a row's work is (stop - start) columns of up to `end` updates each */
    const int64_t per_row = (stop - start) * (end - start) + 1;
    parallel_for(rows, MIN_ELEMS_PER_THREAD / per_row + 1, nthreads, gptq_cols_rows, &j);
    return 0;
}
