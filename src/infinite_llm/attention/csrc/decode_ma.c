/* Decode MicroAttention over paged rBlocks: every request of an MABatch in one call.
 *
 * Built at first use by infinite_llm/attention/native_build.py and called through ctypes by
 * cpu_native.py; semantics are those of micro_attention_reference (out, lse in float32).
 *
 * Layout (one layer of a KVPool, K and V alike; elements, float32 or bfloat16):
 *
 *     cache[h][block][offset][d]    head stride hs, block stride bst, token stride D
 *
 * Work item = (request, kv head, split-K chunk of its keys). An item walks its keys in tiles of
 * TILE tokens (a tile may span rBlocks: each token's address comes from the block table, and
 * the tiles ahead are prefetched, which no hardware prefetcher can do across scattered blocks)
 * and keeps, per query row, the online-softmax state (running max m, sum l, unnormalised
 * acc[D]). The G query heads of a KV head (times the request's query tokens) are the item's
 * rows: each key vector is loaded once for three rows at a time. Items of a request with
 * several chunks leave partial states that a second pass merges by log-sum-exp; a single chunk
 * writes its rows directly. bfloat16 is widened two elements per 32-bit lane (see bf16_even).
 *
 * Also here: merge_into (the running-state merge of DistAttention) and self_decode (a decode
 * token's attention over itself), each a single loop instead of a dozen small torch ops.
 *
 * Portable C11 + GCC/Clang vector extensions (lowered to AVX2, AVX-512, NEON, ... by the
 * compiler; AVX gets a faster horizontal reduction); OpenMP for threads, linked against the
 * libgomp torch already loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32), aligned(4)));   /* unaligned loads are fine */
typedef float v4f __attribute__((vector_size(16), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
typedef uint32_t v8u __attribute__((vector_size(32), aligned(4)));

#define TILE 16       /* keys per tile */
#define MAX_ROWS 16   /* query rows per pass over an item's keys */
#define MAX_D 256
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 2  /* rBlocks sit anywhere: hardware prefetchers cannot follow the table */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 3
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float hsum8(v8f a) {
    v4f lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *)&a + 16, sizeof hi);
    v4f s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

ALWAYS_INLINE v8f select8(v8i mask, v8f a, v8f b) { /* mask ? a : b, per lane */
    v8i ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    ia = (ia & mask) | (ib & ~mask);
    memcpy(&a, &ia, sizeof a);
    return a;
}

/* exp(x) to ~2 ulp on 8 lanes (Cephes expf polynomial); exactly 0 below -87.3 (and for -inf). */
ALWAYS_INLINE v8f exp8(v8f x) {
    const v8f zero = {0};
    v8i under = x < -87.3365447505531f;
    x = select8(x > 88.3762626647949f, zero + 88.3762626647949f, x);
    x = select8(under, zero, x);
    v8f fx = x * 1.44269504088896341f + 0.5f;
    v8f n = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);
    n = select8(n > fx, n - 1.0f, n); /* floor, not truncation towards zero */
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f p = zero + 1.9875691500e-4f;
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    p = p * x * x + x + 1.0f;
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f scale;
    memcpy(&scale, &e, sizeof scale);
    return select8(under, zero, p * scale);
}

typedef struct {
    const float *q;           /* [T, Hq, D] float32 */
    const char *k, *v;        /* pool layer base pointers */
    int64_t head_stride;      /* bytes */
    int64_t block_stride;     /* bytes */
    const int64_t *query_start;   /* [n + 1] */
    const int32_t *block_table;   /* flattened block ids, request i at block_start[i] */
    const int64_t *block_start;   /* [n + 1] */
    const int64_t *context_lens;  /* [n] */
    const int64_t *row_limit;     /* NULL, or [T]: visible keys per query row (causal) */
    int hq, hkv, d, block_size;
    float scale;
    float *out;               /* [T, Hq, D] float32 */
    float *lse;               /* [T, Hq] float32 */
} Problem;

