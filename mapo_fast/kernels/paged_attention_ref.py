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

from typing import Any, Callable, Dict, List, Optional

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
    blocks = block_table[: (length + bs - 1) // bs].tolist()
    return gather_blocks(cache, blocks).reshape(-1, *cache.shape[2:])[:length]


def gather_blocks(cache: Tensor, blocks: List[int]) -> Tensor:
    """``cache``'s ``blocks`` in order, ``[len(blocks), block_size, kv_heads, head_dim]``: a
    view when they are consecutive (a prompt's blocks, allocated together, usually are),
    else a copy."""
    if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and \
            blocks == list(range(blocks[0], blocks[0] + len(blocks))):
        return cache[blocks[0]:blocks[0] + len(blocks)]
    return cache.index_select(0, torch.tensor(blocks, dtype=torch.long, device=cache.device))


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], scale: float,
            with_lse: bool = False, causal: bool = False):
    """``q [S, n, H, D]`` against ``k``/``v [S, L, kv_heads, D]`` where ``allowed [S, n, L]``
    (None: everything; with ``causal``, a whole sequence, ``n == L``: query ``i`` sees keys
    ``0..i``). GQA: the ``H // kv_heads`` query heads of each KV head form one batched matmul
    against a strided view of that head's keys (K/V are never copied per query head). Returns
    ``[S, n, H, D]`` in ``q``'s dtype, and with ``with_lse`` also the log-sum-exp of each
    row's scores, ``[S, n, H]``."""
    S, n, H, D = q.shape
    kv_heads, L = k.shape[2], k.shape[1]
    if causal:
        allowed = torch.ones(n, L, dtype=torch.bool, device=q.device).tril()[None]
    group = H // kv_heads
    out = q.new_empty(S, n, kv_heads, group, D)
    lse = q.new_empty(S, n, kv_heads, group) if with_lse else None
    for h in range(kv_heads):
        qh = q[:, :, h * group:(h + 1) * group].reshape(S, n * group, D)
        scores = torch.bmm(qh, k[:, :, h].transpose(1, 2)).view(S, n, group, L) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
        if with_lse:
            m = torch.logsumexp(scores, dim=-1, keepdim=True)
            lse[:, :, h] = m[..., 0]
            probs = (scores - m).exp_().view(S, n * group, L)
        else:
            probs = torch.softmax(scores, dim=-1).view(S, n * group, L)
        out[:, :, h] = torch.bmm(probs, v[:, :, h]).view(S, n, group, D)
    out = out.view(S, n, H, D)
    return (out, lse.view(S, n, H)) if with_lse else out


#: a group's shared blocks are attended once only when that saves gathering at least this
#: many tokens (below it the extra small matmuls cost more than the gathers they save)
CASCADE_MIN_SAVED = 512


