/* Causal attention of prefill chunks over their own new K,V: the "self" part of a prefill step
 * in DistAttention, every request of the step in one multithreaded call. Semantics are those of
 * cpu_flash.causal_self_attention (out, lse in float32).
 *
 * Unlike a decode row, a prefill chunk has many query rows per key, so scores and values are
 * register-tiled products, as in a GEMM, not dot products:
 *   - Phase 1 packs each (request, kv head)'s keys transposed, in panels of 16 keys
 *     (kt[e][c] = key c's element e), once for all its query blocks.
 *   - Phase 2 runs items (request, kv head, block of query tokens). An item's rows are its
 *     tokens times the G query heads sharing the kv head, so each key is loaded once for all G.
 *     Per 64 keys: scores S = Q K^T in MR x 16 register tiles (MR broadcasts of q and two loads
 *     of K per element, 2 MR FMAs), the causal mask on the blocks that cross the diagonal, one
 *     online-softmax update (exp8), then acc += P V in MR x 16 tiles over the value rows as they
 *     lie in the step's qkv tensor. Keys past the item's last token are never touched.
 *   Items are taken largest first (the last query blocks see the most keys), dynamically.
 *
 * 1.3-2.5x torch's CPU flash kernel (one call per request, KV heads repeated for the groups) on
 * SmolLM2-135M's shapes, Zen 4, 2 threads: figures in cpu_prefill.py.
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
 * w(e) = w + e * wstep (a K panel: 16 contiguous floats per e), or wrow[e] (value rows). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                        const float *w, int64_t wstep,
                                                        const float *const *wrow, int64_t n,
                                                        const int rows, v8f *acc) {
    for (int i = 0; i < 2 * rows; i++) acc[i] = splat8(0.f);
    for (int64_t e = 0; e < n; e++) {
        const float *we = wrow ? wrow[e] : w + e * wstep;
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
                     const float *const *wrow, int64_t n, int rows, v8f *acc) {
    switch (rows) {
    case MR: tile(x, ldx, w, wstep, wrow, n, MR, acc); break;
#if MR > 7
    case 7: tile(x, ldx, w, wstep, wrow, n, 7, acc); break;
#endif
#if MR > 6
    case 6: tile(x, ldx, w, wstep, wrow, n, 6, acc); break;
#endif
    case 5: tile(x, ldx, w, wstep, wrow, n, 5, acc); break;
    case 4: tile(x, ldx, w, wstep, wrow, n, 4, acc); break;
    case 3: tile(x, ldx, w, wstep, wrow, n, 3, acc); break;
    case 2: tile(x, ldx, w, wstep, wrow, n, 2, acc); break;
    default: tile(x, ldx, w, wstep, wrow, n, 1, acc); break;
    }
}

typedef struct {
    const float *q, *k, *v;
    int64_t q_stride, k_stride, v_stride; /* floats between consecutive tokens */
    const int64_t *starts;                /* [n + 1]: request i's tokens */
    const int64_t *kt_start;              /* [n]: request i's first panel in kt (per head) */
    int64_t kt_panels;                    /* panels per head, all requests */
    const float *kt;                      /* [hkv][kt_panels][D][KP] */
    int hq, hkv, d, tokens_per_item;
    float scale;
    float *out, *lse;
} Problem;

