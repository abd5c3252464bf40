// CompactAttention's paged prefill (pass 7) on Hopper warpgroup MMA (wgmma, sm_90a).
//
// Same contract as paged_prefill in compact_attention.cu (units of 128 rows of a table's row
// space, pages read in place, bottom-right causal mask on the chunk's own pages, o and lse out);
// the difference is the tensor-core path. Two warpgroups per block, 64 query rows each:
//   S[64 x TK] = Q K^T   wgmma m64nTKk16, Q and K from shared memory (K-major descriptors)
//   O[64 x D] += P V     wgmma m64nDk16, P from registers (the S fragment, rounded to T),
//                        V from shared memory (MN-major descriptor: head dim contiguous)
// Shared-memory tiles use the 128-byte swizzle: a tile of R rows x D columns is D/64 regions of
// R rows x 128 bytes; the 16-byte chunk j of row r sits at chunk (j ^ r % 8) of its row, so
// every 8-row x 128-byte atom is bank-conflict free for cp.async writes and wgmma reads.
// Keys stream in steps of TK = 128 rows (128 / C pages, or one page of 128) through NST
// cp.async stages: 3 for D = 128 (225 KB of shared memory, one block per SM), 4 for D = 64.
// Stages are handed over by mbarriers ("full": every thread's copies landed; "empty": both
// warpgroups are done with it), never by a block-wide barrier, so the two warpgroups drift
// apart and one's softmax overlaps the other's wgmmas. Per step i: issue S(i+1) and P(i)V(i),
// refill the stage of step i-1, softmax of S(i+1) while P(i)V(i) runs, rescale O.
#include "compact_attention.cuh"
#include "wgmma.cuh"

namespace cpattn {

// a unit (CPATTN_PREFILL_ROWS query rows, as paged_prefill's) is two warpgroups of 64 rows
static_assert(CPATTN_WG_THREADS == 256 && CPATTN_PREFILL_ROWS == 64 * (CPATTN_WG_THREADS / 128),
              "paged_prefill_wg is written for two warpgroups of 64 rows");

// Dynamic shared memory (prefill_wg_smem_bytes in cpattn/kernels.py, checked equal at compile time)
template <int D, int C>
struct WgSmem {
  static constexpr int TK = CPATTN_WG_KEYS;  // keys per step
  static constexpr int NST = D == 64 ? CPATTN_WG_STAGES_D64 : CPATTN_WG_STAGES_D128;  // cp.async stages
  static constexpr int q_bytes = CPATTN_PREFILL_ROWS * D * 2;
  static constexpr int tile_bytes = TK * D * 2;  // one K or V step
  static constexpr int bytes = 1024 + q_bytes + 2 * NST * tile_bytes + 2 * NST * 8;  // slack; mbarriers
};

// mbarriers (shared memory, CTA scope): stage handoff without a block-wide barrier
__device__ __forceinline__ void mbar_init(u64* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  u64 state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
}
// arrives when every earlier cp.async of this thread has landed (counted in the init count)
__device__ __forceinline__ void mbar_arrive_cp_async(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {  // until phase `parity` completes
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n}\n" :: "r"(smem_addr(bar)), "r"(parity) : "memory");
}
// cp.async of 16 bytes, or 16 zero bytes when !real (src is then not read)
__device__ __forceinline__ void cp_async16_or_zero(void* smem, const void* gmem, bool real) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_addr(smem)), "l"(gmem),
               "r"(real ? 16 : 0));
}

// byte offset of 16-byte chunk j (columns 8j .. 8j+7) of row r in a swizzled tile of R rows
template <int R>
__device__ __forceinline__ int swz(int r, int j) {
  return (j >> 3) * (R * 128) + r * 128 + (((j & 7) ^ (r & 7)) << 4);
}

// Accumulator registers of an in-flight wgmma: this file touches them only after the
// wgmma_wait that retires them. ptxas checks that (a read or write inside a wgmma pipeline
// stage makes it serialise the wgmmas and print C7513/C7514, which tools/compile_kernels.py
// treats as an error), so no register fences are needed; empty asm "+f" fences here made
// NVVM emit copies that ptxas counted as such reads.

