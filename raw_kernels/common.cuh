// cpattn common device helpers: tensor-core fragments (inline PTX, sm_80+), cp.async, packing,
// the store of a finished attention state. Inlined into every kernel source by the loader
// (CuPy's disk cache hashes only the source string, so headers are never passed with -I).
#pragma once

// Constants shared with Python live in one table, CONSTANTS in cpattn/kernels.py, and arrive as
// -D options (cpattn.kernels.options(file); tools/compile_kernels.py and tools/nvrtc_check.py
// pass the same). They are never defined here, so the two sides cannot disagree.
#if !defined(CPATTN_THREADS) || !defined(CPATTN_DECODE_ROWS) || !defined(CPATTN_DECODE_WIDE_ROWS) || \
    !defined(CPATTN_DECODE_WIDE_MAX_CHUNK) || !defined(CPATTN_UNIT_WIDTH) || !defined(CPATTN_APPEND_THREADS) || \
    !defined(CPATTN_SCORE_ROWS) || !defined(CPATTN_SAMPLED_ROWS) || !defined(CPATTN_SAMPLED_KEYS) || \
    !defined(CPATTN_UNION_THREADS) || !defined(CPATTN_PREFILL_ROWS) || \
    !defined(CPATTN_PREFILL_KEYS) || !defined(CPATTN_WG_THREADS) || !defined(CPATTN_WG_KEYS) || \
    !defined(CPATTN_WG_STAGES_D64) || !defined(CPATTN_WG_STAGES_D128)
#error "cpattn constants missing: compile with the -D options of cpattn.kernels.options(file)"
#endif
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <math.h>; INFINITY is the only macro of it we use.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace cpattn {

typedef unsigned int u32;

template <typename T> struct Pack;
template <> struct Pack<__half> {
  static __device__ __forceinline__ u32 two(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
  }
  static __device__ __forceinline__ __half one(float a) { return __float2half_rn(a); }
};
template <> struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ u32 two(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 one(float a) { return __float2bfloat16_rn(a); }
};

// D[16x8] += A[16x16] * B[16x8], fp32 accumulate.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x with the hardware approximation (ex2.approx.ftz: ~2 ulp, -inf -> 0), for softmax weights.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The end of a unit: one row of a finished online-softmax state -> memory. This thread holds
// the row's columns 8n + 2 (lane % 4) + {0, 1} for n < D / 8 (the mma accumulator layout;
// pair(n) returns them as a float2), its running max m (log2 units) and its full sum l.
// Writes o / l to dst (float for states, the storage dtype for outputs) and, when write_lse,
// the natural-log lse (m + log2 l) ln 2 to *lse from one lane of the quad. The lse goes first:
// its address is then dead during the column loop (chunk_attend's widest tiles sit at 255
// registers, and the other order spills). A row that saw no key
// (l = 0) gets o = 0 and lse = -inf, which merges as the empty set.
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  *reinterpret_cast<u32*>(p) = Pack<T>::two(a, b);
}

template <int D, typename Out, typename Pair>
__device__ __forceinline__ void store_state_row(Out* __restrict__ dst, float* __restrict__ lse, bool write_lse,
                                                float m, float l, Pair pair) {
  const float kLn2 = 0.6931471805599453f;
  const int lane = threadIdx.x & 31;
  if (write_lse && (lane & 3) == 0) *lse = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const float2 v = pair(n);
    store_pair(dst + n * 8 + (lane & 3) * 2, v.x * inv, v.y * inv);
  }
}

}  // namespace cpattn