/* Eight dot products at once: lane j of the result = sum of the lanes of a[j]. */
ALWAYS_INLINE v8f reduce8(const v8f a[8]) {
#if defined(__AVX__)
    __m256 s01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]);
    __m256 s23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    __m256 s45 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]);
    __m256 s67 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
    __m256 s03 = _mm256_hadd_ps(s01, s23);  /* [a0..a3 low halves | a0..a3 high halves] */
    __m256 s47 = _mm256_hadd_ps(s45, s67);
    __m256 lo = _mm256_permute2f128_ps(s03, s47, 0x20);
    __m256 hi = _mm256_permute2f128_ps(s03, s47, 0x31);
    return (v8f)(lo + hi);
#else
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = hsum8(a[j]);
    return r;
#endif
}

ALWAYS_INLINE float hmax8(v8f a) {
    float x = a[0];
    for (int j = 1; j < 8; j++) x = a[j] > x ? a[j] : x;
    return x;
}

/* Byte offsets in a head's pool of keys t..t+n-1: one division per tile, not one per key. */
ALWAYS_INLINE void key_offsets(const Problem *P, const int32_t *blocks, int64_t t, int n,
                               int64_t tok_bytes, int64_t *off) {
    const int64_t bs = P->block_size;
    int64_t b = t / bs, in = t - b * bs, base = (int64_t)blocks[b] * P->block_stride;
    for (int j = 0; j < n; j++) {
        off[j] = base + in * tok_bytes;
        if (++in == bs && j + 1 < n) {
            in = 0;
            base = (int64_t)blocks[++b] * P->block_stride;
        }
    }
}

/* bfloat16 pairs: a 32-bit lane holds elements 2i (low half) and 2i+1 (high half); shifting and
 * masking widen 16 of them with two instructions. Dot products do not care about the order of
 * the elements; the value accumulators keep [even | odd] per 16 and are put back at the end. */
ALWAYS_INLINE v8f bf16_even(v8u raw) {
    v8u w = raw << 16;
    v8f f;
    memcpy(&f, &w, sizeof f);
    return f;
}
ALWAYS_INLINE v8f bf16_odd(v8u raw) {
    v8u w = raw & 0xFFFF0000u;
    v8f f;
    memcpy(&f, &w, sizeof f);
    return f;
}

/* Four dot products at once: lane j of the result = sum of the lanes of a[j]. */
ALWAYS_INLINE v4f reduce4(const v8f a[4]) {
#if defined(__AVX__)
    __m256 s01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]);
    __m256 s23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    __m256 s03 = _mm256_hadd_ps(s01, s23); /* [a0..a3 low halves | a0..a3 high halves] */
    return (v4f)(_mm256_castps256_ps128(s03) + _mm256_extractf128_ps(s03, 1));
#else
    v4f r;
    for (int j = 0; j < 4; j++) r[j] = hsum8(a[j]);
    return r;
#endif
}

/* Scores of `nr` (1..3) query rows against the TILE keys at kp: s[r][j] = q_r . k_j (q is
 * pre-scaled). Each key vector is loaded once for all rows. */
ALWAYS_INLINE void tile_scores(const float *q, const int nr, const char *const *kp,
                               float (*s)[TILE], int bf16, int D) {
    const int nd = D / 8;
    for (int j0 = 0; j0 < TILE; j0 += 4) {
        v8f a[3][4] = {{{0}}};
        if (bf16) {
            for (int c = 0; c < nd; c += 2)
                for (int j = 0; j < 4; j++) {
                    v8u raw = *(const v8u *)(kp[j0 + j] + 16 * c);
                    v8f ke = bf16_even(raw), ko = bf16_odd(raw);
                    for (int r = 0; r < nr; r++)
                        a[r][j] += *(const v8f *)(q + r * D + 8 * c) * ke +
                                   *(const v8f *)(q + r * D + 8 * c + 8) * ko;
                }
        } else {
            for (int c = 0; c < nd; c++)
                for (int j = 0; j < 4; j++) {
                    v8f kk = *(const v8f *)(kp[j0 + j] + 32 * c);
                    for (int r = 0; r < nr; r++) a[r][j] += *(const v8f *)(q + r * D + 8 * c) * kk;
                }
        }
        for (int r = 0; r < nr; r++) *(v4f *)&s[r][j0] = reduce4(a[r]);
    }
}

/* One item: rows (l, g) of request i, kv head h, query rows r0..r0+nrows of its L*G rows;
 * keys t0..t1. Leaves the unnormalised state (m, l, acc[rows][D]). */
