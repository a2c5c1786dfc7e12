/* The 2-bit and 1-bit i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M:
 * quantize with importance weights and dequantize, byte for byte what
 * llama.cpp's ggml-quants.c writes and reads (formats: gguf-py's
 * gguf.quants classes of the same names).
 *
 * Each group of 8 weights becomes a point of a fixed lattice (the "grid",
 * iq_tables.h, generated from gguf-py's data) whose coordinates take one of
 * three values, times a sign pattern (IQ2) or plus a shift (IQ1), times a
 * scale. The quantizers search scales; at each trial scale a group's rounded
 * coordinates either are a grid point or are replaced by the best of a
 * precomputed neighbour list. Those lists, and the map from coordinates to
 * point, are computed here from the grids once per process (llama.cpp's
 * iq2xs_init_impl); the lists hold the same points in the same order, so
 * the searches visit them as llama.cpp does.
 *
 * Bit-exactness, as in quants_common.h: ggml's float operations in ggml's
 * order, no FMA contraction (-std=c99), the first best candidate kept on
 * ties. IQ1's boundary search sorts a block with the C library's qsort, with
 * ggml's element layout and comparator, so equal values come out in the
 * order llama.cpp gets on the same platform.
 *
 * Where llama.cpp aborts (no importance weights for IQ2_XXS, IQ2_XS, IQ1_S;
 * a search that overflowed to inf/NaN and found no grid point; a negative
 * scale) the row quantizers return an error code instead. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "iq_tables.h"
#include "quants_common.h"
#include "quants_iq12.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
/* The fast rows are plain loops written to vectorize; this asks GCC for an
 * AVX2 clone picked at load time, with the baseline clone elsewhere. Same
 * float operations either way (no FMA: -std=c99). */
#define FAST_FN __attribute__((target_clones("avx2", "default")))
#else
#define FAST_FN
#endif
/* Block code is written once with a constant `fast` flag and inlined into
 * the reference and the fast rows, so each gets its own specialised copy. */
#define IQ_INLINE static inline __attribute__((always_inline))

/* ggml's thresholds below which a block counts as all zero. */
#define GROUP_MAX_EPS_IQ2_S 1e-8f
#define GROUP_MAX_EPS_IQ1_M 1e-7f
#define GROUP_MAX_EPS_IQ1_S 1e-12f

/* Block layouts (bytes): offsets of each field. */
enum {
    IQ2_XXS_BYTES = 66, IQ2_XXS_QS = 2,                        /* d, qs[32] u16 */
    IQ2_XS_BYTES = 74, IQ2_XS_QS = 2, IQ2_XS_SCALES = 66,      /* d, qs[32] u16, scales[8] */
    IQ2_S_BYTES = 82, IQ2_S_QS = 2, IQ2_S_SIGNS = 34,          /* d, qs[32], signs[32], */
    IQ2_S_QH = 66, IQ2_S_SCALES = 74,                          /*   qh[8], scales[8] */
    IQ1_S_BYTES = 50, IQ1_S_QS = 2, IQ1_S_QH = 34,             /* d, qs[32], qh[8] u16 */
    IQ1_M_BYTES = 56, IQ1_M_QS = 0, IQ1_M_QH = 32, IQ1_M_SCALES = 48 /* qs[32], qh[16], scales[4] u16 */
};

/* ======================================================================== */
/* Grid search tables                                                       */

/* A group's coordinates as a key: level (0, 1, 2) of element i in bits 2i,
 * 2i+1 (ggml's kmap index). Levels never exceed 2, so keys stop here. */
#define KEY_COUNT (0xAAAA + 1)
#define MAX_LEVEL_DIST2 (8 * 2 * 2) /* squared level distance of two points, at most */

typedef struct {
    const uint64_t *published; /* iq_tables.h: element j in byte j */
    int size;                  /* points */
    int nwant;                 /* a neighbour list holds the points at this many smallest distances */
    int8_t *levels;            /* size x 8: each coordinate's rank among the grid's 3 values */
    int32_t *map;              /* key -> point, or -(offset + 1) of its neighbour list, or -KEY_COUNT */
    uint16_t *neighbours;      /* lists: count, then points by (distance, index) */
    int ready;
} iq_grid;

enum { GRID_IQ2XXS, GRID_IQ2XS, GRID_IQ2S, GRID_IQ1S, GRID_COUNT };

/* nwant as llama.cpp's iq2xs_init_impl sets it per type. */
static iq_grid GRIDS[GRID_COUNT] = {
    {smolq_iq2xxs_grid, SMOLQ_IQ2XXS_GRID_SIZE, 2, NULL, NULL, NULL, 0},
    {smolq_iq2xs_grid, SMOLQ_IQ2XS_GRID_SIZE, 2, NULL, NULL, NULL, 0},
    {smolq_iq2s_grid, SMOLQ_IQ2S_GRID_SIZE, 1, NULL, NULL, NULL, 0},
    {smolq_iq1s_grid, SMOLQ_IQ1S_GRID_SIZE, 3, NULL, NULL, NULL, 0},
};

static int8_t grid_byte(const iq_grid *g, int p, int i) { return (int8_t)(g->published[p] >> (8 * i)); }

/* Each coordinate's level: its rank among the grid's distinct values (IQ2:
 * 8 < 25 < 43; IQ1: -1 < 0 < 1), which is ggml's (pos - 1) / 2. 0 unless the
 * grid has exactly three values. */
static int grid_levels(iq_grid *g) {
    int8_t values[3];
    int nvalues = 0;
    for (int p = 0; p < g->size; ++p)
        for (int i = 0; i < 8; ++i) {
            const int8_t v = grid_byte(g, p, i);
            int k = 0;
            while (k < nvalues && values[k] < v) ++k;
            if (k < nvalues && values[k] == v) continue;
            if (nvalues == 3) return 0;
            memmove(values + k + 1, values + k, (size_t)(nvalues - k));
            values[k] = v;
            ++nvalues;
        }
    if (nvalues != 3) return 0;
    for (int p = 0; p < g->size; ++p)
        for (int i = 0; i < 8; ++i) {
            const int8_t v = grid_byte(g, p, i);
            g->levels[8 * p + i] = (int8_t)(v == values[0] ? 0 : v == values[1] ? 1 : 2);
        }
    return 1;
}

static int key_is_valid(int key) {
    for (int i = 0; i < 8; ++i)
        if (((key >> (2 * i)) & 3) == 3) return 0;
    return 1;
}

/* Appends key's neighbour list: the points at the nwant smallest distinct
 * squared distances, by (distance, index) as ggml's qsort orders them. */
static int append_neighbours(iq_grid *g, int key, uint8_t *dist, uint16_t **list, size_t *len, size_t *cap) {
    int hist[MAX_LEVEL_DIST2 + 1] = {0};
    for (int p = 0; p < g->size; ++p) {
        int d2 = 0;
        for (int i = 0; i < 8; ++i) {
            const int d = g->levels[8 * p + i] - ((key >> (2 * i)) & 3);
            d2 += d * d;
        }
        dist[p] = (uint8_t)d2;
        ++hist[d2];
    }
    int cut = 0, nhave = 0, count = 0;
    for (int d2 = 0; d2 <= MAX_LEVEL_DIST2 && nhave < g->nwant; ++d2)
        if (hist[d2]) {
            cut = d2;
            count += hist[d2];
            ++nhave;
        }
    if (*len + 1 + (size_t)count > *cap) {
        const size_t want = 2 * *cap + 1 + (size_t)count;
        uint16_t *grown = realloc(*list, want * sizeof(uint16_t));
        if (!grown) return 0;
        *list = grown;
        *cap = want;
    }
    g->map[key] = -(int32_t)(*len + 1);
    (*list)[(*len)++] = (uint16_t)count;
    for (int d2 = 0; d2 <= cut; ++d2)
        if (hist[d2])
            for (int p = 0; p < g->size; ++p)
                if (dist[p] == d2) (*list)[(*len)++] = (uint16_t)p;
    return 1;
}

static int build_grid(iq_grid *g) {
    g->levels = malloc((size_t)g->size * 8);
    g->map = malloc(KEY_COUNT * sizeof(int32_t));
    uint8_t *dist = malloc((size_t)g->size);
    uint16_t *list = NULL;
    size_t len = 0, cap = 0;
    int ok = g->levels && g->map && dist && grid_levels(g);
    if (ok) {
        for (int key = 0; key < KEY_COUNT; ++key) g->map[key] = -KEY_COUNT;
        for (int p = 0; p < g->size; ++p) {
            int key = 0;
            for (int i = 0; i < 8; ++i) key |= g->levels[8 * p + i] << (2 * i);
            g->map[key] = p;
        }
        for (int key = 0; key < KEY_COUNT && ok; ++key)
            if (key_is_valid(key) && g->map[key] < 0) ok = append_neighbours(g, key, dist, &list, &len, &cap);
    }
    free(dist);
    if (!ok) {
        free(list);
        return 0;
    }
    g->neighbours = list;
    return 1;
}

