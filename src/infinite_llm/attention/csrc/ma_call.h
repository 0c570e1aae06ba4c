/* ma_decode's arguments in one struct (every field 8 bytes: pointers and integers as int64):
 * a caller through ctypes converts one argument, not twenty-one, and keeps the fields that do
 * not change between the layers of a step filled in. With write_n > 0 the call first stores
 * write_n new tokens (kv_write's arguments: rows of Hkv x D in the cache's dtype, row strides
 * in elements) in the layer's slots, as DistAttention does before every MA: a decode step's
 * store and MA in one call, not two. ma_decode_call returns ma_decode's codes, -3 for a slot
 * out of range.
 *
 * Shared by decode_ma.c (which runs it) and model/csrc/decoder.c (which fills one per layer);
 * mirrored field for field by cpu_native._DecodeCall. */
#ifndef INFINITE_LLM_MA_CALL_H
#define INFINITE_LLM_MA_CALL_H
#include <stdint.h>

typedef struct {
    int64_t q, k, v, head_stride, block_stride, kv_bf16, num_requests;
    int64_t query_start, block_table, block_start, context_lens, row_limit;
    int64_t hq, hkv, d, block_size;
    double scale;
    int64_t chunk_tokens, num_threads, out, lse;
    int64_t write_slots, write_n, write_k, write_k_row, write_v, write_v_row;
} MADecodeCall;

int ma_decode_call(const MADecodeCall *a);

/* ma_decode_shards' arguments in one struct: k, v and head_stride point to num_shards int64
 * each (every shard's layer base pointer; head strides in elements). Mirrored by
 * native_shards._ShardsCall; model/csrc/decoder.c sets the layer pointers per layer. */
typedef struct {
    int64_t q, num_shards, k, v, head_stride, block_stride, kv_bf16;
    int64_t req_start, group, q_first, block_table, block_start, context_lens, num_groups;
    int64_t group_rows, hq, hkv, d, block_size;
    double scale;
    int64_t chunk_tokens, num_threads, out, lse;
} MAShardsCall;

int ma_shards_call(const MAShardsCall *a);

/* Store n new tokens' K,V (rows of Hkv x D, row strides in elements) in one layer of a pool
 * at slots[0..n); -1 (nothing written) when a slot is out of range. */
int kv_write(void *k_cache, void *v_cache, int64_t head_stride, const int64_t *slots, int64_t n,
             const void *k, int64_t k_row, const void *v, int64_t v_row, int hkv, int d, int esz);
#endif
