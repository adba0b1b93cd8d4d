"""Helpers shared by the kernel modules."""

import os
from typing import Optional, Tuple

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_at_least(version: Tuple[int, int], current: Optional[str] = None) -> bool:
    """Whether torch's ``(major, minor)`` (``current``: a version string, default the running
    torch's) is at least ``version``; local build tags such as ``+cpu`` and pre-release suffixes
    are ignored."""
    text = (torch.__version__ if current is None else current).split("+")[0]
    major, minor = (int("".join(c for c in x if c.isdigit()) or 0)
                    for x in (text.split(".") + ["0"])[:2])
    return (major, minor) >= tuple(version)