// The body, for unit u (q, out, lse_out: its chunk's rows).
template <typename T, int D, int C>
__device__ __forceinline__ void paged_prefill_wg_unit(
    const PagedUnit& u, const T* __restrict__ q, const T* __restrict__ k_pool, const T* __restrict__ v_pool,
    long long layer_page0, const int* __restrict__ indices, int num_q_heads, int num_kv_heads, float scale_log2,
    T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  constexpr int TK = WgSmem<D, C>::TK;  // keys per pipeline step
  constexpr int NST = WgSmem<D, C>::NST;
  constexpr int TILE = WgSmem<D, C>::tile_bytes;
  constexpr int CH = D / 8;              // 16-byte chunks per row
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sQ = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // [2][64 rows] swizzled
  unsigned char* sK = sQ + CPATTN_PREFILL_ROWS * D * 2;  // [NST] tiles
  unsigned char* sV = sK + NST * TILE;       // [NST] tiles
  u64* full = reinterpret_cast<u64*>(sV + NST * TILE);  // [NST]: stage loaded (every thread's copies landed)
  u64* empty = full + NST;                              // [NST]: stage consumed by both warpgroups
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int row_count = u.row_count, lim_unit = u.lim_unit, lim_min = u.lim_min;
  const int nsteps = (lim_unit + TK - 1) / TK;

  if (tid < NST) {
    mbar_init(full + tid, CPATTN_WG_THREADS);
    mbar_init(empty + tid, CPATTN_WG_THREADS);
  }
  __syncthreads();
  // Q rows -> shared memory (zeros past row_count); stage 0's barrier covers these copies too.
  // Every shared-memory write goes through cp.async (zeros included), so the mbarriers order
  // them all.
  for (int e = tid; e < CPATTN_PREFILL_ROWS * CH; e += CPATTN_WG_THREADS) {
    const int r = e / CH, j = e % CH;
    unsigned char* dst = sQ + (r >> 6) * (64 * D * 2) + swz<64>(r & 63, j);
    cp_async16_or_zero(dst, q + u.index(min(r, row_count - 1), num_q_heads) * D + j * 8, r < row_count);
  }
  // this thread's two rows (accumulator fragment rows) and their key limits
  const int r_lo = wg * 64 + warp * 16 + (lane >> 2);
  int lim[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = r_lo + 8 * hh;
    lim[hh] = u.limit(r);
  }
  // Keys below lim_unit all exist (the last own page is cut at n, and the unit's last token < n).
  auto step_valid = [&](int i) { return min(TK, lim_unit - i * TK); };  // key rows of step i any row may read
  auto load_step = [&](int i) {  // step i's K and V rows -> stage i % NST (rows >= valid zeroed)
    constexpr int RSTEP = CPATTN_WG_THREADS / CH;    // rows between one thread's rows (a multiple of 8)
    constexpr int RPP = C < TK ? C : TK;      // rows per page (C <= TK: whole pages)
    const int valid = step_valid(i), st = i % NST;
    const int j = tid % CH, r0 = tid / CH;    // this thread's 16-byte column and first row
    unsigned char* dk = sK + st * TILE + swz<TK>(r0, j);  // row r0 + x sits x * 128 bytes further
    unsigned char* dv = sV + st * TILE + swz<TK>(r0, j);
#pragma unroll
    for (int pg = 0; pg < TK / RPP; ++pg) {
      const int key0 = i * TK + pg * RPP;  // a page's first key: one page-id load per page
      const long long page =
          key0 < lim_unit ? layer_page0 + (long long)indices[u.p0 + key0 / C] * num_kv_heads + u.kvh : 0;
      const T* gk = k_pool + (page * C + r0) * D + j * 8;
      const T* gv = v_pool + (page * C + r0) * D + j * 8;
#pragma unroll
      for (int rr = 0; rr < RPP; rr += RSTEP) {
        const int r = pg * RPP + r0 + rr, off = (pg * RPP + rr) * 128;
        if (RPP < RSTEP && r0 + rr >= RPP) continue;  // (small pages: fewer rows than threads' rows)
        // rows >= valid: zeros (stale pool rows may hold anything; P is 0 there, V must be finite)
        cp_async16_or_zero(dk + off, gk + rr * D, r < valid);
        cp_async16_or_zero(dv + off, gv + rr * D, r < valid);
      }
    }
  };
  // prologue: steps 0 .. NST-2 in flight (one cp.async group each; Q rides with step 0)
#pragma unroll
  for (int i = 0; i < NST - 1; ++i) {
    if (i < nsteps) {
      load_step(i);
      mbar_arrive_cp_async(full + i);
    }
  }

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float sc[TK / 2];      // S of one step (fp32 accumulator fragment)
  u32 pa[TK / 16][4];    // P of one step, rounded to T: the A operand of P V, k-steps of 16 keys
  const u32 q_base = smem_addr(sQ + wg * (64 * D * 2));

  // Online softmax of step i's scores in `sc` (masked on boundary steps), in log2 units: updates
  // m and l, leaves the weights in `sc` and returns the factors O must be rescaled by.
  auto softmax = [&](int i, float& c0, float& c1) {
    const int valid = step_valid(i), key_base = i * TK;
    const bool full = valid == TK && (i + 1) * TK <= lim_min;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < TK / 8; ++j) {
      if (!full) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = j * 8 + (lane & 3) * 2 + (e & 1);
          if (!(key < valid && key_base + key < lim[e >> 1])) sc[4 * j + e] = -INFINITY;
        }
      }
      mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
      mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
    }
    mx0 = quad_max(mx0 * scale_log2);
    mx1 = quad_max(mx1 * scale_log2);
    const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
    const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
    c0 = exp2f(m[0] - base0);
    c1 = exp2f(m[1] - base1);
    m[0] = mn0;
    m[1] = mn1;
    l[0] *= c0;
    l[1] *= c1;
