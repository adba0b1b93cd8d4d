"""Triton kernel for attention over a paged KV cache, for decode and chunked prefill alike (the
math and layout are written out in ``paged_attention_ref.py``, the reference it is tested
against).

Grid: (query tiles, heads). A query tile is up to ``BLOCK_M`` consecutive queries of one
sequence (a host-side table maps tiles to sequences, so sequences of any query count share one
launch). Each program walks its sequence's block table page by page (``BLOCK_N`` = the cache
block size), loads the page's K and V for the head's KV head (GQA), applies the causal mask from
the queries' absolute positions and keeps an online softmax in fp32; pages wholly after the
tile's last query are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

Tensor = torch.Tensor


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, cu_q_ptr,
                            tile_seq_ptr, tile_start_ptr, scale, max_blocks, group,
                            stride_qn, stride_qh, stride_kb, stride_kt, stride_kh,
                            stride_on, stride_oh, HEAD_DIM,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(tile_seq_ptr + tile)
    i0 = tl.load(tile_start_ptr + tile)              # first query of the tile, within the seq
    q_start = tl.load(cu_q_ptr + s)
    n_q = tl.load(cu_q_ptr + s + 1) - q_start
    L = tl.load(lens_ptr + s)
    kvh = h // group

    m_idx = i0 + tl.arange(0, BLOCK_M)
    m_ok = m_idx < n_q
    pos = L - n_q + m_idx                            # absolute positions of the queries
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + m_idx)[:, None].to(tl.int64) * stride_qn + h * stride_qh
                + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    last = tl.minimum(L - n_q + i0 + BLOCK_M, L)     # keys after the last query: never read
    for p in range(0, tl.cdiv(last, BLOCK_N)):
        blk = tl.load(tables_ptr + s.to(tl.int64) * max_blocks + p).to(tl.int64)
        t = p * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = t < L
        base = blk * stride_kb + kvh * stride_kh
        kv_off = base + tl.arange(0, BLOCK_N)[:, None] * stride_kt + d[None, :]
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = sc * scale
        allowed = (t[None, :] <= pos[:, None]) & t_ok[None, :] & m_ok[:, None]
        sc = tl.where(allowed, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        pr = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + m_idx)[:, None].to(tl.int64) * stride_on + h * stride_oh
             + d[None, :], o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float,
                    out: Tensor = None) -> Tensor:
    """Same arguments as ``paged_attention_ref.paged_attention``; ``out`` may supply the output
    buffer. The cache's block size and the head dimension must be powers of two >= 16 for the
    block size (tl.dot's minimum); the head dimension is padded to one."""
    total_q, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and block_size >= 16
    assert block_size & (block_size - 1) == 0, "block size must be a power of two"
    if out is None:
        out = torch.empty_like(q)
    block_m = 16 if interpreting() else 64
    counts = (cu_q[1:] - cu_q[:-1]).tolist()
    tile_seq, tile_start = [], []
    for s, n in enumerate(counts):
        for i0 in range(0, n, block_m):
            tile_seq.append(s)
            tile_start.append(i0)
    if not tile_seq:
        return out
    dev = q.device
    tables = block_tables.to(torch.int32).contiguous()
    _paged_attention_kernel[(len(tile_seq), heads)](
        q, k_cache, v_cache, out, tables, context_lens.to(torch.int32).contiguous(),
        cu_q.to(torch.int32).contiguous(), torch.tensor(tile_seq, dtype=torch.int32, device=dev),
        torch.tensor(tile_start, dtype=torch.int32, device=dev), float(scale),
        tables.shape[1], heads // kv_heads, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), head_dim,
        BLOCK_M=block_m, BLOCK_N=block_size, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out
