"""The pictures of docs/, generated from the NumPy reference (so they cannot drift from it).

    python -m cpattn.examples.figures            # print every figure
    python -m cpattn.examples.figures tree plan  # print some

Each figure is a function returning text; ``docs/make_figures.py`` pastes them into the
Markdown pages between ``<!-- figure: NAME -->`` and ``<!-- /figure -->`` markers, and
``tests/test_pipeline.py`` checks that the pages hold the current text.
"""
from __future__ import annotations

import sys

import numpy as np

from ..reference.chunk_attention import build_decode_plan
from ..reference.chunk_cache import ChunkCache
from ..reference.workloads import TokenKV

C = 4  # chunk size of the small examples: short enough to read, long enough to share


def _word(tokens) -> str:
    """Tokens 0..25 shown as letters, so a chunk reads like a word."""
    return "".join(chr(ord("a") + t % 26) for t in tokens)


def _ids(text: str) -> list[int]:
    return [ord(ch) - ord("a") for ch in text]


def example_cache():
    """A small tree: five prompts that share prefixes (one diverging mid-chunk), one released.

    Returns (cache, {name: sequence id}) with the released sequence left out.
    """
    cache = ChunkCache(num_layers=1, num_kv_heads=1, head_dim=8, num_chunks=16, chunk_size=C)
    kv = TokenKV(1, 1, 8, seed=0, vocab=26)
    seqs = {}
    for name, text in (("s0", "abcdefghijklmn"), ("s1", "abcdefghijklop"), ("s2", "abcdefghqrstu"),
                       ("s3", "abcdwxyzab"), ("s4", "abcdefghijklmnopqr")):
        k, v = kv(_ids(text))
        seqs[name] = cache.add_sequence(_ids(text), k, v)
    cache.release(seqs.pop("s3"))  # its complete chunk "wxyz" stays cached, its tail is freed
    return cache, seqs


def tree_figure() -> str:
    """The chunk tree of ``example_cache`` with pool ids, tokens and reference counts."""
    cache, seqs = example_cache()
    owner = {}
    for name, sid in seqs.items():
        owner.setdefault(cache.seq_nodes(sid)[-1].chunk, []).append(name)
    cached = {n.chunk for n in cache.nodes() if n.ref == 0}
    lines = [f"chunk tree, chunk size {C}: prompts as letters, #k = pool chunk k, ref = live sequences on it",
             "root"]

    def walk(node, prefix):
        kids = node.children
        for i, n in enumerate(kids):
            last = i == len(kids) - 1
            note = []
            if len(n.tokens) < C:
                note.append("partial: private tail of " + ", ".join(owner.get(n.chunk, [])))
            elif n.chunk in cached:
                note.append("cached: no live sequence, kept for later prompts until evicted (LRU)")
            elif n.chunk in owner:
                note.append("tail of " + ", ".join(owner[n.chunk]))
            lines.append(f"{prefix}{'`-- ' if last else '|-- '}#{n.chunk} {_word(n.tokens):<{C}} ref {n.ref}"
                         + (f"   ({'; '.join(note)})" if note else ""))
            walk(n, prefix + ("    " if last else "|   "))

    walk(cache.root, "")
    lines.append("")
    for name, sid in seqs.items():
        lines.append(f"{name} = seq {sid}: {_word(cache.seq_tokens(sid)):<20} path {cache.seq_chunks(sid)}")
    st = cache.stats()
    lines.append(f"stored {st['tokens_stored']} tokens for {st['tokens_flat']} live ones (flat cache: "
                 f"{st['tokens_flat']}); chunks: {st['chunks_referenced']} referenced, {st['chunks_cached']} "
                 f"cached, {st['chunks_free']} free")
    return "\n".join(lines)