static pthread_once_t GRID_ONCE[GRID_COUNT] = {PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT,
                                               PTHREAD_ONCE_INIT};
static void init_iq2xxs(void) { GRIDS[GRID_IQ2XXS].ready = build_grid(&GRIDS[GRID_IQ2XXS]); }
static void init_iq2xs(void) { GRIDS[GRID_IQ2XS].ready = build_grid(&GRIDS[GRID_IQ2XS]); }
static void init_iq2s(void) { GRIDS[GRID_IQ2S].ready = build_grid(&GRIDS[GRID_IQ2S]); }
static void init_iq1s(void) { GRIDS[GRID_IQ1S].ready = build_grid(&GRIDS[GRID_IQ1S]); }
static void (*const GRID_INIT[GRID_COUNT])(void) = {init_iq2xxs, init_iq2xs, init_iq2s, init_iq1s};

/* The tables of one grid, built on first use (thread-safe); NULL if out of memory. */
static const iq_grid *grid_tables(int which) {
    pthread_once(&GRID_ONCE[which], GRID_INIT[which]);
    return GRIDS[which].ready ? &GRIDS[which] : NULL;
}

static const uint16_t *neighbour_list(const iq_grid *g, int key) { return g->neighbours + (-g->map[key] - 1); }

static void copy_levels(const iq_grid *g, int p, int8_t *L) { memcpy(L, g->levels + 8 * p, 8); }

/* The point whose levels are L[0..8), or -1 (where ggml aborts: "point not on
 * grid"). The key is formed as ggml forms it, 16-bit, so levels outside
 * 0..2 (only from degenerate searches) land where they land there. */
static int grid_point(const iq_grid *g, const int8_t *L) {
    uint16_t key = 0;
    for (int i = 0; i < 8; ++i) key |= (uint16_t)((uint32_t)(int32_t)L[i] << (2 * i));
    return key < KEY_COUNT && g->map[key] >= 0 ? g->map[key] : -1;
}

/* ======================================================================== */
/* IQ2: levels 0..2 stand for grid coordinates 2l+1 (ggml's kgrid "pos")    */

/* ggml's i-quant rounding: the level whose coordinate 2l+1 is nearest id*x. */
static inline int8_t iq2_level(float id, float x) {
    const int l = nearest_int(0.5f * (id * x - 1));
    return (int8_t)MAX(0, MIN(2, l));
}

/* ggml iq2_find_best_neighbour: the listed point nearest xval/scale in
 * weighted squared distance (first on ties), its levels into L; -1 if no
 * distance is below FLT_MAX (ggml asserts). */
static int iq2_best_neighbour(const iq_grid *g, int key, const float *xval, const float *w, float scale, int8_t *L) {
    const uint16_t *nb = neighbour_list(g, key);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *pl = g->levels + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) {
            const float q = 2 * pl[i] + 1;
            const float diff = scale * q - xval[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            best = nb[j];
        }
    }
    if (best >= 0) copy_levels(g, best, L);
    return best;
}

/* The fast path's iq2_best_neighbour: each element's three possible terms
 * w*diff*diff computed once, so a point's distance is the same sum of the
 * same terms in the same order, for 8 adds instead of 8 x 4 operations. */
IQ_INLINE int iq2_best_neighbour_terms(const iq_grid *g, int key, const float *xval, const float *w, float scale,
                                       int8_t *L) {
    float terms[8][3];
    for (int i = 0; i < 8; ++i)
        for (int l = 0; l < 3; ++l) {
            const float q = 2 * l + 1;
            const float diff = scale * q - xval[i];
            terms[i][l] = w[i] * diff * diff;
        }
    const uint16_t *nb = neighbour_list(g, key);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *pl = g->levels + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) d2 += terms[i][pl[i]];
        if (d2 < best_d2) {
            best_d2 = d2;
            best = nb[j];
        }
    }
    if (best >= 0) copy_levels(g, best, L);
    return best;
}

/* One group of 8 rounded at inverse scale id into L; if that is no grid
 * point, the best neighbour at `scale` (weights waux) replaces it. Returns 1
 * if it was on the grid, 0 if replaced, -1 if no neighbour was found. */
IQ_INLINE int iq2_round_group(const iq_grid *g, float id, float scale, const float *xval, const float *waux, int8_t *L,
                              int fast) {
    int key = 0;
    for (int i = 0; i < 8; ++i) {
        L[i] = iq2_level(id, xval[i]);
        key |= L[i] << (2 * i);
    }
    if (g->map[key] >= 0) return 1;
    const int p = fast ? iq2_best_neighbour_terms(g, key, xval, waux, scale, L)
                       : iq2_best_neighbour(g, key, xval, waux, scale, L);
    return p < 0 ? -1 : 0;
}

