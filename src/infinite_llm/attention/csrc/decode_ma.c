/* Decode MicroAttention over paged rBlocks: every request of an MABatch in one call.
 *
 * Built at first use by infinite_llm/native/build.py and called through ctypes by
 * cpu_native.py; semantics are those of micro_attention_reference (out, lse in float32).
 *
 * Layout (one layer of a KVPool, K and V alike; elements, float32 or bfloat16):
 *
 *     cache[h][block][offset][d]    head stride hs, block stride bst, token stride D
 *
 * Work item = (request, kv head, split-K chunk of its keys), taken in head-major order (every
 * request's items of head 0 first: the threads stay in one head's region of the pool). An item
 * walks its keys in tiles of TILE tokens and keeps, per query row, the online-softmax state
 * (running max m, sum l, unnormalised acc[D]). When the block size is a multiple of TILE (the usual 16, 32, ...) a
 * tile lies in one rBlock and its keys are addressed from one base pointer; SUPER_TILES tiles
 * are scored before one softmax update; the keys and values of the tiles a step ahead are
 * prefetched line by line through the loops (no hardware prefetcher can follow scattered
 * blocks). Other block sizes take each key's address from the block table. The G query heads of a KV head (times the request's query tokens) are the item's
 * rows: each key vector is loaded once for three rows at a time. Items of a request with
 * several chunks leave partial states that a second pass merges by log-sum-exp; a single chunk
 * writes its rows directly. bfloat16 is widened two elements per 32-bit lane (see bf16_even).
 *
 * Also here: step_attend (a whole-step decoder's attention, layer by layer, see ma_call.h),
 * merge_into (the running-state merge of DistAttention) and self_decode (a decode
 * token's attention over itself), each a single loop instead of a dozen small torch ops.
 *
 * Portable C11 + GCC/Clang vector extensions (lowered to AVX2, AVX-512, NEON, ... by the
 * compiler; AVX gets a faster horizontal reduction); OpenMP for threads, linked against the
 * libgomp torch already loaded.
 */
#include "ma_call.h"
#include "vec8.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define TILE 16       /* keys per tile */
#define MAX_ROWS 16   /* query rows per pass over an item's keys */
#define MAX_D 256
#ifndef SUPER_TILES
#define SUPER_TILES 4 /* tiles scored together before one online-softmax update */
#endif
#ifndef PREFETCH_STEPS /* rBlocks sit anywhere: hardware prefetchers cannot follow the table. */
#define PREFETCH_STEPS 1 /* The keys and values this many steps ahead are prefetched line by line */
#endif                   /* while a step computes (128K shuffled, 2 threads: 12 -> 17 GB/s). */
#ifndef PREFETCH_LOCALITY /* into L2 (prefetcht1), not L1: the L2 tracks more misses at once. */
#define PREFETCH_LOCALITY 2 /* Zen 4, 2 threads, cold caches: 128K shuffled 17.9 -> 26.8 GB/s, */
#endif                      /* batch 32 x 576 tokens 1.65 -> 1.13 ms (hint 3, into L1, before) */

