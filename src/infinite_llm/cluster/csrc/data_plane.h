/* The data plane's per-layer exchange in C: a whole-step native decode's remote shards over the
 * shared-memory channels of cluster/channel.py, with no Python on either side per layer.
 *
 * A channel is two shared-memory regions (one written by each side) and a FIFO doorbell each
 * way. A Python message rings the doorbell with its region's generation; a native message
 * rings it with NATIVE_BELL and lays out the region as below. A step's first message on a
 * channel is a Python one (the setup: the creditor's block lists and slots, cluster/
 * native_plane.py), which also sizes both regions for the native messages that follow, one
 * per layer, so no region grows or moves while C reads and writes it.
 *
 * Request (debtor -> creditor), at the region's start: RequestHead, then at offsets 64-aligned
 * q [n_rows][Hq*D], k [n_write][Hkv*D], v [n_write][Hkv*D], float32.
 * Reply (creditor -> debtor): ReplyHead, then out [n_rows][Hq*D] and lse [n_rows][Hq]. */
#ifndef INFINITE_LLM_DATA_PLANE_H
#define INFINITE_LLM_DATA_PLANE_H
#include <stdint.h>

#include "../../native/csrc/c_struct.h"

#define NATIVE_BELL 0xFFFFFFFFu

typedef struct {
    int64_t step, layer;
} RequestHead;

typedef struct {
    int64_t status, step, layer, began_ns, ended_ns;
} ReplyHead;

/* One creditor of a debtor's step. out_region / in_region: the debtor's mapping of its own
 * region and of the creditor's; bell_out / bell_in: the doorbell FIFOs' fds (bell_in
 * non-blocking). rows: int64[n_rows] the step's rows this creditor serves (0: all t rows);
 * write_rows: int64[n_write] the rows whose new K,V it stores (0 with n_write == t: all). */
#define REMOTE_LINK(I, F)                                                                         \
    I(out_region) I(in_region) I(bell_out) I(bell_in) I(rows) I(n_rows) I(write_rows) I(n_write)
C_STRUCT(RemoteLink, REMOTE_LINK)

/* A debtor's step (remote_step's context): num_links RemoteLinks at `links`; t rows of
 * Hq/Hkv heads of D; `step` the number every message of this step carries; `merge` the
 * attention library's merge_into; `alive` an int (*)(int64 link) asked after every silent
 * slice of slice_ms (0: the creditor is gone), timeout_ms in all. On a failure: `failed` the
 * link, `status` why (see data_plane.c). `pending`: 1 from a layer's sends to its merge (a
 * step stopped in between leaves replies on the channels). `times`:
 * int64[num_layers][2 + 4 * num_links], CLOCK_MONOTONIC ns per layer: phase 0 began, phase 1
 * began (the local MA done), then per link sent, reply read, the creditor's MA began and
 * ended. */
#define REMOTE_STEP(I, F)                                                                         \
    I(num_links) I(links) I(t) I(hq) I(hkv) I(d) I(step) I(merge) I(alive) I(slice_ms)            \
    I(timeout_ms) I(failed) I(status) I(pending) I(times) I(num_layers)
C_STRUCT(RemoteStep, REMOTE_STEP)

/* A creditor's side of one debtor's step. in_region / out_region: its mapping of the debtor's
 * region and of its own; bell_in / bell_out: fds. `call`: the attention library's
 * MADecodeCall for the debtor's rows (tables, split, write_slots filled; q, k, v, out, lse and
 * the write rows set per layer), `ma` its ma_decode_call, or 0 with `store` (kv_write) when
 * the creditor only stores. k_base / v_base: layer 0 of its pool, layer_stride bytes between
 * layers, head_stride elements (for `store`). delay_ns: fault injection, every reply late.
 * times: int64[num_layers][2], CLOCK_MONOTONIC ns each layer's service began and ended. */
#define SERVE_LINK(I, F)                                                                          \
    I(in_region) I(out_region) I(bell_in) I(bell_out) I(step) I(call) I(ma) I(store) I(k_base)    \
    I(v_base) I(layer_stride) I(head_stride) I(num_layers) I(n_rows) I(n_write) I(write_slots)    \
    I(hq) I(hkv) I(d) I(delay_ns) I(times)
C_STRUCT(ServeLink, SERVE_LINK)

/* Phase 0 (after the local stores): every link's request for `layer`, doorbells rung; phase 1
 * (after the local MA): every reply, in link order, merged into attn [t][Hq*D] / lse [t][Hq].
 * The attention library's RemoteFn (attention/csrc/ma_call.h). */
int remote_step(void *ctx, int64_t phase, int64_t layer, const float *qkv, float *attn,
                float *lse);

/* One doorbell on a creditor's channel: a native request served here (SERVE_HANDLED), nothing
 * there after all (SERVE_NOTHING), the channel closed or broken (SERVE_CLOSED), else the
 * generation of a Python message for the caller to read. */
#define SERVE_HANDLED (-3)
#define SERVE_NOTHING (-2)
#define SERVE_CLOSED (-1)
int64_t serve_native(const void *link);

/* Bytes a native request / reply needs (out[0], out[1]). */
void native_sizes(int64_t n_rows, int64_t n_write, int64_t hq, int64_t hkv, int64_t d,
                  int64_t *out);
#endif