/* sum w*x*q and sum w*q*q over n elements, q = 2L+1, left to right. */
static void iq2_sums(int n, const float *w, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
        const float q = 2 * L[i] + 1;
        sx += w[i] * xval[i] * q;
        s2 += w[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* |x| of a group of 8 into xval, bit i of the result set for each negative
 * x[i] (IQ2_S stores all 8 bits). */
static uint8_t fold_signs(const float *x, float *xval) {
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
        if (x[i] >= 0) {
            xval[i] = x[i];
        } else {
            xval[i] = -x[i];
            s |= (uint8_t)(1 << i);
        }
    }
    return s;
}

/* IQ2_XXS and IQ2_XS store 7 sign bits and imply the 8th by even parity: with
 * an odd number of negatives, the element of least w*x*x keeps its sign in
 * xval (it goes negative there) and its bit flips. */
static uint8_t fold_signs_even(const float *x, const float *w, float *xval) {
    uint8_t s = fold_signs(x, xval);
    int nflip = 0;
    for (int i = 0; i < 8; ++i) nflip += (s >> i) & 1;
    if (nflip % 2) {
        int imin = 0;
        float min = w[0] * x[0] * x[0];
        for (int i = 1; i < 8; ++i) {
            const float ax = w[i] * x[i] * x[i];
            if (ax < min) {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= (uint8_t)(1 << imin);
    }
    return s & 127;
}

/* The weights of one sub-block: importance times sqrt(sigma2 + x^2), and their
 * square roots (the neighbour searches' weights). */
static void iq2_weights(const float *xb, const float *qw, float sigma2, int n, float *weight, float *waux) {
    imatrix_weights(xb, qw, sigma2, n, weight);
    for (int i = 0; i < n; ++i) waux[i] = sqrtf(weight[i]);
}

static float max_of(const float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; ++i) max = MAX(max, x[i]);
    return max;
}

/* ggml's 4-bit (IQ2) or 3-bit (IQ1) sub-block scale: the level l with
 * scale ~ d*(2l+1), clamped to [0, lmax]. */
static inline int scale_level(float id, float scale, int lmax) {
    const int l = nearest_int(0.5f * (id * scale - 1));
    return MAX(0, MIN(lmax, l));
}

/* How ggml picked one super-block's points, for GPTQ grids that re-round
 * groups (smolq_iq2_rounding_plan); NULL when not wanted. Per 8-group: the
 * inverse scale and scale its levels were rounded with; per element: the sign
 * making xval = sign * x, and the search weight; per block: the decode scale
 * and 1 where ggml skipped it (or its levels came from no group rounding). */
typedef struct {
    float *id, *scale; /* [32] */
    float *sign, *waux; /* [256] */
    float *db;         /* [blocks] */
    uint8_t *skipped;  /* [blocks] */
} iq2_plan;

/* The 8 signs of a group as +-1, from its stored bits (bit 7 implied by even
 * parity when only 7 are stored). */
static void plan_signs(uint8_t bits, int parity7, float *sign) {
    if (parity7) bits = (uint8_t)(bits | (__builtin_popcount(bits & 127) & 1) << 7);
    for (int i = 0; i < 8; ++i) sign[i] = bits >> i & 1 ? -1.f : 1.f;
}

/* After ggml's "should never happen" flip of scale and signs: -xval rounds
 * with -id, -scale to the same levels. */
static void plan_flip(float *id, float *scale, float *sign, int ngroups) {
    for (int k = 0; k < ngroups; ++k) {
        id[k] = -id[k];
        scale[k] = -scale[k];
    }
    for (int i = 0; i < 8 * ngroups; ++i) sign[i] = -sign[i];
}

/* The decode scales d * (0.5 + l) / 4 of blocks with 4-bit scale levels l. */
static void plan_block_scales(const iq2_plan *plan, float dstored, float id, const float *scales, int nblocks) {
    for (int ib = 0; ib < nblocks; ++ib) plan->db[ib] = dstored * (0.5f + scale_level(id, scales[ib], 15)) * 0.25f;
}

/* IQ2_XXS's search over a block of 32 (four groups), from make_qp_quants'
 * scale: 13 trial inverse scales, the best by weighted least squares, then
 * every group rounded again at that scale and the scale refit. L: levels.
 * 0, or SMOLQ_ERR_RANGE where ggml asserts. */
IQ_INLINE int iq2_xxs_search(const iq_grid *g, const float *xval, const float *weight, const float *waux, int8_t *L,
                             float *scale_io, int fast, float *gid, float *gscale, int *replayable) {
    const float eff_max = *scale_io * 3;
    float scale = *scale_io, best = 0;
    int8_t Laux[32];
    for (int is = -6; is <= 6; ++is) {
        const float id = (5 + is * 0.1f) / eff_max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 4; ++k)
            if (iq2_round_group(g, id, this_scale, xval + 8 * k, waux + 8 * k, Laux + 8 * k, fast) < 0)
                return SMOLQ_ERR_RANGE;
        float sumqx, sumq2;
        iq2_sums(32, weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, 32);
        }
    }
    *replayable = scale > 0; /* else the levels are make_qp_quants' or a scan's: no one rounding */
    if (scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 4; ++k) {
            if (iq2_round_group(g, id, scale, xval + 8 * k, waux + 8 * k, L + 8 * k, fast) < 0) return SMOLQ_ERR_RANGE;
            if (gid) {
                gid[k] = id;
                gscale[k] = scale;
            }
        }
        float sumqx, sumq2;
        iq2_sums(32, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    *scale_io = scale;
    return 0;
}

/* IQ2_XS's and IQ2_S's search over a block of 16 (two groups): 19 trial
 * inverse scales around 5/max, the best by weighted least squares; groups
 * that were off the grid then rounded again at that scale and the scale
 * refit. L (zeroed by the caller): levels. 0, or SMOLQ_ERR_RANGE. */
IQ_INLINE int iq2_search16(const iq_grid *g, const float *xval, const float *weight, const float *waux, float max,
                           int8_t *L, float *scale_out, int fast, float *gid, float *gscale) {
    float best = 0, scale = max / 5;
    int on_grid[2] = {1, 1}, on_grid_aux[2];
    int8_t Laux[16];
    float pick_id[2] = {0, 0}, pick_scale[2] = {0, 0}; /* all-zero levels until a trial wins: id 0 rounds to them */
    for (int is = -9; is <= 9; ++is) {
        const float id = (5 + is * 0.1f) / max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 2; ++k) {
            on_grid_aux[k] = iq2_round_group(g, id, this_scale, xval + 8 * k, waux + 8 * k, Laux + 8 * k, fast);
            if (on_grid_aux[k] < 0) return SMOLQ_ERR_RANGE;
        }
        float sumqx, sumq2;
        iq2_sums(16, weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, 16);
            on_grid[0] = on_grid_aux[0];
            on_grid[1] = on_grid_aux[1];
            pick_id[0] = pick_id[1] = id;
            pick_scale[0] = pick_scale[1] = this_scale;
        }
    }
    if ((!on_grid[0] || !on_grid[1]) && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 2; ++k)
            if (!on_grid[k]) {
                if (iq2_round_group(g, id, scale, xval + 8 * k, waux + 8 * k, L + 8 * k, fast) < 0) return SMOLQ_ERR_RANGE;
                pick_id[k] = id;
                pick_scale[k] = scale;
            }
        float sumqx, sumq2;
        iq2_sums(16, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    *scale_out = scale;
    if (gid)
        for (int k = 0; k < 2; ++k) {
            gid[k] = pick_id[k];
            gscale[k] = pick_scale[k];
        }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* IQ2_XXS: 8 blocks of 32; per block 4 grid indices (8 bits), 4x7 sign bits
 * and a 4-bit scale in two u32.                                            */

IQ_INLINE int iq2_xxs_block_plan(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast,
                                 const iq2_plan *plan) {
    uint32_t q2[16] = {0};
    float scales[8], max_scale = 0;
    const float sigma2 = sum_squares(xbl, QK_K) / QK_K;
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = xbl + 32 * ib;
        float weight[32], waux[32], xval[32];
        int8_t L[32];
        uint8_t signs[4];
        iq2_weights(xb, qwbl + 32 * ib, sigma2, 32, weight, waux);
        for (int k = 0; k < 4; ++k) signs[k] = fold_signs_even(xb + 8 * k, weight + 8 * k, xval + 8 * k);
        float *gid = plan ? plan->id + 4 * ib : NULL, *gscale = plan ? plan->scale + 4 * ib : NULL;
        if (plan) {
            plan->skipped[ib] = 1;
            memset(gid, 0, 4 * sizeof(float));
            memset(gscale, 0, 4 * sizeof(float));
            memcpy(plan->waux + 32 * ib, waux, sizeof waux);
            for (int k = 0; k < 4; ++k) plan_signs(signs[k], 1, plan->sign + 32 * ib + 8 * k);
        }
        scales[ib] = 0;
        if (max_of(xval, 32) < GROUP_MAX_EPS) continue;
        float scale = make_qp_quants(32, 4, xval, (uint8_t *)L, weight);
        if (scale * 3 <= 0) continue;
        int replayable;
        const int err = iq2_xxs_search(g, xval, weight, waux, L, &scale, fast, gid, gscale, &replayable);
        if (err) return err;
        if (plan) plan->skipped[ib] = !replayable;
        if (scale < 0) { /* ggml: "should never happen"; flip scale and signs */
            scale = -scale;
            for (int k = 0; k < 4; ++k) signs[k] = (uint8_t)(~signs[k] & 127);
            if (plan) plan_flip(gid, gscale, plan->sign + 32 * ib, 4);
        }
        for (int k = 0; k < 4; ++k) {
            const int p = grid_point(g, L + 8 * k);
            if (p < 0) return SMOLQ_ERR_RANGE;
            q2[2 * ib + 0] |= (uint32_t)p << (8 * k);
            q2[2 * ib + 1] |= (uint32_t)signs[k] << (7 * k);
        }
        if (!(scale >= 0)) return SMOLQ_ERR_RANGE;
        scales[ib] = scale;
        max_scale = MAX(max_scale, scale);
    }
    memset(out, 0, IQ2_XXS_BYTES);
    if (plan) memset(plan->db, 0, 8 * sizeof(float));
    if (!max_scale) {
        if (plan) memset(plan->skipped, 1, 8);
        return 0;
    }
    const float d = max_scale / 31;
    f16_store(out, d);
    const float id = 1 / d, dstored = f16_load(out);
    for (int ib = 0; ib < 8; ++ib) {
        const int ls = scale_level(id, scales[ib], 15);
        q2[2 * ib + 1] |= (uint32_t)ls << 28;
        if (plan) plan->db[ib] = dstored * (0.5f + ls) * 0.25f;
    }
    for (int i = 0; i < 16; ++i) wr32(out + IQ2_XXS_QS + 4 * i, q2[i]);
    return 0;
}

IQ_INLINE int iq2_xxs_block(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast) {
    return iq2_xxs_block_plan(g, xbl, qwbl, out, fast, NULL);
}

/* ------------------------------------------------------------------------ */
/* IQ2_XS: 16 blocks of 16; per group a u16 of 9-bit grid index and 7 sign
 * bits; per block a 4-bit scale.                                           */