typedef struct {
    const float *q;           /* [T, Hq, D] float32 */
    const char *k, *v;        /* pool layer base pointers */
    int64_t head_stride;      /* bytes */
    int64_t block_stride;     /* bytes */
    const int64_t *q_first;       /* [n]: request i's first query row in q (and out) */
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

/* Address of key j of a tile: kp[j], or base + j * tb when the tile lies in one rBlock (`contig`,
 * a constant in every specialisation: the addresses become immediate offsets). */
ALWAYS_INLINE const char *at(const char *const *kp, const char *base, int contig, int64_t tb,
                             int j) {
    return contig ? base + j * tb : kp[j];
}

/* Scores of `nr` (1..3) query rows against the TILE keys at kp: s[r][j] = q_r . k_j (q is
 * pre-scaled). Each key vector is loaded once for all rows. */
ALWAYS_INLINE void tile_scores(const float *q, const int nr, const char *const *kp,
                               const char *kbase, int contig, float *s, int ld, int bf16, int D,
                               const char *pf) {
    const int64_t tb = (int64_t)D * (bf16 ? 2 : 4);
    const int nd = D / 8;
    for (int j0 = 0; j0 < TILE; j0 += 4) {
        if (pf) /* the same four keys of a tile ahead: spread out, not a burst that stalls loads */
            for (int64_t b = 0; b < 4 * tb; b += 64) __builtin_prefetch(pf + j0 * tb + b, 0, PREFETCH_LOCALITY);
        v8f a[3][4] = {{{0}}};
        if (bf16) {
            for (int c = 0; c < nd; c += 2)
                for (int j = 0; j < 4; j++) {
                    v8u raw = *(const v8u *)(at(kp, kbase, contig, tb, j0 + j) + 16 * c);
                    v8f ke = bf16_even(raw), ko = bf16_odd(raw);
                    for (int r = 0; r < nr; r++)
                        a[r][j] += *(const v8f *)(q + r * D + 8 * c) * ke +
                                   *(const v8f *)(q + r * D + 8 * c + 8) * ko;
                }
        } else { /* three q vectors and the twelve sums stay in registers; one load per key */
            const char *k0 = at(kp, kbase, contig, tb, j0), *k1 = at(kp, kbase, contig, tb, j0 + 1);
            const char *k2 = at(kp, kbase, contig, tb, j0 + 2), *k3 = at(kp, kbase, contig, tb, j0 + 3);
#pragma GCC unroll 1 /* unrolled, GCC hoists all q vectors and spills the sums */
            for (int c = 0; c < nd; c++) {
                const v8f q0 = *(const v8f *)(q + 8 * c);
                const v8f q1 = nr > 1 ? *(const v8f *)(q + D + 8 * c) : q0;
                const v8f q2 = nr > 2 ? *(const v8f *)(q + 2 * D + 8 * c) : q0;
#define SCORE_KEY(J, KP)                                   \
    {                                                      \
        const v8f kk = *(const v8f *)((KP) + 32 * c);      \
        a[0][J] += q0 * kk;                                \
        if (nr > 1) a[1][J] += q1 * kk;                    \
        if (nr > 2) a[2][J] += q2 * kk;                    \
    }
                SCORE_KEY(0, k0)
                SCORE_KEY(1, k1)
                SCORE_KEY(2, k2)
                SCORE_KEY(3, k3)
#undef SCORE_KEY
            }
        }
        for (int r = 0; r < nr; r++) *(v4f *)&s[r * ld + j0] = reduce4(a[r]);
    }
}

/* acc[r] += sum_j s[r][j] v_j for `nr` (1..3) rows (float32 values): twelve accumulators, three
 * broadcast weights and one value vector fill the sixteen AVX registers. */
ALWAYS_INLINE void tile_pv_f32(float *acc, const int nr, const float *s, int ld,
                               const char *const *vp, const char *vbase, int contig, int D,
                               const char *pf) {
    const int nd = D / 8;
    for (int c0 = 0; c0 < nd; c0 += 4) {
        const int nc = nd - c0 < 4 ? nd - c0 : 4;
        v8f a[3][4];
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++) a[r][c] = *(const v8f *)(acc + r * D + 8 * (c0 + c));
        for (int j = 0; j < TILE; j++) {
            if (pf) /* the same part of value j of a tile ahead */
                for (int b = 0; b < nc * 32; b += 64)
                    __builtin_prefetch(pf + j * 4 * (int64_t)D + 32 * c0 + b, 0, PREFETCH_LOCALITY);
            const v8f p0 = splat8(s[j]);
            const v8f p1 = nr > 1 ? splat8(s[ld + j]) : p0;
            const v8f p2 = nr > 2 ? splat8(s[2 * ld + j]) : p0;
            const char *vj = at(vp, vbase, contig, 4 * (int64_t)D, j) + 32 * c0;
            for (int c = 0; c < nc; c++) {
                const v8f vv = *(const v8f *)(vj + 32 * c);
                a[0][c] += p0 * vv;
                if (nr > 1) a[1][c] += p1 * vv;
                if (nr > 2) a[2][c] += p2 * vv;
            }
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++) *(v8f *)(acc + r * D + 8 * (c0 + c)) = a[r][c];
    }
}

/* NT tiles of keys from t on (the last tile may hold fewer than TILE real keys) for an item's
 * rows: scores of all NT * TILE keys, masking, one online-softmax update, acc += p V. Tile u's
 * keys are at kb[u] / vb[u] + j * D * esz when `contig` (NT, contig: constants), else at kp/vp
 * (NT = 1). Scoring several tiles before one softmax update keeps the latency chain of max, exp
 * and rescaling off the path of every sixteen keys. */
