/* Attention of prefill chunks, every request of a step in one multithreaded call (out, lse in
 * float32), over either of DistAttention's two kinds of keys:
 *   - prefill_self_attention: each chunk's own new K,V, causal (the "self" part of a step;
 *     semantics of cpu_flash.causal_self_attention), read where they lie in the step's qkv;
 *   - prefill_paged_attention: a chunk's context in one pool's rBlocks, through the block table
 *     (semantics of micro_attention_reference for query chunks: all keys visible, or causal by
 *     the shard's positions).
 *
 * Unlike a decode row, a prefill chunk has many query rows per key, so scores and values are
 * register-tiled products, as in a GEMM, not dot products:
 *   - Phase 1 packs each (request, kv head)'s keys transposed, in panels of 16 keys
 *     (kt[e][c] = key c's element e), once for all its query blocks, from wherever they lie.
 *   - Phase 2 runs items (request, kv head, block of query tokens). An item's rows are its
 *     tokens times the G query heads sharing the kv head, so each key is loaded once for all G.
 *     Per 64 keys: scores S = Q K^T in MR x 16 register tiles (MR broadcasts of q and two loads
 *     of K per element, 2 MR FMAs), the causal mask on the blocks that cross the diagonal, one
 *     online-softmax update (exp8), then acc += P V in MR x 16 tiles over the value rows where
 *     they lie. Keys no row of the item sees are never touched.
 *   Items are taken largest first (the last query blocks see the most keys), dynamically.
 *
 * Self part: 1.2-2.5x torch's CPU flash kernel (one call per request, KV heads repeated for the
 * groups) on SmolLM2-135M's shapes, Zen 4, 2 threads; context: 1.0-1.35x. Figures in
 * cpu_prefill.py.
 *
 * Float32 only; D a multiple of 16 up to 256. Built at first use by infinite_llm/native/build.py
 * and called through ctypes by infinite_llm/attention/cpu_prefill.py.
 */
#include "vec8.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KP 16         /* keys per panel (two vectors) */
#define SUPER 4       /* panels per online-softmax update */
#define KW (KP * SUPER)
#define TARGET_ROWS 48 /* query rows (tokens x G) per item */
#define MAX_ROWS 64
#define MAX_D 256
#if defined(__AVX512F__) /* 32 vector registers: 8 x 16 tiles (16 accumulators) */
#define MR 8
#else                    /* 16 registers (AVX2): 6 x 16 tiles, 12 accumulators */
#define MR 6
#endif

/* acc[r][0..15] = sum_e x[r][e] w(e)[0..15] for `rows` (a constant in every inlined copy) rows,
 * w(e) = w + e * wstep (a K panel: 16 contiguous floats per e), or wrow[e] + col (columns
 * col..col+15 of value rows). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                        const float *w, int64_t wstep,
                                                        const float *const *wrow, int col,
                                                        int64_t n, const int rows, v8f *acc) {
    for (int i = 0; i < 2 * rows; i++) acc[i] = splat8(0.f);
    for (int64_t e = 0; e < n; e++) {
        const float *we = wrow ? wrow[e] + col : w + e * wstep;
        const v8f w0 = *(const v8f *)we, w1 = *(const v8f *)(we + 8);
        for (int r = 0; r < rows; r++) {
            const v8f xb = splat8(x[r * ldx + e]);
            acc[2 * r] += w0 * xb;
            acc[2 * r + 1] += w1 * xb;
        }
    }
}

/* The same tile, any row count up to MR: each count its own inlined copy. */
static void tile_any(const float *x, int64_t ldx, const float *w, int64_t wstep,
                     const float *const *wrow, int col, int64_t n, int rows, v8f *acc) {
    switch (rows) {
    case MR: tile(x, ldx, w, wstep, wrow, col, n, MR, acc); break;
#if MR > 7
    case 7: tile(x, ldx, w, wstep, wrow, col, n, 7, acc); break;
#endif
#if MR > 6
    case 6: tile(x, ldx, w, wstep, wrow, col, n, 6, acc); break;
#endif
    case 5: tile(x, ldx, w, wstep, wrow, col, n, 5, acc); break;
    case 4: tile(x, ldx, w, wstep, wrow, col, n, 4, acc); break;
    case 3: tile(x, ldx, w, wstep, wrow, col, n, 3, acc); break;
    case 2: tile(x, ldx, w, wstep, wrow, col, n, 2, acc); break;
    default: tile(x, ldx, w, wstep, wrow, col, n, 1, acc); break;
    }
}

