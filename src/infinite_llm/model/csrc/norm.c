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
 * Built at first use by infinite_llm/attention/native_build.py, called through ctypes by
 * infinite_llm/model/native_norm.py.
 */
#include <math.h>
#include <stdint.h>

static void norm_row(const float *x, const float *w, int64_t n, float eps, float *out) {
    double sq = 0.0;
    for (int64_t c = 0; c < n; c++) sq += (double)x[c] * x[c];
    const float r = 1.0f / sqrtf((float)(sq / (double)n) + eps);
    for (int64_t c = 0; c < n; c++) out[c] = w[c] * (x[c] * r);
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
