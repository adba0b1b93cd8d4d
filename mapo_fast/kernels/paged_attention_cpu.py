"""The CPU path of paged attention. Decode rows (one query per sequence) go to the C++ kernel
``_paged_attention_cpu`` (``csrc/paged_attention_cpu.cpp``), which reads each sequence's keys
and values in place from their blocks (``decode``; float32 / float64, where the extension is
built). Prefill chunks, and decode rows without the extension, take ``paged_attention_ref``'s
gathers and decode cascade, each attention computed by torch's fused CPU flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``: one pass over the keys, no ``[n, L]``
score matrix, log-sum-exp returned for the cascade's merge) instead of the reference's matmul /
mask / softmax / matmul. Same layout and semantics as the reference (its module doc); available
where torch has that operator (``available``)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, List, Optional, Tuple

import torch

from . import paged_attention_ref as ref
from ._common import torch_at_least

Tensor = torch.Tensor
#: the first torch release whose CPU flash-attention operator takes ``attn_mask`` and returns
#: the log-sum-exp
MIN_TORCH = (2, 3)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch has the fused CPU operator (checked by version, then by name)."""
    return torch_at_least(MIN_TORCH) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], scale: float,
           with_lse: bool = False, causal: bool = False):
    """``paged_attention_ref._attend``'s contract through the fused operator: ``q [S, n, H,
    D]`` against ``k``/``v [S, L, kv_heads, D]`` where ``allowed [S, n, L]`` (None:
    everything). ``causal`` (a whole sequence, ``n == L``): the operator's causal flag and its
    own grouped heads (head ``h`` reads KV head ``h // (H // kv_heads)``). Otherwise the ``H //
    kv_heads`` query heads of a KV head and the ``n`` queries form one row block of that head
    (``[S, kv_heads, n * group, D]``: each key is read once per KV head, not per query head)
    with ``allowed`` as an additive mask. Returns ``[S, n, H, D]`` (and the log-sum-exp
    ``[S, n, H]``)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    S, n, H, D = q.shape
    if causal:
        out, lse = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True,
                      scale=scale)
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
        return (out, lse) if with_lse else out
    kv, L = k.shape[2], k.shape[1]
    group = H // kv
    qh = q.view(S, n, kv, group, D).permute(0, 2, 1, 3, 4).reshape(S, kv, n * group, D)
    mask = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
        mask = bias[:, None, :, None, :].expand(S, 1, n, group, L).reshape(S, 1, n * group, L)
    out, lse = op(qh, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask,
                  scale=scale)
    out = out.view(S, kv, n, group, D).permute(0, 2, 1, 3, 4).reshape(S, n, H, D)
    if not with_lse:
        return out
    return out, lse.view(S, kv, n, group).permute(0, 2, 1, 3).reshape(S, n, H)


#: the dtypes the in-place decode kernel computes in
DECODE_DTYPES = (torch.float32, torch.float64)
EXTENSION = "mapo_fast.kernels._paged_attention_cpu"


@functools.lru_cache(maxsize=None)
def extension() -> Optional[Any]:
    """The C++ decode kernel's module, or None where it is not built."""
    return importlib.import_module(EXTENSION) if importlib.util.find_spec(EXTENSION) else None


#: the decode kernel's row-loop levels, lowest first (the extension's numbering): the
#: architecture's baseline, AVX2 + FMA, AVX-512F (the float32 path for heads of 64 and 128)
ISAS = ("generic", "avx2", "avx512")
#: names the level to run instead of the CPU's best (e.g. ``generic``), as torch's
#: ``ATEN_CPU_CAPABILITY`` does for its own kernels; read once, at the first decode
ISA_ENV = "MAPO_FAST_CPU_ISA"


@functools.lru_cache(maxsize=None)
def supported_isas() -> Tuple[str, ...]:
    """The levels this CPU runs, lowest first (needs the extension; asked once: every decode
    call checks its level against it)."""
    return ISAS[:extension().best_isa() + 1]


@functools.lru_cache(maxsize=None)
def default_isa() -> str:
    """The level ``decode`` runs when given none: ``ISA_ENV`` where set, else the CPU's best.
    A value that is not a level this CPU runs raises ``ValueError`` naming it."""
    supported = supported_isas()
    chosen = os.environ.get(ISA_ENV, "").strip().lower()
    if not chosen:
        return supported[-1]
    if chosen not in supported:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r}: this CPU runs {supported} "
                         f"(of {ISAS})")
    return chosen


def decodes_in_place(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether ``decode`` takes these inputs: the extension built, CPU tensors of one dtype in
    ``DECODE_DTYPES``, contiguous caches."""
    return extension() is not None and q.device.type == "cpu" and \
        q.dtype in DECODE_DTYPES and k_cache.dtype == v_cache.dtype == q.dtype and \
        k_cache.is_contiguous() and v_cache.is_contiguous()


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
           context_lens: Tensor, scale: float, out: Optional[Tensor] = None,
           threads: Optional[int] = None, isa: Optional[str] = None) -> Tensor:
    """One query per sequence, keys and values read in place: ``q [S, H, D]``, caches
    ``[num_blocks, block_size, kv_heads, D]``, ``block_tables [S, W]``, ``context_lens [S]``
    (the query's own key included). A cascade: the leading blocks a group of sequences shares
    (``shared_blocks``) are attended once for all of them, then merged with each one's own.
    Returns ``[S, H, D]`` in ``q``'s dtype, computed in it, written into ``out`` when given
    (contiguous, ``q``'s shape and dtype). Inputs as
    ``decodes_in_place`` accepts; ``threads`` defaults to ``torch.get_num_threads()``;
    ``isa``, the row loops' level (one of ``supported_isas()``), to ``default_isa()``. A
    context length outside ``[1, W * block_size]``, a block outside the pool or a level this
    CPU does not run raises ``ValueError`` before anything is read."""
    isa = default_isa() if isa is None else isa
    if isa not in supported_isas():
        raise ValueError(f"paged decode: `isa` must be one of {supported_isas()} on this CPU, "
                         f"got {isa!r}")
    S, H, D = q.shape
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"paged decode: `out` must be contiguous {tuple(q.shape)} {q.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if S == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    extension().decode(q.element_size(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                       out.data_ptr(), tables.data_ptr(), lens.data_ptr(), S, H,
                       k_cache.shape[2], D, k_cache.shape[1], tables.shape[1],
                       k_cache.shape[0], float(scale),
                       threads if threads is not None else torch.get_num_threads(),
                       ISAS.index(isa))
    return out


def shared_blocks(block_tables: Tensor, context_lens: Tensor, block_size: int) -> List[int]:
    """How many leading blocks ``decode`` attends once for each sequence's group (the kernel's
    own rule: ``paged_attention_ref.shared_prefixes`` without a minimum saving). Needs the
    extension; lengths in ``[1, W * block_size]``."""
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    return extension().shared_blocks(tables.data_ptr(), lens.data_ptr(), tables.shape[0],
                                     tables.shape[1], block_size)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float) -> Tensor:
    """``paged_attention_ref.paged_attention`` with the fused ``attend``, and decode rows
    through ``decode`` where ``decodes_in_place``."""
    def rows(q_rows: Tensor, tables: Tensor, lens: Tensor) -> Tensor:
        return decode(q_rows, k_cache, v_cache, tables, lens, scale)
    in_place = decodes_in_place(q, k_cache, v_cache)
    return ref.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_q, scale,
                               attend=attend, decode=rows if in_place else None)
