// The attention inner loop shared by the decode (chunk_attention.cu) and prefill
// (compact_attention.cu) kernels: one page of keys in shared memory folded into each warp's
// online-softmax state, on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
#pragma once
#include "common.cuh"

namespace cpattn {

constexpr int kNoLimit = 0x7fffffff;

// One page (C keys, both K and V, each C x D) -> shared memory rows padded to D + 8 elements
// (16 bytes), which makes every ldmatrix below conflict-free. Rows >= valid are zero-filled.
template <typename T, int D, int C>
__device__ __forceinline__ void load_page(const T* __restrict__ gk, const T* __restrict__ gv, T* dk, T* dv,
                                          int valid, int tid) {
  constexpr int LD = D + 8, V = D / 8;
  for (int j = tid; j < C * V; j += CPATTN_THREADS) {
    const int r = j / V, c = (j % V) * 8;
    if (r < valid) {
      cp_async16(dk + r * LD + c, gk + r * D + c);
      cp_async16(dv + r * LD + c, gv + r * D + c);
    } else {  // stale pool rows may hold anything; P is 0 there, V must be finite
      *reinterpret_cast<uint4*>(dk + r * LD + c) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dv + r * LD + c) = make_uint4(0, 0, 0, 0);
    }
  }
}

// The default `keep` of attend_chunk / attend_step_rt2: no mask beyond the row limits (the
// call folds away, so their code is what it was before `keep` existed).
struct KeepAll {
  __device__ __forceinline__ bool operator()(int, int) const { return true; }
  __device__ __forceinline__ bool operator()(int, int, int) const { return true; }
};