typedef struct {
    const float *q;
    int64_t q_stride;         /* floats between consecutive query tokens */
    const int64_t *q_first;   /* [n + 1]: request i's query tokens */
    /* keys of request i: fresh, key j at k + (k_first[i] + j) * k_stride (v alike); or paged
     * (block_table != NULL), key j in block block_table[block_start[i] + j / bs], slot j % bs,
     * of a pool layer [hkv][blocks][bs][D] (strides in floats) */
    const float *k, *v;
    int64_t k_stride, v_stride;
    const int64_t *k_first;
    const int32_t *block_table;
    const int64_t *block_start;
    int64_t head_stride, block_stride, block_size;
    const int64_t *num_keys;  /* [n] */
    const int64_t *offset;    /* [n] or NULL: query token l sees keys j <= l + offset[i]; all */
    const int64_t *kt_start;  /* [n]: request i's first panel in kt (per head) */
    int64_t kt_panels;        /* panels per head, all requests */
    const float *kt;          /* [hkv][kt_panels][D][KP] */
    int hq, hkv, d;
    float scale;
    float *out, *lse;         /* [T, hq, D], [T, hq] */
} Problem;

/* Key (or value) j of request i, kv head h. */
static inline const float *key_at(const Problem *P, const float *base, int64_t stride, int64_t i,
                                  int h, int64_t j) {
    if (P->block_table) {
        const int64_t b = P->block_table[P->block_start[i] + j / P->block_size];
        return base + h * P->head_stride + b * P->block_stride + (j % P->block_size) * P->d;
    }
    return base + (P->k_first[i] + j) * stride + (int64_t)h * P->d;
}

/* Keys query token l of request i sees: 0..visible(l) - 1. */
static inline int64_t visible(const Problem *P, int64_t i, int64_t l) {
    const int64_t s = P->num_keys[i];
    if (!P->offset) return s;
    const int64_t lim = l + P->offset[i] + 1;
    return lim < 0 ? 0 : lim < s ? lim : s;
}

