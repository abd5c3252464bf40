"""Worked examples that use cpattn end to end (installed with the package).

``python -m cpattn.examples.serving`` runs the serving pipeline: a small decoder-only model whose
attention goes through the chunk tree (prefix reuse, CompactAttention chunked prefill,
ChunkAttention decode). ``python -m cpattn.examples.figures`` prints the pictures of docs/.
"""
