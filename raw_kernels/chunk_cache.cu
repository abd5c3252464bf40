// The chunk cache's pool writes: K/V of new tokens scattered into their pages.
//
// Pool layout (reference/chunk_cache.py): [num_layers, num_chunks, num_kv_heads, C, D], so one
// (layer, chunk, kv head) is a contiguous C x D page, addressed by the flat page index
// layer * num_chunks * Hkv + chunk * Hkv + head.
#include "common.cuh"

namespace cpattn {

// KV append: token t of k, v ([n, Hkv, D], contiguous) goes to page (slot_chunk[t], h) at row
// slot_off[t] of one layer. One thread per 16-byte vector, CPATTN_APPEND_THREADS per block.
// Serves decode (one token per sequence) and prefill (a run of tokens of one sequence) alike.
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_APPEND_THREADS) kv_append(
    const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ slot_chunk,
    const int* __restrict__ slot_off, T* __restrict__ k_pool, T* __restrict__ v_pool, long long layer_page0,
    int num_kv_heads, int n) {
  constexpr int V = D / 8;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)n * num_kv_heads * V) return;
  const int c = (int)(i % V) * 8;
  const long long th = i / V;  // token * Hkv + head
  const int h = (int)(th % num_kv_heads), t = (int)(th / num_kv_heads);
  const long long page = layer_page0 + (long long)slot_chunk[t] * num_kv_heads + h;
  const long long dst = (page * C + slot_off[t]) * D + c;
  *reinterpret_cast<uint4*>(k_pool + dst) = *reinterpret_cast<const uint4*>(k + th * D + c);
  *reinterpret_cast<uint4*>(v_pool + dst) = *reinterpret_cast<const uint4*>(v + th * D + c);
}

}  // namespace cpattn