/* One item: request i, kv head h, tokens l0..l0+nt-1 of the request. */
static void run_item(const Problem *P, int64_t i, int h, int64_t l0, int nt) {
    const int D = P->d, G = P->hq / P->hkv, rows = nt * G;
    const int64_t s0 = P->q_first[i];
    float qs[MAX_ROWS * MAX_D] __attribute__((aligned(32)));
    float acc[MAX_ROWS * MAX_D] __attribute__((aligned(32)));
    float s[MAX_ROWS * KW] __attribute__((aligned(32)));
    float m[MAX_ROWS], l[MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        const float *qr = P->q + (s0 + l0 + r / G) * P->q_stride + (int64_t)(h * G + r % G) * D;
        for (int c = 0; c < D; c++) qs[r * D + c] = qr[c] * P->scale;
        m[r] = -INFINITY;
        l[r] = 0.f;
    }
    memset(acc, 0, sizeof(float) * rows * D);
    const float *kt = P->kt + ((int64_t)h * P->kt_panels + P->kt_start[i]) * D * KP;
    const int64_t nkeys = visible(P, i, l0 + nt - 1); /* the item's last token sees the most */
    const int64_t first_limit = visible(P, i, l0);
    const float *vrow[KW];
    v8f t_acc[2 * MR];
    for (int64_t t = 0; t < nkeys; t += KW) {
        const int real = nkeys - t < KW ? (int)(nkeys - t) : KW;
        const int np = (real + KP - 1) / KP, W = np * KP;
        /* scores */
        for (int r0 = 0; r0 < rows; r0 += MR) {
            const int mr = rows - r0 < MR ? rows - r0 : MR;
            for (int p = 0; p < np; p++) {
                tile_any(qs + r0 * D, D, kt + (t / KP + p) * D * KP, KP, NULL, 0, D, mr, t_acc);
                for (int r = 0; r < mr; r++) {
                    *(v8f *)&s[(r0 + r) * KW + p * KP] = t_acc[2 * r];
                    *(v8f *)&s[(r0 + r) * KW + p * KP + 8] = t_acc[2 * r + 1];
                }
            }
        }
        /* mask: key t + j is visible to token l when t + j < visible(l); only blocks that
         * reach past the first token's keys need it (padding past nkeys included) */
        if (t + W > first_limit) {
            const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
            for (int r = 0; r < rows; r++) {
                const int last = (int)(visible(P, i, l0 + r / G) - 1 - t); /* last visible j */
                for (int j0 = 0; j0 < W; j0 += 8) {
                    v8i visible = lane + j0 <= last;
                    *(v8f *)&s[r * KW + j0] =
                        select8(visible, *(v8f *)&s[r * KW + j0], splat8(-INFINITY));
                }
            }
        }
        /* online softmax: probabilities overwrite the scores */
        for (int r = 0; r < rows; r++) softmax_update(s + r * KW, W, &m[r], &l[r], acc + r * D, D);
        /* acc += P V over the real keys (padding has probability 0 and no value row) */
        for (int j = 0; j < real; j++) vrow[j] = key_at(P, P->v, P->v_stride, i, h, t + j);
        for (int r0 = 0; r0 < rows; r0 += MR) {
            const int mr = rows - r0 < MR ? rows - r0 : MR;
            for (int c0 = 0; c0 < D; c0 += 16) {
                tile_any(s + r0 * KW, KW, NULL, 0, vrow, c0, real, mr, t_acc);
                for (int r = 0; r < mr; r++) {
                    float *a = acc + (r0 + r) * D + c0;
                    *(v8f *)a += t_acc[2 * r];
                    *(v8f *)(a + 8) += t_acc[2 * r + 1];
                }
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const int64_t tok = s0 + l0 + r / G;
        const int head = h * G + r % G;
        float *o = P->out + (tok * P->hq + head) * D;
        if (l[r] == 0.f) { /* a row that sees no key here: the empty state */
            memset(o, 0, sizeof(float) * D);
            P->lse[tok * P->hq + head] = -INFINITY;
            continue;
        }
        const float inv = 1.0f / l[r];
        for (int c = 0; c < D; c++) o[c] = acc[r * D + c] * inv;
        P->lse[tok * P->hq + head] = m[r] + logf(l[r]);
    }
}

/* Phase 1 and 2 over P (q, keys, num_keys, offset, hq, hkv, d, scale, out, lse set) for n
 * requests. Returns 0, or -1 (nothing written) where the shapes are not supported or memory
 * runs out. */
static int run(Problem *P, int64_t n, int num_threads) {
    const int hq = P->hq, hkv = P->hkv, d = P->d;
    if (hkv <= 0 || hq % hkv || d % 16 || d > MAX_D || hq / hkv > MAX_ROWS || n <= 0) return -1;
    const int G = hq / hkv;
    int tpi = TARGET_ROWS / G;
    if (tpi < 1) tpi = 1;
    int64_t *kt_start = malloc(sizeof(int64_t) * (size_t)n);
    int64_t panels = 0, items = 0, max_blocks = 0;
    if (!kt_start) return -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t len = P->q_first[i + 1] - P->q_first[i];
        kt_start[i] = panels;
        panels += (P->num_keys[i] + KP - 1) / KP;
        const int64_t blocks = (len + tpi - 1) / tpi;
        items += blocks * hkv;
        if (blocks > max_blocks) max_blocks = blocks;
    }
    float *kt = malloc(sizeof(float) * (size_t)(hkv * panels * d * KP) + 1);
    int64_t *order = malloc(sizeof(int64_t) * 3 * (size_t)(items ? items : 1));
    if (!kt || !order) {
        free(kt_start);
        free(kt);
        free(order);
        return -1;
    }
    P->kt_start = kt_start;
    P->kt_panels = panels;
    P->kt = kt;
    /* largest items first: later query blocks see more keys */
    int64_t at = 0;
    for (int64_t b = max_blocks - 1; b >= 0; b--)
        for (int64_t i = 0; i < n; i++)
            if (b * tpi < P->q_first[i + 1] - P->q_first[i])
                for (int h = 0; h < hkv; h++) {
                    order[3 * at] = i;
                    order[3 * at + 1] = h;
                    order[3 * at + 2] = b;
                    at++;
                }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < hkv * panels; x++) { /* pack K^T, panel by panel */
            const int h = (int)(x / panels);
            const int64_t p = x % panels;
            int64_t i = 0; /* the request holding panel p */
            while (i + 1 < n && kt_start[i + 1] <= p) i++;
            const int64_t first = (p - kt_start[i]) * KP, len = P->num_keys[i];
            float *dst = kt + x * d * KP;
            for (int c = 0; c < KP; c++) {
                const int64_t key = first + c;
                if (key < len) {
                    const float *src = key_at(P, P->k, P->k_stride, i, h, key);
                    for (int e = 0; e < d; e++) dst[e * KP + c] = src[e];
                } else {
                    for (int e = 0; e < d; e++) dst[e * KP + c] = 0.f;
                }
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < items; x++) {
            const int64_t i = order[3 * x], b = order[3 * x + 2];
            const int64_t len = P->q_first[i + 1] - P->q_first[i], l0 = b * tpi;
            const int nt = len - l0 < tpi ? (int)(len - l0) : tpi;
            run_item(P, i, (int)order[3 * x + 1], l0, nt);
        }
    }
    free(kt_start);
    free(kt);
    free(order);
    return 0;
}