IQ_INLINE int iq2_xs_block_plan(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast,
                                const iq2_plan *plan) {
    uint16_t q2[32] = {0};
    float scales[16], max_scale = 0;
    const float sigma2 = sum_squares(xbl, QK_K) / QK_K;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        float weight[16], waux[16], xval[16], scale;
        int8_t L[16] = {0};
        uint8_t signs[2];
        iq2_weights(xb, qwbl + 16 * ib, sigma2, 16, weight, waux);
        for (int k = 0; k < 2; ++k) signs[k] = fold_signs_even(xb + 8 * k, weight + 8 * k, xval + 8 * k);
        float *gid = plan ? plan->id + 2 * ib : NULL, *gscale = plan ? plan->scale + 2 * ib : NULL;
        if (plan) {
            plan->skipped[ib] = 1;
            gid[0] = gid[1] = gscale[0] = gscale[1] = 0;
            memcpy(plan->waux + 16 * ib, waux, sizeof waux);
            for (int k = 0; k < 2; ++k) plan_signs(signs[k], 1, plan->sign + 16 * ib + 8 * k);
        }
        const float max = max_of(xval, 16);
        scales[ib] = 0;
        if (max < GROUP_MAX_EPS) continue;
        const int err = iq2_search16(g, xval, weight, waux, max, L, &scale, fast, gid, gscale);
        if (err) return err;
        if (plan) plan->skipped[ib] = 0;
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 2; ++k) signs[k] = (uint8_t)(~signs[k] & 127);
            if (plan) plan_flip(gid, gscale, plan->sign + 16 * ib, 2);
        }
        for (int k = 0; k < 2; ++k) {
            const int p = grid_point(g, L + 8 * k);
            if (p < 0) return SMOLQ_ERR_RANGE;
            q2[2 * ib + k] = (uint16_t)(p | (signs[k] << 9));
        }
        if (!(scale >= 0)) return SMOLQ_ERR_RANGE;
        scales[ib] = scale;
        max_scale = MAX(max_scale, scale);
    }
    memset(out, 0, IQ2_XS_BYTES);
    if (plan) memset(plan->db, 0, 16 * sizeof(float));
    if (!max_scale) {
        if (plan) memset(plan->skipped, 1, 16);
        return 0;
    }
    const float d = max_scale / 31;
    f16_store(out, d);
    const float id = 1 / d;
    for (int ib = 0; ib < 16; ++ib) out[IQ2_XS_SCALES + ib / 2] |= (uint8_t)(scale_level(id, scales[ib], 15) << 4 * (ib % 2));
    for (int i = 0; i < 32; ++i) wr16(out + IQ2_XS_QS + 2 * i, q2[i]);
    if (plan) plan_block_scales(plan, f16_load(out), id, scales, 16);
    return 0;
}

IQ_INLINE int iq2_xs_block(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast) {
    return iq2_xs_block_plan(g, xbl, qwbl, out, fast, NULL);
}

/* ------------------------------------------------------------------------ */
/* IQ2_S: 16 blocks of 16; per group a 10-bit grid index (8 in qs, 2 in qh)
 * and 8 sign bits; per block a 4-bit scale. Without importance weights the
 * weights are sigma2/4 + x^2 (ggml's fallback).                            */

IQ_INLINE int iq2_s_block_plan(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast,
                               const iq2_plan *plan) {
    float scales[16], max_scale = 0;
    const float sigma2 = 2 * sum_squares(xbl, QK_K) / QK_K;
    memset(out, 0, IQ2_S_BYTES);
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        float weight[16], waux[16], xval[16], scale;
        int8_t L[16] = {0};
        uint8_t signs[2];
        if (qwbl) {
            imatrix_weights(xb, qwbl + 16 * ib, sigma2, 16, weight);
        } else {
            for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
        }
        for (int i = 0; i < 16; ++i) waux[i] = sqrtf(weight[i]);
        for (int k = 0; k < 2; ++k) signs[k] = fold_signs(xb + 8 * k, xval + 8 * k);
        float *gid = plan ? plan->id + 2 * ib : NULL, *gscale = plan ? plan->scale + 2 * ib : NULL;
        if (plan) {
            plan->skipped[ib] = 1;
            gid[0] = gid[1] = gscale[0] = gscale[1] = 0;
            memcpy(plan->waux + 16 * ib, waux, sizeof waux);
            for (int k = 0; k < 2; ++k) plan_signs(signs[k], 0, plan->sign + 16 * ib + 8 * k);
        }
        const float max = max_of(xval, 16);
        scales[ib] = 0;
        if (max < GROUP_MAX_EPS_IQ2_S) continue;
        const int err = iq2_search16(g, xval, weight, waux, max, L, &scale, fast, gid, gscale);
        if (err) return err;
        if (plan) plan->skipped[ib] = 0;
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 2; ++k) signs[k] = (uint8_t)~signs[k];
            if (plan) plan_flip(gid, gscale, plan->sign + 16 * ib, 2);
        }
        for (int k = 0; k < 2; ++k) {
            const int p = grid_point(g, L + 8 * k);
            if (p < 0) return SMOLQ_ERR_RANGE;
            const int i8 = 2 * ib + k;
            out[IQ2_S_QS + i8] = (uint8_t)(p & 255);
            out[IQ2_S_QH + i8 / 4] |= (uint8_t)((p >> 8) << 2 * (i8 % 4));
            out[IQ2_S_SIGNS + i8] = signs[k];
        }
        if (!(scale >= 0)) return SMOLQ_ERR_RANGE;
        scales[ib] = scale;
        max_scale = MAX(max_scale, scale);
    }
    if (plan) memset(plan->db, 0, 16 * sizeof(float));
    if (!max_scale) {
        if (plan) memset(plan->skipped, 1, 16);
        return 0;
    }
    const float d = max_scale / 31;
    f16_store(out, d * 0.9875f);
    const float id = 1 / d;
    for (int ib = 0; ib < 16; ++ib) out[IQ2_S_SCALES + ib / 2] |= (uint8_t)(scale_level(id, scales[ib], 15) << 4 * (ib % 2));
    if (plan) plan_block_scales(plan, f16_load(out), id, scales, 16);
    return 0;
}

IQ_INLINE int iq2_s_block(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast) {
    return iq2_s_block_plan(g, xbl, qwbl, out, fast, NULL);
}

/* ======================================================================== */
/* IQ1: coordinates -1, 0, 1 shifted by +-delta; the grid's levels index xx. */

static const float IQ1S_XP[3] = {-1 + SMOLQ_IQ1S_DELTA, SMOLQ_IQ1S_DELTA, 1 + SMOLQ_IQ1S_DELTA};
static const float IQ1S_XM[3] = {-1 - SMOLQ_IQ1S_DELTA, -SMOLQ_IQ1S_DELTA, 1 - SMOLQ_IQ1S_DELTA};
static const float IQ1M_XP[3] = {-1 + SMOLQ_IQ1M_DELTA, SMOLQ_IQ1M_DELTA, 1 + SMOLQ_IQ1M_DELTA};
static const float IQ1M_XM[3] = {-1 - SMOLQ_IQ1M_DELTA, -SMOLQ_IQ1M_DELTA, 1 - SMOLQ_IQ1M_DELTA};

/* ggml's sort element: a value and its index in one 8-byte pair. */
typedef struct {
    float x;
    int32_t i;
} value_index;

static int by_value(const void *left, const void *right) {
    const float l = ((const value_index *)left)->x, r = ((const value_index *)right)->x;
    return l < r ? -1 : l > r ? 1 : 0;
}

/* xb's indices in ascending order of value, ties as the C library's qsort leaves them. */
static void sort_by_value(const float *xb, int n, value_index *pairs) {
    for (int j = 0; j < n; ++j) {
        pairs[j].x = xb[j];
        pairs[j].i = j;
    }
    qsort(pairs, (size_t)n, sizeof(value_index), by_value);
}

/* The fast path's sort: insertion sort, which gives qsort's order whenever
 * the values are distinct (the order is then unique); with any tie (equal
 * under the comparator, -0 == +0 included) it falls back to qsort itself. */
IQ_INLINE void sort_by_value_fast(const float *xb, int n, value_index *pairs) {
    int tie = 0;
    for (int j = 0; j < n && !tie; ++j) {
        const float v = xb[j];
        int k = j;
        while (k > 0 && pairs[k - 1].x > v) {
            pairs[k] = pairs[k - 1];
            --k;
        }
        tie = k > 0 && !(pairs[k - 1].x < v);
        pairs[k].x = v;
        pairs[k].i = j;
    }
    if (tie) sort_by_value(xb, n, pairs);
}

/* ggml iq1_find_best_neighbour2: the listed point nearest xb at `scale` with
 * coordinates xx[level], first on ties; its levels into L. -1 if no distance
 * is below FLT_MAX (ggml then scans the whole grid reading past its group,
 * and asserts when that finds nothing too). */
static int iq1_best_neighbour(const iq_grid *g, int key, const float *xb, const float *w, float scale,
                              const float *xx, int8_t *L) {
    const uint16_t *nb = neighbour_list(g, key);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *pl = g->levels + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) {
            const float diff = scale * xx[pl[i]] - xb[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            best = nb[j];
        }
    }
    if (best >= 0) copy_levels(g, best, L);
    return best;
}

/* The fast path's iq1_best_neighbour, from per-element terms as in
 * iq2_best_neighbour_terms. */
