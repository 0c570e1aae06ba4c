/* RMSNorm of float32 rows, alone or after the residual add that precedes it in a decoder layer
 * (vLLM's fused_add_rms_norm): one C loop instead of torch's pow, mean, rsqrt and two
 * multiplies. At batch 1 a row is 576 floats and the work is nothing; what a call saves is
 * the dispatch of several torch ops, each of which finds its code evicted from the caches by
 * the weights the previous linear streamed.
 *
 * Arithmetic as transformers' LlamaRMSNorm in float32: mean of squares, + eps, rsqrt, times x,
 * times the weight; the sum of squares is accumulated in double (torch accumulates float32
 * lanes), so results may differ from torch's in the last bit.
 *
 * Built at first use by infinite_llm/native/build.py, called through ctypes by
 * infinite_llm/model/native_norm.py.
 */
#include <math.h>
#include <stdint.h>

/* The sum of squares in eight double chains (c mod 8), added pairwise at the end: one chain
 * waited on the add's latency every element (about 36 us a norm at batch 32, 2.2 ms a step). */
static void norm_row(const float *x, const float *w, int64_t n, float eps, float *out) {
    double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int j = 0; j < 8; j++) s[j] += (double)x[c + j] * x[c + j];
    for (int j = 0; c < n; c++, j++) s[j] += (double)x[c] * x[c];
    const double sq = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    const float r = 1.0f / sqrtf((float)(sq / (double)n) + eps);
    for (int64_t e = 0; e < n; e++) out[e] = w[e] * (x[e] * r);
}

/* out[i] = rmsnorm(x[i]) * w for rows of n floats (contiguous rows). */
void rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *out) {
#pragma omp parallel for if (rows >= 64)
    for (int64_t i = 0; i < rows; i++) norm_row(x + i * n, w, n, eps, out + i * n);
}

/* residual[i] += delta[i] (in place), then out[i] = rmsnorm(residual[i]) * w. */
void add_rms_norm(float *residual, const float *delta, int64_t rows, int64_t n, const float *w,
                  float eps, float *out) {
#pragma omp parallel for if (rows >= 64)
    for (int64_t i = 0; i < rows; i++) {
        float *x = residual + i * n;
        const float *d = delta + i * n;
        for (int64_t c = 0; c < n; c++) x[c] += d[c];
        norm_row(x, w, n, eps, out + i * n);
    }
}