ALWAYS_INLINE void run_item(const Problem *P, int i, int h, int r0, int nrows, int64_t t0,
                            int64_t t1, float *m, float *l, float *acc, int bf16, int D) {
    const int G = P->hq / P->hkv, nd = D / 8, esz = bf16 ? 2 : 4;
    const int64_t tok_bytes = (int64_t)D * esz;
    const int32_t *blocks = P->block_table + P->block_start[i];
    const char *kh = P->k + h * P->head_stride, *vh = P->v + h * P->head_stride;
    /* scaled query rows (bfloat16: [even | odd] per 16 elements, like the keys) */
    float qs[MAX_ROWS * MAX_D] __attribute__((aligned(32)));
    int64_t limit[MAX_ROWS];
    for (int r = 0; r < nrows; r++) {
        int f = r0 + r;
        int64_t row = P->query_start[i] + f / G;
        const float *qr = P->q + (row * P->hq + h * G + f % G) * D;
        for (int c = 0; c < D; c++) {
            int to = bf16 ? (c & ~15) + (c & 1) * 8 + (c & 15) / 2 : c;
            qs[r * D + to] = qr[c] * P->scale;
        }
        limit[r] = P->row_limit && P->row_limit[row] < t1 ? P->row_limit[row] : t1;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        memset(acc + (int64_t)r * D, 0, sizeof(float) * D);
    }
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    float s[MAX_ROWS][TILE] __attribute__((aligned(32)));
    for (int64_t t = t0; t < t1; t += TILE) {
        const int nt = t1 - t < TILE ? (int)(t1 - t) : TILE;
        int64_t off[TILE];
        if (PREFETCH_TILES > 0 && t + PREFETCH_TILES * TILE < t1) {
            const int64_t tp = t + PREFETCH_TILES * TILE;
            const int np = t1 - tp < TILE ? (int)(t1 - tp) : TILE;
            key_offsets(P, blocks, tp, np, tok_bytes, off);
            for (int j = 0; j < np; j++)
                for (int64_t b = 0; b < tok_bytes; b += 64) {
                    __builtin_prefetch(kh + off[j] + b, 0, PREFETCH_LOCALITY);
                    __builtin_prefetch(vh + off[j] + b, 0, PREFETCH_LOCALITY);
                }
        }
        key_offsets(P, blocks, t, nt, tok_bytes, off);
        const char *kp[TILE], *vp[TILE];
        for (int j = 0; j < TILE; j++) { /* padding keys repeat the first: finite, weight 0 */
            kp[j] = kh + off[j < nt ? j : 0];
            vp[j] = vh + off[j < nt ? j : 0];
        }
        /* scores: up to three rows share each key load (twelve FMA chains, four keys at a time) */
        for (int r = 0; r < nrows; r += 3) {
            const int nr = nrows - r < 3 ? nrows - r : 3;
            if (nr == 3)
                tile_scores(qs + r * D, 3, kp, &s[r], bf16, D);
            else if (nr == 2)
                tile_scores(qs + r * D, 2, kp, &s[r], bf16, D);
            else
                tile_scores(qs + r * D, 1, kp, &s[r], bf16, D);
        }
        for (int r = 0; r < nrows; r++) /* keys past the tile, the shard or the causal limit */
            for (int j0 = 0; j0 < TILE; j0 += 8) {
                v8i visible = lane + (int)(t + j0 - t0) < (int)(limit[r] - t0);
                *(v8f *)&s[r][j0] = select8(visible, *(v8f *)&s[r][j0], (v8f){0} - INFINITY);
            }
        /* online softmax: probabilities overwrite the scores */
        for (int r = 0; r < nrows; r++) {
            v8f s0 = *(v8f *)&s[r][0], s1 = *(v8f *)&s[r][8];
            float mt = hmax8(select8(s0 > s1, s0, s1));
            if (mt == -INFINITY) {
                *(v8f *)&s[r][0] = (v8f){0};
                *(v8f *)&s[r][8] = (v8f){0};
                continue;
            }
            float mn = mt > m[r] ? mt : m[r];
            v8f p0 = exp8(s0 - mn), p1 = exp8(s1 - mn);
            *(v8f *)&s[r][0] = p0;
            *(v8f *)&s[r][8] = p1;
            if (mn != m[r]) {
                float corr = m[r] == -INFINITY ? 0.0f : expf(m[r] - mn);
                l[r] *= corr;
                for (int c = 0; c < D; c++) acc[(int64_t)r * D + c] *= corr;
                m[r] = mn;
            }
            l[r] += hsum8(p0 + p1);
        }
        /* acc += p V: per row, up to eight accumulator vectors across the keys of the tile */
        for (int r = 0; r < nrows; r++) {
            float *ar = acc + (int64_t)r * D;
            for (int c0 = 0; c0 < nd; c0 += 8) {
                const int nc = nd - c0 < 8 ? nd - c0 : 8;
                v8f a[8];
                for (int c = 0; c < nc; c++) a[c] = *(v8f *)(ar + 8 * (c0 + c));
                for (int j = 0; j < TILE; j++) {
                    const float pj = s[r][j];
                    if (bf16) {
                        for (int c = 0; c < nc; c += 2) {
                            v8u raw = *(const v8u *)(vp[j] + 16 * (c0 + c));
                            a[c] += pj * bf16_even(raw);
                            a[c + 1] += pj * bf16_odd(raw);
                        }
                    } else {
                        for (int c = 0; c < nc; c++) a[c] += pj * *(const v8f *)(vp[j] + 32 * (c0 + c));
                    }
                }
                for (int c = 0; c < nc; c++) *(v8f *)(ar + 8 * (c0 + c)) = a[c];
            }
        }
    }
    if (bf16) /* values back from [even | odd] to element order */
        for (int r = 0; r < nrows; r++)
            for (int c0 = 0; c0 < D; c0 += 16) {
                float tmp[16], *ar = acc + (int64_t)r * D + c0;
                memcpy(tmp, ar, sizeof tmp);
                for (int e = 0; e < 8; e++) {
                    ar[2 * e] = tmp[e];
                    ar[2 * e + 1] = tmp[8 + e];
                }
            }
}

