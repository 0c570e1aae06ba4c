/* A decode step of a Llama-family decoder in one call: every layer, for float32 rows on CPU
 * whose KV lives in pools of this process (one pool, or several merged in the MA kernel), and
 * rows with context in other processes too, through a hook that exchanges their share per layer.
 *
 * Why: at batch 1 a step's arithmetic is small next to its weights, and the weights stream
 * through the caches between two layers, so each torch op and ctypes call of a layer starts
 * cold (tens of microseconds each; about 8 of a 27 ms step on SmolLM2 were spent outside the
 * linears). Here a layer is one C loop over the same kernels the torch path calls: the packed
 * linear (model/csrc/linear.c), the norms (norm.c), rope and silu*mul (below, which the torch
 * path calls too), and the step's attention: one call a layer to an AttendFn the attention
 * executor hands over with its context (attention/csrc/decode_ma.c's step_attend: the K,V
 * store and the MA over the pools of this process and beyond). The decoder knows nothing of
 * where the KV lives. Kernels come in as function pointers, so each stays in its own library;
 * the results are the torch path's, bit for bit (tests/model/test_native_decoder.py).
 *
 * Layer l, rows t (one decode token each), the residual stream updated in place:
 *     h = rmsnorm(res += mlp)   (layer 0: h = rmsnorm(res), res = the embeddings)
 *     qkv = h Wqkv^T (+ b); rope(q, k); attn = attend(q, k, v)  (stores k, v, then attends)
 *     h = rmsnorm(res += attn Wo^T);  mlp = (silu(g) * u) Wdown^T  with [g | u] = h Wgu^T
 * and at the end out = rmsnorm(res += mlp) with the final norm.
 *
 * Built at first use by infinite_llm/native/build.py, driven through ctypes by
 * infinite_llm/model/native_decoder.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../native/csrc/c_struct.h"

typedef void (*LinearFn)(const float *x, int64_t m, int64_t k, int64_t ldx, const float *wp,
                         const float *bias, int64_t n, float *y, int64_t ldy, int num_threads);
typedef void (*NormFn)(const float *x, int64_t rows, int64_t n, const float *w, float eps,
                       float *out);
typedef void (*AddNormFn)(float *residual, const float *delta, int64_t rows, int64_t n,
                          const float *w, float eps, float *out);
/* One layer's attention (attention/csrc/ma_call.h's step_attend): q [t][Q] float32 rows, qkv
 * [t][Q+2KV] whose K,V part is stored first, attn [t][Q] and lse [t][Hq] written. Nonzero:
 * the step stops with that status. */
typedef int (*AttendFn)(const void *ctx, int64_t layer, const float *q, const float *qkv,
                        float *attn, float *lse);

/* Rotary embedding, rotate-half convention, in place: x holds t rows (row stride ld floats) of
 * `heads` heads of d floats; cos and signed_sin are [t][d] (the sine's first half negated).
 * Per element x*cos + roll(x, d/2)*sin, each product rounded, then their sum: torch's three
 * ops, so no fused multiply-add may be formed here. */
