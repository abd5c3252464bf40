// ChunkAttention decode: the two-phase partition as one "attend" launch plus one "merge" launch.
//
// Both phases are the same computation on different rows and keys, so one kernel runs both:
// a *unit* is (a list of chunks, up to 128 query rows, one kv head).
//   phase 1 (chunk-first):    chunks = a shared segment piece, rows = (sequences of the piece's
//                             batch range) x (query heads of the kv head), up to 128 rows per
//                             unit (64 at chunk size 128)
//   phase 2 (sequence-first): chunks = one private item of one sequence, rows = the group's heads
// Every unit emits one fp32 attention state (o, lse) per row; `chunk_merge` then merges the
// states on each sequence's path (docs/design.md, "Attention state and merge"). Running both phases
// in one grid keeps the GPU full with no tail between them.
//
// Tiles: 4 warps; Q K^T and P V on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate). Units of 65-128 rows give each warp 32 rows (two mma tiles per K/V fragment,
// attend_step_rt2); units of up to 64 rows give each warp 16 rows (KS=1) or, when the unit has
// few rows, split its keys over the warps (KS=2 or 4, partial states merged through shared
// memory at the end). K and V pages stream through a 2-stage cp.async pipeline
// (stream_pages). Shared-memory rows are padded by 16 bytes, which makes every ldmatrix
// conflict-free.
//
// Multi-token decode (queries_per_seq = k > 1; docs/design.md, "Multi-token decode"): a
// sequence has k query rows per query head, rows (sequence, query j, head) in that order; query
// j of a sequence of length L sees positions < L - k and the new positions L - k + i whose bit
// i is set in its tree bits (causal: bits 0..j). U_LEN_MINUS then holds every unit's first key
// position; each Q row's padding holds (L - k, bits) of its row, and only pages that reach a
// row's new tokens are masked (`Masked` instantiations). The multi-token code is compiled only
// into chunk_attend_multi / chunk_merge_multi (Multi = true); chunk_attend / chunk_merge
// (Multi = false) are the one-query kernels with none of it, and the launcher picks them for
// plans of one query per sequence and no tree mask.
//
// Batch-invariant decode (docs/design.md, "Batch-invariant decode"): chunk_attend_invariant is
// the multi-token body (Invariant = true) with one fixed arithmetic per row: every unit (the
// planner's fixed key blocks, at most invariant_rows(C, k) rows: cpattn/kernels.py) splits its
// keys over the warps by a rule of (C, k) alone (k = 1: KS = 4 at C >= 64, 2 at 32, 1 at 16;
// k > 1: KS = 1; never the two-tile path), so every row folds its keys the same way in every unit. An mma.sync output row depends only on
// its own A row, so a row's state is the same bits whatever other rows share its tile: a block
// read as a shared piece or as one sequence's item gives each sequence the same state.
#include "attend_core.cuh"