/* Specialisations: the dtype and the common head sizes become constants. */
#define ITEM(NAME, BF16, DIM)                                                                    \
    static void NAME(const Problem *P, int i, int h, int r0, int n, int64_t t0, int64_t t1,     \
                     float *m, float *l, float *acc) {                                           \
        run_item(P, i, h, r0, n, t0, t1, m, l, acc, BF16, DIM);                                 \
    }
ITEM(item_f32_16, 0, 16)
ITEM(item_f32_32, 0, 32)
ITEM(item_f32_64, 0, 64)
ITEM(item_f32_128, 0, 128)
ITEM(item_bf16_16, 1, 16)
ITEM(item_bf16_32, 1, 32)
ITEM(item_bf16_64, 1, 64)
ITEM(item_bf16_128, 1, 128)
static void item_any(const Problem *P, int i, int h, int r0, int n, int64_t t0, int64_t t1,
                     float *m, float *l, float *acc, int bf16) {
    if (bf16)
        run_item(P, i, h, r0, n, t0, t1, m, l, acc, 1, P->d);
    else
        run_item(P, i, h, r0, n, t0, t1, m, l, acc, 0, P->d);
}

typedef struct {
    int i, h, r0, nrows, chunk, num_chunks;
    int64_t t0, t1, state; /* state: offset of this item's partial state in the scratch */
} Item;

/* Returns 0; -1 when scratch memory could not be allocated; -2 for a head size it cannot do
 * (a multiple of 8 up to MAX_D; bfloat16: of 16). */
