"""Soak: a serving loop of random operations on one cache, checked for leaks and corruption.

The loop admits requests (a system prompt from a small set + a user suffix: the cached prefix is
reused, the rest prefilled chunk by chunk through reserve / write_kv / commit, optionally with
CompactAttention per layer), runs decode steps over a batch of live sequences (append one token
each, then decode every layer, the plan rebuilt only when the tree or the batch changed), forks
(parallel sampling), finishes requests, and evicts. A full pool is handled like a server would:
finish the oldest request and go on. Every ``--check-every`` operations a few sequences are
checked against the model (K/V read back byte for byte, decode within budget of a float64
oracle computed from the model, not from the cache). At the end:

  * pool accounting is exact: free + cached + referenced == capacity, every chunk in exactly
    one state, refcounts == live paths through each node;
  * the CuPy memory pool's used bytes are flat after warm-up (the max over the second half of
    the post-warm-up samples exceeds the first half's by at most --mem-tolerance-mb);
  * Python objects do not grow after warm-up beyond tolerance.

    python -m cpattn.bench.soak --backend cupy --ops 10000 --out soak.json   # realistic sizes, GPU
    python -m cpattn.bench.soak --backend numpy --ops 300 --out soak.json    # small, any machine

(``tools/soak.py`` runs the same.) Attention goes through the server's backend
(``cpattn.serving.ChunkTreeBackend``), so the soak exercises what a server runs.

Prints progress and ops/s; writes a JSON summary to --out; exits 1 when any check failed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from collections import Counter

import numpy as np

from ..arrays import to_host
from ..reference.chunk_cache import CacheError, CacheFullError, ChunkCache
from ..reference.dtypes import to_float32, to_storage
from ..reference.workloads import TokenKV
from ..serving.backends import ChunkTreeBackend
from ..testing.budgets import budget
from .table import markdown_table

# realistic (GPU) and small (NumPy) defaults; any flag overrides
SIZES = {
    "cupy": dict(layers=4, kv_heads=8, q_heads=32, head_dim=128, chunk_size=64, num_chunks=1024,
                 max_seqs=256, live=96, max_batch=64, system_prompts=8, system_len=(256, 2048),
                 suffix_len=(1, 512), gen_len=(16, 512), prefill_chunk=512, vocab=256, kv_positions=4096),
    "numpy": dict(layers=1, kv_heads=2, q_heads=4, head_dim=16, chunk_size=16, num_chunks=32,
                  max_seqs=24, live=10, max_batch=8, system_prompts=3, system_len=(16, 96),
                  suffix_len=(1, 40), gen_len=(4, 40), prefill_chunk=32, vocab=16, kv_positions=512),
}
OPS = ("admit", "decode_step", "fork", "finish", "evict")
WEIGHTS = (0.22, 0.55, 0.06, 0.14, 0.03)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cpattn.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["cupy", "numpy"], default="cupy")
    p.add_argument("--ops", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    for name, typ in (("layers", int), ("kv_heads", int), ("q_heads", int), ("head_dim", int),
                      ("chunk_size", int), ("num_chunks", int), ("max_seqs", int), ("live", int),
                      ("max_batch", int), ("system_prompts", int), ("prefill_chunk", int), ("vocab", int),
                      ("kv_positions", int)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    p.add_argument("--prefill-attn", action="store_true",
                   help="run CompactAttention on every prefill chunk (cpattn.compact_attention on cupy)")
    p.add_argument("--check-every", type=int, default=250, help="model checks every N ops")
    p.add_argument("--sample-every", type=int, default=50, help="memory/object samples every N ops")
    p.add_argument("--warmup-frac", type=float, default=0.2)
    p.add_argument("--mem-tolerance-mb", type=float, default=64.0)
    p.add_argument("--objects-tolerance", type=float, default=0.25, help="relative growth allowed")
    p.add_argument("--progress-every", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON summary path")
    args = p.parse_args(argv)
    for k, v in SIZES[args.backend].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.progress_every = args.progress_every or max(1, args.ops // 10)
    c = args.chunk_size
    args.prefill_chunk = max(c, args.prefill_chunk // c * c)  # prefill chunks start on a block
    return args


# ----------------------------------------------------------------------------- the rig
class Rig:
    """The cache (NumPy ``ChunkCache`` or ``GpuChunkCache``), the server's attention backend on
    it, host/device copies and the device memory pool's counters."""

    def __init__(self, a):
        self.name = a.backend
        if a.backend == "cupy":
            import cupy

            from ..chunk_cache import GpuChunkCache as cache_class

            self.xp, self.pool = cupy, cupy.get_default_memory_pool()
        else:
            cache_class, self.xp, self.pool = ChunkCache, np, None
        self.cache = cache_class(a.layers, a.kv_heads, a.head_dim, a.num_chunks, chunk_size=a.chunk_size,
                                 dtype=a.dtype, max_sequences=a.max_seqs)
        self.attention = ChunkTreeBackend(self.cache, measure_recall=False)

    @property
    def plans_built(self) -> int:
        return self.attention.stats.plans_built

    def dev(self, x):
        return self.xp.asarray(x)

    def host(self, x):
        return to_host(x)

    def decode(self, batch, q, layer):
        """o [B, Hq, D] storage dtype on the cache's device; the plan rebuilt only when needed."""
        return self.attention.decode(batch, self.dev(q), layer)

    def prefill(self, seq, q, layer):
        return self.attention.prefill(seq, self.dev(q), layer)

    def memory_used(self):
        return 0 if self.pool is None else int(self.pool.used_bytes())

    def memory_reserved(self):
        return 0 if self.pool is None else int(self.pool.total_bytes())

    def sync(self):
        self.attention.sync()


