#!/usr/bin/env python3
"""Small decode and prefill workloads for compute-sanitizer (memcheck, racecheck, synccheck):
every kernel family and the awkward shapes (partial tails, key-split warps, multiple row tiles,
partial own pages, tiles and sub-groups) run once; prefill also under summary='sampled'
(sampled_block_mass: key splits, c 128's two steps a block, c 16's four blocks a step)."""
import sys

import cupy
import numpy as np

from cpattn.chunk_cache import GpuChunkCache
from cpattn.chunk_attention import ChunkAttentionDecode
from cpattn.reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries

for dtype, D, c, Hkv, ratio, n in (("float16", 128, 64, 2, 1, 5), ("bfloat16", 64, 32, 1, 8, 9),
                                   ("float16", 64, 16, 2, 4, 3), ("bfloat16", 128, 128, 1, 1, 70)):
    prompts = prefix_tree_prompts(n, n, c, levels=2, vocab=6)
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=n, vocab=6, max_len=max(map(len, prompts)) + 4)
    cache = GpuChunkCache(1, Hkv, D, sum(-(-(len(p) + 1) // c) for p in prompts) + 2, chunk_size=c, dtype=dtype)
    ids = fill_cache(cache, prompts, kv)
    dec = ChunkAttentionDecode(cache, piece_chunks=2, private_piece_chunks=1)
    dec.plan(ids, Hkv * ratio)
    q = cupy.asarray(random_queries(1, n, Hkv * ratio, D, dtype))
    lse = cupy.empty((n, Hkv * ratio), cupy.float32)
    o, _ = dec.run(q, 0, lse_out=lse)
    cupy.cuda.Device().synchronize()
    assert bool(cupy.isfinite(lse).all())
    print(f"sanitize: {dtype} D={D} c={c} ratio={ratio} batch={n}: ok")
    # the batch-invariant kernel (chunk_attend_invariant + chunk_merge_multi): one query, then 3 in a tree
    inv = ChunkAttentionDecode(cache, batch_invariant=True)
    for k, mask in ((1, None), (3, np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool))):
        if min(cache.seq_len(s) for s in ids) < k:
            continue
        inv.plan(ids, Hkv * ratio, queries_per_seq=k, tree_mask=mask)
        q = cupy.asarray(random_queries(2, n * k, Hkv * ratio, D, dtype))
        lse = cupy.empty((n * k, Hkv * ratio), cupy.float32)
        inv.run(q, 0, lse_out=lse)
        cupy.cuda.Device().synchronize()
        assert bool(cupy.isfinite(lse).all())
    print(f"sanitize batch-invariant: {dtype} D={D} c={c} ratio={ratio} batch={n}: ok")
# batch-invariant decode with shared fixed blocks (9 shared chunks: one shared block, a partial
# one per sequence), pieces of several 64-row tiles (6 sequences x 4 heads x 3 queries)
from cpattn.reference.workloads import shared_prefix_prompts  # noqa: E402

for dtype, D, c in (("bfloat16", 64, 16), ("float16", 128, 64)):
    prompts = shared_prefix_prompts(6, 9 * c + 3, c + 1, seed=c, vocab=6)
    kv = TokenKV(1, 2, D, dtype=dtype, seed=c, vocab=6, max_len=max(map(len, prompts)) + 4)
    cache = GpuChunkCache(1, 2, D, sum(-(-(len(p) + 1) // c) for p in prompts) + 2, chunk_size=c, dtype=dtype)
    ids = fill_cache(cache, prompts, kv)
    inv = ChunkAttentionDecode(cache, batch_invariant=True)
    plan = inv.plan(ids, 8, queries_per_seq=3)
    assert plan.num_pieces >= 1, plan.summary()
    lse = cupy.empty((6 * 3, 8), cupy.float32)
    inv.run(cupy.asarray(random_queries(3, 6 * 3, 8, D, dtype)), 0, lse_out=lse)
    cupy.cuda.Device().synchronize()
    assert bool(cupy.isfinite(lse).all())
    print(f"sanitize batch-invariant shared blocks: {dtype} D={D} c={c}: {plan.summary()}: ok")

from cpattn.compact_attention import BlockMeans, compact_prefill
from cpattn.reference.workloads import long_context_qkv

for dtype, D, c, Hkv, ratio, P, n, tile, sub in (("bfloat16", 128, 64, 2, 4, 5 * 64, 2 * 64 - 3, None, None),
                                                 ("float16", 64, 32, 1, 8, 7 * 32, 70, 32, 2),
                                                 ("float16", 128, 16, 2, 1, 3 * 16, 5, None, None),
                                                 ("bfloat16", 64, 128, 1, 4, 2 * 128, 130, 128, 1)):
    w = long_context_qkv(P + n, P + n, Hkv * ratio, Hkv, D, dtype=dtype, locality_len=2 * c, needle_len=c)
    cache = GpuChunkCache(1, Hkv, D, (P + n) // c + 2, chunk_size=c, dtype=dtype)
    seq = cache.add_sequence([])
    cache.extend(seq, list(range(P + n)), w.k, w.v)
    means = BlockMeans(cache)
    kernels = ("mma", "wgmma") if cupy.cuda.Device().compute_capability == "90" else ("mma",)
    for alpha, kernel in [(a, k) for a in (0.0, 0.06) for k in kernels]:
        r = compact_prefill(cache, means, seq, cupy.asarray(w.q[0, P:]), alpha=alpha, q_tile=tile, group_size=sub,
                            kernel=kernel)
        cupy.cuda.Device().synchronize()
        assert bool(cupy.isfinite(r.lse).all())
    # summary='sampled' (sampled_block_mass): the recall rule's default, and under the alpha rule
    for opt in (dict(recall=0.9, sample_rows=3), dict(alpha=0.06, summary="sampled")):
        r = compact_prefill(cache, means, seq, cupy.asarray(w.q[0, P:]), q_tile=tile, group_size=sub, kernel="mma",
                            **opt)
        cupy.cuda.Device().synchronize()
        assert bool(cupy.isfinite(r.lse).all())
    print(f"sanitize prefill ({', '.join(kernels)}; sampled summary): {dtype} D={D} c={c} ratio={ratio} P={P} "
          f"n={n}: ok")

# sampled_block_mass over several key splits (8 steps of CPATTN_SAMPLED_KEYS keys each), c 128 and c 16
for dtype, D, c, Hkv, ratio, P, n in (("bfloat16", 128, 128, 2, 4, 40 * 128, 300),
                                      ("float16", 64, 16, 1, 8, 200 * 16, 37)):
    w = long_context_qkv(P + n, P + n, Hkv * ratio, Hkv, D, dtype=dtype, locality_len=2 * c, needle_len=c)
    cache = GpuChunkCache(1, Hkv, D, (P + n) // c + 2, chunk_size=c, dtype=dtype)
    seq = cache.add_sequence([])
    cache.extend(seq, list(range(P + n)), w.k, w.v)
    r = compact_prefill(cache, BlockMeans(cache), seq, cupy.asarray(w.q[0, P:]), recall=0.95, kernel="mma")
    cupy.cuda.Device().synchronize()
    assert bool(cupy.isfinite(r.lse).all())
    print(f"sanitize sampled summary, key splits: {dtype} D={D} c={c} ratio={ratio} P={P} n={n}: ok")

# the model's fused kernels (model_ops.cu) through GraphedDecoder, eager and replayed, on a tiny random Llama
from cpattn.serving.graphed import GraphedDecoder  # noqa: E402
from cpattn.serving.llama import CacheAttention, LlamaConfig, LlamaModel  # noqa: E402

cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=200, num_layers=2, num_q_heads=4,
                  num_kv_heads=2, head_dim=64, context_length=512)
rng = np.random.default_rng(5)
shapes = {"token_embd.weight": (300, 128), "output_norm.weight": (128,)}
for i in range(2):
    shapes.update({f"blk.{i}.{n}.weight": s for n, s in (
        ("attn_norm", (128,)), ("ffn_norm", (128,)), ("attn_q", (256, 128)), ("attn_k", (128, 128)),
        ("attn_v", (128, 128)), ("attn_output", (128, 256)), ("ffn_gate", (200, 128)), ("ffn_up", (200, 128)),
        ("ffn_down", (128, 200)))})
model = LlamaModel(cfg, {k: (0.1 * rng.standard_normal(v)).astype(np.float32) for k, v in shapes.items()}, xp=cupy)
for graph in (False, True):
    cache = model.new_cache(16, chunk_size=16, max_sequences=4)
    attn = CacheAttention(cache, 4)
    seqs = [cache.add_sequence([]) for _ in range(3)]
    last = [int(model.prefill(attn, s, list(range(1, 6 + 7 * k)), chunk_tokens=16).argmax().get())
            for k, s in enumerate(seqs)]
    dec = GraphedDecoder(model, attn, graph=graph)
    for _ in range(20):  # crosses chunk boundaries: new plans, new captures
        last = dec.step(seqs, last).tolist()
    cupy.cuda.Device().synchronize()
    print(f"sanitize model_ops ({'graph' if graph else 'eager'}): 3 sequences x 20 steps: ok")
sys.exit(0)
