"""Attention over the paged KV cache, for decode and chunked prefill: validation and device
dispatch, once. On CUDA: flash-attn's ``flash_attn_with_kvcache`` with a block table when it is
importable and the batch fits it (every sequence the same number of queries, e.g. a decode
step; fp16/bf16; blocks of a multiple of 256 tokens, flash-attn's page size rule), else the
Triton kernel (``kernels/paged_attention.py``, any page size). On CPU
(``kernels/paged_attention_cpu.py``, ``"torch_fused"``, where torch has its fused CPU
flash-attention kernel) decode rows are read in place by a C++ kernel where it is built, and
prefill chunks gather their pages for the fused kernel; elsewhere the
plain-torch reference (``kernels/paged_attention_ref.py``, ``"torch"``). Layout and
semantics are documented in the latter; they are flash-attn's (``[num_blocks, block_size,
kv_heads, head_dim]`` pages, causal queries aligned to the end of each sequence's context)."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import torch

from .. import _checks as chk
from .._dispatch import backend_for, triton_module
from ..kernels import paged_attention_cpu, paged_attention_ref

Tensor = torch.Tensor
KERNEL = "paged_attention"


FLASH_PAGE_MULTIPLE = 256  # flash-attn's paged KV needs page sizes divisible by this
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_kvcache_fn() -> Optional[Callable]:
    """flash-attn's ``flash_attn_with_kvcache``, or None when flash-attn does not import."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch / CUDA
        return None
    return flash_attn_with_kvcache


def choose_path(device: torch.device, dtype: torch.dtype, page: int, uniform: bool,
                backend: str) -> str:
    """The implementation for a batch, from host facts only: ``backend`` (``backend_for``),
    whether every sequence has the same positive number of queries (``uniform``)."""
    if backend != "triton":
        return "torch_fused" if device.type == "cpu" and paged_attention_cpu.available() \
            else "torch"
    if device.type == "cuda" and dtype in FLASH_DTYPES and page % FLASH_PAGE_MULTIPLE == 0 \
            and uniform and flash_kvcache_fn() is not None:
        return "flash_attn"
    return "triton"


def attention_path(q: Tensor, k_cache: Tensor, cu_q: Tensor) -> str:
    """Which implementation ``paged_attention`` uses for these inputs: ``"flash_attn"``,
    ``"triton"``, ``"torch_fused"`` or ``"torch"`` (reads ``cu_q``: a host synchronisation on
    CUDA)."""
    n_q = cu_q[1:] - cu_q[:-1]
    uniform = bool(n_q.numel()) and bool((n_q == n_q[0]).all()) and int(n_q[0]) > 0
    return choose_path(q.device, q.dtype, k_cache.shape[1], uniform, backend_for(q, KERNEL))


