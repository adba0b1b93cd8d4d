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


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """``q [S, n, H, D]`` against ``k``/``v [S, L, kv_heads, D]`` where ``allowed [S, n, L]``.
    GQA: the ``H // kv_heads`` query heads of each KV head form one batched matmul against
    a strided view of that head's keys (K/V are never copied per query head). Returns
    ``[S, n, H, D]`` in ``q``'s dtype."""
    S, n, H, D = q.shape
    kv_heads, L = k.shape[2], k.shape[1]
    group = H // kv_heads
    out = q.new_empty(S, n, kv_heads, group, D)
    for h in range(kv_heads):
        qh = q[:, :, h * group:(h + 1) * group].reshape(S, n * group, D)
        scores = torch.bmm(qh, k[:, :, h].transpose(1, 2)).view(S, n, group, L) * scale
        scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(S, n * group, L)
        out[:, :, h] = torch.bmm(probs, v[:, :, h]).view(S, n, group, D)
    return out.view(S, n, H, D)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float) -> Tensor:
    """``[total_q, heads, head_dim]`` in ``q``'s dtype; see the module doc.

    Sequences with one query (decode) are attended together: their pages gathered into a
    padded ``[S, max_len]`` batch, the padding masked. Longer chunks (prefill) go one
    sequence at a time."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    starts, lens = cu_q.tolist(), context_lens.tolist()
    n_q = [b - a for a, b in zip(starts, starts[1:])]
    single = [s for s, n in enumerate(n_q) if n == 1]
    if single:
        bs, dev = k_cache.shape[1], q.device
        idx = torch.tensor(single, device=dev)
        nb = (max(lens[s] for s in single) + bs - 1) // bs
        blocks = block_tables.index_select(0, idx)[:, :nb].reshape(-1).to(torch.int64)
        kv_shape = (len(single), nb * bs, *k_cache.shape[2:])          # whole blocks
        k = k_cache.index_select(0, blocks).view(kv_shape).to(cd)      # [S1, L, Hkv, D]
        v = v_cache.index_select(0, blocks).view(kv_shape).to(cd)
        t = torch.arange(nb * bs, device=dev)
        allowed = (t[None, :] < context_lens.index_select(0, idx)[:, None])[:, None, :]
        rows = cu_q.index_select(0, idx)
        out[rows] = _attend(q[rows].to(cd)[:, None], k, v, allowed, scale)[:, 0].to(q.dtype)
    for s, n in enumerate(n_q):
        if n <= 1:
            continue
        L, q0 = lens[s], starts[s]
        k = gather_kv(k_cache, block_tables[s], L).to(cd)[None]
        v = gather_kv(v_cache, block_tables[s], L).to(cd)[None]
        pos = L - n + torch.arange(n, device=q.device)
        allowed = torch.arange(L, device=q.device)[None, :] <= pos[:, None]
        out[q0:q0 + n] = _attend(q[q0:q0 + n].to(cd)[None], k, v, allowed[None], scale)[0] \
            .to(q.dtype)
    return out
