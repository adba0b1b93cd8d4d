"""Argument checks shared by the public ops: each raises ``ValueError`` naming the argument and
the bad value, before any kernel runs."""

from __future__ import annotations

import math
import reprlib
from typing import Any, Optional, Sequence

import torch

Tensor = torch.Tensor


class ConfigError(ValueError):
    """A bad configuration key or value (the trainer's settings, a task's records); the
    message names the key."""


#: Most characters of a bad value echoed in an error message.
REPR_CHARS = 200
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12: set the limits one by one
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = REPR_CHARS, REPR_CHARS, 60


def short_repr(value: Any) -> str:
    """``repr(value)`` in at most ~``REPR_CHARS`` characters, with bounded work however large
    or nested ``value`` is (a YAML alias bomb is millions of shared nodes)."""
    text = _REPR.repr(value)
    return text if len(text) <= REPR_CHARS else text[:REPR_CHARS] + "..."


def fail(fn: str, arg: str, msg: str) -> None:
    raise ValueError(f"{fn}: `{arg}` {msg}")


def tensor(fn: str, arg: str, x, *, dims: Optional[Sequence[int]] = None,
           floating: bool = False, integer: bool = False) -> Tensor:
    if not isinstance(x, torch.Tensor):
        fail(fn, arg, f"must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        fail(fn, arg, f"must have {' or '.join(map(str, dims))} dimensions, "
                      f"got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        fail(fn, arg, f"must be a floating-point tensor, got dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        fail(fn, arg, f"must be an integer tensor, got dtype {x.dtype}")
    return x


def shape(fn: str, arg: str, x: Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        fail(fn, arg, f"must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def same_device(fn: str, ref_arg: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            fail(fn, name, f"is on {x.device}, but `{ref_arg}` is on {ref.device}")


def finite_tensor(fn: str, arg: str, x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        fail(fn, arg, f"must be finite, found {bad}")


def targets_in_range(fn: str, targets: Tensor, vocab: int) -> None:
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab:
        fail(fn, "targets", f"must lie in [0, {vocab}) (the rows of `weight`), "
                            f"found {lo if lo < 0 else hi}")


def number(fn: str, arg: str, x, *, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> float:
    """A finite real number in the stated interval."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or \
            (integer and not float(x).is_integer()):
        fail(fn, arg, f"must be {'an integer' if integer else 'a number'}, got {x!r}")
    x = float(x)
    lo_bad = lo is not None and (x <= lo if lo_open else x < lo)
    hi_bad = hi is not None and (x >= hi if hi_open else x > hi)
    if not math.isfinite(x) or lo_bad or hi_bad:
        interval = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, " \
                   f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
        fail(fn, arg, f"must be a finite number in {interval}, got {x!r}")
    return x


def flag(fn: str, arg: str, x) -> bool:
    """A bool (``True``/``False``; not a string or a number, whose truth is ambiguous)."""
    if not isinstance(x, bool):
        fail(fn, arg, f"must be True or False, got {type(x).__name__} {str(x)[:60]!r}")
    return x


def binary(fn: str, arg: str, x: Tensor) -> None:
    """A bool tensor, or one whose every value is 0 or 1 (not 0.5, not NaN)."""
    if x.dtype != torch.bool and x.numel() and not bool(((x == 0) | (x == 1)).all()):
        bad = x[~((x == 0) | (x == 1))].flatten()[0].item()
        fail(fn, arg, f"must hold only 0 and 1 (or be bool), found {bad}")


def choice(fn: str, arg: str, x, options: Sequence[str]) -> str:
    if x not in options:
        fail(fn, arg, f"must be one of {list(options)}, got {x!r}")
    return x
