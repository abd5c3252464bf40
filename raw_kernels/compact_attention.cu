// CompactAttention chunked prefill on the GPU: block means, block scores, the two unions and
// CSR block tables (no host synchronisation), and the paged prefill kernel that reads the
// selected pool pages in place. Semantics: reference/compact_attention.py (passes 1-7).
//
//   block_mean      pass 1  kmean[l, page, h] = mean of the page's C keys (fp32, and a copy in
//                           the storage dtype that feeds the tensor cores in block_score)
//   block_score     pass 2  s_raw[h, i, j] = sum over rows r of query block i of
//                           exp(z[r, j] - max_j z[r, j]), z = scale * q_r . kmean_j (two sweeps
//                           over the past blocks: row max, then the sums)
//   sampled_block_mass  2   (summary="sampled") per (head, sampled row, key block) the block's
//                           log-sum-exp of the row's exact scores, K read in place
//   block_union     3-5     threshold s_raw >= alpha * max_j s_raw (normalising over j cancels),
//                           sink and window blocks, OR over the tile's query blocks and the
//                           sub-group's heads; kept pool ids compacted in order; stage counts
//   tables_csr      6       counts -> indptr (prefix sums) and compacted indices
//   paged_prefill   7       per (table, 128 rows): flash attention over the table's pages with the
//                           bottom-right causal mask on the chunk's own pages
#include "attend_core.cuh"
#include "compact_attention.cuh"