# ----------------------------------------------------------------------------- checks
def accounting(cache, live) -> dict:
    """Pool accounting recomputed from the tree (not from the cache's counters)."""
    nodes = list(cache.nodes())
    referenced = {n.chunk for n in nodes if n.ref > 0}
    cached = [n.chunk for n in cache.cached_nodes()]
    free = cache.free_chunks()
    through = Counter(id(m) for s in live for m in cache.seq_nodes(s))  # live paths through each node
    ref_errors = sum(1 for n in nodes if n.ref != through[id(n)])
    states = len(referenced) + len(cached) + len(free)
    exact = (states == cache.num_chunks and referenced | set(cached) | set(free) == set(range(cache.num_chunks))
             and len(set(cached)) == len(cached) and len(set(free)) == len(free) and ref_errors == 0
             and all(n.ref > 0 or (n.registered and n in cache.cached_nodes()) for n in nodes)
             and (cache.num_free, cache.num_cached, cache.num_referenced) == (len(free), len(cached), len(referenced)))
    return dict(capacity=cache.num_chunks, free=len(free), cached=len(cached), referenced=len(referenced),
                refcount_errors=ref_errors, sequences=len(live), exact=bool(exact))


def model_decode_oracle(kv: TokenKV, tokens, q, layer, dtype):
    """float64 decode of one sequence from the model's K/V (tokens -> TokenKV), q [Hq, D]."""
    k, v = kv(tokens)
    k = to_float32(k[layer], dtype).astype(np.float64)  # [n, Hkv, D]
    v = to_float32(v[layer], dtype).astype(np.float64)
    qf = to_float32(q, dtype).astype(np.float64)
    Hq, D = qf.shape
    G = Hq // k.shape[1]
    out = np.empty((Hq, D))
    for h in range(Hq):
        s = k[:, h // G] @ qf[h] / np.sqrt(D)
        p = np.exp(s - s.max())
        out[h] = p @ v[:, h // G] / p.sum()
    return out, float(np.abs(v).max())


def growth(samples, start):
    """(max over the 2nd half - max over the 1st half) of the samples taken after ``start``."""
    post = [v for i, v in samples if i >= start]
    if len(post) < 4:
        return 0, post
    half = len(post) // 2
    return max(post[half:]) - max(post[:half]), post


# ----------------------------------------------------------------------------- the loop
class Soak:
    def __init__(self, a):
        self.a = a
        self.rng = np.random.default_rng(a.seed)
        self.rig = Rig(a)
        self.cache = self.rig.cache
        self.kv = TokenKV(a.layers, a.kv_heads, a.head_dim, dtype=a.dtype, seed=a.seed, vocab=a.vocab,
                          max_len=a.kv_positions)
        lo, hi = a.system_len
        self.system = [self.rng.integers(0, a.vocab, int(self.rng.integers(lo, hi + 1))).tolist()
                       for _ in range(a.system_prompts)]
        self.live: dict[int, list[int]] = {}  # the model: each live sequence's tokens
        self.target: dict[int, int] = {}  # length at which a request finishes
        self.counts = Counter()
        self.events = Counter()
        self.failures: list[str] = []
        self.max_err = 0.0
        self.decode_checks = self.kv_checks = 0
        self.tokens_decoded = 0
        self.mem, self.objs = [], []

    # -------------------------------------------------------------- helpers
    def fail(self, msg):
        if len(self.failures) < 20:
            self.failures.append(msg)

    def kv_dev(self, tokens, start):
        k, v = self.kv(tokens, start=start)
        return self.rig.dev(k), self.rig.dev(v)

    def make_room(self):
        """A server's answer to a full pool: finish the oldest request."""
        if self.live:
            self.finish(next(iter(self.live)))
            self.events["finished to make room"] += 1

    def finish(self, sid):
        self.cache.release(sid)
        del self.live[sid]
        self.target.pop(sid, None)

    # -------------------------------------------------------------- operations
    def admit(self):
        a = self.a
        if len(self.live) >= a.max_seqs:
            self.finish(next(iter(self.live)))
        sys_p = self.system[int(self.rng.integers(len(self.system)))]
        lo, hi = a.suffix_len
        prompt = sys_p + self.rng.integers(0, a.vocab, int(self.rng.integers(lo, hi + 1))).tolist()
        try:  # the last prompt token is recomputed for its logits: cap the reuse below it
            sid = self.cache.add_sequence(prompt, max_match=len(prompt) - 1)
        except CacheError as e:  # slots: only when max_seqs is tiny
            self.events[str(e).split(":")[0]] += 1
            return
        n = self.cache.seq_len(sid)
        self.events["prefix tokens reused"] += n
        self.live[sid] = prompt[:n]
        glo, ghi = a.gen_len
        self.target[sid] = len(prompt) + int(self.rng.integers(glo, ghi + 1))
        while len(self.live[sid]) < len(prompt):  # prefill chunk by chunk, as a model would
            start = len(self.live[sid])
            piece = prompt[start: start + a.prefill_chunk]
            try:
                slots = self.cache.reserve(sid, piece)
            except CacheFullError:
                self.events["pool full"] += 1
                if len(self.live) == 1:  # nothing else to finish: give this request up
                    self.finish(sid)
                    return
                self.make_room()  # the oldest request, never this one (it is the newest)
                continue
            k, v = self.kv(piece, start=start)
            for layer in range(a.layers):
                self.cache.write_kv(layer, slots, self.rig.dev(k[layer]), self.rig.dev(v[layer]))
                if a.prefill_attn:
                    q = self.queries(len(piece), start + layer)
                    self.rig.prefill(sid, q, layer)
            self.cache.commit(sid)
            self.live[sid] += piece

    def queries(self, n, seed):
        r = np.random.default_rng(seed)
        return to_storage(r.standard_normal((n, self.a.q_heads, self.a.head_dim)).astype(np.float32), self.a.dtype)

    def decode_step(self):
        ready = [s for s, t in self.live.items() if t]
        if not ready:
            return self.admit()
        batch = ready[: self.a.max_batch]
        toks = self.rng.integers(0, self.a.vocab, len(batch)).tolist()
        ks, vs = zip(*(self.kv([t], start=len(self.live[s])) for s, t in zip(batch, toks)))
        k, v = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
        try:
            self.cache.append(batch, toks, self.rig.dev(k), self.rig.dev(v))
        except CacheFullError:
            self.events["pool full"] += 1
            self.make_room()
            return
        for s, t in zip(batch, toks):
            self.live[s].append(t)
        q = self.queries(len(batch), int(self.rng.integers(1 << 30)))
        for layer in range(self.a.layers):
            self.rig.decode(batch, q, layer)
        self.tokens_decoded += len(batch)
        for s in batch:
            if len(self.live[s]) >= self.target.get(s, 1 << 60):
                self.finish(s)

    def fork(self):
        if not self.live or len(self.live) >= self.a.max_seqs:
            return
        parent = list(self.live)[int(self.rng.integers(len(self.live)))]
        try:
            child = self.cache.fork(parent)
        except CacheFullError:
            self.events["pool full"] += 1
            self.make_room()
            return
        self.live[child] = list(self.live[parent])
        self.target[child] = self.target.get(parent, len(self.live[child]) + 1)

    def finish_random(self):
        if self.live:
            self.finish(list(self.live)[int(self.rng.integers(len(self.live)))])

    def evict(self):
        self.cache.evict(int(self.rng.integers(0, 8)))

    # -------------------------------------------------------------- checks
    def check(self):
        """A few live sequences against the model: K/V bytes and decode vs a float64 oracle."""
        a = self.a
        ready = [s for s, t in self.live.items() if t]
        if not ready:
            return
        pick = [ready[i] for i in sorted(self.rng.choice(len(ready), min(4, len(ready)), replace=False))]
        for s in pick:
            k, v = self.kv(self.live[s])
            for layer in range(a.layers):
                rk, rv = (self.rig.host(x) for x in self.cache.read_kv(s, layer))
                if rk.tobytes() != k[layer].tobytes() or rv.tobytes() != v[layer].tobytes():
                    self.fail(f"K/V of sequence {s} layer {layer} differs from what was written")
            self.kv_checks += 1
        q = self.queries(len(pick), int(self.rng.integers(1 << 30)))
        layer = int(self.rng.integers(a.layers))
        o = to_float32(self.rig.host(self.rig.decode(pick, q, layer)), a.dtype)
        for i, s in enumerate(pick):
            want, vmax = model_decode_oracle(self.kv, self.live[s], q[i], layer, a.dtype)
            err = float(np.abs(o[i] - want).max()) if np.isfinite(o[i]).all() else float("inf")
            bound = budget("decode", a.dtype, vmax, backend=self.rig.name)
            self.max_err = max(self.max_err, err / bound)
            if err > bound:
                self.fail(f"decode of sequence {s} (len {len(self.live[s])}) off by {err:.3g} > {bound:.3g}")
            self.decode_checks += 1

    def sample(self, i):
        self.rig.sync()
        self.mem.append((i, self.rig.memory_used()))
        gc.collect()
        self.objs.append((i, len(gc.get_objects())))

    # -------------------------------------------------------------- run
    def run(self):
        a = self.a
        ops = {"admit": self.admit, "decode_step": self.decode_step, "fork": self.fork,
               "finish": self.finish_random, "evict": self.evict}
        choices = self.rng.choice(len(OPS), size=a.ops, p=WEIGHTS)
        t0 = tlast = time.perf_counter()
        warm = int(a.ops * a.warmup_frac)
        for i in range(a.ops):
            name = OPS[choices[i]]
            if name == "admit" and len(self.live) >= a.live:  # keep the load near the target
                name = "finish"
            elif name == "finish" and len(self.live) < a.live // 2:
                name = "admit"
            self.counts[name] += 1
            try:
                ops[name]()
            except Exception as e:  # noqa: BLE001 -- a soak reports, then stops
                self.fail(f"op {i} ({name}) raised {type(e).__name__}: {e}")
                break
            if (i + 1) % a.check_every == 0:
                self.check()
            if i % a.sample_every == 0 or i == warm:
                self.sample(i)
            if (i + 1) % a.progress_every == 0:
                now = time.perf_counter()
                st = self.cache.stats()
                print(f"op {i + 1:>7}/{a.ops}  {a.progress_every / (now - tlast):8.1f} ops/s  live {len(self.live):4d}  "
                      f"chunks free {st['chunks_free']:5d} cached {st['chunks_cached']:5d} "
                      f"referenced {st['chunks_referenced']:5d}  used {self.mem[-1][1] / 2**20:8.1f} MiB  "
                      f"failures {len(self.failures)}", flush=True)
                tlast = now
        self.rig.sync()
        elapsed = time.perf_counter() - t0
        self.check()
        self.sample(a.ops)
        return self.summary(elapsed, warm)

    def summary(self, elapsed, warm):
        a = self.a
        acct = accounting(self.cache, self.live)
        if not acct["exact"]:
            self.fail(f"pool accounting is off: {acct}")
        for s, toks in self.live.items():  # every live sequence's length and tokens (cheap)
            if self.cache.seq_tokens(s) != toks:
                self.fail(f"sequence {s} holds other tokens than the model")
        mem_growth, mem_post = growth(self.mem, warm)
        obj_growth, obj_post = growth(self.objs, warm)
        mem_ok = mem_growth <= a.mem_tolerance_mb * 2**20
        obj_ok = not obj_post or obj_growth <= a.objects_tolerance * max(obj_post[: max(1, len(obj_post) // 2)])
        if not mem_ok:
            self.fail(f"device memory grew {mem_growth / 2**20:.1f} MiB after warm-up")
        if not obj_ok:
            self.fail(f"Python objects grew by {obj_growth} after warm-up")
        if self.decode_checks == 0:
            self.fail("no decode check ran (too few ops for --check-every?)")
        device = "cpu"
        if a.backend == "cupy":
            import cupy

            device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        cfg = {k: v for k, v in vars(a).items() if k not in ("out",)}
        return dict(
            backend=a.backend, device=device, date=datetime.date.today().isoformat(), config=cfg, ops=a.ops,
            elapsed_s=round(elapsed, 3),
            ops_per_s=round(a.ops / elapsed, 1), op_counts=dict(self.counts), events=dict(self.events),
            tokens_decoded=self.tokens_decoded, decode_tokens_per_s=round(self.tokens_decoded / elapsed, 1),
            plans_built=self.rig.plans_built,
            checks=dict(kv=self.kv_checks, decode=self.decode_checks, max_err_over_budget=float(f"{self.max_err:.3g}")),
            accounting=acct,
            memory=dict(used_bytes_at_warmup=next((v for i, v in self.mem if i >= warm), 0),
                        post_warmup_max=max(mem_post, default=0), final=self.mem[-1][1],
                        growth_bytes=int(mem_growth), pool_reserved_bytes=self.rig.memory_reserved(), tolerance_bytes=int(a.mem_tolerance_mb * 2**20), flat=bool(mem_ok),
                        samples=self.mem[:: max(1, len(self.mem) // 200)]),
            python_objects=dict(post_warmup_max=max(obj_post, default=0), growth=int(obj_growth), bounded=bool(obj_ok)),
            failures=self.failures, passed=not self.failures)


def markdown_section(d: dict, path: str) -> str:
    """The BENCHMARKS.md section of a soak summary ``d`` (the JSON ``main`` writes to ``path``)."""
    c, a, m, ch = d["config"], d["accounting"], d["memory"], d["checks"]
    fails = len(d["failures"]) if isinstance(d["failures"], list) else d["failures"]
    row = [f"L={c['layers']} Hkv={c['kv_heads']} Hq={c['q_heads']} D={c['head_dim']} c={c['chunk_size']} "
           f"pool={c['num_chunks']} chunks, {c['dtype']}", d["ops"], d["ops_per_s"],
           ", ".join(f"{k} {v}" for k, v in d["op_counts"].items()),
           f"free {a['free']} + cached {a['cached']} + referenced {a['referenced']} = {a['capacity']} "
           f"(exact: {a['exact']}, refcount errors {a['refcount_errors']})", f"{m['growth_bytes']} bytes",
           f"K/V {ch.get('kv')}, decode {ch.get('decode')}, worst error {ch.get('max_err_over_budget')} of budget",
           fails, d["passed"]]
    return "\n".join([
        f"## Soak ({d['device']}, {d.get('date', '2026-11-24')})", "",
        f"`python -m cpattn.bench.soak --backend {c['backend']} --ops {d['ops']}` (via `tools/gpu_check.sh soak`); "
        f"section generated by `tools/soak_report.py {path}`.", "",
        *markdown_table(["config", "ops", "ops/s", "op counts", "accounting at the end",
                         "CuPy pool growth after warm-up", "checks", "failures", "passed"], [row]), ""])


def main(argv=None) -> int:
    a = parse_args(argv)
    print(f"soak: {a.backend}, {a.ops} ops, L={a.layers} Hkv={a.kv_heads} Hq={a.q_heads} D={a.head_dim} "
          f"c={a.chunk_size} pool={a.num_chunks} chunks, up to {a.max_seqs} sequences", flush=True)
    summary = Soak(a).run()
    print(f"{summary['ops_per_s']} ops/s, {summary['decode_tokens_per_s']} decoded tokens/s; accounting "
          f"{'exact' if summary['accounting']['exact'] else 'OFF'}; memory growth after warm-up "
          f"{summary['memory']['growth_bytes'] / 2**20:.2f} MiB; checks {summary['checks']}; "
          f"{'PASSED' if summary['passed'] else 'FAILED: ' + '; '.join(summary['failures'])}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