def plan_figure(piece_chunks: int | None = 1) -> str:
    """The decode plan of ``example_cache``'s live sequences: segments, pieces, items, arrays."""
    cache, seqs = example_cache()
    batch = list(seqs.values())
    plan = build_decode_plan(cache, batch, piece_chunks=piece_chunks)
    letters = "ABCDEFGHIJ"
    seg_of_chunk = {}
    for s in range(plan.num_segments):
        for ch in plan.piece_chunks[plan.seg_chunk_indptr[s]:plan.seg_chunk_indptr[s + 1]]:
            seg_of_chunk[int(ch)] = letters[s]
    name_of = {sid: name for name, sid in seqs.items()}
    lines = [f"decode plan for batch {batch} (piece_chunks={piece_chunks}); rows in depth-first order",
             "pos  seq       path: A, B = shared segment (phase 1), . = private (phase 2)"]
    for pos in range(plan.batch_size):
        sid = plan.batch[plan.order[pos]]
        cells = [f"{seg_of_chunk.get(ch, '.')}#{ch}" for ch in cache.seq_chunks(sid)]
        lines.append(f"{pos:>3}  {name_of[sid]}={sid:<5}  " + " ".join(f"{c:<4}" for c in cells)
                     + f"  ({cache.seq_len(sid)} tokens)")
    lines.append("")
    lines.append("phase 1, one unit per (piece, kv head): the piece's keys are read once for all its rows")
    for p in range(plan.num_pieces):
        chunks = plan.piece_chunks[plan.piece_chunk_indptr[p]:plan.piece_chunk_indptr[p + 1]].tolist()
        b0, b1 = int(plan.piece_begin[p]), int(plan.piece_end[p])
        seg = seg_of_chunk[chunks[0]]
        lines.append(f"  piece {p} (segment {seg}): chunks {chunks} x positions {b0}..{b1 - 1} -> "
                     f"{b1 - b0} sequences x G query heads attend together; states in rows "
                     f"{int(plan.piece_state_offset[p])}..{int(plan.piece_state_offset[p + 1]) - 1}")
    lines.append("phase 2, one unit per (private item, kv head): one sequence, its own chunks")
    for i in range(plan.num_items):
        chunks = plan.private_chunks[plan.item_begin[i]:plan.item_end[i]].tolist()
        lines.append(f"  item {i}: position {int(plan.item_pos[i])}, chunks {chunks}")
    lines.append("merge: position pos merges the states of seq_pieces[seq_piece_indptr[pos]:...] and of "
                 "its items")
    lines.append("")
    lines.append("the int32 arrays (what the GPU uploads once):")
    for k, v in plan.arrays().items():
        lines.append(f"  {k:<19} {v.tolist()}")
    lines.append(plan.summary())
    return "\n".join(lines)


def serving_figure() -> str:
    """A traced run of the serving example: admissions with prefix reuse, decode steps, releases."""
    from .serving import ModelConfig, PrefillOptions, Server, TinyLM, footprint_chunks, system_prompt_workload

    cfg = ModelConfig(vocab_size=32, num_layers=2, hidden=32, num_q_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_hidden=64)
    work = system_prompt_workload(0, 5, num_systems=2, system_len=40, own_len=(3, 12), max_new_tokens=4,
                                  vocab=cfg.vocab_size)
    pool = footprint_chunks(work[:3], 8) + 1
    server = Server(TinyLM(cfg), pool, chunk_size=8, prefill_chunk=16, options=PrefillOptions(alpha=0.0),
                    measure_recall=False, trace=True)
    for i, (prompt, m) in enumerate(work):
        server.submit(prompt, m, arrival=i)
    rep = server.run()
    head = (f"5 requests over 2 system prompts of 40 tokens, one arriving per step; chunk size 8, prefill "
            f"chunks of 16, pool {pool} chunks")
    return "\n".join([head, *server.log, "",
                      f"{rep.prefill_reused} of {rep.prompt_tokens} prompt tokens reused, "
                      f"{rep.evictions} chunk(s) evicted, {rep.plans_built} plans for {rep.decode_steps} "
                      f"decode steps"])


FIGURES = {"tree": tree_figure, "plan": plan_figure, "serving": serving_figure}


def main(argv=None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(FIGURES)
    for name in names:
        if name not in FIGURES:
            print(f"figure: expected one of {list(FIGURES)}, got {name!r}", file=sys.stderr)
            return 2
        print(f"== {name}\n{FIGURES[name]()}\n")
    return 0


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    sys.exit(main())