ALWAYS_INLINE void tile_step(const float *qs, int nrows, const int64_t *limit, int64_t t,
                             int64_t t0, const int NT, const char *const *kp,
                             const char *const *vp, const char *const *kb, const char *const *vb,
                             const char *const *pk, const char *const *pv, int contig, float *m,
                             float *l, float *acc, int bf16, int D) {
    const int nd = D / 8, W = NT * TILE;
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    float s[MAX_ROWS * SUPER_TILES * TILE] __attribute__((aligned(32)));
    /* scores: up to three rows share each key load (twelve FMA chains, four keys at a time) */
    for (int u = 0; u < NT; u++) {
        const char *kbase = contig ? kb[u] : NULL;
        for (int r = 0; r < nrows; r += 3) {
            const int nr = nrows - r < 3 ? nrows - r : 3;
            float *sr = s + r * W + u * TILE;
            if (nr == 3)
                tile_scores(qs + r * D, 3, kp, kbase, contig, sr, W, bf16, D, r == 0 && pk ? pk[u] : NULL);
            else if (nr == 2)
                tile_scores(qs + r * D, 2, kp, kbase, contig, sr, W, bf16, D, r == 0 && pk ? pk[u] : NULL);
            else
                tile_scores(qs + r * D, 1, kp, kbase, contig, sr, W, bf16, D, r == 0 && pk ? pk[u] : NULL);
        }
    }
    for (int r = 0; r < nrows; r++) /* keys past the tile, the shard or the causal limit */
        if (t + W > limit[r])
            for (int j0 = 0; j0 < W; j0 += 8) {
                v8i visible = lane + (int)(t + j0 - t0) < (int)(limit[r] - t0);
                *(v8f *)&s[r * W + j0] = select8(visible, *(v8f *)&s[r * W + j0], (v8f){0} - INFINITY);
            }
    /* online softmax: probabilities overwrite the scores */
    for (int r = 0; r < nrows; r++) softmax_update(s + r * W, W, &m[r], &l[r], acc + (int64_t)r * D, D);
    /* acc += p V */
    for (int u = 0; u < NT; u++) {
        const char *vbase = contig ? vb[u] : NULL;
        if (bf16) { /* per row, up to eight accumulator vectors across the keys of the tile */
            for (int r = 0; r < nrows; r++) {
                float *ar = acc + (int64_t)r * D;
                const float *sr = s + r * W + u * TILE;
                for (int c0 = 0; c0 < nd; c0 += 8) {
                    const int nc = nd - c0 < 8 ? nd - c0 : 8;
                    v8f a[8];
                    for (int c = 0; c < nc; c++) a[c] = *(v8f *)(ar + 8 * (c0 + c));
                    for (int j = 0; j < TILE; j++) {
                        const float pj = sr[j];
                        if (r == 0 && c0 == 0 && pv && pv[u]) /* value j of a tile ahead */
                            for (int b = 0; b < 2 * D; b += 64)
                                __builtin_prefetch(pv[u] + j * 2 * (int64_t)D + b, 0, PREFETCH_LOCALITY);
                        for (int c = 0; c < nc; c += 2) {
                            v8u raw = *(const v8u *)(at(vp, vbase, contig, 2 * (int64_t)D, j) + 16 * (c0 + c));
                            a[c] += pj * bf16_even(raw);
                            a[c + 1] += pj * bf16_odd(raw);
                        }
                    }
                    for (int c = 0; c < nc; c++) *(v8f *)(ar + 8 * (c0 + c)) = a[c];
                }
            }
        } else { /* three rows x four vectors of accumulators: each value vector loaded once */
            for (int r = 0; r < nrows; r += 3) {
                const int nr = nrows - r < 3 ? nrows - r : 3;
                const float *sr = s + r * W + u * TILE;
                if (nr == 3)
                    tile_pv_f32(acc + (int64_t)r * D, 3, sr, W, vp, vbase, contig, D, r == 0 && pv ? pv[u] : NULL);
                else if (nr == 2)
                    tile_pv_f32(acc + (int64_t)r * D, 2, sr, W, vp, vbase, contig, D, r == 0 && pv ? pv[u] : NULL);
                else
                    tile_pv_f32(acc + (int64_t)r * D, 1, sr, W, vp, vbase, contig, D, r == 0 && pv ? pv[u] : NULL);
            }
        }
    }
}

/* One item: rows (l, g) of request i, kv head h, query rows r0..r0+nrows of its L*G rows;
 * keys t0..t1. Leaves the unnormalised state (m, l, acc[rows][D]). */