IQ_INLINE int iq1_best_neighbour_terms(const iq_grid *g, int key, const float *xb, const float *w, float scale,
                                       const float *xx, int8_t *L) {
    float terms[8][3];
    for (int i = 0; i < 8; ++i)
        for (int l = 0; l < 3; ++l) {
            const float diff = scale * xx[l] - xb[i];
            terms[i][l] = w[i] * diff * diff;
        }
    const uint16_t *nb = neighbour_list(g, key);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *pl = g->levels + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) d2 += terms[i][pl[i]];
        if (d2 < best_d2) {
            best_d2 = d2;
            best = nb[j];
        }
    }
    if (best >= 0) copy_levels(g, best, L);
    return best;
}

/* A group's grid point: its own if on the grid, else the best neighbour
 * (L updated); -1 if none. *on_grid cleared for a neighbour. */
IQ_INLINE int iq1_group_point(const iq_grid *g, const float *xb, const float *w, float scale, const float *xx,
                              int8_t *L, int *on_grid, int fast) {
    int key = 0;
    for (int i = 0; i < 8; ++i) key |= L[i] << (2 * i);
    if (g->map[key] >= 0) return g->map[key];
    *on_grid = 0;
    return fast ? iq1_best_neighbour_terms(g, key, xb, w, scale, xx, L) : iq1_best_neighbour(g, key, xb, w, scale, xx, L);
}

/* Adds w*q*x and w*q*q over a group at grid point p, q = xx[level]. */
static void iq1_group_sums(const iq_grid *g, int p, const float *xx, const float *w, const float *xb,
                           float *sumqx, float *sumq2) {
    const int8_t *pl = g->levels + 8 * p;
    for (int j = 0; j < 8; ++j) {
        const float q = xx[pl[j]];
        *sumqx += w[j] * q * xb[j];
        *sumq2 += w[j] * q * q;
    }
}

/* Levels 0/1/2 of a sorted block: below i1, from i1 to i2, from i2 on. */
static void split_levels(const value_index *sorted, int n, int i1, int i2, int8_t *L) {
    for (int j = 0; j < n; ++j) L[sorted[j].i] = (int8_t)(j < i1 ? 0 : j < i2 ? 1 : 2);
}

/* ------------------------------------------------------------------------ */
/* IQ1_S: 8 blocks of 32; per group an 11-bit grid index (8 in qs, 3 in qh);
 * per block a 3-bit scale and the sign of the shift in qh's top bits.      */

typedef struct {
    int i1, i2, shift; /* shift 0: nothing found */
    float scale;
} iq1_split;

/* IQ1_S's exact search: every split of the sorted block into levels 0/1/2,
 * shift + then -, by weighted least squares; the first best is kept. */
static iq1_split iq1_s_best_split(const float *xb, const float *weight, const value_index *sorted, float max) {
    float sumx[33], sumw[33];
    sumx[0] = sumw[0] = 0;
    for (int j = 0; j < 32; ++j) {
        const int i = sorted[j].i;
        sumx[j + 1] = sumx[j] + weight[i] * xb[i];
        sumw[j + 1] = sumw[j] + weight[i];
    }
    iq1_split best = {-1, -1, 0, max};
    float best_score = -FLT_MAX;
    for (int i1 = 0; i1 <= 32; ++i1) {
        for (int i2 = i1; i2 <= 32; ++i2) {
            for (int s = 0; s < 2; ++s) {
                const float *xx = s == 0 ? IQ1S_XP : IQ1S_XM;
                const float sumqx = (sumx[i1] - sumx[0]) * xx[0] + (sumx[i2] - sumx[i1]) * xx[1] +
                                    (sumx[32] - sumx[i2]) * xx[2];
                const float sumq2 = (sumw[i1] - sumw[0]) * xx[0] * xx[0] + (sumw[i2] - sumw[i1]) * xx[1] * xx[1] +
                                    (sumw[32] - sumw[i2]) * xx[2] * xx[2];
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    best.scale = sumqx / sumq2;
                    best_score = best.scale * sumqx;
                    best.i1 = i1;
                    best.i2 = i2;
                    best.shift = s == 0 ? 1 : -1;
                }
            }
        }
    }
    return best;
}

/* Whether any of n candidates passes the split searches' test against
 * best_score. If none does, trying them in order changes nothing (the best
 * only moves when one passes), so the fast searches skip them; the test is
 * the reference's, operation for operation, in a loop that vectorizes. */
IQ_INLINE int any_improves(const float *sumqx, const float *sumq2, int n, float best_score) {
    int any = 0;
    for (int i = 0; i < n; ++i) any |= (sumq2[i] > 0) & (sumqx[i] * sumqx[i] > best_score * sumq2[i]);
    return any;
}

/* The fast path's IQ1_S split search: for each i1 the candidates of every
 * i2 are computed first (a loop the compiler vectorizes; each lane does the
 * reference's operations in its order), then, unless none can pass, tried in
 * the reference's order. */
IQ_INLINE iq1_split iq1_s_best_split_fast(const float *xb, const float *weight, const value_index *sorted,
                                          float max) {
    float sumx[33], sumw[33];
    sumx[0] = sumw[0] = 0;
    for (int j = 0; j < 32; ++j) {
        const int i = sorted[j].i;
        sumx[j + 1] = sumx[j] + weight[i] * xb[i];
        sumw[j + 1] = sumw[j] + weight[i];
    }
    iq1_split best = {-1, -1, 0, max};
    float best_score = -FLT_MAX;
    float qx[2][33], q2[2][33];
    for (int i1 = 0; i1 <= 32; ++i1) {
        const float x1 = sumx[i1] - sumx[0], w1 = sumw[i1] - sumw[0];
        for (int s = 0; s < 2; ++s) {
            const float *xx = s == 0 ? IQ1S_XP : IQ1S_XM;
            const float a0 = xx[0], a1 = xx[1], a2 = xx[2];
            for (int i2 = i1; i2 <= 32; ++i2) {
                qx[s][i2] = x1 * a0 + (sumx[i2] - sumx[i1]) * a1 + (sumx[32] - sumx[i2]) * a2;
                q2[s][i2] = w1 * a0 * a0 + (sumw[i2] - sumw[i1]) * a1 * a1 + (sumw[32] - sumw[i2]) * a2 * a2;
            }
        }
        if (!any_improves(qx[0] + i1, q2[0] + i1, 33 - i1, best_score) &&
            !any_improves(qx[1] + i1, q2[1] + i1, 33 - i1, best_score))
            continue;
        for (int i2 = i1; i2 <= 32; ++i2)
            for (int s = 0; s < 2; ++s) {
                const float sumqx = qx[s][i2], sumq2 = q2[s][i2];
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    best.scale = sumqx / sumq2;
                    best_score = best.scale * sumqx;
                    best.i1 = i1;
                    best.i2 = i2;
                    best.shift = s == 0 ? 1 : -1;
                }
            }
    }
    return best;
}

