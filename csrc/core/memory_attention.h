// Top-k memory attention on CPU (Extended Mind Transformers, arXiv 2406.02332): for every query
// vector, the top-k memory keys by q . k_normed, then softmax((q . k) * scale) over those k keys
// weights their values. Scores are computed block by block and folded into a running top-k per
// query; they are never stored for the whole memory.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace kcore {

// One layer's memory, laid out (num_kv_heads, mem_len, head_dim) with the last dim contiguous.
struct MemoryTensor {
  const void* data = nullptr;
  int64_t stride_head = 0;  // elements
  int64_t stride_row = 0;   // elements
};

struct MemoryAttentionArgs {
  // (num_kv_heads, queries_per_head, head_dim) contiguous float32: every query vector that maps
  // onto each KV head (batch x grouped query heads x query tokens, flattened).
  const float* query = nullptr;
  int64_t num_kv_heads = 0;
  int64_t queries_per_head = 0;
  int64_t head_dim = 0;
  int64_t mem_len = 0;
  ElemType normed_dtype = ElemType::kFloat32;  // float32/float16/bfloat16
  ElemType kv_dtype = ElemType::kFloat32;      // of keys and values; int8 needs the row scales
  MemoryTensor keys_normed;                     // used for the ranking
  MemoryTensor keys;                            // used for the logits
  MemoryTensor values;
  // int8 keys/values only: (num_kv_heads, mem_len) contiguous float32, row = int8 row * scale.
  const float* key_scales = nullptr;
  const float* value_scales = nullptr;
  int64_t topk = 0;  // 1 <= topk <= mem_len
  float scale = 1.0f;
  bool use_threshold = false;
  float similarity_threshold = 0.0f;  // cosine; selected keys below it are dropped
  // Outputs, contiguous: out (num_kv_heads, queries_per_head, head_dim) float32,
  // lse (num_kv_heads, queries_per_head) float32, indices (num_kv_heads, queries_per_head, topk).
  float* out = nullptr;
  float* lse = nullptr;
  int64_t* indices = nullptr;
};

// Throws kcore::InvalidInput on inconsistent sizes. Multithreaded with parallel_for.
void memory_attention_forward(const MemoryAttentionArgs& args);

// Merges two attentions over disjoint key sets into the attention over their union (FlashInfer's
// merge_state, natural log): with lse = log(exp(lse_a) + exp(lse_b)),
// out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b. out_a / out_b / out: (rows, head_dim),
// lse_a / lse_b / lse: (rows), all float32 contiguous; out may alias out_a or out_b. A side with
// lse -inf contributes nothing; both -inf give zeros and -inf. Returns 0, or 1 / 2 when lse_a /
// lse_b holds NaN or +inf (then nothing is written). Single-threaded: rows are few (decode).
int merge_attention_states_f32(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                               int64_t rows, int64_t head_dim, float* out, float* lse);

}  // namespace kcore
