"""The error budgets of cpattn, in one table: how far an output may be from the float64 oracle.

Both backends compute in float32 and store ``o`` in the storage dtype (one rounding). With
``u`` the unit roundoff of the storage dtype (2^-11 float16, 2^-8 bfloat16) and ``vmax`` the
largest ``|v|`` the output can mix (``o`` is a convex combination of values, so ``|o| <= vmax``):

* **reference** (``numpy``, and ``emulated``, which runs the same math): float32 attention is
  accurate to about 1e-6 relative; rounding ``o`` once adds at most ``u * vmax``. Budget
  ``u * vmax + 2e-5 * max(1, vmax)``.
* **kernel** (``cupy``): the same, plus the probabilities ``P`` rounded to the storage dtype for
  the ``P.V`` product on the tensor cores (at most ``u * vmax`` more, since the weights sum to
  one) and ``exp2`` approximations. Budget ``4 u vmax + 1e-5``: twice the rounding the kernel
  does, as flash-attention's tests allow a kernel twice the error of a storage-dtype reference.
* **log-sum-exp** (float32 on both): the reference is off by a few float32 ulps of ``|lse|``;
  a kernel's approximate ``exp2``/``log2`` by about 1e-6 relative plus the score error. Budget
  ``2e-5 * max(1, |lse|)`` for the reference, ``1e-3 * max(1, |lse|)`` for a kernel.
* **large scores** (any backend): a float32 dot product of ``D`` terms whose scaled sum is at
  most ``S`` in magnitude is off by about ``2^-23 S (sqrt(D) + 1)`` (rounding errors of random
  sign, plus one for the scaling). An error ``delta`` per score moves each softmax weight by at
  most ``exp(2 delta) - 1`` relative, which adds ``2 (exp(2 delta) - 1) vmax`` to ``o``.
  Pass ``score_absmax`` (the largest ``|scale q.k|``) and ``head_dim`` to include it; at ordinary
  scores it is far below the floor.

A budget must stay well below ``vmax``: a wrong running max, a dropped state or an overflowed
exp produce errors of order ``vmax``, and a budget that size would pass them.
"""
from __future__ import annotations

import math

from ..reference.dtypes import check_dtype_name, unit_roundoff

KINDS = ("decode", "prefill", "lse")
REFERENCE_BACKENDS = ("numpy", "emulated")  # the NumPy reference math
KERNEL_BACKENDS = ("cupy",)  # the CUDA kernels

FLOAT32_SCORE_ULP = 2.0 ** -23


def backend_name(backend) -> str:
    """``"numpy"``, ``"emulated"`` or ``"cupy"`` from a name, a ``cpattn.testing`` backend or a cache."""
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    if name is None and hasattr(backend, "backend"):  # a cache: where its pool lives
        name = backend.backend
    if name not in REFERENCE_BACKENDS + KERNEL_BACKENDS:
        raise ValueError(f"backend: expected one of {REFERENCE_BACKENDS + KERNEL_BACKENDS}, got {backend!r}")
    return name


def score_error(score_absmax: float, head_dim: int) -> float:
    """Error of one float32 score ``scale q.k`` whose magnitude is at most ``score_absmax``."""
    return FLOAT32_SCORE_ULP * float(score_absmax) * (math.sqrt(head_dim) + 1)


def budget(kind: str, dtype: str, v_absmax: float, *, backend="numpy", score_absmax: float = 0.0,
           head_dim: int = 1) -> float:
    """Allowed ``max |x - oracle|`` for an output of ``kind`` (see the module docstring).

    Args:
        kind: ``"decode"`` or ``"prefill"`` (``o``, same rule), or ``"lse"``.
        dtype: storage dtype name of the cache, ``"float16"`` or ``"bfloat16"``.
        v_absmax: for ``o``, the largest ``|v|`` in the cache (an upper bound is fine); for
            ``"lse"``, the largest ``|lse|`` of the oracle.
        backend: ``"numpy"``, ``"emulated"`` or ``"cupy"`` (or a backend object, or a cache).
        score_absmax, head_dim: the largest ``|scale q.k|`` and the head size, for outputs of
            extreme scores; 0 leaves the score term out.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    u = unit_roundoff(check_dtype_name(dtype))
    kernel = backend_name(backend) in KERNEL_BACKENDS
    mag = abs(float(v_absmax))
    if kind == "lse":
        return (1e-3 if kernel else 2e-5) * max(1.0, mag) + 2 * score_error(score_absmax, head_dim)
    base = 4 * u * mag + 1e-5 if kernel else u * mag + 2e-5 * max(1.0, mag)
    return base + 2 * math.expm1(2 * score_error(score_absmax, head_dim)) * mag
