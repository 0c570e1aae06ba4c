/* Eight-lane float vectors for the CPU attention kernels (decode_ma.c, prefill_ma.c): the
 * types, a Cephes exp and the reductions, in GCC/Clang vector extensions that the compiler lowers
 * to AVX2, AVX-512, NEON, ... */
#ifndef INFINITE_LLM_VEC8_H
#define INFINITE_LLM_VEC8_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32), aligned(4)));   /* unaligned loads are fine */
typedef float v4f __attribute__((vector_size(16), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
typedef uint32_t v8u __attribute__((vector_size(32), aligned(4)));

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

ALWAYS_INLINE v8f splat8(float x) { /* not 0 + x: without -ffast-math that is an addition */
    return (v8f){x, x, x, x, x, x, x, x};
}

ALWAYS_INLINE float hmax8(v8f a) {
    float x = a[0];
    for (int j = 1; j < 8; j++) x = a[j] > x ? a[j] : x;
    return x;
}

/* One online-softmax update of a query row over W scores (W a multiple of 8): the scores in sr
 * become probabilities exp(s - m') against the new running max m', and the running sum *l and
 * the row's unnormalised accumulator acc[0..D) are rescaled to m'. A row whose scores are all
 * -inf here (no visible key) gets probabilities 0 and keeps its state. */
ALWAYS_INLINE void softmax_update(float *sr, int W, float *m, float *l, float *acc, int D) {
    v8f mx = *(v8f *)sr;
    for (int j0 = 8; j0 < W; j0 += 8) {
        v8f x = *(v8f *)&sr[j0];
        mx = select8(x > mx, x, mx);
    }
    const float mt = hmax8(mx);
    if (mt == -INFINITY) {
        memset(sr, 0, sizeof(float) * W);
        return;
    }
    const float mn = mt > *m ? mt : *m;
    v8f sum = splat8(0.f);
    for (int j0 = 0; j0 < W; j0 += 8) {
        v8f p = exp8(*(v8f *)&sr[j0] - mn);
        *(v8f *)&sr[j0] = p;
        sum += p;
    }
    if (mn != *m) {
        const float corr = *m == -INFINITY ? 0.0f : expf(*m - mn);
        *l *= corr;
        for (int c = 0; c < D; c++) acc[c] *= corr;
        *m = mn;
    }
    *l += hsum8(sum);
}

#endif