/* One item: request i, kv head h, tokens l0..l0+nt-1 of the request. */
static void run_item(const Problem *P, int64_t i, int h, int64_t l0, int nt) {
    const int D = P->d, G = P->hq / P->hkv, rows = nt * G;
    const int64_t s0 = P->starts[i];
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
    const float *vh = P->v + s0 * P->v_stride + (int64_t)h * D;
    const int64_t nkeys = l0 + nt; /* the item's last token sees keys 0..l0+nt-1 */
    const float *vrow[KW];
    v8f t_acc[2 * MR];
    for (int64_t t = 0; t < nkeys; t += KW) {
        const int real = nkeys - t < KW ? (int)(nkeys - t) : KW;
        const int np = (real + KP - 1) / KP, W = np * KP;
        /* scores */
        for (int r0 = 0; r0 < rows; r0 += MR) {
            const int mr = rows - r0 < MR ? rows - r0 : MR;
            for (int p = 0; p < np; p++) {
                tile_any(qs + r0 * D, D, kt + (t / KP + p) * D * KP, KP, NULL, D, mr, t_acc);
                for (int r = 0; r < mr; r++) {
                    *(v8f *)&s[(r0 + r) * KW + p * KP] = t_acc[2 * r];
                    *(v8f *)&s[(r0 + r) * KW + p * KP + 8] = t_acc[2 * r + 1];
                }
            }
        }
        /* causal mask: key t + j is visible to token l0 + r / G when t + j <= l0 + r / G */
        if (t + W - 1 > l0) {
            const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
            for (int r = 0; r < rows; r++) {
                const int last = (int)(l0 + r / G - t); /* the row's last visible j */
                for (int j0 = 0; j0 < W; j0 += 8) {
                    v8i visible = lane + j0 <= last;
                    *(v8f *)&s[r * KW + j0] =
                        select8(visible, *(v8f *)&s[r * KW + j0], splat8(-INFINITY));
                }
            }
        }
        /* online softmax: probabilities overwrite the scores; every row sees key t >= 0 */
        for (int r = 0; r < rows; r++) {
            float *sr = s + r * KW;
            v8f mx = *(v8f *)sr;
            for (int j0 = 8; j0 < W; j0 += 8) {
                v8f x = *(v8f *)&sr[j0];
                mx = select8(x > mx, x, mx);
            }
            const float mt = hmax8(mx);
            if (mt == -INFINITY) { /* no visible key in this block (a later block of the row) */
                memset(sr, 0, sizeof(float) * W);
                continue;
            }
            const float mn = mt > m[r] ? mt : m[r];
            v8f sum = splat8(0.f);
            for (int j0 = 0; j0 < W; j0 += 8) {
                v8f p = exp8(*(v8f *)&sr[j0] - mn);
                *(v8f *)&sr[j0] = p;
                sum += p;
            }
            if (mn != m[r]) {
                const float corr = m[r] == -INFINITY ? 0.0f : expf(m[r] - mn);
                l[r] *= corr;
                for (int c = 0; c < D; c++) acc[r * D + c] *= corr;
                m[r] = mn;
            }
            l[r] += hsum8(sum);
        }
        /* acc += P V over the real keys (padding has probability 0 and no value row) */
        for (int j = 0; j < real; j++) vrow[j] = vh + (t + j) * P->v_stride;
        for (int r0 = 0; r0 < rows; r0 += MR) {
            const int mr = rows - r0 < MR ? rows - r0 : MR;
            for (int c0 = 0; c0 < D; c0 += 16) {
                const float *cols[KW];
                for (int j = 0; j < real; j++) cols[j] = vrow[j] + c0;
                tile_any(s + r0 * KW, KW, NULL, 0, cols, real, mr, t_acc);
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
        const float inv = 1.0f / l[r];
        for (int c = 0; c < D; c++) o[c] = acc[r * D + c] * inv;
        P->lse[tok * P->hq + head] = m[r] + logf(l[r]);
    }
}

/* q: token t's head j at q + t * q_stride + j * d (k, v alike with hkv heads); starts: [n + 1]
 * token offsets of the requests. out: [T, hq, d], lse: [T, hq], float32, contiguous.
 * Returns 0, or -1 (nothing written) where the shapes are not supported or memory runs out. */
int prefill_self_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                           const float *v, int64_t v_stride, const int64_t *starts, int64_t n,
                           int hq, int hkv, int d, float scale, float *out, float *lse,
                           int num_threads) {
    if (hkv <= 0 || hq % hkv || d % 16 || d > MAX_D || hq / hkv > MAX_ROWS || n <= 0) return -1;
    const int G = hq / hkv;
    int tpi = TARGET_ROWS / G;
    if (tpi < 1) tpi = 1;
    int64_t *kt_start = malloc(sizeof(int64_t) * (size_t)n);
    int64_t panels = 0, items = 0, max_blocks = 0;
    if (!kt_start) return -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t len = starts[i + 1] - starts[i];
        kt_start[i] = panels;
        panels += (len + KP - 1) / KP;
        const int64_t blocks = (len + tpi - 1) / tpi;
        items += blocks * hkv;
        if (blocks > max_blocks) max_blocks = blocks;
    }
    float *kt = malloc(sizeof(float) * (size_t)(hkv * panels * d * KP));
    int64_t *order = malloc(sizeof(int64_t) * 3 * (size_t)(items ? items : 1));
    if (!kt || !order) {
        free(kt_start);
        free(kt);
        free(order);
        return -1;
    }
    Problem P = {q, k, v, q_stride, k_stride, v_stride, starts, kt_start, panels, kt,
                 hq, hkv, d, tpi, scale, out, lse};
    /* largest items first: query block b sees (b + 1) * tpi keys */
    int64_t at = 0;
    for (int64_t b = max_blocks - 1; b >= 0; b--)
        for (int64_t i = 0; i < n; i++)
            if (b * tpi < starts[i + 1] - starts[i])
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
            const int64_t first = (p - kt_start[i]) * KP, len = starts[i + 1] - starts[i];
            float *dst = kt + x * d * KP;
            for (int c = 0; c < KP; c++) {
                const int64_t key = first + c;
                const float *src = k + (starts[i] + key) * k_stride + (int64_t)h * d;
                for (int e = 0; e < d; e++) dst[e * KP + c] = key < len ? src[e] : 0.f;
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < items; x++) {
            const int64_t i = order[3 * x], b = order[3 * x + 2];
            const int64_t len = starts[i + 1] - starts[i], l0 = b * tpi;
            const int nt = len - l0 < tpi ? (int)(len - l0) : tpi;
            run_item(&P, i, (int)order[3 * x + 1], l0, nt);
        }
    }
    free(kt_start);
    free(kt);
    free(order);
    return 0;
}
