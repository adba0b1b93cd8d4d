"""Launch configurations as data, shared by the launchers and the ahead-of-time compile check.

Each Triton module describes every configuration its launchers can choose as ``Config``s
(block sizes, warps, stages) and its kernels' constexpr flags through one function per kernel;
the launcher takes its configuration from that function, and ``compile_cases()`` enumerates
the same functions over every dtype and flag, so a launch the check has not compiled cannot
happen. ``kernels/compile_check.py`` compiles the cases for a GPU target without a GPU.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Sequence, Tuple

import torch

#: Triton's name of each tensor dtype in a kernel signature (pointer types get a ``*``).
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                torch.int8: "i8", torch.uint8: "u8"}


@dataclass(frozen=True)
class Config:
    """Tile sizes (kernel-specific constexpr names) and the launch's warps and stages."""
    blocks: Mapping[str, int]
    num_warps: int
    num_stages: int = 1


@dataclass(frozen=True)
class CompileCase:
    """One kernel at one launch configuration: what ``triton.compile`` needs, plus a label.

    ``signature``: every non-constexpr argument's Triton type (``"*bf16"``, ``"i32"``, ...);
    ``constexprs``: every constexpr argument's value. ``default``: a configuration the
    launchers use on a GPU (held to "no spills"); others are reachable but secondary.
    ``targets``: the compute capabilities (``90`` for sm_90) the launchers use it on (empty:
    all)."""
    kernel: Any
    label: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    default: bool = True
    wgmma: bool = False  # expect wgmma on sm_90 (half-precision dot, >= 64 rows)
    no_mma: bool = False  # no tensor-core instruction may appear (exact fp32 math)
    notes: Tuple[str, ...] = field(default=())
    targets: Tuple[int, ...] = field(default=())

    @property
    def name(self) -> str:
        """``module.kernel``, e.g. ``linear_logprob._fwd_kernel``."""
        fn = self.kernel.fn
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def ptr(dtype: torch.dtype) -> str:
    return "*" + TRITON_TYPES[dtype]


def signature(kernel: Any, types: Mapping[str, str], default: str = "i32") -> Dict[str, str]:
    """The signature of ``kernel``'s non-constexpr arguments: ``types`` by name, ``default``
    (32-bit integer) for the rest. Names not in the kernel raise (a stale table)."""
    params = inspect.signature(kernel.fn).parameters.values()
    names = [p.name for p in params if "constexpr" not in str(p.annotation)]
    unknown = set(types) - {p.name for p in params}
    assert not unknown, f"{kernel.fn.__name__}: no arguments {sorted(unknown)}"
    return {n: types.get(n, default) for n in names}


def flag_grid(**flags: Sequence[Any]) -> Iterator[Dict[str, Any]]:
    """Every combination of the given flag values, as dicts."""
    keys = list(flags)
    for values in itertools.product(*(flags[k] for k in keys)):
        yield dict(zip(keys, values))


def collect(*sources: Callable[[], Iterable[CompileCase]]) -> list:
    return [case for src in sources for case in src()]