namespace cpattn {

// The unit record: int32 [num_units][kUnitFields], fields in the order of UNIT_FIELDS in
// cpattn/kernels.py (tests/test_kernel_sources.py compares the two lists).
enum {
  U_CHUNK_BEGIN,  // first entry of this unit in chunk_list
  U_CHUNK_END,
  U_LEN_SLOT,     // -1: every chunk full; else keys = slot_lens[slot] - U_LEN_MINUS
  U_LEN_MINUS,    // (k > 1: every unit's first key position in its sequence)
  U_POS_BEGIN,    // batch position (DFS order) of row 0 of the unit's row space
  U_ROW0,         // first row of this unit within that row space
  U_ROW_COUNT,    // rows in this unit (<= CPATTN_DECODE_ROWS; phase-1 units <= QRows<C>)
  U_KV_HEAD,
  U_OUT_BASE,     // state row of the row space's first sequence
  kUnitFields
};
static_assert(kUnitFields == CPATTN_UNIT_WIDTH, "the unit record of cpattn/kernels.py has other fields");
// the tiles below are 4 warps of 16 rows (one-tile units) or 32 rows (two-tile units)
static_assert(CPATTN_THREADS == 128 && CPATTN_DECODE_ROWS == 64 && CPATTN_DECODE_WIDE_ROWS == 128,
              "chunk_attend's tiles are written for 4 warps");

// Phase-1 units of more than CPATTN_DECODE_ROWS rows (small pages) take the two-tile path.
template <int C>
struct QRows {
  static constexpr int value = C <= CPATTN_DECODE_WIDE_MAX_CHUNK ? CPATTN_DECODE_WIDE_ROWS : CPATTN_DECODE_ROWS;
};

// Dynamic shared memory of chunk_attend (decode_smem_bytes in cpattn/kernels.py, checked equal
// at compile time): the Q tile, then two K/V stages of one page, rows padded by 16 bytes; the
// key-split warps' partial states (KS > 1, C >= 32) overlay the K/V stages.
template <int D, int C>
struct DecodeSmem {
  static constexpr int LD = D + 8;
  static constexpr int q_bytes = QRows<C>::value * LD * 2;
  static constexpr int kv_bytes = 2 * 2 * C * LD * 2;
  static constexpr int split_bytes = C >= 32 ? 4 * (16 * D + 32) * 4 : 0;
  static constexpr int bytes = q_bytes + (kv_bytes > split_bytes ? kv_bytes : split_bytes);
};

// The 2-stage cp.async ring over a unit's pages: page i + 1 loads while step(i, K, V, valid)
// folds page i (keys [i*C, i*C + valid) of the unit; rows past `valid` are zero-filled).
template <typename T, int D, int C, typename Step>
__device__ __forceinline__ void stream_pages(const T* __restrict__ k_pool, const T* __restrict__ v_pool,
                                             long long layer_page0, const int* __restrict__ chunk_list, int cb,
                                             int nk, int kvh, int num_kv_heads, T* sK, T* sV, Step step) {
  constexpr int LD = D + 8;
  const int tid = threadIdx.x;
  const int nchunks = (nk + C - 1) / C;
  auto page = [&](int i) { return layer_page0 + (long long)chunk_list[cb + i] * num_kv_heads + kvh; };
  {
    const long long p = page(0);
    load_page<T, D, C>(k_pool + p * C * D, v_pool + p * C * D, sK, sV, min(C, nk), tid);
  }
  cp_async_commit();
  for (int i = 0; i < nchunks; ++i) {
    if (i + 1 < nchunks) {
      const long long p = page(i + 1);
      const int st = (i + 1) & 1;
      load_page<T, D, C>(k_pool + p * C * D, v_pool + p * C * D, sK + st * C * LD, sV + st * C * LD,
                         min(C, nk - (i + 1) * C), tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    step(i, sK + (i & 1) * C * LD, sV + (i & 1) * C * LD, min(C, nk - i * C));
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
}

// Multi-token rows: (first new position, tree bits) of Q row r live in the row's padding.
template <typename T, int D>
__device__ __forceinline__ int* row_info(T* sQ, int r) {
  return reinterpret_cast<int*>(sQ + r * (D + 8) + D);
}
// Does Q row r see the key at position p of its sequence (p < its length)?
template <typename T, int D>
__device__ __forceinline__ bool row_sees(const T* sQ, int r, int p) {
  const int* info = reinterpret_cast<const int*>(sQ + r * (D + 8) + D);
  const int d = p - info[0];
  return d < 0 || ((info[1] >> d) & 1);
}

template <typename T, int D, int C, int KS, bool Masked>
__device__ __forceinline__ void attend_unit(
    const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ chunk_list, int cb, int nk, int kvh, int num_kv_heads,
    T* sQ, T* sK, T* sV, float scale_log2, int key_base, int first_new,
    float (&o)[D / 8][4], float& m0, float& m1, float& l0, float& l1) {
  constexpr int LD = D + 8;
  constexpr int RB = 4 / KS;        // row blocks
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int rb = warp % RB, ks = warp / RB;

  u32 qf[D / 16][4];
  stream_pages<T, D, C>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh, num_kv_heads, sK, sV,
                        [&](int i, const T* ks_, const T* vs_, int valid) {
                          if (i == 0) {
#pragma unroll
                            for (int kk = 0; kk < D / 16; ++kk)
                              ldmatrix_x4(qf[kk], smem_addr(sQ + (rb * 16 + (lane & 15)) * LD + kk * 16 +
                                                            (lane >> 4) * 8));
                          }
                          if constexpr (!Masked) {
                            attend_chunk<T, D, C, KS>(qf, ks_, vs_, valid, 0, kNoLimit, kNoLimit, scale_log2, o,
                                                      m0, m1, l0, l1);
                          } else {
                            const int p0 = key_base + i * C;  // position of the page's first key
                            const bool past = p0 + C <= first_new;  // no row's new tokens on this page
                            const int r0 = rb * 16 + (lane >> 2);
                            attend_chunk<T, D, C, KS>(
                                qf, ks_, vs_, valid, 0, kNoLimit, kNoLimit, scale_log2, o, m0, m1, l0, l1,
                                [&](int half, int key) { return past || row_sees<T, D>(sQ, r0 + half * 8, p0 + key); });
                          }
                        });
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);

  if (KS > 1) {  // merge the key-split warps of each row block through shared memory
    float* red = reinterpret_cast<float*>(sK);
    if (ks > 0) {
      float* w = red + warp * (16 * D + 32);
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int col = n * 8 + (lane & 3) * 2;
        w[(lane >> 2) * D + col] = o[n][0];
        w[(lane >> 2) * D + col + 1] = o[n][1];
        w[((lane >> 2) + 8) * D + col] = o[n][2];
        w[((lane >> 2) + 8) * D + col + 1] = o[n][3];
      }
      if ((lane & 3) == 0) {
        w[16 * D + (lane >> 2)] = m0;
        w[16 * D + (lane >> 2) + 8] = m1;
        w[16 * D + 16 + (lane >> 2)] = l0;
        w[16 * D + 16 + (lane >> 2) + 8] = l1;
      }
    }
    __syncthreads();
    if (ks == 0) {
#pragma unroll
      for (int k = 1; k < KS; ++k) {
        const float* w = red + (rb + k * RB) * (16 * D + 32);
        const float om0 = w[16 * D + (lane >> 2)], om1 = w[16 * D + (lane >> 2) + 8];
        const float ol0 = w[16 * D + 16 + (lane >> 2)], ol1 = w[16 * D + 16 + (lane >> 2) + 8];
        const float mn0 = fmaxf(m0, om0), mn1 = fmaxf(m1, om1);
        const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
        const float a0 = exp2f(m0 - base0), b0 = exp2f(om0 - base0);
        const float a1 = exp2f(m1 - base1), b1 = exp2f(om1 - base1);
        l0 = l0 * a0 + ol0 * b0;
        l1 = l1 * a1 + ol1 * b1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          const int col = n * 8 + (lane & 3) * 2;
          o[n][0] = o[n][0] * a0 + w[(lane >> 2) * D + col] * b0;
          o[n][1] = o[n][1] * a0 + w[(lane >> 2) * D + col + 1] * b0;
          o[n][2] = o[n][2] * a1 + w[((lane >> 2) + 8) * D + col] * b1;
          o[n][3] = o[n][3] * a1 + w[((lane >> 2) + 8) * D + col + 1] * b1;
        }
      }
    }
  }
}