#pragma unroll
    for (int j = 0; j < TK / 8; ++j) {
      sc[4 * j] = fast_exp2(fmaf(sc[4 * j], scale_log2, -base0));
      sc[4 * j + 1] = fast_exp2(fmaf(sc[4 * j + 1], scale_log2, -base0));
      sc[4 * j + 2] = fast_exp2(fmaf(sc[4 * j + 2], scale_log2, -base1));
      sc[4 * j + 3] = fast_exp2(fmaf(sc[4 * j + 3], scale_log2, -base1));
      l[0] += sc[4 * j] + sc[4 * j + 1];
      l[1] += sc[4 * j + 2] + sc[4 * j + 3];
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) pa[kk][e] = Pack<T>::two(sc[8 * kk + 2 * e], sc[8 * kk + 2 * e + 1]);
  };
  // S = Q K^T of step i: D in k-steps of 16, four per 128-byte region. Every operand register
  // (descriptors, P) is defined before wgmma_fence: ptxas serialises the wgmma pipeline when an
  // operand or accumulator is touched between an issue and the wait that retires it.
  u64 da[D / 16];  // Q's descriptors: the same every step
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) da[kk] = smem_desc(q_base + (kk >> 2) * (64 * 128) + (kk & 3) * 32, 16, 1024);
  auto s_desc = [&](int i, u64 (&db)[D / 16]) {
    const u64 d0 = smem_desc(smem_addr(sK + (i % NST) * TILE), 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) db[kk] = d0 + (((kk >> 2) * (TK * 128) + (kk & 3) * 32) >> 4);
  };

  auto v_desc = [&](int i, u64 (&dv)[TK / 16]) {  // V of step i: k-steps of 16 keys; 64-column regions TK*128 B apart
    const u64 d0 = smem_desc(smem_addr(sV + (i % NST) * TILE), TK * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk) dv[kk] = d0 + ((kk * (16 * 128)) >> 4);  // (no carry: < 256 KB)
  };

  if (nsteps > 0) {  // S_0 -> P_0
    u64 db[D / 16];
    s_desc(0, db);
    mbar_wait(full, 0);
    fence_proxy_async();  // generic-proxy (cp.async) writes -> visible to wgmma
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Wgmma<T, TK>::ss(sc, da[kk], db[kk], kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    float c0, c1;
    softmax(0, c0, c1);
    pack_p();
  }
  // Step i < nsteps-1: issue S_{i+1} = Q K_{i+1}^T and O += P_i V_i together; the softmax of
  // S_{i+1} runs on this warpgroup's ALUs while the tensor cores finish P_i V_i; then O is
  // rescaled. (No branch around a wgmma inside the loop: ptxas must see which group each wait
  // retires, or it serialises them.) The last step, peeled below, has only P V.
  for (int i = 0; i < nsteps - 1; ++i) {
    mbar_wait(full + (i + 1) % NST, ((i + 1) / NST) & 1);  // step i+1 has landed (everyone's copies)
    fence_proxy_async();
    u64 db[D / 16], dv[TK / 16];
    s_desc(i + 1, db);
    v_desc(i, dv);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Wgmma<T, TK>::ss(sc, da[kk], db[kk], kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk) Wgmma<T, D>::rs(o, pa[kk], dv[kk], 1);
    wgmma_commit();
    // refill the stage of step i-1 (once both warpgroups are done with it) while the tensor
    // cores work: no block-wide barrier, so a warpgroup never waits for the other's softmax
    if (i + NST - 1 < nsteps) {
      if (i >= 1) mbar_wait(empty + (i - 1) % NST, ((i - 1) / NST) & 1);
      load_step(i + NST - 1);
      mbar_arrive_cp_async(full + (i + NST - 1) % NST);
    }
    wgmma_wait<1>();  // S_{i+1} (the older group) is done; P_i V_i may still run
    float c0, c1;
    softmax(i + 1, c0, c1);
    wgmma_wait<0>();
    mbar_arrive(empty + i % NST);  // S_i and P_i V_i are done: this thread is through with stage i
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j] *= c0; o[4 * j + 1] *= c0; o[4 * j + 2] *= c1; o[4 * j + 3] *= c1;
    }
    pack_p();
  }
  if (nsteps > 0) {  // the last step's P V (its data was waited for by the step before, or S_0)
    u64 dv[TK / 16];
    v_desc(nsteps - 1, dv);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk) Wgmma<T, D>::rs(o, pa[kk], dv[kk], 1);
    wgmma_commit();
    wgmma_wait<0>();
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float lsum = quad_sum(l[hh]);
    const int r = r_lo + 8 * hh;
    if (r >= row_count) continue;
    const long long row = u.index(r, num_q_heads);
    store_state_row<D>(out + row * D, lse_out + row, write_lse, m[hh], lsum,
                       [&](int j) { return make_float2(o[4 * j + 2 * hh], o[4 * j + 2 * hh + 1]); });
  }
}

