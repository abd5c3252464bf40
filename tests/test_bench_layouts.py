"""Host-side layouts of the GPU benchmarks, checked on the CPU against brute force.

``cpattn.bench.batched_prefill.doc_block_mask`` is the FlexAttention peer's document-causal
BlockMask over packed requests: expanding its full/partial block lists (and the mask on the
partial ones) must give exactly the dense document-causal mask.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.bench.batched_prefill import dense_flops, doc_block_mask, past_lengths


def dense_truth(pasts, n):
    nq, nk = n * len(pasts), sum(p + n for p in pasts)
    m = np.zeros((nq, nk), bool)
    k_off = 0
    for b, p in enumerate(pasts):
        for r in range(n):
            m[b * n + r, k_off:k_off + p + r + 1] = True
        k_off += p + n
    return m


@settings(max_examples=40, deadline=None)
@given(pasts=st.lists(st.integers(0, 5), min_size=1, max_size=5), per=st.integers(1, 3),
       block=st.sampled_from([2, 4]))
def test_doc_block_mask_expands_to_the_document_causal_mask(pasts, per, block):
    pasts = [p * block for p in pasts]
    n = per * block
    kv_num, kv_idx, full_num, full_idx, delta = doc_block_mask(pasts, n, block)
    truth = dense_truth(pasts, n)
    got = np.zeros_like(truth)
    for qb in range(kv_num.shape[2]):
        rows = np.arange(qb * block, (qb + 1) * block)
        for j in full_idx[0, 0, qb, :full_num[0, 0, qb]]:
            got[np.ix_(rows, np.arange(j * block, (j + 1) * block))] = True
        for j in kv_idx[0, 0, qb, :kv_num[0, 0, qb]]:
            for qi in rows:
                for ki in range(j * block, (j + 1) * block):
                    got[qi, ki] |= ki - qi <= delta[qi]
    assert np.array_equal(got, truth)
    # no block listed as both full and partial
    for qb in range(kv_num.shape[2]):
        assert not set(full_idx[0, 0, qb, :full_num[0, 0, qb]]) & set(kv_idx[0, 0, qb, :kv_num[0, 0, qb]])


def test_doc_block_mask_rejects_unaligned_lengths():
    with pytest.raises(ValueError, match="multiples of 128"):
        doc_block_mask([0, 100], 256)
    with pytest.raises(ValueError, match="multiples of 4"):
        doc_block_mask([4], 6, 4)


def test_past_lengths_spread_and_flops():
    p = past_lengths(64, 32768)
    assert p[0] == 0 and p[-1] == 32768 and len(p) == 64 and all(x % 128 == 0 for x in p)
    assert all(b >= a for a, b in zip(p, p[1:]))
    assert past_lengths(1, 1000) == [896]
    # one request, no past: n(n+1)/2 visible pairs, 4 D Hq FLOPs each
    assert dense_flops([0], 4) == 4.0 * 128 * 32 * 10
