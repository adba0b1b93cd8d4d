"""Plain-torch attention over a paged KV cache: the reference, and the CPU path of
``paged_attention.py``'s Triton kernel.

Cache layout (per layer): ``k_cache``, ``v_cache`` ``[num_blocks, block_size, kv_heads,
head_dim]``; token ``t`` of a sequence lives in block ``block_table[t // block_size]`` at offset
``t % block_size`` (its *slot* is ``block * block_size + offset``).

Queries are packed over sequences: ``q [total_q, heads, head_dim]`` with ``cu_q [S + 1]`` the
start of each sequence's queries; sequence ``s`` has ``context_lens[s]`` tokens in the cache,
the last ``n_s = cu_q[s+1] - cu_q[s]`` of which are its queries (decode: ``n_s = 1``; chunked
prefill: a chunk). Query ``i`` sits at position ``context_lens[s] - n_s + i`` and attends to
positions ``0..`` that one (causal). Head ``h`` reads KV head ``h // (heads // kv_heads)`` (GQA).
Scores use ``scale``; softmax in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Stores ``k``/``v [N, kv_heads, head_dim]`` at ``slots [N]`` of the caches, in place."""
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    """``[length, kv_heads, head_dim]``: the first ``length`` tokens of one sequence."""
    bs = cache.shape[1]
    blocks = block_table[: (length + bs - 1) // bs]
    return cache.index_select(0, blocks).reshape(-1, *cache.shape[2:])[:length]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float) -> Tensor:
    """``[total_q, heads, head_dim]`` in ``q``'s dtype; see the module doc."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    starts, lens = cu_q.tolist(), context_lens.tolist()
    for s, L in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        k = gather_kv(k_cache, block_tables[s], L).to(cd).repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[s], L).to(cd).repeat_interleave(group, dim=1)
        qs = q[q0:q1].to(cd)                                          # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale          # [H, n, L]
        pos = L - (q1 - q0) + torch.arange(q1 - q0, device=q.device)
        allowed = torch.arange(L, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)
    return out