ALWAYS_INLINE void run_item(const Problem *P, int i, int h, int r0, int nrows, int64_t t0,
                            int64_t t1, float *m, float *l, float *acc, int bf16, int D) {
    const int G = P->hq / P->hkv, esz = bf16 ? 2 : 4;
    const int64_t tok_bytes = (int64_t)D * esz;
    const int32_t *blocks = P->block_table + P->block_start[i];
    const char *kh = P->k + h * P->head_stride, *vh = P->v + h * P->head_stride;
    /* scaled query rows (bfloat16: [even | odd] per 16 elements, like the keys) */
    float qs[MAX_ROWS * MAX_D] __attribute__((aligned(32)));
    int64_t limit[MAX_ROWS];
    for (int r = 0; r < nrows; r++) {
        int f = r0 + r;
        int64_t row = P->q_first[i] + f / G;
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
    const int64_t bs = P->block_size;
    /* tiles start at multiples of TILE (t0 is one): with bs % TILE == 0 a tile is one rBlock's */
    const int blocked = bs % TILE == 0;
    int64_t t = t0;
    while (t < t1) {
        /* the tiles PREFETCH_STEPS steps ahead, prefetched while this step computes */
        const char *pk[SUPER_TILES] = {NULL}, *pv[SUPER_TILES] = {NULL};
        const int64_t ahead = t + PREFETCH_STEPS * SUPER_TILES * TILE;
        for (int u = 0; PREFETCH_STEPS > 0 && blocked && u < SUPER_TILES; u++) {
            const int64_t tp = ahead + u * TILE;
            if (tp + TILE > t1) break;
            const int64_t base = (int64_t)blocks[tp / bs] * P->block_stride + (tp % bs) * tok_bytes;
            pk[u] = kh + base;
            pv[u] = vh + base;
        }
        if (blocked && t + SUPER_TILES * TILE <= t1) { /* SUPER_TILES whole tiles */
            const char *kb[SUPER_TILES], *vb[SUPER_TILES];
            for (int u = 0; u < SUPER_TILES; u++) {
                const int64_t tu = t + u * TILE;
                const int64_t base = (int64_t)blocks[tu / bs] * P->block_stride + (tu % bs) * tok_bytes;
                kb[u] = kh + base;
                vb[u] = vh + base;
            }
            tile_step(qs, nrows, limit, t, t0, SUPER_TILES, NULL, NULL, kb, vb, pk, pv, 1, m, l,
                      acc, bf16, D);
            t += SUPER_TILES * TILE;
            continue;
        }
        const int nt = t1 - t < TILE ? (int)(t1 - t) : TILE;
        if (blocked && nt == TILE) { /* one whole tile */
            const int64_t base = (int64_t)blocks[t / bs] * P->block_stride + (t % bs) * tok_bytes;
            const char *kb = kh + base, *vb = vh + base;
            tile_step(qs, nrows, limit, t, t0, 1, NULL, NULL, &kb, &vb, NULL, NULL, 1, m, l, acc,
                      bf16, D);
        } else { /* a tile across rBlocks, or the last partial one: key by key */
            int64_t off[TILE] = {0};
            key_offsets(P, blocks, t, nt, tok_bytes, off);
            if (!blocked && PREFETCH_STEPS > 0 && t + 2 * TILE <= t1) {
                int64_t poff[TILE];
                key_offsets(P, blocks, t + TILE, TILE, tok_bytes, poff);
                for (int j = 0; j < TILE; j++)
                    for (int64_t b = 0; b < tok_bytes; b += 64) {
                        __builtin_prefetch(kh + poff[j] + b, 0, PREFETCH_LOCALITY);
                        __builtin_prefetch(vh + poff[j] + b, 0, PREFETCH_LOCALITY);
                    }
            }
            const char *kp[TILE], *vp[TILE];
            for (int j = 0; j < TILE; j++) { /* padding keys repeat the first: finite, weight 0 */
                kp[j] = kh + off[j < nt ? j : 0];
                vp[j] = vh + off[j < nt ? j : 0];
            }
            tile_step(qs, nrows, limit, t, t0, 1, kp, vp, NULL, NULL, NULL, NULL, 0, m, l, acc,
                      bf16, D);
        }
        t += TILE;
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
    int s, i, h, r0, nrows; /* shard s's request i, kv head h, query rows r0..r0+nrows */
    int part, parts;        /* place in its merge set: the items of one (group, h, r0) */
    int64_t t0, t1, state;  /* keys; state: offset of this item's partial state in the scratch */
} Item;

/* The work of every shard at once: shard s is a Problem (its pool, block tables, the first global
 * query row of each of its requests); requests of different shards that share a group (the same
 * query rows, their context spread over pools) are merged by log-sum-exp like split-K chunks.
 * group_start[g]..group_start[g+1] index member[], which holds (shard, request) pairs. Returns 0;
 * -1 when scratch memory could not be allocated. */
static int ma_run(const Problem *shards, int num_groups, const int64_t *group_start,
                  const int32_t *member, const int64_t *group_rows, int kv_bf16, int64_t chunk_tokens,
                  int num_threads) {
    const Problem *P0 = &shards[0];
    const int hq = P0->hq, hkv = P0->hkv, d = P0->d, G = hq / hkv;
    float *out = P0->out, *lse = P0->lse;
    /* count items; rows of groups without keys get the empty state right away */
    int64_t num_items = 0;
    for (int g = 0; g < num_groups; g++) {
        int64_t rows = group_rows[g] * G, chunks = 0;
        for (int64_t x = group_start[g]; x < group_start[g + 1]; x++) {
            int64_t ctx = shards[member[2 * x]].context_lens[member[2 * x + 1]];
            chunks += (ctx + chunk_tokens - 1) / chunk_tokens;
        }
        if (group_start[g] == group_start[g + 1]) continue; /* callers give every group one */
        if (rows && !chunks) {
            const Problem *P = &shards[member[2 * group_start[g]]];
            int64_t first = P->q_first[member[2 * group_start[g] + 1]];
            for (int64_t row = first; row < first + group_rows[g]; row++)
                for (int hh = 0; hh < hq; hh++) {
                    memset(out + (row * hq + hh) * d, 0, sizeof(float) * d);
                    lse[row * hq + hh] = -INFINITY;
                }
        }
        num_items += hkv * ((rows + MAX_ROWS - 1) / MAX_ROWS) * chunks;
    }
    Item *items = malloc(sizeof(Item) * (num_items ? num_items : 1));
    if (!items) return -1;
    int64_t n = 0, scratch = 0;
    /* head-major: consecutive items read one head's region of the pool; moving to another
     * head's region costs more the larger the pool (batch 32, 4K tokens each: 8.9 -> 8.1 ms) */
    for (int h = 0; h < hkv; h++)
        for (int g = 0; g < num_groups; g++) {
            const int rows = (int)group_rows[g] * G;
            for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
                const int64_t set = n;
                for (int64_t x = group_start[g]; x < group_start[g + 1]; x++) {
                    const int sh = member[2 * x], i = member[2 * x + 1];
                    const int64_t ctx = shards[sh].context_lens[i];
                    for (int64_t t0 = 0; t0 < ctx; t0 += chunk_tokens) {
                        Item it = {sh, i, h, r0, rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS, 0, 0,
                                   t0, t0 + chunk_tokens < ctx ? t0 + chunk_tokens : ctx, -1};
                        items[n++] = it;
                    }
                }
                for (int64_t x = set; x < n; x++) {
                    items[x].part = (int)(x - set);
                    items[x].parts = (int)(n - set);
                    if (n - set > 1) {
                        items[x].state = scratch;
                        scratch += (int64_t)items[x].nrows * (d + 2);
                    }
                }
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
            const Problem *P = &shards[it->s];
            if (fn)
                fn(P, it->i, it->h, it->r0, it->nrows, it->t0, it->t1, m, l, acc);
            else
                item_any(P, it->i, it->h, it->r0, it->nrows, it->t0, it->t1, m, l, acc, kv_bf16);
            for (int r = 0; r < it->nrows; r++) {
                int f = it->r0 + r;
                int64_t row = P->q_first[it->i] + f / G;
                int hh = it->h * G + f % G;
                const float *a = acc + (int64_t)r * d;
                if (it->parts > 1) { /* partial state: merged below */
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
        /* merge the partial states of every merge set (split-K chunks, shards of one group) */
#pragma omp for schedule(static)
        for (int64_t x = 0; x < n; x++) {
            const Item *it = &items[x];
            if (it->parts == 1 || it->part != 0) continue;
            const Problem *P = &shards[it->s];
            for (int r = 0; r < it->nrows; r++) {
                float mx = -INFINITY, sum = 0.0f;
                for (int c = 0; c < it->parts; c++) {
                    float mc = partial[items[x + c].state + (int64_t)r * (d + 2)];
                    mx = mc > mx ? mc : mx;
                }
                int f = it->r0 + r;
                int64_t row = P->q_first[it->i] + f / G;
                int hh = it->h * G + f % G;
                float *o = out + (row * hq + hh) * d;
                memset(o, 0, sizeof(float) * d);
                if (mx == -INFINITY) {
                    lse[row * hq + hh] = -INFINITY;
                    continue;
                }
                for (int c = 0; c < it->parts; c++) {
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

/* One pool: request i's query rows are query_start[i]..query_start[i+1] of q and out. Returns
 * 0; -1 when scratch memory could not be allocated; -2 for a head size it cannot do (a multiple
 * of 8 up to MAX_D; bfloat16: of 16). */
int ma_decode(const float *q, const void *k, const void *v, int64_t head_stride,
              int64_t block_stride, int kv_bf16, int num_requests, const int64_t *query_start,
              const int32_t *block_table, const int64_t *block_start, const int64_t *context_lens,
              const int64_t *row_limit, int hq, int hkv, int d, int block_size, float scale,
              int64_t chunk_tokens, int num_threads, float *out, float *lse) {
    if (d % (kv_bf16 ? 16 : 8) || d > MAX_D) return -2;
    const int esz = kv_bf16 ? 2 : 4;
    Problem P = {q, (const char *)k, (const char *)v, head_stride * esz, block_stride * esz,
                 query_start, block_table, block_start, context_lens, row_limit, hq, hkv, d,
                 block_size, scale, out, lse};
    int64_t *group_start = malloc(sizeof(int64_t) * (num_requests + 1));
    int64_t *group_rows = malloc(sizeof(int64_t) * (num_requests + 1));
    int32_t *member = malloc(sizeof(int32_t) * 2 * (num_requests + 1));
    int status = -1;
    if (group_start && group_rows && member) { /* every request its own group */
        for (int i = 0; i <= num_requests; i++) group_start[i] = i;
        for (int i = 0; i < num_requests; i++) {
            group_rows[i] = query_start[i + 1] - query_start[i];
            member[2 * i] = 0;
            member[2 * i + 1] = i;
        }
        status = ma_run(&P, num_requests, group_start, member, group_rows, kv_bf16, chunk_tokens,
                        num_threads);
    }
    free(group_start);
    free(group_rows);
    free(member);
    return status;
}

int ma_decode_call(const MADecodeCall *a) {
#define PTR(T, x) ((T)(intptr_t)(x))
    if (a->write_n > 0 &&
        kv_write(PTR(void *, a->k), PTR(void *, a->v), a->head_stride,
                 PTR(const int64_t *, a->write_slots), a->write_n, PTR(const void *, a->write_k),
                 a->write_k_row, PTR(const void *, a->write_v), a->write_v_row, (int)a->hkv,
                 (int)a->d, a->kv_bf16 ? 2 : 4))
        return -3;
    return ma_decode(PTR(const float *, a->q), PTR(const void *, a->k), PTR(const void *, a->v),
                     a->head_stride, a->block_stride, (int)a->kv_bf16, (int)a->num_requests,
                     PTR(const int64_t *, a->query_start), PTR(const int32_t *, a->block_table),
                     PTR(const int64_t *, a->block_start), PTR(const int64_t *, a->context_lens),
                     PTR(const int64_t *, a->row_limit), (int)a->hq, (int)a->hkv, (int)a->d,
                     (int)a->block_size, (float)a->scale, a->chunk_tokens, (int)a->num_threads,
                     PTR(float *, a->out), PTR(float *, a->lse));
#undef PTR
}

/* Decode rows whose context is spread over several pools (DistAttention's shards in one
 * process), every shard's MA and the merge in one call. Shard s: layer base pointers k[s],
 * v[s] (head stride head_stride[s] elements; block stride, dtype and shapes shared), requests
 * req_start[s]..req_start[s+1] of the flat per-request arrays below. Per request r: its group
 * (the batch request whose rows it serves) group[r], its first global query row q_first[r],
 * its rBlocks block_table[block_start[r]..block_start[r+1]] and context_lens[r] keys. Groups
 * are 0..num_groups-1 with group_rows[g] query rows each; out [T, Hq, D], lse [T, Hq]. Returns
 * as ma_decode. */
int ma_decode_shards(const float *q, int num_shards, const int64_t *k, const int64_t *v,
                     const int64_t *head_stride, int64_t block_stride, int kv_bf16,
                     const int64_t *req_start, const int64_t *group, const int64_t *q_first,
                     const int32_t *block_table, const int64_t *block_start,
                     const int64_t *context_lens, int num_groups, const int64_t *group_rows,
                     int hq, int hkv, int d, int block_size, float scale, int64_t chunk_tokens,
                     int num_threads, float *out, float *lse) {
    if (d % (kv_bf16 ? 16 : 8) || d > MAX_D) return -2;
    const int esz = kv_bf16 ? 2 : 4;
    const int64_t num_reqs = req_start[num_shards];
    Problem *shards = malloc(sizeof(Problem) * (num_shards ? num_shards : 1));
    int64_t *group_start = calloc(num_groups + 1, sizeof(int64_t));
    int32_t *member = malloc(sizeof(int32_t) * 2 * (num_reqs ? num_reqs : 1));
    int64_t *fill = malloc(sizeof(int64_t) * (num_groups ? num_groups : 1));
    int status = -1;
    if (shards && group_start && member && fill) {
        for (int s = 0; s < num_shards; s++) { /* request arrays offset to the shard's first */
            const int64_t r0 = req_start[s];
            Problem P = {q, (const char *)(intptr_t)k[s], (const char *)(intptr_t)v[s],
                         head_stride[s] * esz, block_stride * esz, q_first + r0, block_table,
                         block_start + r0, context_lens + r0, NULL, hq, hkv, d, block_size,
                         scale, out, lse};
            shards[s] = P;
        }
        for (int64_t r = 0; r < num_reqs; r++) group_start[group[r] + 1]++; /* members by group */
        for (int g = 0; g < num_groups; g++) group_start[g + 1] += group_start[g];
        int64_t row = 0; /* a group no shard serves (its request lives elsewhere): empty state */
        for (int g = 0; g < num_groups; row += group_rows[g], g++) {
            if (group_start[g] != group_start[g + 1]) continue;
            for (int64_t x = row * hq; x < (row + group_rows[g]) * hq; x++) {
                memset(out + x * d, 0, sizeof(float) * d);
                lse[x] = -INFINITY;
            }
        }
        for (int g = 0; g < num_groups; g++) fill[g] = group_start[g];
        for (int s = 0; s < num_shards; s++)
            for (int64_t r = req_start[s]; r < req_start[s + 1]; r++) {
                const int64_t x = fill[group[r]]++;
                member[2 * x] = s;
                member[2 * x + 1] = (int32_t)(r - req_start[s]);
            }
        status = ma_run(shards, num_groups, group_start, member, group_rows, kv_bf16,
                        chunk_tokens, num_threads);
    }
    free(shards);
    free(group_start);
    free(member);
    free(fill);
    return status;
}

int ma_shards_call(const MAShardsCall *a) {
#define PTR(T, x) ((T)(intptr_t)(x))
    return ma_decode_shards(
        PTR(const float *, a->q), (int)a->num_shards, PTR(const int64_t *, a->k),
        PTR(const int64_t *, a->v), PTR(const int64_t *, a->head_stride), a->block_stride,
        (int)a->kv_bf16, PTR(const int64_t *, a->req_start), PTR(const int64_t *, a->group),
        PTR(const int64_t *, a->q_first), PTR(const int32_t *, a->block_table),
        PTR(const int64_t *, a->block_start), PTR(const int64_t *, a->context_lens),
        (int)a->num_groups, PTR(const int64_t *, a->group_rows), (int)a->hq, (int)a->hkv,
        (int)a->d, (int)a->block_size, (float)a->scale, a->chunk_tokens, (int)a->num_threads,
        PTR(float *, a->out), PTR(float *, a->lse));
#undef PTR
}

C_STRUCT_LAYOUT(MADecodeCall, MA_DECODE_CALL)
C_STRUCT_LAYOUT(MAShardsCall, MA_SHARDS_CALL)
C_STRUCT_LAYOUT(StepAttention, STEP_ATTENTION)

/* See ma_call.h. The pools are float32 (a whole-step decoder runs in float32). */
int step_attend(const void *step, int64_t layer, const float *q, const float *qkv, float *attn,
                float *lse) {
#define PTR(T, x) ((T)(intptr_t)(x))
    const StepAttention *s = step;
    const int64_t Q = s->hq * s->d, KV = s->hkv * s->d, QKV = Q + 2 * KV;
    const int64_t *k_bases = PTR(const int64_t *, s->k_bases);
    const int64_t *v_bases = PTR(const int64_t *, s->v_bases);
    const int64_t *layer_strides = PTR(const int64_t *, s->layer_strides);
    const int64_t *head_strides = PTR(const int64_t *, s->head_strides);
    const int64_t *write_pool = PTR(const int64_t *, s->write_pool);
    const int64_t *slots = PTR(const int64_t *, s->slots);
    int64_t *layer_k = PTR(int64_t *, s->layer_k), *layer_v = PTR(int64_t *, s->layer_v);
    RemoteFn remote = PTR(RemoteFn, s->remote);
    void *rctx = PTR(void *, s->remote_ctx);
    int status;
    for (int64_t p = 0; p < s->num_pools; p++) {
        layer_k[p] = k_bases[p] + layer * layer_strides[p];
        layer_v[p] = v_bases[p] + layer * layer_strides[p];
    }
    for (int64_t i = 0; i < s->t; i++) { /* store first: a row's MA reads it */
        const int64_t p = write_pool[i];
        if (p < 0) {
            if (remote) continue; /* its rBlock is elsewhere: phase 0 sends its K,V */
            return -3;
        }
        const float *row = qkv + i * QKV;
        if (kv_write(PTR(void *, layer_k[p]), PTR(void *, layer_v[p]), head_strides[p], slots + i,
                     1, row + Q, QKV, row + Q + KV, QKV, (int)s->hkv, (int)s->d, 4))
            return -3;
    }
    if (remote && (status = remote(rctx, 0, layer, qkv, attn, lse))) return status;
    if (s->kind == 0) {
        MADecodeCall *one = PTR(MADecodeCall *, s->call);
        one->q = (int64_t)(intptr_t)q;
        one->k = layer_k[0];
        one->v = layer_v[0];
        one->out = (int64_t)(intptr_t)attn;
        one->lse = (int64_t)(intptr_t)lse;
        one->write_n = 0; /* stored above */
        status = ma_decode_call(one);
    } else if (s->kind == 1) {
        MAShardsCall *many = PTR(MAShardsCall *, s->call);
        many->q = (int64_t)(intptr_t)q;
        many->k = s->layer_k;
        many->v = s->layer_v;
        many->out = (int64_t)(intptr_t)attn;
        many->lse = (int64_t)(intptr_t)lse;
        status = ma_shards_call(many);
    } else {
        return -2;
    }
    if (status) return status;
    return remote ? remote(rctx, 1, layer, qkv, attn, lse) : 0;
#undef PTR
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

/* S partial states of the same rows merged in one pass (merge_attention_states): with
 * m = max_s lse_s and w_s = exp(lse_s - m), out = sum_s w_s o_s / sum_s w_s and
 * lse = m + log(sum_s w_s). A state with lse -inf weighs nothing; a row empty in every state
 * gets zeros and -inf. states: the S addresses of the outs ([rows, d], float32 or, when bf16,
 * bfloat16), then the S of the lses ([rows] float32); out [rows, d] and lse [rows] float32. */
void merge_states(const int64_t *states, int num_states, int64_t rows, int d, int bf16, float *out,
                  float *lse) {
    const int64_t *outs = states, *lses = states + num_states; /* S out pointers, then S lse */
    float acc[MAX_D];
    for (int64_t r = 0; r < rows; r++) {
        float top = -INFINITY, total = 0.0f;
        for (int s = 0; s < num_states; s++) {
            const float x = ((const float *)lses[s])[r];
            top = x > top ? x : top;
        }
        float *o = out + r * d;
        if (top == -INFINITY) {
            memset(o, 0, sizeof(float) * d);
            lse[r] = -INFINITY;
            continue;
        }
        /* Every input of the row is read before the row is written: out and lse may be the
         * first state's own (merge_attention_states_ merges in place). */
        memset(acc, 0, sizeof(float) * d);
        for (int s = 0; s < num_states; s++) {
            const float x = ((const float *)lses[s])[r];
            if (x == -INFINITY) continue;
            const float w = expf(x - top);
            const void *p = (const void *)outs[s];
            total += w;
            for (int c = 0; c < d; c++) acc[c] += load1(p, r * d + c, bf16) * w;
        }
        const float inv = 1.0f / total;
        for (int c = 0; c < d; c++) o[c] = acc[c] * inv;
        lse[r] = top + logf(total);
    }
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

/* Store new tokens' K and V in their slots of one layer of a pool: token r's head h goes to
 * cache[h][slots[r]] (head stride head_stride elements, token stride d). k, v [n, Hkv, D] with
 * row strides in elements (heads and dims contiguous), of the pool's element size. Returns 0;
 * -1 (nothing written) when a slot is outside the pool. */
int kv_write(void *k_cache, void *v_cache, int64_t head_stride, const int64_t *slots, int64_t n,
             const void *k, int64_t k_row, const void *v, int64_t v_row, int hkv, int d, int esz) {
    const size_t bytes = (size_t)d * esz;
    for (int64_t r = 0; r < n; r++)
        if (slots[r] < 0 || slots[r] >= head_stride / d) return -1;
    for (int64_t r = 0; r < n; r++)
        for (int h = 0; h < hkv; h++) {
            const int64_t dst = (h * head_stride + slots[r] * d) * esz;
            memcpy((char *)k_cache + dst, (const char *)k + (r * k_row + (int64_t)h * d) * esz, bytes);
            memcpy((char *)v_cache + dst, (const char *)v + (r * v_row + (int64_t)h * d) * esz, bytes);
        }
    return 0;
}

/* The reads of a decode MA without its arithmetic: every rBlock of blocks[0..n) of every KV
 * head, K and V (block_bytes each, a multiple of 32), walked as an MA walks them (a head's
 * blocks in table order, the next block's lines prefetched), on num_threads threads. What
 * bench attention sets an MA's bandwidth against besides a streaming read: scattered 4 KB
 * blocks cannot be read as fast as one long array. Returns the sum of the 32-bit words read,
 * modulo 2^32 (so that no read can be optimised away, and a test can check what was read). */
int64_t kv_read(const void *k, const void *v, int64_t head_stride_bytes, int64_t block_stride_bytes,
                int hkv, const int32_t *blocks, int64_t n, int64_t block_bytes, int num_threads) {
    uint32_t total = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(+ : total)
    for (int64_t w = 0; w < hkv * n; w++) {
        const int64_t h = w / n, i = w % n;
        const char *kb = (const char *)k + h * head_stride_bytes + blocks[i] * block_stride_bytes;
        const char *vb = (const char *)v + h * head_stride_bytes + blocks[i] * block_stride_bytes;
        if (i + 1 < n) {
            const int64_t ahead = h * head_stride_bytes + blocks[i + 1] * block_stride_bytes;
            for (int64_t b = 0; b < block_bytes; b += 64) {
                __builtin_prefetch((const char *)k + ahead + b, 0, PREFETCH_LOCALITY);
                __builtin_prefetch((const char *)v + ahead + b, 0, PREFETCH_LOCALITY);
            }
        }
        v8u acc = {0};
        for (int64_t b = 0; b < block_bytes; b += 32)
            acc += *(const v8u *)(kb + b) + *(const v8u *)(vb + b);
        for (int j = 0; j < 8; j++) total += acc[j];
    }
    return total;
}