namespace cpattn {

// block_score and paged_prefill: 4 warps x 32 rows (two mma tiles per warp)
static_assert(CPATTN_THREADS == 128 && CPATTN_SCORE_ROWS == 128 && CPATTN_PREFILL_ROWS == 128,
              "block_score and paged_prefill are written for 4 warps of 32 rows");

// ---------------------------------------------------------------------------------- pass 1
// grid (num_pages, Hkv), D threads. pages: pool ids to summarise; all layers.
template <typename T, int D, int C>
__global__ void block_mean(const T* __restrict__ k_pool, const int* __restrict__ pages, int num_pages,
                           int num_layers, int num_chunks, int num_kv_heads, float* __restrict__ kmean,
                           T* __restrict__ kmean_lp) {
  const int p = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  if (p >= num_pages || d >= D) return;
  const long long page = pages[p];
  for (int l = 0; l < num_layers; ++l) {
    const long long base = ((long long)l * num_chunks + page) * num_kv_heads + h;
    const T* src = k_pool + base * C * D + d;
    float acc = 0.f;
#pragma unroll 8
    for (int r = 0; r < C; ++r) acc += static_cast<float>(src[r * D]);
    const float mean = acc / C;
    kmean[base * D + d] = mean;
    kmean_lp[base * D + d] = Pack<T>::one(mean);
  }
}

// ---------------------------------------------------------------------------------- pass 2
// grid (ceil(n / 128), Hq), 128 threads. Each warp owns 32 query rows (two 16-row mma tiles fed
// by every ldmatrix'd kmean fragment); kmean tiles of 64 past blocks stream through two
// shared-memory buffers (the next tile loads while this one is used), twice: sweep 0 takes the
// row max, sweep 1 the column sums of exp(z - row max). The sums of each 16-row tile are
// reduced in shared memory and added to s_raw[h, i, j] (zeroed by the caller) with one atomic
// per (query block, column, CTA).
// What one block_score block works on: head h, the CPATTN_SCORE_ROWS rows from row0 of a chunk
// of n rows (q), its Pb past blocks and its scores s_raw [Hq, Qb, Pb].
template <typename T>
struct ScoreRows {
  const T* q;
  const int* blocks;
  float* s_raw;
  int Pb, n, h, row0;
};

// z = Q K^T for a warp's two 16-row mma tiles (Q fragments qf in registers) against NK keys in
// shared memory (rows of LD elements, D used): every ldmatrix'd key fragment feeds both tiles.
template <typename T, int D, int NK, int LD>
__device__ __forceinline__ void qk_two_tiles(float (&z)[2][NK / 8][4], const u32 (&qf)[2][D / 16][4],
                                             const T* cur, int lane) {
#pragma unroll
  for (int tt = 0; tt < 2; ++tt)
#pragma unroll
    for (int j = 0; j < NK / 8; ++j) z[tt][j][0] = z[tt][j][1] = z[tt][j][2] = z[tt][j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int j = 0; j < NK / 16; ++j) {
      u32 b[4];
      ldmatrix_x4(b, smem_addr(cur + (j * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
      for (int tt = 0; tt < 2; ++tt) {
        mma16816<T>(z[tt][2 * j], qf[tt][kk], b[0], b[1]);
        mma16816<T>(z[tt][2 * j + 1], qf[tt][kk], b[2], b[3]);
      }
    }
  }
}

// The body; rows_of() gives the ScoreRows, called where the single-sequence kernel read them
// (so it compiles to the machine code it had before the batched kernel).
template <typename T, int D, int C, typename RowsOf>
__device__ __forceinline__ void block_score_rows(
    RowsOf rows_of,
    const T* __restrict__ kmean_lp,   // [L, N, Hkv, D] storage dtype
    long long layer_page0,            // layer * N * Hkv
    int num_q_heads, int num_kv_heads, float scale_log2) {
  constexpr int LD = D + 8, TJ = 64, NT = CPATTN_SCORE_ROWS / 16;  // TJ past blocks per tile; NT 16-row tiles
  __shared__ __align__(16) T tile[2][TJ * LD];
  __shared__ float colsum[NT][TJ];  // per 16-row tile of the block
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoreRows<T> at = rows_of();
  const T* __restrict__ q = at.q;            // [n, Hq, D]
  const int* __restrict__ blocks = at.blocks;  // [Pb] pool ids of the past blocks, in token order
  float* __restrict__ s_raw = at.s_raw;      // [Hq, Qb, Pb]
  const int Pb = at.Pb, n = at.n;
  const int h = at.h, kvh = h / (num_q_heads / num_kv_heads);
  const int block_row0 = at.row0;
  const int Qb = (n + C - 1) / C;

  u32 qf[2][D / 16][4];
  bool ok[2][2];  // [tile][row half]: the row exists
#pragma unroll
  for (int tt = 0; tt < 2; ++tt) {
    const int r0 = block_row0 + warp * 32 + tt * 16 + (lane >> 2), r1 = r0 + 8;
    ok[tt][0] = r0 < n;
    ok[tt][1] = r1 < n;
    const u32* p0 = r0 < n ? reinterpret_cast<const u32*>(q + ((long long)r0 * num_q_heads + h) * D) : nullptr;
    const u32* p1 = r1 < n ? reinterpret_cast<const u32*>(q + ((long long)r1 * num_q_heads + h) * D) : nullptr;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c = kk * 8 + (lane & 3);
      qf[tt][kk][0] = p0 ? p0[c] : 0u;
      qf[tt][kk][1] = p1 ? p1[c] : 0u;
      qf[tt][kk][2] = p0 ? p0[c + 4] : 0u;
      qf[tt][kk][3] = p1 ? p1[c + 4] : 0u;
    }
  }
  auto load_tile = [&](int j0, T* dst) {  // kmean rows j0 .. j0+63 (zeros past Pb)
    for (int e = tid; e < TJ * (D / 8); e += CPATTN_THREADS) {
      const int r = e / (D / 8), c = (e % (D / 8)) * 8;
      if (j0 + r < Pb) {
        cp_async16(dst + r * LD + c, kmean_lp + (layer_page0 + (long long)blocks[j0 + r] * num_kv_heads + kvh) * D + c);
      } else {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
  };
  const int ntiles = (Pb + TJ - 1) / TJ;
  float mrow[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  load_tile(0, tile[0]);
  for (int it = 0; it < 2 * ntiles; ++it) {  // sweep 0: it < ntiles; sweep 1: the rest
    const int sweep = it >= ntiles, j0 = (it % ntiles) * TJ;
    const T* cur = tile[it & 1];
    if (it + 1 < 2 * ntiles) {
      load_tile(((it + 1) % ntiles) * TJ, tile[(it + 1) & 1]);  // freed by the barrier that ended it - 1
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (sweep && it == ntiles) {  // first tile of sweep 1: the row maxima are final
#pragma unroll
      for (int tt = 0; tt < 2; ++tt) {
        mrow[tt][0] = quad_max(mrow[tt][0]);
        mrow[tt][1] = quad_max(mrow[tt][1]);
      }
    }
    float z[2][TJ / 8][4];
    qk_two_tiles<T, D, TJ, LD>(z, qf, cur, lane);
    if (!sweep) {
#pragma unroll
      for (int tt = 0; tt < 2; ++tt)
#pragma unroll
        for (int j = 0; j < TJ / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = j0 + j * 8 + (lane & 3) * 2 + (e & 1);
            if (col < Pb) mrow[tt][e >> 1] = fmaxf(mrow[tt][e >> 1], z[tt][j][e] * scale_log2);
          }
    } else {
      // column sums over each 16-row tile's valid rows, then over the warp (lanes with equal lane&3)
#pragma unroll
      for (int tt = 0; tt < 2; ++tt)
#pragma unroll
        for (int j = 0; j < TJ / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = (ok[tt][0] ? fast_exp2(fmaf(z[tt][j][e], scale_log2, -mrow[tt][0])) : 0.f) +
                      (ok[tt][1] ? fast_exp2(fmaf(z[tt][j][e + 2], scale_log2, -mrow[tt][1])) : 0.f);
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            if (lane < 4) colsum[warp * 2 + tt][j * 8 + lane * 2 + e] = v;
          }
      __syncthreads();
      // 16-row tiles of one query block add up; one atomic per (query block, column)
      if (tid < TJ && j0 + tid < Pb) {
        for (int w = 0; w < NT; ++w) {
          const int r = block_row0 + w * 16;
          if (r >= n) break;
          const int i = r / C;
          float acc = colsum[w][tid];
          while (w + 1 < NT && block_row0 + (w + 1) * 16 < n && (block_row0 + (w + 1) * 16) / C == i) {
            ++w;
            acc += colsum[w][tid];
          }
          atomicAdd(s_raw + ((long long)h * Qb + i) * Pb + j0 + tid, acc);
        }
      }
    }
    __syncthreads();  // this buffer is refilled two tiles on; colsum is rewritten next tile
  }
}

template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS) block_score(
    const T* __restrict__ q, const T* __restrict__ kmean_lp, long long layer_page0, const int* __restrict__ blocks,
    int Pb, int n, int num_q_heads, int num_kv_heads, float scale_log2, float* __restrict__ s_raw) {
  block_score_rows<T, D, C>(
      [&] { return ScoreRows<T>{q, blocks, s_raw, Pb, n, (int)blockIdx.y, (int)blockIdx.x * CPATTN_SCORE_ROWS}; },
      kmean_lp, layer_page0, num_q_heads, num_kv_heads, scale_log2);
}

// Batched: grid (num_row_blocks, Hq); row_blocks[x] = (sequence b, first row) over the chunks
// with past blocks; each chunk's q rows, blocks and s_raw from the per-sequence record.
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS) block_score_varlen(
    const T* __restrict__ q,          // [sum n, Hq, D] packed
    const T* __restrict__ kmean_lp, long long layer_page0,
    const int* __restrict__ blocks,   // packed block lists
    const int* __restrict__ seqs, int num_seqs, const int* __restrict__ row_blocks,
    int num_q_heads, int num_kv_heads, float scale_log2, float* __restrict__ s_raw) {
  block_score_rows<T, D, C>(
      [&] {
        const int b = row_blocks[2 * blockIdx.x];
        const long long row0 = seq_field(seqs, num_seqs, SQ_ROW0, b);
        return ScoreRows<T>{q + row0 * num_q_heads * D, blocks + seq_field(seqs, num_seqs, SQ_BLOCK0, b),
                            s_raw + seq_field(seqs, num_seqs, SQ_SCORE0, b), seq_field(seqs, num_seqs, SQ_PAST_BLOCKS, b),
                            seq_field(seqs, num_seqs, SQ_CHUNK_LEN, b), (int)blockIdx.y, row_blocks[2 * blockIdx.x + 1]};
      },
      kmean_lp, layer_page0, num_q_heads, num_kv_heads, scale_log2);
}

// ------------------------------------------------------------------- pass 2, summary="sampled"
// The exact softmax of the sampled rows of each query block (reference sampled_rows) over every
// key up to the chunk end, reduced per key block; K read in place from the pool pages.
// grid (ceil(G m / CPATTN_SAMPLED_ROWS), splits, Hkv), CPATTN_THREADS threads.
//
// Rows: kv head kvh has G m rows, gr = hh * m + i: query head kvh G + hh, sampled row i (chunk
// row rows[i], which sees the keys x <= P + rows[i]). A block owns CPATTN_SAMPLED_ROWS of them
// from blockIdx.x * CPATTN_SAMPLED_ROWS; each warp 32 (two 16-row mma tiles fed by every
// ldmatrix'd key fragment), Q fragments in registers.
// Keys: the NB = Pb + Qb pages blocks[0 .. NB) in token order, key x in page x / C, row x % C,
// x < P + n (P = Pb C). Steps of K = CPATTN_SAMPLED_KEYS keys (C <= K: K / C blocks a step;
// C > K: C / K steps a block) stream through two shared-memory buffers; block y of the grid
// takes steps [y split_steps, (y + 1) split_steps), split_steps a multiple of the steps a
// block spans, so every key block lies in one grid block.
// Output: part[j * (Hq m) + h * m + i] = log2 of the sum over the keys x of block j that row i
// sees of 2^(scale_log2 q . k_x) (-inf where it sees none): the block's log-sum-exp in log2
// units. A grid block's rows are consecutive columns, so a quad's writes are coalesced.
// cpattn.compact_attention.mass_from_partials turns part into estimate_mass's past and own.
__device__ __forceinline__ float fast_log2(float x) {  // lg2.approx: ~2^-22 absolute for x in [1, 128]
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS) sampled_block_mass(
    const T* __restrict__ q_rows,   // [m, Hq, D] the sampled rows of q (storage dtype)
    const int* __restrict__ rows,   // [m] their rows in the chunk, each in [0, n)
    int m, const T* __restrict__ k_pool, long long layer_page0,  // layer * N * Hkv
    const int* __restrict__ blocks,  // [Pb + Qb] pool ids of the sequence's pages up to the chunk end
    int Pb, int n, int num_q_heads, int num_kv_heads, int split_steps, float scale_log2,
    float* __restrict__ part) {     // [Pb + Qb, Hq, m]
  constexpr int K = CPATTN_SAMPLED_KEYS, LD = D + 8;
  constexpr int CB = C < K ? C : K;  // keys of one key block within a step
  constexpr int BPS = K / CB;        // key blocks per step (C < K)
  constexpr int SPB = C / CB;        // steps per key block (C > K)
  constexpr int FPB = CB / 8;        // 8-key mma column tiles per key block and step
  static_assert(CPATTN_SAMPLED_ROWS == 4 * 32 && CPATTN_THREADS == 128, "4 warps of 32 rows");
  static_assert(K % 16 == 0 && C % 8 == 0 && (C % K == 0 || K % C == 0), "key steps and blocks must nest");
  static_assert(SPB <= 2, "a key block spans at most two steps (running state of one earlier step)");
  __shared__ __align__(16) T tile[2][K * LD];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int G = num_q_heads / num_kv_heads, kvh = blockIdx.z, M = G * m;
  const int NB = Pb + (n + C - 1) / C, P = Pb * C, keys = P + n;
  const int s0 = blockIdx.y * split_steps, s1 = min((NB * C + K - 1) / K, s0 + split_steps);
  if (s0 >= s1) return;  // the whole block (no barrier passed yet)
  const long long ld_part = (long long)num_q_heads * m, col0 = (long long)kvh * M;
  const int row_base = blockIdx.x * CPATTN_SAMPLED_ROWS + warp * 32 + (lane >> 2);  // + 16 tt + 8 hh

  u32 qf[2][D / 16][4];
  int lim[2][2];  // [tile][row half]: keys x < lim the row sees (0: no such row)
#pragma unroll
  for (int tt = 0; tt < 2; ++tt) {
    const u32* p[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int gr = row_base + tt * 16 + hh * 8;
      if (gr < M) {
        const int i = gr % m, h = kvh * G + gr / m;
        p[hh] = reinterpret_cast<const u32*>(q_rows + ((long long)i * num_q_heads + h) * D);
        lim[tt][hh] = P + rows[i] + 1;
      } else {
        p[hh] = nullptr;
        lim[tt][hh] = 0;
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c = kk * 8 + (lane & 3);
      qf[tt][kk][0] = p[0] ? p[0][c] : 0u;
      qf[tt][kk][1] = p[1] ? p[1][c] : 0u;
      qf[tt][kk][2] = p[0] ? p[0][c + 4] : 0u;
      qf[tt][kk][3] = p[1] ? p[1][c + 4] : 0u;
    }
  }
  auto load_step = [&](int s, T* dst) {  // keys s K .. s K + K - 1 (zeros from P + n on)
    for (int e = tid; e < K * (D / 8); e += CPATTN_THREADS) {
      const int r = e / (D / 8), c = (e % (D / 8)) * 8, x = s * K + r;
      if (x < keys) {
        const long long page = layer_page0 + (long long)blocks[x / C] * num_kv_heads + kvh;
        cp_async16(dst + r * LD + c, k_pool + (page * C + x % C) * D + c);
      } else {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
  };
  // one key block's (max, sum) of this row -> part (lanes with lane % 4 == 0 hold the quad's)
  auto put = [&](int j, int tt, int hh, float mx, float l) {
    const int gr = row_base + tt * 16 + hh * 8;
    if ((lane & 3) == 0 && gr < M && j < NB)
      part[(long long)j * ld_part + col0 + gr] = mx == -INFINITY ? -INFINITY : mx + fast_log2(l);
  };
  float rm[2][2], rl[2][2];  // C > K: the key block's state after its first step
#pragma unroll
  for (int tt = 0; tt < 2; ++tt) rm[tt][0] = rm[tt][1] = -INFINITY, rl[tt][0] = rl[tt][1] = 0.f;

  load_step(s0, tile[0]);
  for (int s = s0; s < s1; ++s) {
    const int it = s - s0;
    if (s + 1 < s1) {
      load_step(s + 1, tile[(it + 1) & 1]);  // freed by the barrier that ended step s - 1
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cur = tile[it & 1];
    float z[2][K / 8][4];
    qk_two_tiles<T, D, K, LD>(z, qf, cur, lane);
    if ((s + 1) * K > P) {  // a step with own keys: the causal limit per row (past keys: every row sees them)
#pragma unroll
      for (int tt = 0; tt < 2; ++tt)
#pragma unroll
        for (int j = 0; j < K / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (s * K + j * 8 + (lane & 3) * 2 + (e & 1) >= lim[tt][e >> 1]) z[tt][j][e] = -INFINITY;
    }
#pragma unroll
    for (int b = 0; b < BPS; ++b) {
#pragma unroll
      for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float mx = -INFINITY;
#pragma unroll
          for (int f = 0; f < FPB; ++f) mx = fmaxf(mx, fmaxf(z[tt][b * FPB + f][2 * hh], z[tt][b * FPB + f][2 * hh + 1]));
          mx = quad_max(mx) * scale_log2;  // raw scores until here; scale_log2 > 0 keeps the order
          const float base = mx == -INFINITY ? 0.f : mx;
          float l = 0.f;
#pragma unroll
          for (int f = 0; f < FPB; ++f)
            l += fast_exp2(fmaf(z[tt][b * FPB + f][2 * hh], scale_log2, -base)) +
                 fast_exp2(fmaf(z[tt][b * FPB + f][2 * hh + 1], scale_log2, -base));
          l = quad_sum(l);
          if constexpr (SPB == 1) {
            put(s * BPS + b, tt, hh, mx, l);
          } else if (s % SPB == 0) {  // the key block's first step
            rm[tt][hh] = mx;
            rl[tt][hh] = l;
          } else {  // its second: merge with the first, write
            const float mn = fmaxf(rm[tt][hh], mx);
            const float mb = mn == -INFINITY ? 0.f : mn;
            put(s / SPB, tt, hh, mn, rl[tt][hh] * fast_exp2(rm[tt][hh] - mb) + l * fast_exp2(mx - mb));
          }
        }
      }
    }
    __syncthreads();  // this buffer is refilled two steps on
  }
}

// ------------------------------------------------------------------------------- passes 3-5
// grid (num_tables) = T x Hkv x S, CPATTN_UNION_THREADS threads, s * tb floats of dynamic
// shared memory. Table (t, kvh, g) ORs the keep masks of the s heads kvh*G + g*s + [0, s)
// over the query blocks of tile t, then compacts the kept past blocks' pool ids (ascending
// token order) followed by the tile's own blocks into padded[table * cap ...];
// counts[table] = length. stats[0..2] += kept (head, query block,
// past block) triples at the select / q-union / group-union stage (same weighting as the
// reference's densities).
//
// What one block_union block works on: table `table` of a chunk (the chunk's scores s_raw, Pb
// past and Qb query blocks, tb per tile, own_total own pages, blocks: its Pb + Qb pool ids,
// stats: its stage counts [3]); the list goes to padded[list_table * cap ...] and its length
// to counts[list_table], list_table being the table's number in the launch.
struct UnionTable {
  const float* s_raw;
  const int* blocks;
  int Pb, Qb, tb, own_total, table, list_table;
  unsigned long long* stats;
};

// The body; table_of() gives the UnionTable, called where the single-sequence kernel read its
// table (so it compiles to the machine code it had before the batched kernel).
template <typename TableOf>
__device__ __forceinline__ void block_union_table(
    TableOf table_of, int num_kv_heads, int G, int s, float alpha, int sink, int window,
    int* __restrict__ padded, int cap, int* __restrict__ counts) {
  extern __shared__ float thr[];  // [s * tb] thresholds (dynamic shared memory)
  __shared__ int scan[CPATTN_UNION_THREADS];
  __shared__ int base_s;
  const UnionTable at = table_of();
  const float* __restrict__ s_raw = at.s_raw;
  const int* __restrict__ blocks = at.blocks;
  unsigned long long* __restrict__ stats = at.stats;
  const int Pb = at.Pb, Qb = at.Qb, tb = at.tb, own_total = at.own_total;
  const int table = at.table, list_table = at.list_table, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TableCoords tc = table_coords(table, num_kv_heads, G / s);
  const int t = tc.t, kvh = tc.kvh, g = tc.g;
  const int i0 = t * tb, nb = min(tb, Qb - i0);  // query blocks of this tile
  const int h0 = kvh * G + g * s;
  // thresholds: alpha * max_j s_raw[h, i, :], one warp per (head, block) row
  for (int row = warp; row < s * nb; row += CPATTN_UNION_THREADS / 32) {
    const float* src = s_raw + ((long long)(h0 + row / nb) * Qb + i0 + row % nb) * Pb;
    float mx = 0.f;
    for (int j = lane; j < Pb; j += 32) mx = fmaxf(mx, src[j]);
#pragma unroll
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) thr[row] = alpha * mx;
  }
  if (tid == 0) base_s = 0;
  __syncthreads();
  unsigned long long n_sel = 0, n_qu = 0, n_gu = 0;
  for (int j0 = 0; j0 < Pb; j0 += CPATTN_UNION_THREADS) {
    const int j = j0 + tid;
    int keep_g = 0;
    if (j < Pb) {
      const bool forced = j < sink || j >= Pb - window;
      for (int hh = 0; hh < s; ++hh) {
        int keep_h = 0;
        for (int b = 0; b < nb; ++b) {
          const float v = s_raw[((long long)(h0 + hh) * Qb + i0 + b) * Pb + j];
          const int k = forced || v >= thr[hh * nb + b];
          n_sel += k;
          keep_h |= k;
        }
        n_qu += keep_h * nb;
        keep_g |= keep_h;
      }
      n_gu += (unsigned long long)keep_g * s * nb;
    }
    // block-wide exclusive scan of keep_g (Hillis-Steele over the block)
    scan[tid] = keep_g;
    __syncthreads();
    for (int off = 1; off < CPATTN_UNION_THREADS; off <<= 1) {
      const int v = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += v;
      __syncthreads();
    }
    if (keep_g) padded[(long long)list_table * cap + base_s + scan[tid] - 1] = blocks[j];
    __syncthreads();
    if (tid == CPATTN_UNION_THREADS - 1) base_s += scan[CPATTN_UNION_THREADS - 1];
    __syncthreads();
  }
  // the tile's own blocks: chunk blocks [0, min(tile end, chunk) / C rounded up)
  const int own = min((t + 1) * tb, own_total);
  for (int b = tid; b < own; b += CPATTN_UNION_THREADS) padded[(long long)list_table * cap + base_s + b] = blocks[Pb + b];
  if (tid == 0) counts[list_table] = base_s + own;
  // stats: warp sums, then one atomic per warp
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    n_sel += __shfl_xor_sync(0xffffffffu, n_sel, o);
    n_qu += __shfl_xor_sync(0xffffffffu, n_qu, o);
    n_gu += __shfl_xor_sync(0xffffffffu, n_gu, o);
  }
  if (lane == 0) {
    atomicAdd(stats + 0, n_sel);
    atomicAdd(stats + 1, n_qu);
    atomicAdd(stats + 2, n_gu);
  }
}

__global__ void __launch_bounds__(CPATTN_UNION_THREADS) block_union(
    const float* __restrict__ s_raw, int Pb, int Qb, int tb, int T, int num_kv_heads, int G, int s,
    float alpha, int sink, int window, const int* __restrict__ blocks, int own_total,
    int* __restrict__ padded, int cap, int* __restrict__ counts, unsigned long long* __restrict__ stats) {
  block_union_table([&] { return UnionTable{s_raw, blocks, Pb, Qb, tb, own_total, (int)blockIdx.x, (int)blockIdx.x, stats}; },
                    num_kv_heads, G, s, alpha, sink, window, padded, cap, counts);
}

// Batched: grid (tables of the batch); table x of sequence table_seq[x], its scores and blocks
// from the record; stats[3 b ..] per sequence; lists padded to cap (the batch's largest).
// Dynamic shared memory: s * (the batch's largest tb) floats.
__global__ void __launch_bounds__(CPATTN_UNION_THREADS) block_union_varlen(
    const float* __restrict__ s_raw, const int* __restrict__ seqs, int num_seqs, const int* __restrict__ table_seq,
    int num_kv_heads, int G, int s, float alpha, int sink, int window, const int* __restrict__ blocks,
    int* __restrict__ padded, int cap, int* __restrict__ counts, unsigned long long* __restrict__ stats) {
  block_union_table(
      [&] {
        const int table = blockIdx.x, b = table_seq[table];
        return UnionTable{s_raw + seq_field(seqs, num_seqs, SQ_SCORE0, b), blocks + seq_field(seqs, num_seqs, SQ_BLOCK0, b),
                          seq_field(seqs, num_seqs, SQ_PAST_BLOCKS, b), seq_field(seqs, num_seqs, SQ_QUERY_BLOCKS, b),
                          seq_field(seqs, num_seqs, SQ_TILE_BLOCKS, b), seq_field(seqs, num_seqs, SQ_QUERY_BLOCKS, b),
                          table - seq_field(seqs, num_seqs, SQ_TABLE0, b),
                          table, stats + 3 * b};
      },
      num_kv_heads, G, s, alpha, sink, window, padded, cap, counts);
}

// -------------------------------------------------------------------------------- pass 6
// grid (num_tables), 128 threads: indptr[t] = sum of earlier counts; compacted indices.
__global__ void tables_csr(const int* __restrict__ padded, int cap, const int* __restrict__ counts, int num_tables,
                           int* __restrict__ indptr, int* __restrict__ indices) {
  __shared__ int off_s;
  const int t = blockIdx.x;
  if (threadIdx.x == 0) {
    int off = 0;
    for (int u = 0; u < t; ++u) off += counts[u];
    off_s = off;
    indptr[t] = off;
    if (t == num_tables - 1) indptr[num_tables] = off + counts[t];
  }
  __syncthreads();
  const int n = counts[t], off = off_s;
  for (int k = threadIdx.x; k < n; k += blockDim.x) indices[off + k] = padded[(long long)t * cap + k];
}

// -------------------------------------------------------------------------------- pass 7
// grid (num_units), CPATTN_THREADS threads, one unit each (PagedUnit in compact_attention.cuh:
// CPATTN_PREFILL_ROWS rows of a table's row space, the table's pages with the bottom-right
// causal mask on the own pages). Writes o [n, Hq, D] and lse [n, Hq].
//
// Compute-bound, so the tile differs from decode's: each warp owns 32 rows (two 16-row mma
// tiles) and every K/V fragment read from shared memory feeds both, halving shared-memory
// traffic per FLOP; Q stays in shared memory (re-read per page) to leave registers for the
// two accumulators. Shared memory: Q [128][D+8], then two K/V stages.
// Keys stream in tiles of TK = min(C, CPATTN_PREFILL_KEYS) rows (a page of 128 keys is two
// tiles), so shared memory is (128 + 4 TK) (D + 8) halves whatever the page size: two blocks
// per SM.
template <int D, int C>
struct PrefillSmem {
  static constexpr int LD = D + 8;
  static constexpr int TK = C < CPATTN_PREFILL_KEYS ? C : CPATTN_PREFILL_KEYS;
  static constexpr int bytes = (CPATTN_PREFILL_ROWS + 4 * TK) * LD * 2;  // prefill_smem_bytes in cpattn/kernels.py
};

// The body. unit_of() gives this block's unit (a UnitAt: the unit, its chunk's n, and the
// chunk's first row in q, out and lse_out), called where the single-sequence kernel always
// read its unit, so that kernel compiles to the machine code it had before the batched one.
template <typename T, int D, int C, typename UnitOf>
__device__ __forceinline__ void paged_prefill_unit(
    UnitOf unit_of, const T* __restrict__ q, const T* __restrict__ k_pool, const T* __restrict__ v_pool,
    long long layer_page0, const int* __restrict__ indices, int num_q_heads, int num_kv_heads, float scale_log2,
    T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  constexpr int LD = D + 8;
  constexpr int TK = PrefillSmem<D, C>::TK;  // keys per pipeline step
  constexpr int SUB = C / TK;                 // steps per page
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [CPATTN_PREFILL_ROWS][LD]
  T* sK = sQ + CPATTN_PREFILL_ROWS * LD;   // [2][TK][LD]
  T* sV = sK + 2 * TK * LD;                // [2][TK][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const UnitAt at = unit_of();
  const PagedUnit u = at.u;
  const int n = at.n;
  q += at.row0 * num_q_heads * D;
  out += at.row0 * num_q_heads * D;
  lse_out += write_lse ? at.row0 * num_q_heads : 0;
  const int row_count = u.row_count, npast = u.npast, lim_unit = u.lim_unit;
  const int nsteps = (lim_unit + TK - 1) / TK;

  // Q rows -> shared memory (zeros past row_count); row limits of this thread's 4 rows
  for (int e = tid; e < CPATTN_PREFILL_ROWS * (D / 8); e += CPATTN_THREADS) {
    const int r = e / (D / 8), c = (e % (D / 8)) * 8;
    if (r < row_count) {
      cp_async16(sQ + r * LD + c, q + u.index(r, num_q_heads) * D + c);
    } else {
      *reinterpret_cast<uint4*>(sQ + r * LD + c) = make_uint4(0, 0, 0, 0);
    }
  }
  int lim[2][2];
#pragma unroll
  for (int tt = 0; tt < 2; ++tt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = warp * 32 + tt * 16 + (lane >> 2) + 8 * hh;
      lim[tt][hh] = u.limit(r);
    }
  auto step_valid = [&](int i) {  // key rows of step i that any row of this unit may read
    const int page = i / SUB, first = (i % SUB) * TK;
    const int v = page < npast ? TK : min(TK, n - (page - npast) * C - first);
    return min(v, lim_unit - i * TK);
  };
  auto step_src = [&](int i) {  // element offset of step i's first key row in the pools
    const long long page = layer_page0 + (long long)indices[u.p0 + i / SUB] * num_kv_heads + u.kvh;
    return (page * C + (i % SUB) * TK) * D;
  };

  float o[2][D / 8][4];
#pragma unroll
  for (int tt = 0; tt < 2; ++tt)
#pragma unroll
    for (int nn = 0; nn < D / 8; ++nn) o[tt][nn][0] = o[tt][nn][1] = o[tt][nn][2] = o[tt][nn][3] = 0.f;
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  if (nsteps > 0) {
    const long long e = step_src(0);
    load_page<T, D, TK>(k_pool + e, v_pool + e, sK, sV, step_valid(0), tid);
  }
  cp_async_commit();
  for (int i = 0; i < nsteps; ++i) {
    if (i + 1 < nsteps) {
      const long long e = step_src(i + 1);
      const int st = (i + 1) & 1;
      load_page<T, D, TK>(k_pool + e, v_pool + e, sK + st * TK * LD, sV + st * TK * LD, step_valid(i + 1), tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* ks_ = sK + (i & 1) * TK * LD;
    const T* vs_ = sV + (i & 1) * TK * LD;
    const int valid = step_valid(i);
    // every key of this step visible to every row of the unit: skip the per-key mask
    const bool full = valid == TK && (i + 1) * TK <= u.lim_min;
    attend_step_rt2<T, D, TK>(sQ, ks_, vs_, valid, i * TK, lim, full, scale_log2, o, m, l);
    __syncthreads();
  }
#pragma unroll
  for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float lsum = quad_sum(l[tt][hh]);
      const int r = warp * 32 + tt * 16 + (lane >> 2) + hh * 8;
      if (r >= row_count) continue;
      const long long row = u.index(r, num_q_heads);
      store_state_row<D>(out + row * D, lse_out + row, write_lse, m[tt][hh], lsum,
                         [&](int nn) { return make_float2(o[tt][nn][2 * hh], o[tt][nn][2 * hh + 1]); });
    }
  }
}

template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS, 2) paged_prefill(
    const T* __restrict__ q,          // [n, Hq, D]
    const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ units,    // [U, 2]: table, row0
    const int* __restrict__ indptr, const int* __restrict__ indices,
    int n, int q_tile, int num_q_heads, int num_kv_heads, int G, int s, int own_total,
    float scale_log2, T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  paged_prefill_unit<T, D, C>(
      [&] { return UnitAt{paged_unit<C>(units, indptr, n, q_tile, num_kv_heads, G, s, own_total), n, 0}; }, q, k_pool,
      v_pool, layer_page0, indices, num_q_heads, num_kv_heads, scale_log2, out, lse_out, write_lse);
}

// Batched: units over the tables of the batch (paged_unit_varlen); q, o and lse packed
// [sum n, Hq, ...], each unit's chunk at its record's SQ_ROW0.
template <typename T, int D, int C>
__global__ void __launch_bounds__(CPATTN_THREADS, 2) paged_prefill_varlen(
    const T* __restrict__ q, const T* __restrict__ k_pool, const T* __restrict__ v_pool, long long layer_page0,
    const int* __restrict__ units, const int* __restrict__ indptr, const int* __restrict__ indices,
    const int* __restrict__ seqs, int num_seqs, const int* __restrict__ table_seq,
    int num_q_heads, int num_kv_heads, int G, int s, float scale_log2,
    T* __restrict__ out, float* __restrict__ lse_out, int write_lse) {
  paged_prefill_unit<T, D, C>([&] { return paged_unit_varlen<C>(units, indptr, table_seq, seqs, num_seqs, num_kv_heads,
                                                                G, s); },
                              q, k_pool, v_pool, layer_page0, indices, num_q_heads, num_kv_heads, scale_log2, out,
                              lse_out, write_lse);
}

}  // namespace cpattn
