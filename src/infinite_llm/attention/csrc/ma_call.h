/* The decode MA's entry points, their argument structs and the whole-step attention hook.
 *
 * Every struct is a field list (native/csrc/c_struct.h): the C typedef and the ctypes struct
 * that attention/cpu_native.py, native_shards.py and step_attention.py fill are both built
 * from it. Pointers and integers travel as int64: a caller through ctypes converts one
 * argument, not twenty, and keeps the fields that do not change between the layers of a step
 * filled in. */
#ifndef INFINITE_LLM_MA_CALL_H
#define INFINITE_LLM_MA_CALL_H
#include <stdint.h>

#include "../../native/csrc/c_struct.h"

/* ma_decode's arguments. With write_n > 0 the call first stores write_n new tokens (kv_write's
 * arguments: rows of Hkv x D in the cache's dtype, row strides in elements) in the layer's
 * slots, as DistAttention does before every MA: a decode step's store and MA in one call, not
 * two. ma_decode_call returns ma_decode's codes, -3 for a slot out of range. */
#define MA_DECODE_CALL(I, F)                                                                      \
    I(q) I(k) I(v) I(head_stride) I(block_stride) I(kv_bf16) I(num_requests) I(query_start)       \
    I(block_table) I(block_start) I(context_lens) I(row_limit) I(hq) I(hkv) I(d) I(block_size)    \
    F(scale) I(chunk_tokens) I(num_threads) I(out) I(lse) I(write_slots) I(write_n) I(write_k)    \
    I(write_k_row) I(write_v) I(write_v_row)
C_STRUCT(MADecodeCall, MA_DECODE_CALL)
int ma_decode_call(const MADecodeCall *a);

/* ma_decode_shards' arguments: k, v and head_stride point to num_shards int64 each (every
 * shard's layer base pointer; head strides in elements). A group no shard serves gets the
 * empty state (out 0, lse -inf): its request's context is elsewhere, merged in after. */
#define MA_SHARDS_CALL(I, F)                                                                      \
    I(q) I(num_shards) I(k) I(v) I(head_stride) I(block_stride) I(kv_bf16) I(req_start) I(group)  \
    I(q_first) I(block_table) I(block_start) I(context_lens) I(num_groups) I(group_rows) I(hq)    \
    I(hkv) I(d) I(block_size) F(scale) I(chunk_tokens) I(num_threads) I(out) I(lse)
C_STRUCT(MAShardsCall, MA_SHARDS_CALL)
int ma_shards_call(const MAShardsCall *a);

/* Store n new tokens' K,V (rows of Hkv x D, row strides in elements) in one layer of a pool
 * at slots[0..n); -1 (nothing written) when a slot is out of range. */
int kv_write(void *k_cache, void *v_cache, int64_t head_stride, const int64_t *slots, int64_t n,
             const void *k, int64_t k_row, const void *v, int64_t v_row, int hkv, int d, int esz);

/* A decode step's attention as a whole-step decoder calls it, once a layer (step_attend): the
 * new K,V of every row stored in its pool, then the MA over one pool (kind 0: `call` is an
 * MADecodeCall) or several merged in the kernel (kind 1: an MAShardsCall), and around the MA
 * the rows' share in other processes through `remote` (a RemoteFn, or 0, called with
 * `remote_ctx`).
 *   pools, int64[num_pools] each: layer 0's K and V addresses (k_bases, v_bases), bytes from
 *   one layer to the next (layer_strides), elements from one KV head to the next
 *   (head_strides); layer_k, layer_v: int64[num_pools] scratch the call fills per layer (what
 *   an MAShardsCall reads). write_pool, slots: int64[t], the pool index and slot of row i's
 *   new K,V (-1: stored remotely). */
#define STEP_ATTENTION(I, F)                                                                      \
    I(kind) I(call) I(num_pools) I(k_bases) I(v_bases) I(layer_strides) I(head_strides)           \
    I(layer_k) I(layer_v) I(write_pool) I(slots) I(t) I(hq) I(hkv) I(d) I(remote) I(remote_ctx)
C_STRUCT(StepAttention, STEP_ATTENTION)

/* Rows with context in another process's pools (a Ray actor's creditors): phase 0, after the
 * local stores, sends them their share of layer `layer` (q and new K,V from qkv [t][Q+2KV]);
 * phase 1, after the local MA, merges their (out, lse) into attn [t][Q] and lse [t][Hq].
 * Nonzero: the step is abandoned with that status. */
typedef int (*RemoteFn)(void *ctx, int64_t phase, int64_t layer, const float *qkv, float *attn,
                        float *lse);

/* Layer `layer` of the step: q [t][Hq*D] float32 rows, qkv [t][(Hq+2Hkv)*D] the rows whose K,V
 * part is stored (q may point into qkv when t == 1), attn [t][Hq*D] and lse [t][Hq] the result.
 * Returns 0, -3 for a slot outside its pool, -2 for an unknown kind, else the MA's or the
 * remote hook's code. The signature is the decoder's AttendFn (model/csrc/decoder.c). */
int step_attend(const void *step, int64_t layer, const float *q, const float *qkv, float *attn,
                float *lse);
#endif
