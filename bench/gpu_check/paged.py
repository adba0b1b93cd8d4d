"""The paged-attention section."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .common import Sizes, rel_err

def paged_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Decode (one query per sequence) at ``page`` and at 16x that page, the split-KV merge
    (4 splits, forced) and a chunked-prefill batch (``Sizes.prefill``), against the torch
    path; decode time vs reading K and V once at the measured copy bandwidth, and vs SDPA on
    K/V already gathered contiguous."""
    from mapo_fast.kernels import paged_attention as K
    from mapo_fast.kernels import paged_attention_ref as R
    B, ctx, heads, kvh, D, page = sz.paged
    out = {"sizes": dict(batch=B, context=ctx, heads=heads, kv_heads=kvh, head_dim=D),
           "errors": {}, "ms": {}}
    for pg in (page, page * 16):
        q, kc, vc, tables, lens, cu_q = _paged_batch(B, ctx, heads, kvh, D, pg, dev)
        want = R.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5)
        plan = K.plan(q.shape, q.dtype, kvh, pg, tables, lens, cu_q)
        got = K.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=plan)
        out["errors"][f"page{pg}"] = rel_err(got, want)
        out["ms"][f"triton_page{pg}"] = measure(
            lambda: K.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=plan))
        out[f"splits_page{pg}"] = plan.splits
        if pg == page:  # the split-KV merge on the same batch (forced: a full batch may not)
            split = K.plan(q.shape, q.dtype, kvh, pg, tables, lens, cu_q, splits=4)
            out["errors"]["split_kv"] = rel_err(K.paged_attention(
                q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=split), want)
            out["ms"]["triton_split_kv4"] = measure(lambda: K.paged_attention(
                q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=split))
    _prefill_tile(sz, dev, measure, out)
    kv_bytes = 2 * int(lens.sum()) * kvh * D * q.element_size()
    buf = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    copy_ms = measure(lambda: buf.clone())
    out["copy_gbps"] = 2 * buf.numel() / copy_ms / 1e6  # read + write
    out["ms"]["kv_read_floor"] = kv_bytes / (out["copy_gbps"] * 1e6)
    k = torch.stack([R.gather_kv(kc, t, ctx) for t in tables]).transpose(1, 2)  # [B, kvh, L, D]
    v = torch.stack([R.gather_kv(vc, t, ctx) for t in tables]).transpose(1, 2)
    qd = q[:, :, None, :]
    out["ms"]["sdpa_gathered"] = measure(
        lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True))
    out["tolerance"] = 2e-2  # bf16 products, fp32 softmax sums in another order
    out["ok"] = all(e <= out["tolerance"] for e in out["errors"].values())
    return out


def _prefill_tile(sz: Sizes, dev: torch.device, measure, out: Dict) -> None:
    """The prefill tile against the torch path: ``Sizes.prefill`` sequences, each with ``n``
    new queries at the end of its context (``paged`` sizes); into ``out``."""
    from mapo_fast.kernels import paged_attention as K
    from mapo_fast.kernels import paged_attention_ref as R
    B, ctx, heads, kvh, D, page = sz.paged
    S, n = sz.prefill
    _, kc, vc, tables, lens, _ = _paged_batch(S, ctx, heads, kvh, D, page, dev)
    cu = torch.arange(S + 1, device=dev) * n
    q = torch.randn(S * n, heads, D, device=dev).to(torch.bfloat16)
    want = R.paged_attention(q, kc, vc, tables, lens, cu, D ** -0.5)
    plan = K.plan(q.shape, q.dtype, kvh, page, tables, lens, cu)
    out["errors"]["prefill"] = rel_err(K.paged_attention(q, kc, vc, tables, lens, cu,
                                                         D ** -0.5, plan_=plan), want)
    out["ms"]["triton_prefill"] = measure(
        lambda: K.paged_attention(q, kc, vc, tables, lens, cu, D ** -0.5, plan_=plan))
    out["sizes"]["prefill"] = dict(sequences=S, queries=n, context=ctx)


def _paged_batch(B, ctx, heads, kvh, D, page, dev):
    """A bf16 decode batch: ``B`` queries, paged K/V of ``ctx`` tokens in shuffled pages of
    ``page`` (every third sequence shorter, not a multiple of the page)."""
    per_seq = -(-ctx // page)
    g = torch.Generator(device=dev).manual_seed(1)
    kc = torch.randn(B * per_seq + 1, page, kvh, D, generator=g, device=dev).to(torch.bfloat16)
    vc = torch.randn(kc.shape, generator=g, device=dev).to(torch.bfloat16)
    tables = torch.randperm(B * per_seq, generator=g, device=dev).view(B, per_seq)
    lens = torch.full((B,), ctx, device=dev)
    lens[::3] = max(1, ctx - page // 2 - 1)  # not all a multiple of the page
    cu_q = torch.arange(B + 1, device=dev)
    q = torch.randn(B, heads, D, generator=g, device=dev).to(torch.bfloat16)
    return q, kc, vc, tables, lens, cu_q