int ma_decode(const float *q, const void *k, const void *v, int64_t head_stride,
              int64_t block_stride, int kv_bf16, int num_requests, const int64_t *query_start,
              const int32_t *block_table, const int64_t *block_start, const int64_t *context_lens,
              const int64_t *row_limit, int hq, int hkv, int d, int block_size, float scale,
              int64_t chunk_tokens, int num_threads, float *out, float *lse) {
    if (d % (kv_bf16 ? 16 : 8) || d > MAX_D) return -2;
    const int esz = kv_bf16 ? 2 : 4, G = hq / hkv;
    Problem P = {q, (const char *)k, (const char *)v, head_stride * esz, block_stride * esz,
                 query_start, block_table, block_start, context_lens, row_limit, hq, hkv, d,
                 block_size, scale, out, lse};
    /* count items; rows of requests without keys get the empty state right away */
    int64_t num_items = 0;
    for (int i = 0; i < num_requests; i++) {
        int64_t rows = (query_start[i + 1] - query_start[i]) * G, ctx = context_lens[i];
        if (rows == 0) continue;
        if (ctx == 0) {
            for (int64_t row = query_start[i]; row < query_start[i + 1]; row++)
                for (int hh = 0; hh < hq; hh++) {
                    memset(out + (row * hq + hh) * d, 0, sizeof(float) * d);
                    lse[row * hq + hh] = -INFINITY;
                }
            continue;
        }
        num_items += hkv * ((rows + MAX_ROWS - 1) / MAX_ROWS) * ((ctx + chunk_tokens - 1) / chunk_tokens);
    }
    Item *items = malloc(sizeof(Item) * (num_items ? num_items : 1));
    if (!items) return -1;
    int64_t n = 0, scratch = 0;
    for (int i = 0; i < num_requests; i++) {
        int rows = (int)(query_start[i + 1] - query_start[i]) * G;
        int64_t ctx = context_lens[i];
        if (rows == 0 || ctx == 0) continue;
        int nc = (int)((ctx + chunk_tokens - 1) / chunk_tokens);
        for (int h = 0; h < hkv; h++)
            for (int r0 = 0; r0 < rows; r0 += MAX_ROWS)
                for (int c = 0; c < nc; c++) {
                    Item it = {i, h, r0, rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS, c, nc,
                               c * chunk_tokens, (c + 1) * chunk_tokens < ctx ? (c + 1) * chunk_tokens : ctx, -1};
                    if (nc > 1) {
                        it.state = scratch;
                        scratch += (int64_t)it.nrows * (d + 2);
                    }
                    items[n++] = it;
                }
    }
    float *partial = scratch ? malloc(sizeof(float) * scratch) : NULL;
    if (scratch && !partial) {
        free(items);
        return -1;
    }
    void (*fn)(const Problem *, int, int, int, int, int64_t, int64_t, float *, float *, float *) = NULL;
    if (d == 16) fn = kv_bf16 ? item_bf16_16 : item_f32_16;
    if (d == 32) fn = kv_bf16 ? item_bf16_32 : item_f32_32;
    if (d == 64) fn = kv_bf16 ? item_bf16_64 : item_f32_64;
    if (d == 128) fn = kv_bf16 ? item_bf16_128 : item_f32_128;

#pragma omp parallel num_threads(num_threads)
    {
        float m[MAX_ROWS], l[MAX_ROWS];
        float acc[MAX_ROWS * MAX_D] __attribute__((aligned(64))); /* per thread, reused by items */
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < n; x++) {
            const Item *it = &items[x];
            if (fn)
                fn(&P, it->i, it->h, it->r0, it->nrows, it->t0, it->t1, m, l, acc);
            else
                item_any(&P, it->i, it->h, it->r0, it->nrows, it->t0, it->t1, m, l, acc, kv_bf16);
            for (int r = 0; r < it->nrows; r++) {
                int f = it->r0 + r;
                int64_t row = query_start[it->i] + f / G;
                int hh = it->h * G + f % G;
                const float *a = acc + (int64_t)r * d;
                if (it->num_chunks > 1) { /* partial state: merged below */
                    float *st = partial + it->state + (int64_t)r * (d + 2);
                    st[0] = m[r];
                    st[1] = l[r];
                    memcpy(st + 2, a, sizeof(float) * d);
                    continue;
                }
                float *o = out + (row * hq + hh) * d;
                float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                for (int c = 0; c < d; c++) o[c] = a[c] * inv;
                lse[row * hq + hh] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
            }
        }
        /* merge split-K partials: the first chunk's item of each (request, head, row tile) */
#pragma omp for schedule(static)
        for (int64_t x = 0; x < n; x++) {
            const Item *it = &items[x];
            if (it->num_chunks == 1 || it->chunk != 0) continue;
            for (int r = 0; r < it->nrows; r++) {
                float mx = -INFINITY, sum = 0.0f;
                for (int c = 0; c < it->num_chunks; c++) {
                    float mc = partial[items[x + c].state + (int64_t)r * (d + 2)];
                    mx = mc > mx ? mc : mx;
                }
                int f = it->r0 + r;
                int64_t row = query_start[it->i] + f / G;
                int hh = it->h * G + f % G;
                float *o = out + (row * hq + hh) * d;
                memset(o, 0, sizeof(float) * d);
                if (mx == -INFINITY) {
                    lse[row * hq + hh] = -INFINITY;
                    continue;
                }
                for (int c = 0; c < it->num_chunks; c++) {
                    const float *st = partial + items[x + c].state + (int64_t)r * (d + 2);
                    if (st[0] == -INFINITY) continue;
                    float w = expf(st[0] - mx);
                    sum += st[1] * w;
                    for (int e = 0; e < d; e++) o[e] += st[2 + e] * w;
                }
                float inv = 1.0f / sum;
                for (int e = 0; e < d; e++) o[e] *= inv;
                lse[row * hq + hh] = mx + logf(sum);
            }
        }
    }
    free(partial);
    free(items);
    return 0;
}

