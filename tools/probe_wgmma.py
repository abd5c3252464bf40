#!/usr/bin/env python3
"""Minimal Hopper wgmma probe: the two GEMMs of one bf16 flash-attention step, inline PTX only.

One CTA of 128 threads (one warpgroup) computes

  1. S[64x64]  (fp32) = Q[64x128] . K[64x128]^T
       wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16, 8 k-steps of 16,
       A = Q and B = K both from shared memory through matrix descriptors, both K-major
       (the head dim is contiguous), 128-byte swizzle.
  2. O[64x128] (fp32) = P[64x64] . V[64x128],  P = bf16(S) taken from the S accumulator registers
       wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16, 4 k-steps of 16 keys,
       A = P from registers (FlashAttention-3 style), B = V from shared memory.  V is stored
       row-major [key][d] (d = N is contiguous: "MN-major" B, imm-trans-b = 1), 128-byte swizzle.

Usage
  python tools/probe_wgmma.py                  # GPU: run every variant (each in its own process), print a table
  python tools/probe_wgmma.py --variant A      # GPU: run one variant in this process, verbose diagnostics
  python tools/probe_wgmma.py --inprocess      # GPU: run all variants in this process (a fault kills the rest)
  python tools/probe_wgmma.py --selfcheck      # CPU only: check the smem fill against the canonical layout model
  python tools/probe_wgmma.py --compile-only   # CPU only: selfcheck + nvcc -cubin (+ptxas -v) + NVRTC compile

Shared-memory layouts (all operand regions and swizzle atoms 1024-byte aligned)
  128B swizzle (Swizzle<3,4,3> on byte addresses): byte address bits [4:6] (16-byte chunk within a
  128-byte row) ^= bits [7:9] (row within an 8-row x 128-byte = 1024-byte atom).  The hardware applies it
  to the absolute shared address, hence the 1024-byte alignment (descriptor base_offset = 0).

  Q, K (K-major, [64 rows][128] bf16): two 64-column halves, each its own [64 rows x 128 B] = 8 KiB
  region:   lin(row, col) = (col / 64) * 8192 + row * 128 + (col % 64) * 2;   addr = swz(lin)
  descriptor: LBO = 16 (ignored for swizzled K-major), SBO = 1024 (8-row group stride);
  k-step ks (16 cols): start = (ks / 4) * 8192 + (ks % 4) * 32   (32 B advance inside the atom).

  V: see VARIANTS below.  Canonical 128B-swizzled MN-major layout (CUTLASS mma_sm90_desc.hpp, units of
  16 B, T = 8 bf16):  Swizzle<3,4,3> o ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
    i.e. 64 contiguous N elements form one 128-byte row, 8 K rows at 128 B form an atom,
    LBO = byte stride between 64-wide N blocks, SBO = byte stride between 8-deep K groups.

Accumulator fragment layout (m64nN, f32; warp w = tid/32 of the warpgroup, lane l = tid%32):
  warp w owns rows 16w..16w+15; for each n8 block j: r = 16w + l/4, c = 8j + 2(l%4),
    d[4j+0] = (r, c), d[4j+1] = (r, c+1), d[4j+2] = (r+8, c), d[4j+3] = (r+8, c+1).
A register fragment (m64k16, bf16, 4 x b32): a0 = (r, c..c+1), a1 = (r+8, c..c+1),
  a2 = (r, c+8..c+9), a3 = (r+8, c+8..c+9) with c = 2(l%4), low half = lower column.
  Hence for P k-step kk (keys 16kk..16kk+15 = n8 blocks 2kk, 2kk+1 of S):
    a[kk][i] = bf16x2(d[8kk+2i], d[8kk+2i+1]),  i = 0..3.

bf16 on CuPy: arrays are numpy/cupy uint16 bit patterns (helpers f32_to_bf16_bits / bf16_bits_to_f32).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from cpattn.raw_kernels import nvrtc  # libnvrtc, CUDA headers, compile (as tools/nvrtc_check.py)

KERNEL_NAME = "probe_wgmma_kernel"
NVRTC_OPTIONS = ("-std=c++17", "-arch=sm_90a")

# Shared-memory map (bytes from the 1024-aligned base).  V gets 32 KiB although it needs 16 KiB so that
# every (possibly wrong) descriptor variant still reads inside the allocation (no illegal-address fault).
SMEM_Q, SMEM_K, SMEM_V, SMEM_USED = 0, 16384, 32768, 65536
SMEM_DYN_BYTES = SMEM_USED + 1024  # + room to round the dynamic smem base up to 1024

# --------------------------------------------------------------------------------------------------
# Variants for the V (B operand of GEMM 2) layout / descriptor: the part we are least sure of.
#   vlayout 0: two 64-wide d halves, each its own [64 keys x 128 B] 8 KiB region
#              lin(key, d) = (d/64)*8192 + key*128 + (d%64)*2
#   vlayout 1: d halves interleaved per 8-key atom: atom (key/8, d/64) at (key/8)*2048 + (d/64)*1024
#              lin(key, d) = (key/8)*2048 + (d/64)*1024 + (key%8)*128 + (d%64)*2
#   vlayout 2: control: V^T stored K-major [128 d][64 keys] (keys contiguous), imm-trans-b = 0
#              lin(key, d) = d*128 + key*2        (LBO ignored, SBO = 1024, 32 B per k-step)
# kstep: start-address advance per k-step of 16 keys.
VARIANTS = {
    "A": dict(vlayout=0, lbo=8192, sbo=1024, kstep=2048, transb=1,
              what="MN-major V, separate d-half regions; LBO=8192 (N-block stride), SBO=1024 (8-key stride) "
                   "[CUTLASS/ThunderKittens convention; expected PASS]"),
    "B": dict(vlayout=0, lbo=1024, sbo=8192, kstep=2048, transb=1,
              what="same smem as A, LBO/SBO roles swapped (LBO=1024, SBO=8192) [expected FAIL]"),
    "C": dict(vlayout=1, lbo=1024, sbo=2048, kstep=4096, transb=1,
              what="MN-major V, d halves interleaved per 8-key atom; LBO=1024 (N-block), SBO=2048 (8-key) "
                   "[CUTLASS convention on another storage; expected PASS]"),
    "D": dict(vlayout=1, lbo=2048, sbo=1024, kstep=4096, transb=1,
              what="same smem as C, LBO/SBO roles swapped [expected FAIL]"),
    "E": dict(vlayout=2, lbo=16, sbo=1024, kstep=32, transb=0,
              what="control: V^T stored K-major (like K), trans-b=0; isolates the P-from-registers path "
                   "[expected PASS]"),
}

# --------------------------------------------------------------------------------------------------
# CUDA source.  Only cuda_bf16.h is included; everything else is inline PTX.


def _wgmma_ss_m64n64k16() -> str:
    n_d = 32
    regs = ", ".join(f"%{i}" for i in range(n_d))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_d))
    return f'''
// D[64x64] (+)= A[64x16] (smem desc, K-major) * B[16x64] (smem desc, K-major); scale_d = 0 -> D = A*B
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[{n_d}], unsigned long long desc_a,
                                                   unsigned long long desc_b, int scale_d) {{
  asm volatile(
      "{{\\n"
      ".reg .pred p;\\n"
      "setp.ne.b32 p, %{n_d + 2}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{{{regs}}}, %{n_d}, %{n_d + 1}, p, 1, 1, 0, 0;\\n"
      "}}\\n"
      : {outs}
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}}
'''


def _wgmma_rs_m64n128k16(transb: int) -> str:
    n_d = 64
    regs = ", ".join(f"%{i}" for i in range(n_d))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_d))
    return f'''
// D[64x128] (+)= A[64x16] (registers, 4 x bf16x2) * B[16x128] (smem desc), imm-trans-b = {transb}
__device__ __forceinline__ void wgmma_m64n128k16_rs_tb{transb}(float (&d)[{n_d}], const unsigned (&a)[4],
                                                             unsigned long long desc_b, int scale_d) {{
  asm volatile(
      "{{\\n"
      ".reg .pred p;\\n"
      "setp.ne.b32 p, %{n_d + 5}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{{{regs}}}, {{%{n_d}, %{n_d + 1}, %{n_d + 2}, %{n_d + 3}}}, %{n_d + 4}, p, 1, 1, {transb};\\n"
      "}}\\n"
      : {outs}
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}}
'''


CUDA_SOURCE = r'''
#include <cuda_bf16.h>

#define SMEM_Q %(SMEM_Q)du
#define SMEM_K %(SMEM_K)du
#define SMEM_V %(SMEM_V)du
#define SMEM_USED %(SMEM_USED)du

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned long long a;
  asm("cvta.to.shared.u64 %%0, %%1;" : "=l"(a) : "l"(p));
  return (unsigned)a;
}

// 128-byte swizzle of a byte offset from a 1024-aligned base: chunk bits [4:6] ^= row bits [7:9].
__device__ __forceinline__ unsigned swz128(unsigned off) { return off ^ (((off >> 7) & 7u) << 4); }

__device__ __forceinline__ void st_shared_v4(unsigned addr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%%0], {%%1, %%2, %%3, %%4};"
               :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void st_shared_u16(unsigned addr, unsigned short v) {
  asm volatile("st.shared.u16 [%%0], %%1;" :: "r"(addr), "h"(v) : "memory");
}

// wgmma matrix descriptor (sm_90): start>>4 bits 0-13, LBO>>4 bits 16-29, SBO>>4 bits 32-45,
// base_offset bits 49-51 = 0, layout/swizzle bits 62-63: 1 = 128B swizzle.
__device__ __forceinline__ unsigned long long make_desc_sw128(unsigned saddr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((saddr & 0x3FFFFu) >> 4)
       | ((unsigned long long)((lbo & 0x3FFFFu) >> 4) << 16)
       | ((unsigned long long)((sbo & 0x3FFFFu) >> 4) << 32)
       | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence()  { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0()  { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the wgmma fence/wait.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
__device__ __forceinline__ void reg_fence(unsigned& r) { asm volatile("" : "+r"(r) :: "memory"); }

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);   // .x (low 16 bits) = lo, .y = hi
  return *reinterpret_cast<unsigned*>(&h);
}

// Unswizzled byte offset of element (key, d) of V inside the V region, per storage variant.
__device__ __forceinline__ unsigned v_lin(int vlayout, int key, int d) {
  if (vlayout == 0) return (d >> 6) * 8192u + key * 128u + (d & 63) * 2u;
  if (vlayout == 1) return (key >> 3) * 2048u + (d >> 6) * 1024u + (key & 7) * 128u + (d & 63) * 2u;
  return d * 128u + key * 2u;  // vlayout 2: V^T K-major [128 d][64 keys]
}

%(WGMMA_FUNCS)s

extern "C" __global__ void __launch_bounds__(128, 1)
probe_wgmma_kernel(const unsigned short* __restrict__ Q,   // [64][128] bf16 bits, row-major
                   const unsigned short* __restrict__ K,   // [64][128]
                   const unsigned short* __restrict__ V,   // [64][128] (key, d)
                   float* __restrict__ S_out,              // [64][64]
                   float* __restrict__ O_out,              // [64][128]
                   int vlayout, unsigned v_lbo, unsigned v_sbo, unsigned v_kstep,
                   unsigned long long* __restrict__ info)  // [8] debug words
{
  extern __shared__ unsigned char smem_raw[];
  const unsigned raw = smem_u32(smem_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  const int tid = threadIdx.x;

  // ---- fill shared memory (generic-proxy stores) ----
  for (unsigned i = tid * 16u; i < SMEM_USED; i += 128u * 16u) st_shared_v4(base + i, make_uint4(0u, 0u, 0u, 0u));
  __syncthreads();
  for (int i = tid; i < 64 * 16; i += 128) {           // 64 rows x 16 chunks of 8 bf16
    const int row = i >> 4, col = (i & 15) * 8;
    const unsigned lin = (col >> 6) * 8192u + row * 128u + (col & 63) * 2u;
    st_shared_v4(base + SMEM_Q + swz128(lin), *reinterpret_cast<const uint4*>(Q + row * 128 + col));
    st_shared_v4(base + SMEM_K + swz128(lin), *reinterpret_cast<const uint4*>(K + row * 128 + col));
  }
  if (vlayout == 2) {
    for (int i = tid; i < 64 * 128; i += 128) {
      const int key = i >> 7, d = i & 127;
      st_shared_u16(base + SMEM_V + swz128(v_lin(2, key, d)), V[i]);
    }
  } else {
    for (int i = tid; i < 64 * 16; i += 128) {
      const int key = i >> 4, d = (i & 15) * 8;
      st_shared_v4(base + SMEM_V + swz128(v_lin(vlayout, key, d)),
                   *reinterpret_cast<const uint4*>(V + key * 128 + d));
    }
  }
  // make the generic-proxy smem writes visible to the async proxy (wgmma operand reads)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();

  // ---- GEMM 1: S = Q K^T (both operands K-major from smem) ----
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) { s[i] = 0.f; reg_fence(s[i]); }
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 8; ++ks) {
    const unsigned off = (ks >> 2) * 8192u + (ks & 3) * 32u;
    const unsigned long long da = make_desc_sw128(base + SMEM_Q + off, 16u, 1024u);
    const unsigned long long db = make_desc_sw128(base + SMEM_K + off, 16u, 1024u);
    wgmma_m64n64k16_ss(s, da, db, ks > 0 ? 1 : 0);
  }
  wgmma_commit();
  wgmma_wait0();
#pragma unroll
  for (int i = 0; i < 32; ++i) reg_fence(s[i]);

  const int warp = tid >> 5, lane = tid & 31;
  const int r = warp * 16 + (lane >> 2), c0 = 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c = 8 * j + c0;
    S_out[r * 64 + c] = s[4 * j + 0];
    S_out[r * 64 + c + 1] = s[4 * j + 1];
    S_out[(r + 8) * 64 + c] = s[4 * j + 2];
    S_out[(r + 8) * 64 + c + 1] = s[4 * j + 3];
  }

  // ---- P = bf16(S): accumulator fragment -> A register fragment, k-steps of 16 keys ----
  unsigned p[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) { p[kk][i] = pack_bf16x2(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]); reg_fence(p[kk][i]); }
  }

  // ---- GEMM 2: O = P V (A from registers, B = V from smem) ----
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) { o[i] = 0.f; reg_fence(o[i]); }
  if (vlayout == 2) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n128k16_rs_tb0(o, p[kk], make_desc_sw128(base + SMEM_V + kk * v_kstep, v_lbo, v_sbo), kk > 0 ? 1 : 0);
    wgmma_commit();
  } else {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n128k16_rs_tb1(o, p[kk], make_desc_sw128(base + SMEM_V + kk * v_kstep, v_lbo, v_sbo), kk > 0 ? 1 : 0);
    wgmma_commit();
  }
  wgmma_wait0();
#pragma unroll
  for (int i = 0; i < 64; ++i) reg_fence(o[i]);

#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int c = 8 * j + c0;
    O_out[r * 128 + c] = o[4 * j + 0];
    O_out[r * 128 + c + 1] = o[4 * j + 1];
    O_out[(r + 8) * 128 + c] = o[4 * j + 2];
    O_out[(r + 8) * 128 + c + 1] = o[4 * j + 3];
  }

  if (tid == 0) {
    info[0] = raw;
    info[1] = base;
    info[2] = make_desc_sw128(base + SMEM_Q, 16u, 1024u);
    info[3] = make_desc_sw128(base + SMEM_V, v_lbo, v_sbo);
    info[4] = 0x5a5a5a5aull;  // "kernel ran to the end"
  }
}
''' % dict(SMEM_Q=SMEM_Q, SMEM_K=SMEM_K, SMEM_V=SMEM_V, SMEM_USED=SMEM_USED,
           WGMMA_FUNCS=_wgmma_ss_m64n64k16() + _wgmma_rs_m64n128k16(0) + _wgmma_rs_m64n128k16(1))


# --------------------------------------------------------------------------------------------------
# bf16 helpers (numpy uint16 bit patterns)

def f32_to_bf16_bits(x) -> np.ndarray:
    """float32 -> bf16 bits, round-to-nearest-even (inputs must be finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def bf16_bits_to_f32(b) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def desc_sw128(saddr: int, lbo: int, sbo: int) -> int:
    return (((saddr & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16) | (((sbo & 0x3FFFF) >> 4) << 32)
            | (1 << 62))


# --------------------------------------------------------------------------------------------------
# CPU self-check: the fill code's addresses vs. the canonical-layout model of what the descriptor reads.

def swz128(off):
    return off ^ (((off >> 7) & 7) << 4)


def kmajor_lin(row, col):           # mirror of the Q/K fill in the kernel
    return (col >> 6) * 8192 + row * 128 + (col & 63) * 2


def v_lin(vlayout, key, d):         # mirror of v_lin() in the kernel
    if vlayout == 0:
        return (d >> 6) * 8192 + key * 128 + (d & 63) * 2
    if vlayout == 1:
        return (key >> 3) * 2048 + (d >> 6) * 1024 + (key & 7) * 128 + (d & 63) * 2
    return d * 128 + key * 2


def model_kmajor(start, lbo, sbo, mn, k):
    """CUTLASS K-major SW128, bf16: Swizzle<3,4,3> o ((8,m),(T,2)):((8T,SBO),(1,T)); LBO unused."""
    return swz128(start + (mn % 8) * 128 + (mn // 8) * sbo + k * 2)


def model_mnmajor(start, lbo, sbo, mn, k):
    """CUTLASS MN-major SW128, bf16: Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))."""
    return swz128(start + (mn % 64) * 2 + (mn // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo)


def selfcheck(verbose=True) -> dict:
    mn = np.arange(128)[:, None]
    kk16 = np.arange(16)[None, :]
    res = {}
    # Q / K operand of GEMM 1 (64 rows), 8 k-steps
    ok = True
    for ks in range(8):
        start = (ks >> 2) * 8192 + (ks & 3) * 32
        rows = mn[:64]
        want = swz128(kmajor_lin(rows, 16 * ks + kk16))
        got = model_kmajor(start, 16, 1024, rows, kk16)
        ok &= bool(np.array_equal(want, got))
    res["QK"] = ok
    for name, v in VARIANTS.items():
        ok = True
        for kk in range(4):
            start = kk * v["kstep"]
            want = swz128(v_lin(v["vlayout"], 16 * kk + kk16, mn))
            model = model_kmajor if v["transb"] == 0 else model_mnmajor
            got = model(start, v["lbo"], v["sbo"], mn, kk16)
            ok &= bool(np.array_equal(want, got))
        res[name] = ok
    # fragment bookkeeping: accumulator layout -> A-fragment layout must be the identity on P
    P = np.arange(64 * 64).reshape(64, 64)
    frag_ok = True
    for tid in range(128):
        w, l = tid // 32, tid % 32
        r, c0 = 16 * w + l // 4, 2 * (l % 4)
        d = np.empty(32, dtype=np.int64)
        for j in range(8):
            c = 8 * j + c0
            d[4 * j:4 * j + 4] = P[r, c], P[r, c + 1], P[r + 8, c], P[r + 8, c + 1]
        for kk in range(4):
            a = [(d[8 * kk + 2 * i], d[8 * kk + 2 * i + 1]) for i in range(4)]
            kb = 16 * kk
            expect = [(P[r, kb + c0], P[r, kb + c0 + 1]), (P[r + 8, kb + c0], P[r + 8, kb + c0 + 1]),
                      (P[r, kb + c0 + 8], P[r, kb + c0 + 9]), (P[r + 8, kb + c0 + 8], P[r + 8, kb + c0 + 9])]
            frag_ok &= all(tuple(x) == tuple(y) for x, y in zip(a, expect))
    res["frag"] = frag_ok
    if verbose:
        print("CPU self-check (fill addresses == CUTLASS canonical-layout model of the descriptor):")
        print(f"  Q/K K-major SW128 (LBO=16, SBO=1024, +32 B/k-step): {'ok' if res['QK'] else 'MISMATCH'}")
        for name, v in VARIANTS.items():
            print(f"  V variant {name}: {'model-consistent' if res[name] else 'NOT model-consistent'}"
                  f"  ({v['what']})")
        print(f"  S accumulator -> P A-fragment mapping: {'ok' if frag_ok else 'MISMATCH'}")
    return res


def emulate(name, seed=1234):
    """CPU emulation of the kernel under the CUTLASS-convention hypothesis: build the smem image exactly as
    the fill code does, read the operands back through the canonical-layout model of each descriptor,
    compute in float32, and return (S, O) as the GPU would.  Exercises the host-side checking code."""
    v = VARIANTS[name]
    q, k, vv = make_inputs(seed)
    smem = np.zeros(SMEM_USED // 2, dtype=np.uint16)
    rows, cols = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    smem[(SMEM_Q + swz128(kmajor_lin(rows, cols))) // 2] = q
    smem[(SMEM_K + swz128(kmajor_lin(rows, cols))) // 2] = k
    smem[(SMEM_V + swz128(v_lin(v["vlayout"], rows, cols))) // 2] = vv
    r64, k16 = np.arange(64)[:, None], np.arange(16)[None, :]
    Qr, Kr = np.zeros((64, 128), np.uint16), np.zeros((64, 128), np.uint16)
    for ks in range(8):
        start = (ks >> 2) * 8192 + (ks & 3) * 32
        Qr[:, 16 * ks:16 * ks + 16] = smem[(SMEM_Q + model_kmajor(start, 16, 1024, r64, k16)) // 2]
        Kr[:, 16 * ks:16 * ks + 16] = smem[(SMEM_K + model_kmajor(start, 16, 1024, r64, k16)) // 2]
    n128 = np.arange(128)[:, None]
    Vr = np.zeros((64, 128), np.uint16)
    model = model_kmajor if v["transb"] == 0 else model_mnmajor
    for kk in range(4):
        addr = SMEM_V + model(kk * v["kstep"], v["lbo"], v["sbo"], n128, k16)   # [n][k]
        Vr[16 * kk:16 * kk + 16, :] = smem[(addr % SMEM_USED) // 2].T
    S = bf16_bits_to_f32(Qr) @ bf16_bits_to_f32(Kr).T
    O = bf16_bits_to_f32(f32_to_bf16_bits(S)) @ bf16_bits_to_f32(Vr)
    return S.astype(np.float32), O.astype(np.float32), (q, k, vv)


def emulate_all():
    print("CPU emulation (CUTLASS-convention hypothesis) through the same checks the GPU run uses:")
    for name in VARIANTS:
        S, O, (q, k, vv) = emulate(name)
        rs, ro, re = compare(S, O, q, k, vv, verbose=False)
        print(f"  {name}: S {'PASS' if rs['ok'] else 'FAIL'} ({rs['maxerr']:.1e})   "
              f"O {'PASS' if ro['ok'] else 'FAIL'} ({ro['maxerr']:.1e})   e2e {'PASS' if re['ok'] else 'FAIL'}")


# --------------------------------------------------------------------------------------------------
# compile checks (NVRTC through cpattn.raw_kernels.nvrtc, as tools/nvrtc_check.py runs it in CI)

def compile_only(args) -> int:
    res = selfcheck()
    emulate_all()
    failed = not (res["QK"] and res["frag"] and res["A"] and res["C"] and res["E"])
    outdir = args.outdir or tempfile.mkdtemp(prefix="probe_wgmma_")
    os.makedirs(outdir, exist_ok=True)
    cu = os.path.join(outdir, "probe_wgmma.cu")
    with open(cu, "w") as f:
        f.write(CUDA_SOURCE)
    print(f"\nwrote {cu}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: nvcc compile check skipped")
    else:
        cmd = [nvcc, "-std=c++17", "-arch=sm_90a", "-cubin", "--ptxas-options=-v", "-o",
               os.path.join(outdir, "probe_wgmma.cubin"), cu]
        print("$ " + " ".join(cmd))
        p = subprocess.run(cmd, capture_output=True, text=True)
        print((p.stdout + p.stderr).strip())
        print(f"nvcc rc={p.returncode}")
        failed |= p.returncode != 0
    path = nvrtc.find_libnvrtc()
    if path is None:
        print("libnvrtc not found: NVRTC compile check skipped")
    else:
        incs = nvrtc.cuda_include_dirs(path)
        opts = list(NVRTC_OPTIONS) + ([f"-I{incs[0]}"] if incs else [])
        rc, log = nvrtc.compile_program(nvrtc.load_libnvrtc(path), CUDA_SOURCE, [], options=opts)
        print(f"NVRTC -arch=sm_90a [{os.path.basename(path)}]: rc={rc}" + (f"\n{log.strip()}" if log.strip() else ""))
        failed |= rc != 0
    print("\ncompile-only:", "FAIL" if failed else "OK")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# GPU run

def build_kernel(cp):
    """The probe kernel through CuPy's RawModule, as cpattn.kernels compiles its own."""
    mod = cp.RawModule(code=CUDA_SOURCE, options=NVRTC_OPTIONS)
    fn = mod.get_function(KERNEL_NAME)
    fn.max_dynamic_shared_size_bytes = SMEM_DYN_BYTES
    return fn, "cupy.RawModule(code, options=%r)" % (NVRTC_OPTIONS,), mod


def make_inputs(seed=1234):
    rng = np.random.default_rng(seed)
    q = f32_to_bf16_bits(rng.standard_normal((64, 128)).astype(np.float32))
    k = f32_to_bf16_bits(rng.standard_normal((64, 128)).astype(np.float32))
    v = f32_to_bf16_bits(rng.standard_normal((64, 128)).astype(np.float32))
    return q, k, v


def block_map(err, tol, br, bc):
    """Coarse map of where the errors are: 'X' = block has an element over tol, '.' otherwise."""
    R, C = err.shape
    lines = []
    for i in range(0, R, br):
        lines.append("    " + "".join("X" if (err[i:i + br, j:j + bc] > tol).any() or
                                      np.isnan(err[i:i + br, j:j + bc]).any() else "."
                                      for j in range(0, C, bc)))
    return "\n".join(lines)


def check(name, got, ref, absref, rel, verbose):
    err = np.abs(got.astype(np.float64) - ref)
    tol = rel * float(absref.max()) + 1e-6
    n_nan = int(np.isnan(got).sum())
    maxerr = float(np.nanmax(err)) if n_nan < got.size else float("nan")
    ok = n_nan == 0 and maxerr <= tol
    n_bad = int(((err > tol) | np.isnan(err)).sum())
    line = (f"{name}: {'PASS' if ok else 'FAIL'}  max|err|={maxerr:.3e}  tol={tol:.3e}  "
            f"max|ref|={float(np.abs(ref).max()):.3e}  bad={n_bad}/{got.size}  nan={n_nan}")
    if verbose:
        print(line)
        if not ok:
            print("  error map (8x8-element blocks, 'X' = some element over tol; rows down, cols across):")
            print(block_map(err, tol, 8, 8))
            bad = np.argwhere((err > tol) | np.isnan(err))[:6]
            for r, c in bad:
                print(f"    ({r},{c}) got {float(got[r, c]):.6g} ref {ref[r, c]:.6g}")
    return dict(ok=ok, maxerr=maxerr, tol=tol, bad=n_bad, nan=n_nan)


def run_variant(cp, fn, name, verbose=True, seed=1234):
    v = VARIANTS[name]
    q, k, vv = make_inputs(seed)
    dq, dk, dv = cp.asarray(q), cp.asarray(k), cp.asarray(vv)
    dS = cp.full((64, 64), np.nan, dtype=cp.float32)     # poison: any element not written stays NaN
    dO = cp.full((64, 128), np.nan, dtype=cp.float32)
    dinfo = cp.zeros(8, dtype=cp.uint64)
    fn((1,), (128,), (dq, dk, dv, dS, dO, np.int32(v["vlayout"]), np.uint32(v["lbo"]), np.uint32(v["sbo"]),
                      np.uint32(v["kstep"]), dinfo), shared_mem=SMEM_DYN_BYTES)
    cp.cuda.runtime.deviceSynchronize()
    S, O, info = cp.asnumpy(dS), cp.asnumpy(dO), cp.asnumpy(dinfo)
    if verbose:
        print(f"--- variant {name}: {v['what']}")
        print(f"    vlayout={v['vlayout']} LBO={v['lbo']} SBO={v['sbo']} kstep={v['kstep']} trans-b={v['transb']}")
        base = int(info[1])
        print(f"    smem raw=0x{int(info[0]):x} base=0x{base:x} (base%1024={base % 1024}), ran_to_end="
              f"{int(info[4]) == 0x5a5a5a5a}")
        for idx, (lbl, want) in ((2, ("descQ", desc_sw128(base + SMEM_Q, 16, 1024))),
                                 (3, ("descV", desc_sw128(base + SMEM_V, v["lbo"], v["sbo"])))):
            print(f"    {lbl} device=0x{int(info[idx]):016x} host=0x{want:016x} "
                  f"{'same' if int(info[idx]) == want else 'DIFFERENT'}")
    rs, ro, ro_full = compare(S, O, q, k, vv, verbose)
    return dict(variant=name, S=rs, O=ro, O_e2e=ro_full, base_mod_1024=int(info[1]) % 1024,
                ran=int(info[4]) == 0x5a5a5a5a)


def compare(S, O, q, k, vv, verbose):
    """float64 references; returns (GEMM1 result, GEMM2 result, end-to-end result)."""
    Qf, Kf, Vf = (bf16_bits_to_f32(x).astype(np.float64) for x in (q, k, vv))
    S_ref = Qf @ Kf.T
    P_ref = bf16_bits_to_f32(f32_to_bf16_bits(S_ref.astype(np.float32))).astype(np.float64)
    O_ref = P_ref @ Vf
    rs = check("GEMM1 S = Q K^T     (Q, K K-major SW128 smem desc)", S, S_ref, np.abs(Qf) @ np.abs(Kf).T,
               1e-4, verbose)
    # GEMM 2 checked against the P the kernel really used (bf16 of its own S): isolates GEMM 2
    # from GEMM 1 (NaNs in S, if any, are zeroed here).
    S_safe = np.where(np.isnan(S), 0.0, S).astype(np.float32)
    P_gpu = bf16_bits_to_f32(f32_to_bf16_bits(S_safe)).astype(np.float64)
    ro = check("GEMM2 O = bf16(S_gpu) V (P regs, V smem desc)", O, P_gpu @ Vf, np.abs(P_gpu) @ np.abs(Vf),
               1e-4, verbose)
    ro_full = check("end-to-end O vs bf16(S_ref) V (loose, bf16 re-rounding)", O, O_ref,
                    np.abs(P_ref) @ np.abs(Vf), 1e-2, verbose)
    return rs, ro, ro_full


def print_table(results):
    print("\n==== wgmma probe summary ====")
    print(f"{'var':<4}{'GEMM1 S (QK^T)':<26}{'GEMM2 O (P.V)':<26}{'e2e O':<10} V layout / descriptor")
    for name, v in VARIANTS.items():
        r = results.get(name)
        if r is None or "error" in r:
            err = (r or {}).get("error", "not run")
            print(f"{name:<4}{'ERROR':<26}{'ERROR':<26}{'-':<10} {v['what']}\n      {err[:300]}")
            continue
        fmt = lambda x: f"{'PASS' if x['ok'] else 'FAIL'} ({x['maxerr']:.1e})"  # noqa: E731
        print(f"{name:<4}{fmt(r['S']):<26}{fmt(r['O']):<26}{('PASS' if r['O_e2e']['ok'] else 'FAIL'):<10} "
              f"{v['what']}")
    passing = [n for n in VARIANTS if results.get(n) and "error" not in results[n]
               and results[n]["S"]["ok"] and results[n]["O"]["ok"]]
    print(f"variants passing both GEMMs: {', '.join(passing) if passing else 'NONE'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="CPU: selfcheck + nvcc/NVRTC compile, no GPU")
    ap.add_argument("--selfcheck", action="store_true", help="CPU: layout model self-check only")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant in this process")
    ap.add_argument("--inprocess", action="store_true", help="run all variants in this process")
    ap.add_argument("--outdir", help="--compile-only: where to write probe_wgmma.cu/.cubin (default: temp dir)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    if args.selfcheck:
        res = selfcheck()
        emulate_all()
        return 0 if (res["QK"] and res["frag"]) else 1
    if args.compile_only:
        return compile_only(args)

    if args.variant or args.inprocess:
        import cupy as cp
        fn, how, _mod = build_kernel(cp)
        dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        print(f"device: {dev['name'].decode() if isinstance(dev['name'], bytes) else dev['name']} "
              f"cc {dev['major']}.{dev['minor']}; compiled via {how}")
        names = [args.variant] if args.variant else list(VARIANTS)
        results = {}
        for n in names:
            try:
                results[n] = run_variant(cp, fn, n, verbose=True, seed=args.seed)
            except Exception as e:  # noqa: BLE001
                results[n] = dict(variant=n, error=f"{type(e).__name__}: {e}")
                print(f"--- variant {n}: ERROR {type(e).__name__}: {e}")
        if len(names) > 1:
            print_table(results)
        print("JSON:" + json.dumps(dict(results=results, compiled_via=how)))
        ok = all("error" not in results[n] and results[n]["S"]["ok"] and results[n]["O"]["ok"] for n in names)
        return 0 if ok else 1

    # default: every variant in its own process (a bad descriptor can fault and poison the context)
    selfcheck()
    results, how = {}, None
    for n in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", n, "--seed", str(args.seed)]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            out = p.stdout + p.stderr
            print("\n".join(x for x in out.rstrip().splitlines() if not x.startswith("JSON:")))
            line = [x for x in p.stdout.splitlines() if x.startswith("JSON:")]
            if line:
                d = json.loads(line[-1][5:])
                results[n] = d["results"][n]
                how = d["compiled_via"]
            else:
                results[n] = dict(error=f"rc={p.returncode}; " + out.strip().splitlines()[-1] if out.strip()
                                  else f"rc={p.returncode}")
        except subprocess.TimeoutExpired:
            results[n] = dict(error="timeout (300 s): hang?")
    if how:
        print(f"\ncompiled via: {how}")
    print_table(results)
    a = results.get("A", {})
    return 0 if ("error" not in a and a.get("S", {}).get("ok") and a.get("O", {}).get("ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