IQ_INLINE int iq1_s_block(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast) {
    float scales[8], max_scale = 0;
    int8_t shifts[8];
    const float sigma2 = 2 * sum_squares(xbl, QK_K) / QK_K;
    memset(out, 0, IQ1_S_BYTES);
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = xbl + 32 * ib;
        float weight[32];
        imatrix_weights(xb, qwbl + 32 * ib, sigma2, 32, weight);
        float max = fabsf(xb[0]);
        for (int i = 1; i < 32; ++i) max = MAX(max, fabsf(xb[i]));
        scales[ib] = 0;
        shifts[ib] = 1;
        if (max < GROUP_MAX_EPS_IQ1_S) continue;
        value_index sorted[32];
        if (fast) sort_by_value_fast(xb, 32, sorted); else sort_by_value(xb, 32, sorted);
        iq1_split sp = fast ? iq1_s_best_split_fast(xb, weight, sorted, max) : iq1_s_best_split(xb, weight, sorted, max);
        if (sp.i1 < 0 || sp.i2 < 0 || sp.shift == 0) continue;
        int8_t L[32];
        split_levels(sorted, 32, sp.i1, sp.i2, L);
        if (sp.scale < 0) {
            for (int j = 0; j < 32; ++j) L[j] = (int8_t)(2 - L[j]);
            sp.scale = -sp.scale;
            sp.shift = -sp.shift;
        }
        const float *xx = sp.shift == 1 ? IQ1S_XP : IQ1S_XM;
        int index[4], on_grid = 1;
        for (int k = 0; k < 4; ++k) {
            index[k] = iq1_group_point(g, xb + 8 * k, weight + 8 * k, sp.scale, xx, L + 8 * k, &on_grid, fast);
            if (index[k] < 0) return SMOLQ_ERR_RANGE;
        }
        if (!on_grid) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 4; ++k) iq1_group_sums(g, index[k], xx, weight + 8 * k, xb + 8 * k, &sumqx, &sumq2);
            if (sumqx > 0 && sumq2 > 0) sp.scale = sumqx / sumq2;
        }
        uint16_t h = 0;
        for (int k = 0; k < 4; ++k) {
            out[IQ1_S_QS + 4 * ib + k] = (uint8_t)(index[k] & 255);
            h |= (uint16_t)((index[k] >> 8) << 3 * k);
        }
        wr16(out + IQ1_S_QH + 2 * ib, h);
        if (!(sp.scale >= 0)) return SMOLQ_ERR_RANGE;
        scales[ib] = sp.scale;
        shifts[ib] = (int8_t)sp.shift;
        max_scale = MAX(max_scale, sp.scale);
    }
    if (!max_scale) return 0;
    const float d = max_scale / 15;
    f16_store(out, d * 1.125f);
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
        int l = scale_level(id, scales[ib], 7);
        if (shifts[ib] == -1) l |= 8;
        wr16(out + IQ1_S_QH + 2 * ib, (uint16_t)(rd16(out + IQ1_S_QH + 2 * ib) | (l << 12)));
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* IQ1_M: 16 blocks of 16; per group an 11-bit grid index (8 in qs, 3 in qh)
 * and its own shift sign (qh bit 3 or 7); per block a 3-bit scale; the fp16
 * super-scale is spread over the top nibbles of the four scale words.
 * Without importance weights the weights are x^2 (ggml's fallback).        */

/* IQ1_M's exact search: every split of the sorted block, each half with
 * either shift (k: 0 ++, 1 +-, 2 -+, 3 --), from prefix sums per half. */
static iq1_split iq1_m_best_split(const float *xb, const float *weight, const value_index *sorted, float max) {
    float px[2][17], pw[2][17];
    px[0][0] = px[1][0] = 0;
    pw[0][0] = pw[1][0] = 0;
    for (int j = 0; j < 16; ++j) {
        const int i = sorted[j].i, h = i < 8 ? 0 : 1;
        px[h][j + 1] = px[h][j] + weight[i] * xb[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + weight[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    const float txs[2] = {px[0][16], px[1][16]}, tws[2] = {pw[0][16], pw[1][16]};
    const float p2 = IQ1M_XP[2], m2 = IQ1M_XM[2];
    const float cp1 = IQ1M_XP[0] * IQ1M_XP[0] - IQ1M_XP[1] * IQ1M_XP[1];
    const float cp2 = IQ1M_XP[1] * IQ1M_XP[1] - IQ1M_XP[2] * IQ1M_XP[2];
    const float cm1 = IQ1M_XM[0] * IQ1M_XM[0] - IQ1M_XM[1] * IQ1M_XM[1];
    const float cm2 = IQ1M_XM[1] * IQ1M_XM[1] - IQ1M_XM[2] * IQ1M_XM[2];
    iq1_split best = {-1, -1, -1, max};
    float best_score = -FLT_MAX;
    for (int i1 = 0; i1 <= 16; ++i1) {
        for (int i2 = i1; i2 <= 16; ++i2) {
            float qx_p[2], qx_m[2], q2_p[2], q2_m[2], sumqx[4], sumq2[4];
            for (int h = 0; h < 2; ++h) {
                const float sx = px[h][i1] + px[h][i2];
                qx_p[h] = txs[h] * p2 - sx;
                qx_m[h] = txs[h] * m2 - sx;
                q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
            }
            sumqx[0] = qx_p[0] + qx_p[1];
            sumqx[1] = qx_p[0] + qx_m[1];
            sumqx[2] = qx_m[0] + qx_p[1];
            sumqx[3] = qx_m[0] + qx_m[1];
            sumq2[0] = q2_p[0] + q2_p[1];
            sumq2[1] = q2_p[0] + q2_m[1];
            sumq2[2] = q2_m[0] + q2_p[1];
            sumq2[3] = q2_m[0] + q2_m[1];
            for (int k = 0; k < 4; ++k) {
                if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best_score * sumq2[k]) {
                    best.scale = sumqx[k] / sumq2[k];
                    best_score = best.scale * sumqx[k];
                    best.i1 = i1;
                    best.i2 = i2;
                    best.shift = k;
                }
            }
        }
    }
    return best;
}

/* The fast path's IQ1_M split search: for each i1 the four candidates of
 * every i2 first (vectorizable, the reference's operations per lane, the
 * i2-independent products hoisted), then, unless none can pass, tried in the
 * reference's order. */
IQ_INLINE iq1_split iq1_m_best_split_fast(const float *xb, const float *weight, const value_index *sorted,
                                          float max) {
    float px[2][17], pw[2][17];
    px[0][0] = px[1][0] = 0;
    pw[0][0] = pw[1][0] = 0;
    for (int j = 0; j < 16; ++j) {
        const int i = sorted[j].i, h = i < 8 ? 0 : 1;
        px[h][j + 1] = px[h][j] + weight[i] * xb[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + weight[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    const float p2 = IQ1M_XP[2], m2 = IQ1M_XM[2];
    const float cp1 = IQ1M_XP[0] * IQ1M_XP[0] - IQ1M_XP[1] * IQ1M_XP[1];
    const float cp2 = IQ1M_XP[1] * IQ1M_XP[1] - IQ1M_XP[2] * IQ1M_XP[2];
    const float cm1 = IQ1M_XM[0] * IQ1M_XM[0] - IQ1M_XM[1] * IQ1M_XM[1];
    const float cm2 = IQ1M_XM[1] * IQ1M_XM[1] - IQ1M_XM[2] * IQ1M_XM[2];
    const float tp0 = px[0][16] * p2, tp1 = px[1][16] * p2, tm0 = px[0][16] * m2, tm1 = px[1][16] * m2;
    const float wp0 = pw[0][16] * p2 * p2, wp1 = pw[1][16] * p2 * p2;
    const float wm0 = pw[0][16] * m2 * m2, wm1 = pw[1][16] * m2 * m2;
    iq1_split best = {-1, -1, -1, max};
    float best_score = -FLT_MAX;
    float sqx[4][17], sq2[4][17];
    for (int i1 = 0; i1 <= 16; ++i1) {
        const float x0 = px[0][i1], x1 = px[1][i1];
        const float p0c = wp0 + pw[0][i1] * cp1, p1c = wp1 + pw[1][i1] * cp1;
        const float m0c = wm0 + pw[0][i1] * cm1, m1c = wm1 + pw[1][i1] * cm1;
        for (int i2 = i1; i2 <= 16; ++i2) {
            const float sx0 = x0 + px[0][i2], sx1 = x1 + px[1][i2];
            const float qx_p0 = tp0 - sx0, qx_p1 = tp1 - sx1, qx_m0 = tm0 - sx0, qx_m1 = tm1 - sx1;
            const float q2_p0 = p0c + pw[0][i2] * cp2, q2_p1 = p1c + pw[1][i2] * cp2;
            const float q2_m0 = m0c + pw[0][i2] * cm2, q2_m1 = m1c + pw[1][i2] * cm2;
            sqx[0][i2] = qx_p0 + qx_p1;
            sqx[1][i2] = qx_p0 + qx_m1;
            sqx[2][i2] = qx_m0 + qx_p1;
            sqx[3][i2] = qx_m0 + qx_m1;
            sq2[0][i2] = q2_p0 + q2_p1;
            sq2[1][i2] = q2_p0 + q2_m1;
            sq2[2][i2] = q2_m0 + q2_p1;
            sq2[3][i2] = q2_m0 + q2_m1;
        }
        int any = 0;
        for (int k = 0; k < 4; ++k) any |= any_improves(sqx[k] + i1, sq2[k] + i1, 17 - i1, best_score);
        if (!any) continue;
        for (int i2 = i1; i2 <= 16; ++i2)
            for (int k = 0; k < 4; ++k) {
                const float sumqx = sqx[k][i2], sumq2 = sq2[k][i2];
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    best.scale = sumqx / sumq2;
                    best_score = best.scale * sumqx;
                    best.i1 = i1;
                    best.i2 = i2;
                    best.shift = k;
                }
            }
    }
    return best;
}

/* The shifted coordinates of group k (0, 1) of an IQ1_M block with shifts k. */
static const float *iq1_m_xx(int shifts, int k) {
    const int minus = k == 0 ? shifts >= 2 : shifts % 2 == 1;
    return minus ? IQ1M_XM : IQ1M_XP;
}

static void iq1_m_weights(const float *xb, const float *qw, float sigma2, float *weight) {
    if (qw) {
        imatrix_weights(xb, qw, sigma2, 16, weight);
    } else {
        for (int i = 0; i < 16; ++i) weight[i] = xb[i] * xb[i];
    }
}

/* IQ1_M's super-scale: the weighted least-squares d over the whole block with
 * the stored levels, grid points and shifts (ggml's final pass). */
static float iq1_m_refit(const iq_grid *g, const float *xbl, const float *qwbl, float sigma2, const uint8_t *out,
                         const int8_t *shifts, const int *levels, float d) {
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        float weight[16];
        iq1_m_weights(xb, qwbl ? qwbl + 16 * ib : NULL, sigma2, weight);
        const int qh = out[IQ1_M_QH + ib];
        for (int k = 0; k < 2; ++k) {
            const int p = out[IQ1_M_QS + 2 * ib + k] + ((qh << (8 - 4 * k)) & 0x700);
            const int8_t *pl = g->levels + 8 * p;
            const float *xx = iq1_m_xx(shifts[ib], k);
            for (int j = 0; j < 8; ++j) {
                const float w = weight[8 * k + j];
                const float q = xx[pl[j]] * (2 * levels[ib] + 1);
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
    }
    return sumq2 > 0 ? sumqx / sumq2 : d;
}

IQ_INLINE int iq1_m_block(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast) {
    static const uint8_t SHIFT_MASKS[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[16], max_scale = 0;
    int8_t shifts[16];
    const float sigma2 = 2 * sum_squares(xbl, QK_K) / QK_K;
    memset(out, 0, IQ1_M_BYTES);
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = xbl + 16 * ib;
        float weight[16];
        iq1_m_weights(xb, qwbl ? qwbl + 16 * ib : NULL, sigma2, weight);
        float max = fabsf(xb[0]);
        for (int i = 1; i < 16; ++i) max = MAX(max, fabsf(xb[i]));
        scales[ib] = 0;
        shifts[ib] = 0;
        if (max < GROUP_MAX_EPS_IQ1_M) continue;
        value_index sorted[16];
        if (fast) sort_by_value_fast(xb, 16, sorted); else sort_by_value(xb, 16, sorted);
        iq1_split sp = fast ? iq1_m_best_split_fast(xb, weight, sorted, max) : iq1_m_best_split(xb, weight, sorted, max);
        if (sp.i1 < 0 || sp.i2 < 0 || sp.shift < 0) continue;
        int8_t L[16];
        split_levels(sorted, 16, sp.i1, sp.i2, L);
        if (sp.scale < 0) {
            for (int j = 0; j < 16; ++j) L[j] = (int8_t)(2 - L[j]);
            sp.scale = -sp.scale;
            sp.shift = 3 - sp.shift; /* both halves' shifts flip */
        }
        int index[2], on_grid = 1;
        for (int k = 0; k < 2; ++k) {
            index[k] = iq1_group_point(g, xb + 8 * k, weight + 8 * k, sp.scale, iq1_m_xx(sp.shift, k), L + 8 * k,
                                       &on_grid, fast);
            if (index[k] < 0) return SMOLQ_ERR_RANGE;
        }
        if (!on_grid) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 2; ++k)
                iq1_group_sums(g, index[k], iq1_m_xx(sp.shift, k), weight + 8 * k, xb + 8 * k, &sumqx, &sumq2);
            if (sumqx > 0 && sumq2 > 0) sp.scale = sumqx / sumq2;
        }
        out[IQ1_M_QS + 2 * ib + 0] = (uint8_t)(index[0] & 255);
        out[IQ1_M_QS + 2 * ib + 1] = (uint8_t)(index[1] & 255);
        out[IQ1_M_QH + ib] = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
        if (!(sp.scale >= 0)) return SMOLQ_ERR_RANGE;
        scales[ib] = sp.scale;
        shifts[ib] = (int8_t)sp.shift;
        max_scale = MAX(max_scale, sp.scale);
    }
    if (!max_scale) return 0;
    uint16_t sc[4] = {0, 0, 0, 0};
    int levels[16];
    float d = max_scale / 15;
    const float id = 1 / d;
    for (int ib = 0; ib < 16; ++ib) {
        levels[ib] = scale_level(id, scales[ib], 7);
        sc[ib / 4] |= (uint16_t)(levels[ib] << 3 * (ib % 4));
        out[IQ1_M_QH + ib] |= SHIFT_MASKS[shifts[ib]];
    }
    d = iq1_m_refit(g, xbl, qwbl, sigma2, out, shifts, levels, d);
    const uint16_t s = smolq_fp32_to_fp16(d * 1.1125f);
    sc[0] |= (uint16_t)((s & 0x000f) << 12);
    sc[1] |= (uint16_t)((s & 0x00f0) << 8);
    sc[2] |= (uint16_t)((s & 0x0f00) << 4);
    sc[3] |= (uint16_t)(s & 0xf000);
    for (int i = 0; i < 4; ++i) wr16(out + IQ1_M_SCALES + 2 * i, sc[i]);
    return 0;
}

/* ======================================================================== */
/* Rows                                                                     */

/* One type's row quantizers: NAME_ref (exported, the reference) and NAME_fast
 * (the same block code with the fast searches, built for AVX2 where the
 * compiler can). Each row is its blocks in turn; the imatrix row is the
 * same for every row. */
#define IQ_ROWS(name, grid, block, bytes, needs_imatrix)                                              \
    IQ_INLINE int name##_row(const float *x, void *vy, int64_t n, const float *imatrix, int fast) {   \
        if ((needs_imatrix) && !imatrix) return SMOLQ_ERR_IMATRIX;                                    \
        const iq_grid *g = grid_tables(grid);                                                         \
        if (!g) return SMOLQ_ERR_ARG;                                                                 \
        uint8_t *y = vy;                                                                              \
        for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {                                                \
            const float *qw = imatrix ? imatrix + QK_K * ibl : NULL;                                  \
            const int err = block(g, x + QK_K * ibl, qw, y + (bytes) * ibl, fast);                    \
            if (err) return err;                                                                      \
        }                                                                                             \
        return 0;                                                                                     \
    }                                                                                                 \
    int smolq_quantize_row_##name(const float *x, void *y, int64_t n, const float *imatrix) {         \
        return name##_row(x, y, n, imatrix, 0);                                                       \
    }                                                                                                 \
    FAST_FN static int name##_fast(const float *x, void *y, int64_t n, const float *imatrix) {        \
        return name##_row(x, y, n, imatrix, 1);                                                       \
    }

IQ_ROWS(iq2_xxs, GRID_IQ2XXS, iq2_xxs_block, IQ2_XXS_BYTES, 1)
IQ_ROWS(iq2_xs, GRID_IQ2XS, iq2_xs_block, IQ2_XS_BYTES, 1)
IQ_ROWS(iq2_s, GRID_IQ2S, iq2_s_block, IQ2_S_BYTES, 0)
IQ_ROWS(iq1_s, GRID_IQ1S, iq1_s_block, IQ1_S_BYTES, 1)
IQ_ROWS(iq1_m, GRID_IQ1S, iq1_m_block, IQ1_M_BYTES, 0)

/* ======================================================================== */
/* Dequantization (ggml's dequantize_row_*, same float operations)           */

/* Eight values db * grid * (+-1): the published grid bytes, sign bit j of signs. */
static void put_signed_group(float db, uint64_t point, uint8_t signs, float *y) {
    for (int j = 0; j < 8; ++j) {
        const float v = (uint8_t)(point >> (8 * j));
        y[j] = db * v * ((signs >> j) & 1 ? -1.f : 1.f);
    }
}

void smolq_dequantize_row_iq2_xxs(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += IQ2_XXS_BYTES) {
        const float d = f16_load(x);
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t *q = x + IQ2_XXS_QS + 8 * ib;
            const uint32_t aux = rd32(q + 4);
            const float db = d * (0.5f + (aux >> 28)) * 0.25f;
            for (int l = 0; l < 4; ++l, y += 8)
                put_signed_group(db, smolq_iq2xxs_grid[q[l]], smolq_ksigns_iq2xs[(aux >> 7 * l) & 127], y);
        }
    }
}

