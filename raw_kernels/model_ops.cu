// The model's own steps of one decode step, fused, for the CUDA-graphed decoder
// (cpattn/serving/graphed.py). They are not an algorithm of either paper: attention stays in
// chunk_attention.cu, K/V writes in chunk_cache.cu. Their reference is the NumPy path of
// cpattn/serving/llama.py, which they reproduce operation for operation in float32 (the
// products and sums use the _rn intrinsics, so the compiler contracts nothing into an FMA that
// the element-wise CuPy path of the eager model does not have). T is the storage dtype of the
// activations that feed the matrix products; the residual stream is float32.
#include "common.cuh"

namespace cpattn {

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // part is reused by the next call
  return v;
}

// x[r] = float(embed[tokens[r]]): the residual stream of a step. One block per row.
template <typename T>
__global__ void embed_rows(const T* __restrict__ embed, const long long* __restrict__ tokens,
                           float* __restrict__ x, int hidden) {
  const T* row = embed + tokens[blockIdx.x] * (long long)hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(long long)blockIdx.x * hidden + i] = to_f32(row[i]);
}

// Residual add, then RMSNorm: x[r] += float(add[r]) (when add is not null), then
// out[r] = T(x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w). One block per row.
template <typename T>
__global__ void add_rms_norm(float* __restrict__ x, const T* __restrict__ add, const float* __restrict__ w,
                             T* __restrict__ out, int hidden, float eps) {
  float* xr = x + (long long)blockIdx.x * hidden;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = xr[i];
    if (add != nullptr) {
      v = __fadd_rn(v, to_f32(add[(long long)blockIdx.x * hidden + i]));
      xr[i] = v;
    }
    ss = __fadd_rn(ss, __fmul_rn(v, v));
  }
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(block_sum(ss), (float)hidden), eps)));
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[(long long)blockIdx.x * hidden + i] = Pack<T>::one(__fmul_rn(__fmul_rn(xr[i], inv), w[i]));
}

// The fused q|k|v product row [Hq*D | Hkv*D | Hkv*D] split into q, k, v ([rows, H, D]), q and k
// rotated by RoPE at their position (adjacent pairs (2i, 2i+1); cos/sin tables [positions, D/2]).
// One block per row, one thread per rotated pair (or copied pair of v).
template <typename T, int D>
__global__ void rope_split(const T* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ cos_t,
                           const float* __restrict__ sin_t, T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                           int num_q_heads, int num_kv_heads) {
  const int r = blockIdx.x, width = (num_q_heads + 2 * num_kv_heads) * D;
  const float* c = cos_t + (long long)pos[r] * (D / 2);
  const float* s = sin_t + (long long)pos[r] * (D / 2);
  const T* row = qkv + (long long)r * width;
  for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
    const int col = 2 * p, head = col / D, i = (col % D) / 2;
    const float a = to_f32(row[col]), b = to_f32(row[col + 1]);
    if (head < num_q_heads + num_kv_heads) {
      const float x0 = __fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, s[i]));
      const float x1 = __fadd_rn(__fmul_rn(a, s[i]), __fmul_rn(b, c[i]));
      T* dst = head < num_q_heads ? q + ((long long)r * num_q_heads + head) * D
                                  : k + ((long long)r * num_kv_heads + head - num_q_heads) * D;
      dst[2 * i] = Pack<T>::one(x0);
      dst[2 * i + 1] = Pack<T>::one(x1);
    } else {
      T* dst = v + ((long long)r * num_kv_heads + head - num_q_heads - num_kv_heads) * D;
      dst[2 * i] = row[col];
      dst[2 * i + 1] = row[col + 1];
    }
  }
}

// SwiGLU: out[r, j] = T(g / (1 + exp(-g)) * u) with g = gu[r, j], u = gu[r, I + j]. One thread per element.
template <typename T>
__global__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int inter, long long n) {
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const long long r = e / inter, j = e % inter;
  const float g = to_f32(gu[r * 2 * inter + j]), u = to_f32(gu[r * 2 * inter + inter + j]);
  out[e] = Pack<T>::one(__fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u));
}

// Greedy pick: tokens[r] = the first index of the largest logit of row r (NaN never wins).
// One block per row.
template <typename T>
__global__ void argmax_rows(const T* __restrict__ logits, long long* __restrict__ tokens, int vocab) {
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  const T* row = logits + (long long)blockIdx.x * vocab;
  float bv = -INFINITY;
  int bi = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = to_f32(row[i]);
    if (v > bv) { bv = v; bi = i; }  // strided: the first hit of a thread is its smallest index
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    bv = lane < warps ? best_v[lane] : -INFINITY;
    bi = lane < warps ? best_i[lane] : vocab;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) tokens[blockIdx.x] = bi < vocab ? bi : 0;
  }
}

// The step's own state for the next step, its last launch: the picked tokens become the next
// input, each row's slot moves one row on in its chunk and its position one on, and the cache's
// device length table grows by one at the row's slot: what the host's reserve of the next token
// does whenever that token stays in its sequence's tail chunk (GraphedDecoder checks, and
// uploads the host's values when not). meta is int32 [3, rows] (slot chunk, slot offset,
// position). One thread per row.
__global__ void advance_step(const long long* __restrict__ picked, long long* __restrict__ next_in,
                             int* __restrict__ meta, int* __restrict__ slot_lens, const int* __restrict__ row_slot,
                             int rows) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  next_in[r] = picked[r];
  meta[rows + r] += 1;
  meta[2 * rows + r] += 1;
  slot_lens[row_slot[r]] += 1;
}

}  // namespace cpattn
