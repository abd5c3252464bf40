// The geometry of one paged-prefill unit, shared by paged_prefill (compact_attention.cu) and
// paged_prefill_wg (compact_attention_sm90.cu).
//
// Tables are (t, kvh, g): query tile t of q_tile chunk tokens, kv head kvh, sub-group g of s
// query heads (S = G / s sub-groups per kv head). A table's row space is tile token x sub-group
// head: row gr is token tile_start + gr / s of query head kvh G + g s + gr % s. A unit,
// units[u] = (table, row0), is CPATTN_PREFILL_ROWS rows of it from row0. Keys are the table's
// pages in list order, the npast past pages first, then the own pages (the chunk's pages up to
// the tile's end); key x lies in page x / C, and row token y reads every past key and own keys
// <= y (the bottom-right causal mask).
#pragma once
#include "common.cuh"

namespace cpattn {

// Table index -> (t, kvh, g); tables are numbered t-major, then kv head, then sub-group.
struct TableCoords {
  int t, kvh, g;
};
__device__ __forceinline__ TableCoords table_coords(int table, int num_kv_heads, int S) {
  return {table / (num_kv_heads * S), (table / S) % num_kv_heads, table % S};
}

struct PagedUnit {
  int tile_start, row0, row_count, s;
  int kvh, g, G;             // the table's kv head, sub-group, and query heads per kv head
  int p0, npast, past_keys;  // the table's first entry in indices, its past pages, their keys
  int lim_unit;              // keys any row of the unit may read (rows read a prefix of the keys)
  int lim_min;               // keys the unit's first row may read: every row reads these

  // [n, Hq] index of unit row r: the row of q it reads, the row of o and lse it writes
  __device__ __forceinline__ long long index(int r, int num_q_heads) const {
    const int gr = row0 + r;
    return (long long)(tile_start + gr / s) * num_q_heads + kvh * G + g * s + gr % s;
  }
  // keys unit row r may read; 0 for rows past row_count (every key masked)
  __device__ __forceinline__ int limit(int r) const {
    return r < row_count ? past_keys + tile_start + (row0 + r) / s + 1 : 0;
  }
};

// The unit of table `table` (its index in indptr), numbered `local` within its chunk's tables,
// from row0. n: chunk tokens; own_total: the chunk's pages.
template <int C>
__device__ __forceinline__ PagedUnit paged_unit_at(int table, int local, int row0, const int* __restrict__ indptr,
                                                   int n, int q_tile, int num_kv_heads, int G, int s, int own_total) {
  PagedUnit u;
  u.row0 = row0;
  const TableCoords tc = table_coords(local, num_kv_heads, G / s);
  const int t = tc.t;
  u.s = s;
  u.kvh = tc.kvh;
  u.g = tc.g;
  u.G = G;
  u.tile_start = t * q_tile;
  const int tile_tokens = min(q_tile, n - u.tile_start);
  u.row_count = min(CPATTN_PREFILL_ROWS, tile_tokens * s - u.row0);
  const int own = min((t + 1) * (q_tile / C), own_total);  // own pages in this table
  u.p0 = indptr[table];
  u.npast = indptr[table + 1] - u.p0 - own;
  u.past_keys = u.npast * C;
  const int tok_max = u.tile_start + (u.row0 + u.row_count - 1) / s;
  u.lim_unit = u.past_keys + tok_max + 1;
  u.lim_min = u.past_keys + u.tile_start + u.row0 / s + 1;
  return u;
}

// The unit of this block (blockIdx.x) of one chunk's launch: units[u] = (table, row0).
template <int C>
__device__ __forceinline__ PagedUnit paged_unit(const int* __restrict__ units, const int* __restrict__ indptr, int n,
                                                int q_tile, int num_kv_heads, int G, int s, int own_total) {
  const int table = units[2 * blockIdx.x];
  return paged_unit_at<C>(table, table, units[2 * blockIdx.x + 1], indptr, n, q_tile, num_kv_heads, G, s, own_total);
}

// ------------------------------------------------------------------ batched varlen prefill
// One launch per stage over the chunks of B sequences (reference BatchedPrefill). Tables of
// all chunks are numbered sequence-major (sequence b's from its SQ_TABLE0), table_seq[table]
// is the sequence of a table, and the per-sequence record is a struct of arrays,
// seqs[field * B + b], fields in the order of PREFILL_SEQ_FIELDS in cpattn/kernels.py:
enum {
  SQ_CHUNK_LEN,     // n: the chunk's tokens
  SQ_PAST_BLOCKS,   // Pb
  SQ_QUERY_BLOCKS,  // Qb = Cb: the chunk's query blocks and own pages
  SQ_TILE_BLOCKS,   // tb = q_tile / C
  SQ_ROW0,          // the chunk's first row in the packed q, o and lse
  SQ_TABLE0,        // its first table
  SQ_BLOCK0,        // its first entry in the packed block list (Pb + Cb pool ids each)
  SQ_SCORE0,        // its first float in the packed scores ([Hq, Qb, max(Pb, 1)] each)
  kSeqFields
};
__device__ __forceinline__ int seq_field(const int* __restrict__ seqs, int num_seqs, int field, int b) {
  return seqs[field * num_seqs + b];
}

// A unit with its chunk: n tokens whose first row in the packed q, o and lse is row0.
struct UnitAt {
  PagedUnit u;
  int n;
  long long row0;
};

// The unit of this block of a batched launch: units[u] = (table, row0), table over the batch.
template <int C>
__device__ __forceinline__ UnitAt paged_unit_varlen(const int* __restrict__ units, const int* __restrict__ indptr,
                                                    const int* __restrict__ table_seq, const int* __restrict__ seqs,
                                                    int num_seqs, int num_kv_heads, int G, int s) {
  const int table = units[2 * blockIdx.x];
  const int b = table_seq[table];
  const int n = seq_field(seqs, num_seqs, SQ_CHUNK_LEN, b);
  return UnitAt{paged_unit_at<C>(table, table - seq_field(seqs, num_seqs, SQ_TABLE0, b), units[2 * blockIdx.x + 1],
                                 indptr, n, seq_field(seqs, num_seqs, SQ_TILE_BLOCKS, b) * C, num_kv_heads, G, s,
                                 seq_field(seqs, num_seqs, SQ_QUERY_BLOCKS, b)),
                n, seq_field(seqs, num_seqs, SQ_ROW0, b)};
}

}  // namespace cpattn