void smolq_dequantize_row_iq2_xs(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += IQ2_XS_BYTES) {
        const float d = f16_load(x);
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t sc = x[IQ2_XS_SCALES + ib];
            const float db[2] = {d * (0.5f + (sc & 0xf)) * 0.25f, d * (0.5f + (sc >> 4)) * 0.25f};
            for (int l = 0; l < 4; ++l, y += 8) {
                const uint16_t q = rd16(x + IQ2_XS_QS + 2 * (4 * ib + l));
                put_signed_group(db[l / 2], smolq_iq2xs_grid[q & 511], smolq_ksigns_iq2xs[q >> 9], y);
            }
        }
    }
}

void smolq_dequantize_row_iq2_s(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += IQ2_S_BYTES) {
        const float d = f16_load(x);
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t sc = x[IQ2_S_SCALES + ib], qh = x[IQ2_S_QH + ib];
            const float db[2] = {d * (0.5f + (sc & 0xf)) * 0.25f, d * (0.5f + (sc >> 4)) * 0.25f};
            for (int l = 0; l < 4; ++l, y += 8) {
                const int p = x[IQ2_S_QS + 4 * ib + l] | ((qh << (8 - 2 * l)) & 0x300);
                put_signed_group(db[l / 2], smolq_iq2s_grid[p], x[IQ2_S_SIGNS + 4 * ib + l], y);
            }
        }
    }
}