template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_WG_THREADS, 1) paged_prefill_wg(
    const T* __restrict__ q,          // [n, Hq, D]
    const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ units,    // [U, 2]: table, row0
    const int* __restrict__ indptr, const int* __restrict__ indices,
    int n, int q_tile, int num_q_heads, int num_kv_heads, int G, int s, int own_total,
    float scale_log2, T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  const PagedUnit u = paged_unit<C>(units, indptr, n, q_tile, num_kv_heads, G, s, own_total);
  paged_prefill_wg_unit<T, D, C>(u, q, k_pool, v_pool, layer_page0, indices, num_q_heads, num_kv_heads, scale_log2,
                                 out, lse_out, write_lse);
}

// Batched (paged_prefill_varlen's contract in compact_attention.cu): units over the batch's
// tables, q, o and lse packed, each unit's chunk at its record's SQ_ROW0.
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_WG_THREADS, 1) paged_prefill_wg_varlen(
    const T* __restrict__ q, const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ units, const int* __restrict__ indptr, const int* __restrict__ indices,
    const int* __restrict__ seqs, int num_seqs, const int* __restrict__ table_seq,
    int num_q_heads, int num_kv_heads, int G, int s, float scale_log2,
    T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  const UnitAt at = paged_unit_varlen<C>(units, indptr, table_seq, seqs, num_seqs, num_kv_heads, G, s);
  const long long r0 = at.row0;
  paged_prefill_wg_unit<T, D, C>(at.u, q + r0 * num_q_heads * D, k_pool, v_pool, layer_page0, indices, num_q_heads,
                                 num_kv_heads, scale_log2, out + r0 * num_q_heads * D,
                                 write_lse ? lse_out + r0 * num_q_heads : lse_out, write_lse);
}

}  // namespace cpattn