/* A problem's query side and shape; the caller sets the keys. */
static Problem problem(const float *q, int64_t q_stride, const int64_t *q_first, int hq, int hkv,
                      int d, float scale, float *out, float *lse) {
    Problem P = {0};
    P.q = q;
    P.q_stride = q_stride;
    P.q_first = q_first;
    P.hq = hq;
    P.hkv = hkv;
    P.d = d;
    P.scale = scale;
    P.out = out;
    P.lse = lse;
    return P;
}

/* Causal self-attention of n chunks: q: token t's head j at q + t * q_stride + j * d (k, v alike
 * with hkv heads); starts: [n + 1] token offsets of the requests, for queries and keys alike.
 * out: [T, hq, d], lse: [T, hq], float32, contiguous. Returns 0, or -1 (nothing written). */
int prefill_self_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                           const float *v, int64_t v_stride, const int64_t *starts, int64_t n,
                           int hq, int hkv, int d, float scale, float *out, float *lse,
                           int num_threads) {
    int64_t *lens = malloc(sizeof(int64_t) * (size_t)(n > 0 ? 2 * n : 1));
    if (!lens) return -1;
    int64_t *offsets = lens + n;
    for (int64_t i = 0; i < n; i++) {
        lens[i] = starts[i + 1] - starts[i];
        offsets[i] = 0;
    }
    Problem P = problem(q, q_stride, starts, hq, hkv, d, scale, out, lse);
    P.k = k;
    P.v = v;
    P.k_stride = k_stride;
    P.v_stride = v_stride;
    P.k_first = starts;
    P.num_keys = lens;
    P.offset = offsets;
    const int status = run(&P, n, num_threads);
    free(lens);
    return status;
}

/* Query chunks over one pool layer's rBlocks: q [T, hq, d] contiguous, request i's rows
 * query_start[i]..query_start[i + 1]; its keys the first context_lens[i] of the blocks
 * block_table[block_start[i]..]; k, v: [hkv][num_blocks][block_size][d] float32, heads and
 * blocks at head_stride and block_stride floats, tokens contiguous inside a block.
 * offset: NULL (every key visible) or [n] (token l sees keys j <= l + offset[i]: the causal
 * mask of a shard whose key 0 sits offset[i] positions before query token 0). */
int prefill_paged_attention(const float *q, const int64_t *query_start, const float *k,
                            const float *v, int64_t head_stride, int64_t block_stride,
                            int64_t block_size,
                            const int32_t *block_table, const int64_t *block_start,
                            const int64_t *context_lens, const int64_t *offset, int64_t n, int hq,
                            int hkv, int d, float scale, float *out, float *lse, int num_threads) {
    Problem P = problem(q, (int64_t)hq * d, query_start, hq, hkv, d, scale, out, lse);
    P.k = k;
    P.v = v;
    P.block_table = block_table;
    P.block_start = block_start;
    P.block_size = block_size;
    P.block_stride = block_stride;
    P.head_stride = head_stride;
    P.num_keys = context_lens;
    P.offset = offset;
    return run(&P, n, num_threads);
}