/* In place: merge the partial state (part_out, part_lse) of rows `rows` (NULL: rows 0..n-1) into
 * the running state (out [T, H, D] float32, lse [T, H] float32); part_out [n, H, D] is float32 or
 * bfloat16. Relative to the larger lse, so huge lse values stay exact; -inf merges as a no-op. */
void merge_into(float *out, float *lse, const int64_t *rows, int64_t n, int h, int d,
                const void *part_out, int part_bf16, const float *part_lse) {
    for (int64_t r = 0; r < n; r++) {
        const int64_t row = rows ? rows[r] : r;
        for (int hh = 0; hh < h; hh++) {
            const float cur = lse[row * h + hh], part = part_lse[r * h + hh];
            const float top = cur > part ? cur : part;
            if (part == -INFINITY || top == -INFINITY) continue;
            const float w_cur = cur == -INFINITY ? 0.0f : expf(cur - top);
            const float w_part = expf(part - top);
            const float total = w_cur + w_part, a = w_cur / total, b = w_part / total;
            float *o = out + (row * h + hh) * d;
            const int64_t base = (r * h + hh) * d;
            if (part_bf16) {
                const uint16_t *p = (const uint16_t *)part_out + base;
                for (int c = 0; c < d; c++) {
                    uint32_t w = (uint32_t)p[c] << 16;
                    float x;
                    memcpy(&x, &w, sizeof x);
                    o[c] = o[c] * a + x * b;
                }
            } else {
                const float *p = (const float *)part_out + base;
                for (int c = 0; c < d; c++) o[c] = o[c] * a + p[c] * b;
            }
            lse[row * h + hh] = top + logf(total);
        }
    }
}

ALWAYS_INLINE float load1(const void *p, int64_t i, int bf16) {
    if (bf16) {
        uint32_t w = (uint32_t)((const uint16_t *)p)[i] << 16;
        float x;
        memcpy(&x, &w, sizeof x);
        return x;
    }
    return ((const float *)p)[i];
}

/* The self part of a pure decode batch: token r sees only itself, so out = v (its KV head's) and
 * lse = scale * q.k. q [T, Hq, D], k, v [T, Hkv, D] with row strides in elements (heads and dims
 * contiguous), all float32 or all bfloat16; out [T, Hq, D] and lse [T, Hq] float32. */
void self_decode(const void *q, int64_t q_row, const void *k, int64_t k_row, const void *v,
                 int64_t v_row, int bf16, int64_t t, int hq, int hkv, int d, float scale,
                 float *out, float *lse) {
    const int G = hq / hkv;
    for (int64_t r = 0; r < t; r++)
        for (int hh = 0; hh < hq; hh++) {
            const int64_t qi = r * q_row + (int64_t)hh * d, ki = r * k_row + (int64_t)(hh / G) * d;
            const int64_t vi = r * v_row + (int64_t)(hh / G) * d;
            float dot = 0.0f;
            float *o = out + (r * hq + hh) * d;
            for (int c = 0; c < d; c++) {
                dot += load1(q, qi + c, bf16) * load1(k, ki + c, bf16);
                o[c] = load1(v, vi + c, bf16);
            }
            lse[r * hq + hh] = dot * scale;
        }
}