// A phase-1 unit of up to 128 rows (4 warps x 32): the compute-heavy case (many sequences x
// query heads on one shared piece), where feeding two mma tiles per K/V fragment pays.
template <typename T, int D, int C, bool Masked>
__device__ __forceinline__ void attend_unit_rt2(
    const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ chunk_list, int cb, int nk, int kvh, int num_kv_heads,
    const T* sQ, T* sK, T* sV, float scale_log2, int key_base, int first_new,
    float (&o)[2][D / 8][4], float (&m)[2][2], float (&l)[2][2]) {
  const int lim[2][2] = {{kNoLimit, kNoLimit}, {kNoLimit, kNoLimit}};
  stream_pages<T, D, C>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh, num_kv_heads, sK, sV,
                        [&](int i, const T* ks_, const T* vs_, int valid) {
                          if constexpr (!Masked) {
                            attend_step_rt2<T, D, C>(sQ, ks_, vs_, valid, 0, lim, valid == C, scale_log2, o, m, l);
                          } else {
                            const int p0 = key_base + i * C;
                            const int r0 = (threadIdx.x >> 5) * 32 + ((threadIdx.x & 31) >> 2);
                            attend_step_rt2<T, D, C>(
                                sQ, ks_, vs_, valid, 0, lim, valid == C && p0 + C <= first_new, scale_log2, o, m, l,
                                [&](int tt, int half, int key) {
                                  return row_sees<T, D>(sQ, r0 + tt * 16 + half * 8, p0 + key);
                                });
                          }
                        });
}

