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
#endif