def flash_paged_attention(fn: Callable, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                          block_tables: Tensor, context_lens: Tensor, scale: float) -> Tensor:
    """``paged_attention`` through ``fn`` = ``flash_attn_with_kvcache`` for a batch whose
    ``S`` sequences all have ``n = total_q / S`` queries: ``q`` viewed ``[S, n, heads,
    head_dim]``, ``cache_seqlens = context_lens`` (the queries' keys already written), int32
    block table, ``causal=True`` (query ``i`` sees positions up to ``context_len - n + i``)."""
    S = context_lens.shape[0]
    out = fn(q.reshape(S, q.shape[0] // S, *q.shape[1:]), k_cache, v_cache,
             cache_seqlens=context_lens.to(torch.int32),
             block_table=block_tables.to(torch.int32).contiguous(),
             softmax_scale=scale, causal=True)
    return out.reshape(q.shape)


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Stores new keys/values ``[N, kv_heads, head_dim]`` at their cache ``slots [N]``
    (``block * block_size + offset``, from the block manager), in place."""
    fn = "write_kv"
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape[1:]) != tuple(k_cache.shape[2:]):
            chk.fail(fn, name, f"must have shape [N, {k_cache.shape[2]}, {k_cache.shape[3]}], "
                               f"got {tuple(x.shape)}")
    if slots.shape != (k.shape[0],):
        chk.fail(fn, "slots", f"must have shape ({k.shape[0]},), got {tuple(slots.shape)}")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= k_cache.shape[0] * k_cache.shape[1]):
        chk.fail(fn, "slots", f"must lie in [0, {k_cache.shape[0] * k_cache.shape[1]}), found "
                              f"{int(slots.min()) if int(slots.min()) < 0 else int(slots.max())}")
    store_kv(k_cache, v_cache, k, v, slots.to(torch.int64))


def store_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """``write_kv`` without validation (no host synchronisation), for callers that computed
    ``slots`` (int64) themselves, such as ``RolloutEngine`` in every layer."""
    paged_attention_ref.write_kv(k_cache, v_cache, k, v, slots)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, *, scale: Optional[float] = None
                    ) -> Tensor:
    """Causal attention of packed queries against a paged KV cache.

    Args:
        q: ``[total_q, heads, head_dim]``, the queries of all sequences, packed.
        k_cache, v_cache: ``[num_blocks, block_size, kv_heads, head_dim]``, ``q``'s dtype.
        block_tables: ``[S, max_blocks]`` int, each sequence's blocks (padding is never read).
        context_lens: ``[S]`` int, tokens of each sequence in the cache, its queries included.
        cu_q: ``[S + 1]`` int, where each sequence's queries start in ``q``.
        scale: defaults to ``1 / sqrt(head_dim)``.

    Returns ``[total_q, heads, head_dim]`` in ``q``'s dtype. ``heads`` must be a multiple of
    ``kv_heads`` (GQA).
    """
    fn = "paged_attention"
    chk.tensor(fn, "q", q, dims=(3,), floating=True)
    chk.tensor(fn, "k_cache", k_cache, dims=(4,), floating=True)
    if v_cache.shape != k_cache.shape:
        chk.fail(fn, "v_cache", f"must have the shape of `k_cache` {tuple(k_cache.shape)}, got "
                                f"{tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        chk.fail(fn, "k_cache", f"must have the dtype of `q` ({q.dtype}), got {k_cache.dtype}")
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        chk.fail(fn, "k_cache", f"head_dim {k_cache.shape[3]} differs from `q`'s {head_dim}")
    if heads % kv_heads:
        chk.fail(fn, "q", f"has {heads} heads, not a multiple of the cache's {kv_heads} KV heads")
    S = context_lens.shape[0]
    if cu_q.shape != (S + 1,) or int(cu_q[0]) != 0 or int(cu_q[-1]) != q.shape[0] or \
            bool((cu_q[1:] < cu_q[:-1]).any()):
        chk.fail(fn, "cu_q", f"must be [S + 1 = {S + 1}] non-decreasing offsets from 0 to "
                             f"{q.shape[0]}, got {cu_q.tolist()}")
    n_q = cu_q[1:] - cu_q[:-1]
    if bool((context_lens < n_q).any()):
        chk.fail(fn, "context_lens", f"{context_lens.tolist()} must count each sequence's "
                                     f"queries too ({n_q.tolist()})")
    need = (int(context_lens.max()) + k_cache.shape[1] - 1) // k_cache.shape[1] if S else 0
    if block_tables.dim() != 2 or block_tables.shape[0] != S or block_tables.shape[1] < need:
        chk.fail(fn, "block_tables", f"must be [S={S}, >= {need}] for context_lens "
                                     f"{context_lens.tolist()}, got {tuple(block_tables.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return run_paged_attention(attention_path(q, k_cache, cu_q), q, k_cache, v_cache,
                               block_tables, context_lens, cu_q, scale)


def run_paged_attention(path: str, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        block_tables: Tensor, context_lens: Tensor, cu_q: Tensor,
                        scale: float, plan: Optional[Any] = None) -> Tensor:
    """``paged_attention`` through ``path`` (from ``choose_path``) without validation and
    without host synchronisation, for callers that built the metadata themselves, such as
    ``RolloutEngine``, which picks the path once per forward pass and calls this per layer;
    ``plan``: the Triton kernel's launch plan (``kernels.paged_attention.plan``), built once
    per forward pass and shared by its layers."""
    if path == "flash_attn":
        return flash_paged_attention(flash_kvcache_fn(), q, k_cache, v_cache, block_tables,
                                     context_lens, scale)
    if path == "triton":
        return triton_module(KERNEL).paged_attention(q, k_cache, v_cache, block_tables,
                                                     context_lens, cu_q, scale, plan_=plan)
    impl = paged_attention_cpu if path == "torch_fused" else paged_attention_ref
    return impl.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_q, scale)


def triton_plan(q: Tensor, k_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                cu_q: Tensor) -> Any:
    """The Triton kernel's launch plan for a forward pass (no host synchronisation)."""
    return triton_module(KERNEL).plan(q.shape, q.dtype, k_cache.shape[2], k_cache.shape[1],
                                      block_tables, context_lens, cu_q)