def shared_prefixes(tables: List[List[int]], lens: List[int], block_size: int,
                    min_saved: int = CASCADE_MIN_SAVED) -> List[int]:
    """For each sequence, how many leading blocks it shares with all the others that start
    with the same block (0 when none does, or when sharing them saves gathering fewer than
    ``min_saved`` tokens): the group's common prompt after a fork. Only blocks wholly before
    every member's last token count (those are complete and, being shared, never written)."""
    groups: Dict[int, List[int]] = {}
    for r, t in enumerate(tables):
        groups.setdefault(t[0], []).append(r)
    shared = [0] * len(tables)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        first, limit, p = tables[rows[0]], min((lens[r] - 1) // block_size for r in rows), 0
        while p < limit and all(tables[r][p] == first[p] for r in rows):
            p += 1
        if p * block_size * (len(rows) - 1) < min_saved:
            continue
        for r in rows:
            shared[r] = p
    return shared


#: ``attend(q, k, v, allowed, scale, with_lse=False, causal=False)``: ``_attend``'s contract
#: (``causal``: a whole sequence, ``n == L``, causally masked, with ``allowed`` None)
Attend = Callable[..., Any]


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: List[List[int]],
            lens: List[int], scale: float, attend: Attend = None) -> Tensor:
    """One query per sequence (``q [S, H, D]``, compute dtype), as a cascade: the blocks a
    group of sequences shares (``shared_prefixes``) are gathered once and attended by all
    the group's queries together; each sequence's own blocks are gathered into one padded
    batch; the two parts merge by their log-sum-exps. Returns ``[S, H, D]``. ``attend``
    (default ``_attend``) computes each part."""
    attend = attend or _attend
    S, bs, dev, cd = len(tables), k_cache.shape[1], q.device, q.dtype
    kv_shape = k_cache.shape[2:]
    shared = shared_prefixes(tables, lens, bs, CASCADE_MIN_SAVED)
    own = [t[p:(L + bs - 1) // bs] for t, p, L in zip(tables, shared, lens)]
    nb = max(map(len, own))
    blocks = torch.tensor([b + [0] * (nb - len(b)) for b in own], device=dev).view(-1)
    k = k_cache.index_select(0, blocks).view(S, nb * bs, *kv_shape).to(cd)   # whole blocks
    v = v_cache.index_select(0, blocks).view(S, nb * bs, *kv_shape).to(cd)
    own_len = torch.tensor([L - p * bs for L, p in zip(lens, shared)], device=dev)
    allowed = (torch.arange(nb * bs, device=dev)[None, :] < own_len[:, None])[:, None, :]
    if not any(shared):
        return attend(q[:, None], k, v, allowed, scale)[:, 0]
    out, lse = attend(q[:, None], k, v, allowed, scale, with_lse=True)
    out, lse = out[:, 0], lse[:, 0]                                   # [S, H, D], [S, H]
    groups: Dict[tuple, List[int]] = {}
    for r, p in enumerate(shared):
        if p:
            groups.setdefault((tables[r][0], p), []).append(r)
    order = [r for rows in groups.values() for r in rows]
    idx = torch.tensor(order, device=dev)
    q_grouped = q[idx]
    parts, start = [], 0
    for (_, p), rows in groups.items():  # each group's shared blocks, attended once
        common = tables[rows[0]][:p]
        kp = gather_blocks(k_cache, common).reshape(1, p * bs, *kv_shape).to(cd)
        vp = gather_blocks(v_cache, common).reshape(1, p * bs, *kv_shape).to(cd)
        parts.append(attend(q_grouped[None, start:start + len(rows)], kp, vp, None, scale,
                            with_lse=True))
        start += len(rows)
    # one merge of every grouped row's two parts by their log-sum-exps
    out[idx] = merge(out[idx], lse[idx], torch.cat([o[0] for o, _ in parts]),
                     torch.cat([lse_p[0] for _, lse_p in parts]))
    return out


def merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
    """Attention over two disjoint sets of keys combined into attention over both, from each
    part's output ``[..., H, D]`` and log-sum-exp ``[..., H]``."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - m).exp()[..., None], (lse_b - m).exp()[..., None]
    return (o_a * w_a + o_b * w_b) / (w_a + w_b)


#: ``decode(q [n, H, D], block_tables [n, W], context_lens [n]) -> [n, H, D]``: the one-query
#: sequences of a batch, attended in one call
Decode = Callable[[Tensor, Tensor, Tensor], Tensor]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float,
                    attend: Attend = None, decode: Optional[Decode] = None) -> Tensor:
    """``[total_q, heads, head_dim]`` in ``q``'s dtype; see the module doc.

    Sequences with one query (decode) are attended together (``_decode``: the blocks a group
    shares once, each sequence's own blocks in one padded batch; or ``decode``, given one).
    Longer chunks (prefill) are attended by ``_prefill``, those of equal length together.
    ``attend`` (default ``_attend``, the plain-torch reference) computes each attention;
    ``paged_attention_cpu`` passes a fused one, and its in-place decode kernel as
    ``decode``."""
    attend = attend or _attend
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    starts, lens = cu_q.tolist(), context_lens.tolist()
    n_q = [b - a for a, b in zip(starts, starts[1:])]
    single = [s for s, n in enumerate(n_q) if n == 1]
    if decode is not None and len(single) == len(n_q):  # a decode step: no rows to pick
        return decode(q, block_tables, context_lens)
    if single:
        idx = torch.tensor(single, device=q.device)
        rows = cu_q.index_select(0, idx)
        if decode is not None:
            out[rows] = decode(q[rows], block_tables.index_select(0, idx),
                               context_lens.index_select(0, idx))
        else:
            tables = block_tables.index_select(0, idx).tolist()
            out[rows] = _decode(q[rows].to(cd), k_cache, v_cache, tables,
                                [lens[s] for s in single], scale, attend).to(q.dtype)
    chunks: Dict[int, List[int]] = {}  # sequences with more than one query, by query count
    for s, n in enumerate(n_q):
        if n > 1:
            chunks.setdefault(n, []).append(s)
    for n, seqs in chunks.items():
        _prefill(q, out, k_cache, v_cache, block_tables, [lens[s] for s in seqs],
                 [starts[s] for s in seqs], seqs, n, scale, attend, cd)
    return out


def _prefill(q: Tensor, out: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
             lens: List[int], starts: List[int], seqs: List[int], n: int, scale: float,
             attend: Attend, cd: torch.dtype) -> None:
    """The ``n`` queries of each sequence of ``seqs`` (context lengths ``lens``, first query
    row ``starts``) into ``out``. Each sequence's keys split into its history (the ``L - n``
    tokens before its queries, all visible: no mask) and its own ``n`` tokens (causal); the own
    parts of all the sequences form one batch, each history is attended alone, and the two
    merge by their log-sum-exps (no ``[n, L]`` mask is built)."""
    ks, vs = [], []
    for s, L in zip(seqs, lens):
        ks.append(gather_kv(k_cache, block_tables[s], L).to(cd))
        vs.append(gather_kv(v_cache, block_tables[s], L).to(cd))
    qs = torch.stack([q[a:a + n] for a in starts]).to(cd)                       # [S, n, H, D]
    history = any(L > n for L in lens)
    own = attend(qs, torch.stack([k[-n:] for k in ks]), torch.stack([v[-n:] for v in vs]), None,
                 scale, with_lse=history, causal=True)
    if history:
        o_own, lse_own = own
        rows = [i for i, L in enumerate(lens) if L > n]
        parts = [attend(qs[i:i + 1], ks[i][None, :lens[i] - n], vs[i][None, :lens[i] - n], None,
                        scale, with_lse=True) for i in rows]
        idx = torch.tensor(rows, device=q.device)
        own = o_own.index_copy(0, idx, merge(o_own[idx], lse_own[idx],
                                             torch.cat([o for o, _ in parts]),
                                             torch.cat([lse for _, lse in parts])))
    for i, a in enumerate(starts):
        out[a:a + n] = own[i].to(out.dtype)
