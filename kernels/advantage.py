"""Triton kernel for the MAPO advantage (the math is written out in ``advantage_ref.py``).

One segmented-reduction kernel: grid (groups, token blocks). Each program loads its group's
members (a CSR of trajectories sorted by group), computes the group statistics of the outcome
rewards and of the valid per-turn semantic scores (mean or leave-one-out baseline, unbiased
std, spread), the normalised and discount-credited scores, and writes ``A[b, t]`` for every
member ``b`` of the group and the tokens ``t`` of its block. The statistics are recomputed by
each token block of a group: they cost ``O(group size x K)``, far less than the block's writes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting

Tensor = torch.Tensor


@triton.jit
def _normalize(x, ok, NORM_STD: tl.constexpr, LOO: tl.constexpr, eps):
    """Group-normalises the valid entries ``ok`` of ``x`` (any shape); 0 elsewhere."""
    xv = tl.where(ok, x, 0.0)
    n = tl.sum(tl.sum(ok.to(tl.float32), axis=1), axis=0)
    total = tl.sum(tl.sum(xv, axis=1), axis=0)
    mean = total / tl.maximum(n, 1.0)
    dev = tl.where(ok, x - mean, 0.0)
    std = tl.sqrt(tl.sum(tl.sum(dev * dev, axis=1), axis=0) / tl.maximum(n - 1.0, 1.0))
    hi = tl.max(tl.max(tl.where(ok, x, float("-inf")), axis=1), axis=0)
    lo = tl.min(tl.min(tl.where(ok, x, float("inf")), axis=1), axis=0)
    if LOO:
        out = x - (total - x) / tl.maximum(n - 1.0, 1.0)
    else:
        out = x - mean
    if NORM_STD:
        out = out / (std + eps)
    degenerate = tl.where(n > 1.0, 0.0, 1.0) + tl.where(hi > lo, 0.0, 1.0)
    return tl.where(ok, tl.where(degenerate > 0.0, 0.0, out), 0.0)


@triton.jit
def _advantage_kernel(r_ptr, s_ptr, valid_ptr, tt_ptr, order_ptr, offs_ptr, out_ptr,
                      T, K, eps, coef, log_discount, stride_s, stride_tt, stride_out,
                      NORM_STD: tl.constexpr, LOO: tl.constexpr, HAS_SEM: tl.constexpr,
                      DISCOUNT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    g = tl.program_id(0)
    tb = tl.program_id(1)
    start = tl.load(offs_ptr + g)
    n = tl.load(offs_ptr + g + 1) - start
    i = tl.arange(0, BLOCK_G)
    i_ok = i < n
    b = tl.load(order_ptr + start + i, mask=i_ok, other=0).to(tl.int64)
    r = tl.load(r_ptr + b, mask=i_ok, other=0.0).to(tl.float32)
    out = tl.sum(_normalize(r[:, None], i_ok[:, None], NORM_STD, LOO, eps), axis=1)

    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    if HAS_SEM:
        ik = i_ok[:, None] & k_ok[None, :]
        s = tl.load(s_ptr + b[:, None] * stride_s + k[None, :], mask=ik, other=0.0)
        v = tl.load(valid_ptr + b[:, None] * stride_s + k[None, :], mask=ik, other=0) != 0
        sem = _normalize(s.to(tl.float32), v & ik, NORM_STD, LOO, eps)
        if DISCOUNT:
            # cred[i, k] = sum_j [j >= k] discount^(j - k) sem[i, j]
            d = k[:, None] - k[None, :]  # j - k, rows j, columns k
            w = tl.where(d >= 0, tl.exp(d.to(tl.float32) * log_discount), 0.0)
            sem = tl.sum(sem[:, :, None] * w[None, :, :], axis=1)

    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    for m in range(0, n):
        pick = i == m
        b_m = tl.sum(tl.where(pick, b, 0), axis=0)
        a = tl.zeros((BLOCK_T,), dtype=tl.float32) + tl.sum(tl.where(pick, out, 0.0), axis=0)
        if HAS_SEM:
            row = tl.sum(tl.where(pick[:, None], sem, 0.0), axis=0)
            tt = tl.load(tt_ptr + b_m * stride_tt + t, mask=t_ok, other=-1)
            a += coef * tl.sum(tl.where(tt[:, None] == k[None, :], row[None, :], 0.0), axis=1)
        tl.store(out_ptr + b_m * stride_out + t, a, mask=t_ok)


def advantages(rewards: Tensor, seg: Tensor, n_groups: int, semantic: Optional[Tensor],
               valid: Optional[Tensor], token_turn: Tensor, *, coef: float, norm_std: bool,
               eps: float, loo: bool, discount: float, out: Optional[Tensor] = None) -> Tensor:
    """``A [B, T]`` float32, same arguments as ``advantage_ref.advantages``; ``out`` may supply
    the output buffer."""
    B, T = token_turn.shape
    assert rewards.shape == (B,) and seg.shape == (B,)
    order = torch.argsort(seg, stable=True).to(torch.int32)
    counts = torch.bincount(seg, minlength=n_groups)
    offs = torch.zeros(n_groups + 1, dtype=torch.int32, device=seg.device)
    offs[1:] = torch.cumsum(counts, 0)
    max_group = int(counts.max()) if B else 1
    if out is None:
        out = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if B == 0 or T == 0:
        return out
    has_sem = semantic is not None and semantic.shape[1] > 0
    K = semantic.shape[1] if has_sem else 1
    s = semantic.to(torch.float32).contiguous() if has_sem else rewards
    v = valid.to(torch.int8).contiguous() if has_sem else rewards
    tt = token_turn.contiguous()
    block_t = min(16 if interpreting() else 256, triton.next_power_of_2(T))
    _advantage_kernel[(n_groups, triton.cdiv(T, block_t))](
        rewards.to(torch.float32).contiguous(), s, v, tt, order, offs, out,
        T, K, float(eps), float(coef), math.log(discount) if discount > 0 else 0.0,
        K if has_sem else 0, tt.stride(0), out.stride(0),
        NORM_STD=norm_std, LOO=loo, HAS_SEM=has_sem, DISCOUNT=has_sem and discount > 0,
        BLOCK_G=max(16, triton.next_power_of_2(max_group)),
        BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_T=block_t)
    return out