// The parameters of chunk_attend and chunk_attend_multi (one launch serves both).
#define CHUNK_ATTEND_PARAMS                                                                            \
  const T* __restrict__ q,        /* [batch * k, Hq, D] caller order */                                 \
  const T* __restrict__ k_pool,   /* [layers, chunks, Hkv, C, D] */                                     \
  const T* __restrict__ v_pool,                                                                         \
  long long layer_page0,          /* layer * chunks * Hkv */                                            \
  const int* __restrict__ units,  /* [num_units, kUnitFields] */                                        \
  const int* __restrict__ chunk_list,                                                                   \
  const int* __restrict__ order,  /* [batch] caller index of DFS position */                            \
  const int* __restrict__ slot_lens,                                                                    \
  float* __restrict__ o_states,   /* [rows, k, Hq, D] */                                                \
  float* __restrict__ lse_states, /* [rows, k, Hq] */                                                   \
  int num_q_heads, int num_kv_heads, int group, float scale_log2,                                       \
  int queries_per_seq,                 /* k: query rows per sequence and head (Multi only) */           \
  const int* __restrict__ pos_slots,   /* [batch] cache slot of DFS position (Multi only) */            \
  const int* __restrict__ query_bits   /* [batch * k] caller order: new tokens each query sees (Multi) */
#define CHUNK_ATTEND_ARGS                                                                              \
  q, k_pool, v_pool, layer_page0, units, chunk_list, order, slot_lens, o_states, lse_states, num_q_heads, \
      num_kv_heads, group, scale_log2, queries_per_seq, pos_slots, query_bits

