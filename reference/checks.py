"""Argument checks shared by both backends: one message format, one rule per kind of argument.

Every message reads ``argument: expected ..., got ...``. Bools are not integers (``True`` is
refused wherever a count, an index or a size is asked for), NumPy integers are integers, and a
scalar is not a list. Each public call of the package runs its checks before it changes
anything, so a refused call leaves every cache and buffer as it was.
"""
from __future__ import annotations

import operator
from numbers import Real

import numpy as np

INT32_MAX = 2**31 - 1  # sizes and ids that reach int32 tables or kernel arguments stay below this
MAX_SCALE = 1e30  # a softmax scale above this overflows float32 scores (scale * log2(e) in the kernels)


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, np.ndarray)


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int with lo <= value < hi (either bound optional; ``hi`` excluded, like
    ``range``). Wrong type (bools and floats too): TypeError; out of range: ValueError."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    v = operator.index(value)
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        if hi is None:
            want = f">= {lo}"
        elif lo is None:
            want = f"< {hi}"
        else:
            want = f"in [{lo}, {hi})"
        raise ValueError(f"{name}: expected an integer {want}, got {v}")
    return v


def check_optional_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    """``None`` or ``check_int``."""
    return None if value is None else check_int(value, name, lo, hi)


def check_ids(value, name: str) -> list[int]:
    """A 1-D list of integer ids from a list, tuple or 1-D integer array; scalars are refused."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
            raise TypeError(f"{name}: expected a 1-D list of integer ids, got an array of dtype "
                            f"{value.dtype} with shape {value.shape}")
        return [int(x) for x in value]
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name}: expected a 1-D list of integer ids, got {type(value).__name__} {value!r}")
    bad = next((x for x in value if not is_int(x)), None)
    if bad is not None:
        raise TypeError(f"{name}: expected a 1-D list of integer ids, got an element {bad!r} "
                        f"({type(bad).__name__})")
    return [operator.index(x) for x in value]


def is_real(value) -> bool:
    """True for Python and NumPy real numbers (ints and floats), False for bools and the rest."""
    return isinstance(value, (Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_token_ids(value, name: str, vocab_size: int | None = None) -> list[int]:
    """A 1-D list of integer token ids (list, tuple or 1-D integer array), each in
    [0, vocab_size) when ``vocab_size`` is given: a negative id would wrap around an embedding
    table, one past the vocabulary would fail deep inside a model."""
    ids = check_ids(value, name)
    if ids and vocab_size is not None:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: expected token ids in [0, {vocab_size}) (the vocabulary), got "
                             f"{bad} at position {ids.index(bad)}")
    return ids


def check_real(value, name: str, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] (``lo_open``: (lo, hi]). Not a number (a bool, a
    string, None, an array): TypeError; NaN, infinity or out of range: ValueError."""
    if not is_real(value):
        raise TypeError(f"{name}: expected a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not np.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
            or (hi is not None and v > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        want = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ValueError(f"{name}: expected a finite number{' ' + want if want else ''}, got {value!r}")
    return v


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: None means 1 / sqrt(head_dim); otherwise a finite number > 0."""
    if scale is None:
        return 1.0 / float(np.sqrt(head_dim))
    return check_real(scale, "scale", lo=0.0, hi=MAX_SCALE, lo_open=True)


def check_choice(value, name: str, choices) -> str:
    """One of the strings ``choices``. Not a string: TypeError; another string: ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {tuple(choices)}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_instance(value, name: str, cls, what: str):
    """``value`` when it is an instance of ``cls`` (a class or a tuple of classes), else
    TypeError naming ``what`` was expected (e.g. "a DecodePlan from build_decode_plan")."""
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {what}, got {type(value).__module__}.{type(value).__qualname__} "
                        f"{_short(value)}")
    return value


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


__all__ = ["is_int", "is_real", "check_int", "check_optional_int", "check_ids", "check_real", "check_scale",
           "check_choice", "check_bool", "check_instance", "check_token_ids", "cdiv", "INT32_MAX", "MAX_SCALE"]
