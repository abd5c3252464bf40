"""Serving on the chunk cache: a model, attention backends behind one cache protocol, a server.

    from cpattn.serving import ModelConfig, TinyLM, Server
    server = Server(TinyLM(ModelConfig()), num_chunks=256, backend="auto")
    r = server.submit(prompt_tokens, max_new_tokens=8)
    report = server.run()          # r.output: the generated tokens; print(report)

``model``: ``TinyLM`` and its dense check; ``backends``: the cache protocol (``ServingCache``),
the backend protocol (``AttentionBackend``) and ``ChunkTreeBackend`` (NumPy or CUDA, by the cache); ``server``:
``Server``, ``Request``, ``ServingReport``; ``workloads``: prompt sets that share prefixes.
"""
from .backends import (AttentionBackend, AttentionStats, ChunkTreeBackend, PrefillOptions, ServingCache,
                       make_backend, resolve_backend)
from .model import ModelConfig, TinyLM, causal_attention, dense_generate
from .server import Request, Server, ServingModel, ServingReport, check_against_dense
from .workloads import footprint_chunks, shared_prompt_workload, system_prompt_workload

__all__ = ["AttentionBackend", "AttentionStats", "ChunkTreeBackend", "ModelConfig", "PrefillOptions", "Request",
           "Server", "ServingCache", "ServingModel", "ServingReport", "TinyLM", "causal_attention",
           "check_against_dense", "dense_generate", "footprint_chunks", "make_backend", "resolve_backend",
           "shared_prompt_workload", "system_prompt_workload"]