// One block per unit. Dynamic shared memory: DecodeSmem<D, C>::bytes. Multi = false is the
// one-query kernel (k = 1, rows (sequence, head)); Multi = true reads queries_per_seq, rows
// (sequence, query, head), and masks the pages that reach new tokens. Invariant = true (with
// Multi): units of at most 64 / KS rows, the key split KS a function of (C, k) alone.
template <typename T, int D, int C, bool Multi, bool Invariant = false>
__device__ __forceinline__ void attend_units(CHUNK_ATTEND_PARAMS) {
  static_assert(Multi || !Invariant, "the batch-invariant kernel is the multi-token body");
  constexpr int LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int QR = Invariant ? CPATTN_DECODE_ROWS : QRows<C>::value;  // Q tile rows (the invariant units' cap)
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + QR * LD;
  T* sV = sK + 2 * C * LD;
  const int* u = units + (long long)blockIdx.x * kUnitFields;
  const int cb = u[U_CHUNK_BEGIN], ce = u[U_CHUNK_END], len_slot = u[U_LEN_SLOT];
  const int pos_begin = u[U_POS_BEGIN], row0 = u[U_ROW0], row_count = u[U_ROW_COUNT], kvh = u[U_KV_HEAD];
  if (row_count == 0) return;  // a spare unit of a plan buffer with room to grow (the whole block: uniform)
  const int out_base = u[U_OUT_BASE];
  const int nk = len_slot < 0 ? (ce - cb) * C : slot_lens[len_slot] - u[U_LEN_MINUS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int kq = Multi ? queries_per_seq : 1, per_seq = group * kq;  // rows of one sequence: (query, head)
  auto state_row = [&](int r) {  // [rows, k, Hq] index of the state of unit row r
    const int gr = row0 + r;
    if constexpr (!Multi) {
      return (long long)(out_base + gr / group) * num_q_heads + kvh * group + gr % group;
    } else {
      const int s = gr / per_seq, jg = gr - s * per_seq;
      return ((long long)(out_base + s) * kq + jg / group) * num_q_heads + kvh * group + jg % group;
    }
  };

  for (int i = tid; i < QR * (D / 8); i += CPATTN_THREADS) {  // Q rows; zeros past row_count
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    if (r < row_count) {
      const int gr = row0 + r;
      if constexpr (!Multi) {
        const int head = kvh * group + gr % group;
        cp_async16(sQ + r * LD + c, q + ((long long)order[pos_begin + gr / group] * num_q_heads + head) * D + c);
      } else {
        const int s = gr / per_seq, jg = gr - s * per_seq;
        const int head = kvh * group + jg % group;
        cp_async16(sQ + r * LD + c,
                   q + (((long long)order[pos_begin + s] * kq + jg / group) * num_q_heads + head) * D + c);
      }
    } else {
      *reinterpret_cast<uint4*>(sQ + r * LD + c) = make_uint4(0, 0, 0, 0);
    }
  }
  // Multi: each row's first new position and tree bits (in its padding), and the unit's first
  // new position over all rows (pages before it are masked by no row)
  int key_base = 0, first_new = kNoLimit;
  if constexpr (Multi) {
    key_base = u[U_LEN_MINUS];
    for (int r = tid; r < QR; r += CPATTN_THREADS) {
      int* info = row_info<T, D>(sQ, r);
      if (r < row_count) {
        const int gr = row0 + r, s = gr / per_seq, jg = gr - s * per_seq;
        info[0] = slot_lens[pos_slots[pos_begin + s]] - kq;
        info[1] = query_bits[order[pos_begin + s] * kq + jg / group];
      } else {
        info[0] = kNoLimit;  // a zero row: sees everything, is never stored
        info[1] = 0;
      }
    }
    const int s0 = row0 / per_seq, s1 = (row0 + row_count - 1) / per_seq;
    for (int s = s0 + lane; s <= s1; s += 32) first_new = min(first_new, slot_lens[pos_slots[pos_begin + s]] - kq);
#pragma unroll
    for (int sh = 16; sh; sh >>= 1) first_new = min(first_new, __shfl_xor_sync(0xffffffffu, first_new, sh));
  }

  if (!Invariant && QR > CPATTN_DECODE_ROWS && row_count > CPATTN_DECODE_ROWS) {  // 65-128 rows: the two-tile path
    float o2[2][D / 8][4];
#pragma unroll
    for (int tt = 0; tt < 2; ++tt)
#pragma unroll
      for (int n = 0; n < D / 8; ++n) o2[tt][n][0] = o2[tt][n][1] = o2[tt][n][2] = o2[tt][n][3] = 0.f;
    float m2[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l2[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    attend_unit_rt2<T, D, C, Multi>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh, num_kv_heads, sQ, sK, sV,
                                    scale_log2, key_base, first_new, o2, m2, l2);
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float l = quad_sum(l2[tt][hh]);
        const int r = warp * 32 + tt * 16 + (lane >> 2) + hh * 8;
        if (r >= row_count) continue;
        const long long srow = state_row(r);
        store_state_row<D>(o_states + srow * D, lse_states + srow, true, m2[tt][hh], l,
                           [&](int n) { return make_float2(o2[tt][n][2 * hh], o2[tt][n][2 * hh + 1]); });
      }
    }
    return;
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  // few rows: split the keys across warps instead of the rows (needs >= 16 keys per warp);
  // the batch-invariant kernel splits by (C, k) alone, so its rows fold their keys the same way in
  // every unit (the planner keeps its units within 64 / KS rows)
  const int ks_want = Invariant ? (kq > 1 ? 1 : (C >= 64 ? 4 : (C >= 32 ? 2 : 1)))
                                : (row_count <= 16 ? 4 : (row_count <= 32 ? 2 : 1));
  int rblocks;
  if (C >= 64 && ks_want == 4) {
    attend_unit<T, D, C, (C >= 64 ? 4 : 1), Multi>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh,
                                                  num_kv_heads, sQ, sK, sV, scale_log2, key_base, first_new, o,
                                                  m0, m1, l0, l1);
    rblocks = 1;
  } else if (C >= 32 && ks_want >= 2) {
    attend_unit<T, D, C, (C >= 32 ? 2 : 1), Multi>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh,
                                                  num_kv_heads, sQ, sK, sV, scale_log2, key_base, first_new, o,
                                                  m0, m1, l0, l1);
    rblocks = 2;
  } else {
    attend_unit<T, D, C, 1, Multi>(k_pool, v_pool, layer_page0, chunk_list, cb, nk, kvh, num_kv_heads, sQ, sK,
                                   sV, scale_log2, key_base, first_new, o, m0, m1, l0, l1);
    rblocks = 4;
  }
  if (warp >= rblocks) return;  // key-split helpers: their part is merged into warp rb

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + (lane >> 2) + half * 8;
    if (r >= row_count) continue;
    const long long srow = state_row(r);
    store_state_row<D>(o_states + srow * D, lse_states + srow, true, half ? m1 : m0, half ? l1 : l0,
                       [&](int n) { return make_float2(o[n][2 * half], o[n][2 * half + 1]); });
  }
}

