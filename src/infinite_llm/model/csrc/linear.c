/* Linear layers of float32 CPU models: y[m, n] = x[m, k] W^T (+ bias), for every m from a
 * decode step's one row to a prefill chunk's hundreds.
 *
 * W is stored once, at load, in panels of NR = 16 output columns, k-major inside a panel:
 * wp[p][e][c] = W[p * 16 + c][e] (columns past n are zero). A panel is one contiguous stream
 * that the hardware prefetcher follows; each k step of it is two 8-float vectors.
 *   - m = 1 (batch-1 decode): the weights stream from memory once, two accumulator chains per
 *     vector so that the FMA latency never limits the bandwidth.
 *   - m > 1: tiles of MR = 6 rows x 16 columns, 12 accumulators in registers (the classic AVX2
 *     micro-kernel shape): per k step two vector loads of W, six broadcasts of x, twelve FMAs.
 *     With AVX-512's 32 registers, MR = 8 (16 accumulators): no 2-row remainder at 8, 16 or 32
 *     rows. Zen 4, same process, SmolLM2's 121 linears: 30.3 -> 28.0 ms at 8 rows, 39.6 -> 37.5
 *     at 16, 60.0 -> 56.9 at 32, 256 rows unchanged; the same sums in the same order.
 *     Rows are taken MB at a time so that their x block stays in L2 while the panels pass.
 * Threads share the panels of a row block (static schedule), so each reads its own part of W.
 *
 * Measured against oneDNN's pre-packed linear (torch.ops.mkldnn._linear_pointwise) over
 * SmolLM2-135M's 121 linears on the 2-core development machine, same process: 16.5 vs 22.3 ms
 * at m = 1, 24.7 vs 33.8 at 8, 57.7 vs 73.4 at 32, 414 vs 455 at 256.
 *
 * Summation runs over k in order per output (two interleaved halves at m = 1): float32
 * rounding differs from other BLAS orders in the last bits, as theirs differ from each other.
 * Built at first use by infinite_llm/native/build.py; called through ctypes by
 * infinite_llm/model/native_linear.py.
 */
#include <stdint.h>
#include <string.h>

#define NR 16
#ifndef MR
#if defined(__AVX512F__) /* 32 vector registers: 8 x 16 tiles (16 accumulators), no remainder at 8, 16, 32 rows */
#define MR 8
#else                    /* 16 registers (AVX2): 6 x 16 tiles, 12 accumulators */
#define MR 6
#endif
#endif
#define MB 48

typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));

static inline v8f load8(const float *p) { return *(const v8fu *)p; }
static inline v8f bcast(float s) { return (v8f){s, s, s, s, s, s, s, s}; }

static void store_tile(float *y, int64_t ldy, int rows, int cols, const v8f *acc,
                       const float *bias) {
    for (int r = 0; r < rows; r++) {
        float tmp[NR];
        memcpy(tmp, &acc[2 * r], sizeof(v8f));
        memcpy(tmp + 8, &acc[2 * r + 1], sizeof(v8f));
        if (bias)
            for (int c = 0; c < cols; c++) tmp[c] += bias[c];
        memcpy(y + r * ldy, tmp, (size_t)cols * sizeof(float));
    }
}

/* rows x 16 outputs; rows is a constant in every inlined copy, so acc stays in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                        const float *wp, int64_t k, int rows,
                                                        v8f *acc) {
    for (int i = 0; i < 2 * rows; i++) acc[i] = bcast(0.f);
    for (int64_t e = 0; e < k; e++) {
        const v8f w0 = load8(wp + e * NR), w1 = load8(wp + e * NR + 8);
        for (int r = 0; r < rows; r++) {
            const v8f xb = bcast(x[r * ldx + e]);
            acc[2 * r] += w0 * xb;
            acc[2 * r + 1] += w1 * xb;
        }
    }
}

/* One row: even and odd k in separate chains, added at the end. */
static void tile1(const float *x, const float *wp, int64_t k, v8f *acc) {
    v8f a0 = bcast(0.f), a1 = a0, c0 = a0, c1 = a0;
    int64_t e = 0;
    for (; e + 1 < k; e += 2) {
        const v8f xa = bcast(x[e]), xb = bcast(x[e + 1]);
        a0 += load8(wp + e * NR) * xa;
        a1 += load8(wp + e * NR + 8) * xa;
        c0 += load8(wp + (e + 1) * NR) * xb;
        c1 += load8(wp + (e + 1) * NR + 8) * xb;
    }
    if (e < k) {
        const v8f xa = bcast(x[e]);
        a0 += load8(wp + e * NR) * xa;
        a1 += load8(wp + e * NR + 8) * xa;
    }
    acc[0] = a0 + c0;
    acc[1] = a1 + c1;
}

static void panel(const float *x, int64_t ldx, int64_t m, const float *wp, int64_t k, int cols,
                  const float *bias, float *y, int64_t ldy) {
    v8f acc[2 * MR];
    if (m == 1) {
        tile1(x, wp, k, acc);
        store_tile(y, ldy, 1, cols, acc, bias);
        return;
    }
    int64_t i = 0;
    for (; i + MR <= m; i += MR) {
        tile(x + i * ldx, ldx, wp, k, MR, acc);
        store_tile(y + i * ldy, ldy, MR, cols, acc, bias);
    }
    const int rest = (int)(m - i);
    switch (rest) {
#if MR > 7
    case 7: tile(x + i * ldx, ldx, wp, k, 7, acc); break;
#endif
#if MR > 6
    case 6: tile(x + i * ldx, ldx, wp, k, 6, acc); break;
#endif
    case 5: tile(x + i * ldx, ldx, wp, k, 5, acc); break;
    case 4: tile(x + i * ldx, ldx, wp, k, 4, acc); break;
    case 3: tile(x + i * ldx, ldx, wp, k, 3, acc); break;
    case 2: tile(x + i * ldx, ldx, wp, k, 2, acc); break;
    case 1: tile(x + i * ldx, ldx, wp, k, 1, acc); break;
    default: return;
    }
    store_tile(y + i * ldy, ldy, rest, cols, acc, bias);
}

/* x: m rows of k floats, row stride ldx; wp: the panels; bias: n floats or NULL;
 * y: m rows of n floats, row stride ldy. */
void linear_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const float *wp,
                const float *bias, int64_t n, float *y, int64_t ldy, int num_threads) {
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
        const int64_t mb = m - i0 < MB ? m - i0 : MB;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int cols = n - p * NR < NR ? (int)(n - p * NR) : NR;
            panel(x + i0 * ldx, ldx, mb, wp + p * k * NR, k, cols, bias ? bias + p * NR : 0,
                  y + i0 * ldy + p * NR, ldy);
        }
    }
}