/* Eight values dl * (grid + delta): the published IQ1 grid bytes (-1, 0, 1). */
static void put_shifted_group(float dl, uint64_t point, float delta, float *y) {
    for (int j = 0; j < 8; ++j) y[j] = dl * ((int8_t)(point >> (8 * j)) + delta);
}

void smolq_dequantize_row_iq1_s(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += IQ1_S_BYTES) {
        const float d = f16_load(x);
        for (int ib = 0; ib < 8; ++ib) {
            const uint16_t qh = rd16(x + IQ1_S_QH + 2 * ib);
            const float dl = d * (2 * ((qh >> 12) & 7) + 1);
            const float delta = qh & 0x8000 ? -SMOLQ_IQ1S_DELTA : SMOLQ_IQ1S_DELTA;
            for (int l = 0; l < 4; ++l, y += 8) {
                const int p = x[IQ1_S_QS + 4 * ib + l] | (((qh >> 3 * l) & 7) << 8);
                put_shifted_group(dl, smolq_iq1s_grid[p], delta, y);
            }
        }
    }
}

void smolq_dequantize_row_iq1_m(const void *vx, float *y, int64_t n) {
    const uint8_t *x = vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += IQ1_M_BYTES) {
        uint16_t sc[4];
        for (int k = 0; k < 4; ++k) sc[k] = rd16(x + IQ1_M_SCALES + 2 * k);
        const uint16_t s = (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
        const float d = smolq_fp16_to_fp32(s);
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t *qs = x + IQ1_M_QS + 4 * ib, *qh = x + IQ1_M_QH + 2 * ib;
            const float dl[2] = {d * (2 * ((sc[ib / 2] >> (6 * (ib % 2) + 0)) & 0x7) + 1),
                                 d * (2 * ((sc[ib / 2] >> (6 * (ib % 2) + 3)) & 0x7) + 1)};
            for (int l = 0; l < 4; ++l, y += 8) {
                const int h = qh[l / 2] >> (4 * (l % 2)); /* index bits 0-2, shift sign bit 3 */
                const int p = qs[l] | ((h & 7) << 8);
                const float delta = h & 0x08 ? -SMOLQ_IQ1M_DELTA : SMOLQ_IQ1M_DELTA;
                put_shifted_group(dl[l / 2], smolq_iq1s_grid[p], delta, y);
            }
        }
    }
}

/* ======================================================================== */

static const smolq_type_ops OPS[] = {
    {SMOLQ_T_IQ2_XXS, 0, QK_K, IQ2_XXS_BYTES, {NULL, NULL},
     {smolq_dequantize_row_iq2_xxs, smolq_dequantize_row_iq2_xxs}, 1,
     {smolq_quantize_row_iq2_xxs, iq2_xxs_fast}},
    {SMOLQ_T_IQ2_XS, 0, QK_K, IQ2_XS_BYTES, {NULL, NULL},
     {smolq_dequantize_row_iq2_xs, smolq_dequantize_row_iq2_xs}, 1,
     {smolq_quantize_row_iq2_xs, iq2_xs_fast}},
    {SMOLQ_T_IQ2_S, 0, QK_K, IQ2_S_BYTES, {NULL, NULL},
     {smolq_dequantize_row_iq2_s, smolq_dequantize_row_iq2_s}, 0,
     {smolq_quantize_row_iq2_s, iq2_s_fast}},
    {SMOLQ_T_IQ1_S, 0, QK_K, IQ1_S_BYTES, {NULL, NULL},
     {smolq_dequantize_row_iq1_s, smolq_dequantize_row_iq1_s}, 1,
     {smolq_quantize_row_iq1_s, iq1_s_fast}},
    {SMOLQ_T_IQ1_M, 0, QK_K, IQ1_M_BYTES, {NULL, NULL},
     {smolq_dequantize_row_iq1_m, smolq_dequantize_row_iq1_m}, 0,
     {smolq_quantize_row_iq1_m, iq1_m_fast}},
};

const smolq_type_ops *smolq_find_iq12_ops(int type) {
    for (size_t i = 0; i < sizeof(OPS) / sizeof(OPS[0]); i++)
        if (OPS[i].type == type) return &OPS[i];
    return NULL;
}

/* ======================================================================== */
/* IQ2 re-rounding for GPTQ grids (smolq_kernel.h)                          */

typedef int (*iq2_plan_block_fn)(const iq_grid *g, const float *xbl, const float *qwbl, uint8_t *out, int fast,
                                 const iq2_plan *plan);

/* The grid, block function, bytes and 32/16-element block count of an IQ2 type, or 0. */
static int iq2_kind(int type, int *grid, iq2_plan_block_fn *fn, int *bytes, int *nblocks) {
    switch (type) {
    case SMOLQ_T_IQ2_XXS: *grid = GRID_IQ2XXS; *fn = iq2_xxs_block_plan; *bytes = IQ2_XXS_BYTES; *nblocks = 8; return 1;
    case SMOLQ_T_IQ2_XS: *grid = GRID_IQ2XS; *fn = iq2_xs_block_plan; *bytes = IQ2_XS_BYTES; *nblocks = 16; return 1;
    case SMOLQ_T_IQ2_S: *grid = GRID_IQ2S; *fn = iq2_s_block_plan; *bytes = IQ2_S_BYTES; *nblocks = 16; return 1;
    default: return 0;
    }
}

int64_t smolq_iq2_rounding_plan(int type, const float *src, void *dst, float *group_id, float *group_scale,
                                float *sign, float *waux, float *db, uint8_t *skipped, int64_t nrows,
                                int64_t n_per_row, const float *imatrix) {
    int grid, bytes, nblocks;
    iq2_plan_block_fn fn;
    if (!iq2_kind(type, &grid, &fn, &bytes, &nblocks)) return SMOLQ_ERR_TYPE;
    if (!src || !dst || !group_id || !group_scale || !sign || !waux || !db || !skipped || nrows < 0 || n_per_row < 0)
        return SMOLQ_ERR_ARG;
    if (n_per_row % QK_K) return SMOLQ_ERR_ROWLEN;
    if (!imatrix && type != SMOLQ_T_IQ2_S) return SMOLQ_ERR_IMATRIX;
    const iq_grid *g = grid_tables(grid);
    if (!g) return SMOLQ_ERR_ARG;
    const int64_t nsuper = n_per_row / QK_K;
    for (int64_t r = 0; r < nrows; ++r)
        for (int64_t ibl = 0; ibl < nsuper; ++ibl) {
            const int64_t e = r * n_per_row + QK_K * ibl, b = (r * nsuper + ibl) * nblocks;
            const iq2_plan plan = {group_id + e / 8, group_scale + e / 8, sign + e, waux + e, db + b, skipped + b};
            const int err = fn(g, src + e, imatrix ? imatrix + QK_K * ibl : NULL,
                               (uint8_t *)dst + (r * nsuper + ibl) * bytes, 0, &plan);
            if (err) return err;
        }
    return nrows * nsuper * bytes;
}

int64_t smolq_iq2_round_groups(int type, const float *xval, const float *waux, const float *id, const float *scale,
                               int64_t n, uint16_t *points, uint8_t *magnitudes) {
    int grid, bytes, nblocks;
    iq2_plan_block_fn fn;
    if (!iq2_kind(type, &grid, &fn, &bytes, &nblocks)) return SMOLQ_ERR_TYPE;
    if (n < 0 || (n && (!xval || !waux || !id || !scale || !points || !magnitudes))) return SMOLQ_ERR_ARG;
    const iq_grid *g = grid_tables(grid);
    if (!g) return SMOLQ_ERR_ARG;
    for (int64_t k = 0; k < n; ++k) {
        int8_t L[8];
        if (iq2_round_group(g, id[k], scale[k], xval + 8 * k, waux + 8 * k, L, 0) < 0) return SMOLQ_ERR_RANGE;
        const int p = grid_point(g, L);
        if (p < 0) return SMOLQ_ERR_RANGE;
        points[k] = (uint16_t)p;
        for (int i = 0; i < 8; ++i) magnitudes[8 * k + i] = (uint8_t)(g->published[p] >> (8 * i));
    }
    return n;
}
