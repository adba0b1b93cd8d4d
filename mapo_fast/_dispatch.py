"""Backend selection shared by every feature: Triton kernels on CUDA tensors (when Triton
imports), the plain-torch path elsewhere. ``MAPO_FAST_BACKEND=torch|triton`` forces one
(``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_module(name: str) -> ModuleType:
    """``mapo_fast.kernels.<name>`` (raises ImportError where Triton is unavailable)."""
    return importlib.import_module(f"mapo_fast.kernels.{name}")


def backend_for(x: torch.Tensor, kernel: str) -> str:
    """``"triton"`` or ``"torch"`` for computing feature ``kernel`` on tensor ``x``."""
    choice = os.environ.get("MAPO_FAST_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"environment variable MAPO_FAST_BACKEND must be one of {BACKENDS}, "
                         f"got {choice!r}")
    if choice != "auto":
        return choice
    if not x.is_cuda:
        return "torch"
    try:
        triton_module(kernel)
    except ImportError:
        return "torch"
    return "triton"