__attribute__((optimize("fp-contract=off"))) void rope_f32(float *x, int64_t t, int64_t heads,
                                                            int64_t d, int64_t ld,
                                                            const float *cos,
                                                            const float *signed_sin) {
    const int64_t half = d / 2;
    if (d > 512) return; /* native_decoder.MAX_HEAD_DIM: the Python side never calls past it */
#pragma omp parallel for if (t >= 64) /* prefill rows, as the norms */
    for (int64_t i = 0; i < t; i++) {
        const float *c = cos + i * d, *s = signed_sin + i * d;
        float row[512];
        for (int64_t h = 0; h < heads; h++) {
            float *r = x + i * ld + h * d;
            memcpy(row, r, sizeof(float) * (size_t)d);
            for (int64_t e = 0; e < d; e++) {
                const float a = row[e] * c[e];
                const float b = row[e < half ? e + half : e - half] * s[e];
                r[e] = a + b;
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* e^x for 8 floats: Cody-Waite reduction x = n ln2 + r, Cephes' degree-7 polynomial for e^r
 * (about 1 ulp over the clamped range), 2^n from the exponent bits. x is clamped to
 * [-87.3, 88.0], where 2^n stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
#endif

/* out[i][j] = silu(gu[i][j]) * gu[i][n + j] for t rows of gu = [gate | up] (2n floats each);
 * silu(g) = g / (1 + e^-g). Eight at a time with AVX2 (a scalar expf per call cost 300 us a
 * layer at batch 32, five times torch's vectorised silu; now 40 us), expf for the rest;
 * relative error as torch's float32 silu (1.8e-7 against float64 on random rows). Rows split
 * over OpenMP threads from 64 on (prefill chunks): 8 x 256-token prompts spent 40-70 ms less
 * outside the linears, this and rope_f32 together. */
void silu_mul_f32(const float *gu, int64_t t, int64_t n, float *out) {
#pragma omp parallel for if (t >= 64) /* prefill rows, as the norms */
    for (int64_t i = 0; i < t; i++) {
        const float *g = gu + i * 2 * n, *u = g + n;
        float *o = out + i * n;
        int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(g + j);
            const __m256 e = exp8(_mm256_sub_ps(zero, x));
            __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            /* below -87 silu is below 1e-36 in magnitude: 0, not x over the clamped e^87 */
            s = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), s);
            _mm256_storeu_ps(o + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
        }
#endif
        for (; j < n; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* one layer's weights: packed linears (linear.c's panels), norm weights */
#define LAYER_WEIGHTS(I, F) I(qkv) I(qkv_bias) I(o) I(gate_up) I(down) I(input_norm) I(post_norm)
C_STRUCT(LayerWeights, LAYER_WEIGHTS)
C_STRUCT_LAYOUT(LayerWeights, LAYER_WEIGHTS)

/* A step: shapes; LayerWeights[num_layers] and the final norm; the kernels (linear, norms) and
 * the attention (attend, called with attend_ctx); cos, sin [t][head_dim]; the embeddings x
 * [t][hidden] (updated in place: the residual stream) and the result out [t][hidden]. */
#define DECODE_STEP(I, F)                                                                         \
    I(num_layers) I(t) I(hidden) I(num_heads) I(num_kv_heads) I(head_dim) I(intermediate)         \
    I(num_threads) F(eps) I(layers) I(final_norm) I(linear) I(norm) I(add_norm) I(attend)         \
    I(attend_ctx) I(cos) I(sin) I(x) I(out)
C_STRUCT(DecodeStep, DECODE_STEP)
C_STRUCT_LAYOUT(DecodeStep, DECODE_STEP)

#define P(T, x) ((T)(intptr_t)(x))

/* Returns 0; -1 when scratch memory could not be had; else the attention's code. */
int decode_layers(const DecodeStep *s) {
    const int64_t t = s->t, H = s->hidden, D = s->head_dim, I = s->intermediate;
    const int64_t Q = s->num_heads * D, KV = s->num_kv_heads * D, QKV = Q + 2 * KV;
    const int threads = (int)s->num_threads;
    const float eps = (float)s->eps;
    LinearFn linear = P(LinearFn, s->linear);
    NormFn norm = P(NormFn, s->norm);
    AddNormFn add_norm = P(AddNormFn, s->add_norm);
    AttendFn attend = P(AttendFn, s->attend);
    const void *attend_ctx = P(const void *, s->attend_ctx);
    const LayerWeights *layers = P(const LayerWeights *, s->layers);
    float *res = P(float *, s->x);
    const size_t floats = (size_t)t * (H + QKV + Q + Q + s->num_heads + H + 2 * I + I + H);
    float *scratch = malloc(sizeof(float) * (floats ? floats : 1));
    if (!scratch) return -1;
    float *h = scratch, *qkv = h + t * H, *q = qkv + t * QKV, *attn = q + t * Q;
    float *lse = attn + t * Q, *o = lse + t * s->num_heads, *gu = o + t * H, *act = gu + t * 2 * I;
    float *mlp = act + t * I;
    const float *q_rows = t == 1 ? qkv : q; /* q as contiguous [t][Q] rows */
    int status = 0;
    for (int64_t l = 0; l < s->num_layers && !status; l++) {
        const LayerWeights *L = layers + l;
        if (l == 0)
            norm(res, t, H, P(const float *, L->input_norm), eps, h);
        else
            add_norm(res, mlp, t, H, P(const float *, L->input_norm), eps, h);
        linear(h, t, H, H, P(const float *, L->qkv), P(const float *, L->qkv_bias), QKV, qkv, QKV,
               threads);
        rope_f32(qkv, t, s->num_heads + s->num_kv_heads, D, QKV, P(const float *, s->cos),
                 P(const float *, s->sin));
        if (t > 1)
            for (int64_t i = 0; i < t; i++) memcpy(q + i * Q, qkv + i * QKV, sizeof(float) * Q);
        if ((status = attend(attend_ctx, l, q_rows, qkv, attn, lse))) break;
        linear(attn, t, Q, Q, P(const float *, L->o), 0, H, o, H, threads);
        add_norm(res, o, t, H, P(const float *, L->post_norm), eps, h);
        linear(h, t, H, H, P(const float *, L->gate_up), 0, 2 * I, gu, 2 * I, threads);
        silu_mul_f32(gu, t, I, act);
        linear(act, t, I, I, P(const float *, L->down), 0, H, mlp, H, threads);
    }
    if (!status) add_norm(res, mlp, t, H, P(const float *, s->final_norm), eps, P(float *, s->out));
    free(scratch);
    return status;
}