// Fold one page of keys into this warp's state. The warp owns 16 query rows (qf: A fragments)
// and keys [ks*C/KS, (ks+1)*C/KS) of the page (KS warps split the page's keys). Key k of the page
// is masked when k >= valid or key_base + k >= the row's limit (lim0: rows lane/4, lim1: rows
// lane/4 + 8) or !keep(half, k) (half 0: rows lane/4, 1: rows lane/4 + 8); scores are in log2
// units (scale_log2 = scale * log2(e)).
template <typename T, int D, int C, int KS, typename Keep = KeepAll>
__device__ __forceinline__ void attend_chunk(const u32 (&qf)[D / 16][4], const T* ks_, const T* vs_, int valid,
                                             int key_base, int lim0, int lim1, float scale_log2,
                                             float (&o)[D / 8][4], float& m0, float& m1, float& l0, float& l1,
                                             Keep keep = Keep{}) {
  constexpr int LD = D + 8;
  constexpr int RB = 4 / KS;
  constexpr int KW = C / KS;             // keys per warp per page
  constexpr int NB = KW < 64 ? KW : 64;  // keys per sub-block (bounds the score registers)
  const int lane = threadIdx.x & 31, ks = (threadIdx.x >> 5) / RB;
#pragma unroll
  for (int sb = 0; sb < KW; sb += NB) {
    const int key0 = ks * KW + sb;
    if (key0 < valid) {
      float s[NB / 8][4];
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < NB / 16; ++j) {
          u32 b[4];
          ldmatrix_x4(b, smem_addr(ks_ + (key0 + j * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 +
                                   ((lane >> 3) & 1) * 8));
          mma16816<T>(s[2 * j], qf[kk], b[0], b[1]);
          mma16816<T>(s[2 * j + 1], qf[kk], b[2], b[3]);
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + j * 8 + (lane & 3) * 2 + (e & 1);
          s[j][e] = (key < valid && key_base + key < (e < 2 ? lim0 : lim1) && keep(e >> 1, key))
                        ? s[j][e] * scale_log2
                        : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
      }
      mx0 = quad_max(mx0);
      mx1 = quad_max(mx1);
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
      const float a0 = exp2f(m0 - base0), a1 = exp2f(m1 - base1);
      m0 = mn0;
      m1 = mn1;
      l0 *= a0;
      l1 *= a1;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= a0; o[n][1] *= a0; o[n][2] *= a1; o[n][3] *= a1;
      }
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) {
        s[j][0] = exp2f(s[j][0] - base0);
        s[j][1] = exp2f(s[j][1] - base0);
        s[j][2] = exp2f(s[j][2] - base1);
        s[j][3] = exp2f(s[j][3] - base1);
        l0 += s[j][0] + s[j][1];
        l1 += s[j][2] + s[j][3];
      }
#pragma unroll
      for (int kk = 0; kk < NB / 16; ++kk) {
        const u32 a[4] = {Pack<T>::two(s[2 * kk][0], s[2 * kk][1]), Pack<T>::two(s[2 * kk][2], s[2 * kk][3]),
                          Pack<T>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                          Pack<T>::two(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          u32 b[4];
          ldmatrix_x4_trans(b, smem_addr(vs_ + (key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                         np * 16 + (lane >> 4) * 8));
          mma16816<T>(o[2 * np], a, b[0], b[1]);
          mma16816<T>(o[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
  }
}

// Fold one step of TK keys (K, V in shared memory, rows padded to D + 8) into the state of this
// warp's 32 query rows: two 16-row mma tiles (rows warp*32 + [0, 16) and + [16, 32) of sQ), so
// every K/V fragment read from shared memory feeds two mma. Compute-bound users (prefill, and
// decode's phase-1 units) use it. Key k of the step is masked when k >= valid or key_base + k
// >= the row's limit (lim[tile][half]) or !keep(tile, half, k); `full` promises none of these
// happens (mask skipped).
template <typename T, int D, int TK, typename Keep = KeepAll>
__device__ __forceinline__ void attend_step_rt2(const T* sQ, const T* ks_, const T* vs_, int valid, int key_base,
                                                const int (&lim)[2][2], bool full, float scale_log2,
                                                float (&o)[2][D / 8][4], float (&m)[2][2], float (&l)[2][2],
                                                Keep keep = Keep{}) {
  constexpr int LD = D + 8;
  constexpr int NB = TK;  // keys per sub-block
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int key0 = 0; key0 < TK; key0 += NB) {
    if (key0 >= valid) break;
    float sc[2][NB / 8][4];
#pragma unroll
    for (int tt = 0; tt < 2; ++tt)
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) sc[tt][j][0] = sc[tt][j][1] = sc[tt][j][2] = sc[tt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a0[4], a1[4];
      ldmatrix_x4(a0, smem_addr(sQ + (warp * 32 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
      ldmatrix_x4(a1, smem_addr(sQ + (warp * 32 + 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int j = 0; j < NB / 16; ++j) {
        u32 b[4];
        ldmatrix_x4(b, smem_addr(ks_ + (key0 + j * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 +
                                 ((lane >> 3) & 1) * 8));
        mma16816<T>(sc[0][2 * j], a0, b[0], b[1]);
        mma16816<T>(sc[0][2 * j + 1], a0, b[2], b[3]);
        mma16816<T>(sc[1][2 * j], a1, b[0], b[1]);
        mma16816<T>(sc[1][2 * j + 1], a1, b[2], b[3]);
      }
    }
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) {
        if (!full) {  // only boundary steps need the per-key mask
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + j * 8 + (lane & 3) * 2 + (e & 1);
            if (!(key < valid && key_base + key < lim[tt][e >> 1] && keep(tt, e >> 1, key)))
              sc[tt][j][e] = -INFINITY;
          }
        }
        mx0 = fmaxf(mx0, fmaxf(sc[tt][j][0], sc[tt][j][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[tt][j][2], sc[tt][j][3]));
      }
      // raw scores until here; scale_log2 > 0 keeps the order, so the max scales too
      mx0 *= scale_log2;
      mx1 *= scale_log2;
      mx0 = quad_max(mx0);
      mx1 = quad_max(mx1);
      const float mn0 = fmaxf(m[tt][0], mx0), mn1 = fmaxf(m[tt][1], mx1);
      const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
      const float c0 = exp2f(m[tt][0] - base0), c1 = exp2f(m[tt][1] - base1);
      m[tt][0] = mn0;
      m[tt][1] = mn1;
      l[tt][0] *= c0;
      l[tt][1] *= c1;
#pragma unroll
      for (int nn = 0; nn < D / 8; ++nn) {
        o[tt][nn][0] *= c0; o[tt][nn][1] *= c0; o[tt][nn][2] *= c1; o[tt][nn][3] *= c1;
      }
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) {
        sc[tt][j][0] = fast_exp2(fmaf(sc[tt][j][0], scale_log2, -base0));
        sc[tt][j][1] = fast_exp2(fmaf(sc[tt][j][1], scale_log2, -base0));
        sc[tt][j][2] = fast_exp2(fmaf(sc[tt][j][2], scale_log2, -base1));
        sc[tt][j][3] = fast_exp2(fmaf(sc[tt][j][3], scale_log2, -base1));
        l[tt][0] += sc[tt][j][0] + sc[tt][j][1];
        l[tt][1] += sc[tt][j][2] + sc[tt][j][3];
      }
    }
#pragma unroll
    for (int kk = 0; kk < NB / 16; ++kk) {
      u32 pa[2][4];
#pragma unroll
      for (int tt = 0; tt < 2; ++tt) {
        pa[tt][0] = Pack<T>::two(sc[tt][2 * kk][0], sc[tt][2 * kk][1]);
        pa[tt][1] = Pack<T>::two(sc[tt][2 * kk][2], sc[tt][2 * kk][3]);
        pa[tt][2] = Pack<T>::two(sc[tt][2 * kk + 1][0], sc[tt][2 * kk + 1][1]);
        pa[tt][3] = Pack<T>::two(sc[tt][2 * kk + 1][2], sc[tt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        u32 b[4];
        ldmatrix_x4_trans(b, smem_addr(vs_ + (key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                       np * 16 + (lane >> 4) * 8));
        mma16816<T>(o[0][2 * np], pa[0], b[0], b[1]);
        mma16816<T>(o[0][2 * np + 1], pa[0], b[2], b[3]);
        mma16816<T>(o[1][2 * np], pa[1], b[0], b[1]);
        mma16816<T>(o[1][2 * np + 1], pa[1], b[2], b[3]);
      }
    }
  }
}

}  // namespace cpattn
