/* Eight-lane float vectors for the CPU attention kernels (decode_ma.c, prefill_ma.c): the
 * types, a Cephes exp and the reductions, in GCC/Clang vector extensions that the compiler lowers
 * to AVX2, AVX-512, NEON, ... */
#ifndef INFINITE_LLM_VEC8_H
#define INFINITE_LLM_VEC8_H
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

#endif