// One query per sequence (queries_per_seq, pos_slots, query_bits unread).
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS, 1) chunk_attend(CHUNK_ATTEND_PARAMS) {
  attend_units<T, D, C, false>(CHUNK_ATTEND_ARGS);
}
// queries_per_seq query rows per sequence (any k >= 1, causal or a tree).
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS, 1) chunk_attend_multi(CHUNK_ATTEND_PARAMS) {
  attend_units<T, D, C, true>(CHUNK_ATTEND_ARGS);
}
// Batch-invariant plans, any k: the multi-token body with one fixed arithmetic per row.
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS, 1) chunk_attend_invariant(CHUNK_ATTEND_PARAMS) {
  attend_units<T, D, C, true, true>(CHUNK_ATTEND_ARGS);
}
#undef CHUNK_ATTEND_PARAMS
#undef CHUNK_ATTEND_ARGS

// The parameters of chunk_merge and chunk_merge_multi.
#define CHUNK_MERGE_PARAMS                                                                         \
  const float* __restrict__ o_states, const float* __restrict__ lse_states,                           \
      const int* __restrict__ seq_piece_indptr, const int* __restrict__ seq_pieces,                   \
      const int* __restrict__ piece_state_offset, const int* __restrict__ piece_begin,                \
      const int* __restrict__ seq_item_indptr, int item_state_base, const int* __restrict__ order,    \
      T* __restrict__ out, float* __restrict__ out_lse, int write_lse, int batch, int num_q_heads,    \
      int queries_per_seq
#define CHUNK_MERGE_ARGS                                                                                 \
  o_states, lse_states, seq_piece_indptr, seq_pieces, piece_state_offset, piece_begin, seq_item_indptr,   \
      item_state_base, order, out, out_lse, write_lse, batch, num_q_heads, queries_per_seq

// One warp per (batch position, query, query head): merge the states on the sequence's path and
// write the output row in the caller's order, and its lse when write_lse is set (Multi = false:
// one query per sequence, queries_per_seq unread).
template <typename T, int D, bool Multi>
__device__ __forceinline__ void merge_states(CHUNK_MERGE_PARAMS) {
  constexpr int E = D / 32;  // elements per lane
  const int gw = blockIdx.x * (CPATTN_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  const int kq = Multi ? queries_per_seq : 1;
  if (gw >= batch * kq * num_q_heads) return;
  int pos, j, head;
  if constexpr (!Multi) {
    pos = gw / num_q_heads, j = 0, head = gw % num_q_heads;
  } else {
    pos = gw / (kq * num_q_heads);
    const int jh = gw - pos * kq * num_q_heads;
    j = jh / num_q_heads, head = jh % num_q_heads;
  }
  const int p0 = seq_piece_indptr[pos], np = seq_piece_indptr[pos + 1] - p0;
  const int i0 = seq_item_indptr[pos], n = np + seq_item_indptr[pos + 1] - i0;
  auto state_row = [&](int k) -> long long {
    if (k < np) {
      const int p = seq_pieces[p0 + k];
      return piece_state_offset[p] + pos - piece_begin[p];
    }
    return item_state_base + i0 + (k - np);
  };
  float mx = -INFINITY;
  for (int k = 0; k < n; ++k) mx = fmaxf(mx, lse_states[(state_row(k) * kq + j) * num_q_heads + head]);
  const float base = mx == -INFINITY ? 0.f : mx;
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  float wsum = 0.f;
  for (int k = 0; k < n; ++k) {
    const long long r = (state_row(k) * kq + j) * num_q_heads + head;
    const float w = __expf(lse_states[r] - base);  // exp(-inf) = 0
    wsum += w;
    const float* src = o_states + r * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += w * src[e];
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  const long long orow = ((long long)order[pos] * kq + j) * num_q_heads + head;  // output row of the caller
  T* dst = out + orow * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) dst[e] = Pack<T>::one(acc[e] * inv);
  if (write_lse && lane == 0)
    out_lse[orow] = wsum > 0.f ? base + logf(wsum) : -INFINITY;
}

template <typename T, int D>
__global__ void __launch_bounds__(CPATTN_THREADS) chunk_merge(CHUNK_MERGE_PARAMS) {
  merge_states<T, D, false>(CHUNK_MERGE_ARGS);
}
template <typename T, int D>
__global__ void __launch_bounds__(CPATTN_THREADS) chunk_merge_multi(CHUNK_MERGE_PARAMS) {
  merge_states<T, D, true>(CHUNK_MERGE_ARGS);
}
#undef CHUNK_MERGE_PARAMS
#undef CHUNK_MERGE_ARGS

}  // namespace cpattn
