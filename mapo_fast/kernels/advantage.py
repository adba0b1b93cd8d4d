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
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting
from ._compile import CompileCase, flag_grid, ptr, signature

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
            # cred[i, k] = sum_j [j >= k] discount^(j - k) sem[i, j], one turn j at a time:
            # a select-and-add, never a product-sum Triton could lower to a (TF32) dot
            cred = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float32)
            for j in range(0, K):
                col = tl.sum(tl.where(k[None, :] == j, sem, 0.0), axis=1)
                w = tl.where(k <= j, tl.exp((j - k).to(tl.float32) * log_discount), 0.0)
                cred += col[:, None] * w[None, :]
            sem = cred

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


#: Block sizes a GPU launch can use: groups up to 64 trajectories, up to 32 turns (a group's
#: [G, K] scores live in registers); larger batches take the torch path (``supports``).
#: Tokens: 256 per program (16 in the interpreter).
GROUP_BLOCKS = (16, 32, 64)
TURN_BLOCKS = (16, 32)
GPU_BLOCK_T, INTERPRETER_BLOCK_T = 256, 16
NUM_WARPS = 8  # no spills at the largest blocks (compile_check)


def supports(max_group: int, turns: int) -> bool:
    """Whether the kernel takes groups of ``max_group`` trajectories with ``turns`` turns."""
    return max_group <= GROUP_BLOCKS[-1] and turns <= TURN_BLOCKS[-1]


def _block(n: int, choices) -> int:
    return next(b for b in choices if b >= n)


def _flags(norm_std: bool, loo: bool, has_sem: bool, discount: bool) -> dict:
    return dict(NORM_STD=norm_std, LOO=loo, HAS_SEM=has_sem, DISCOUNT=has_sem and discount)


def advantages(rewards: Tensor, seg: Tensor, n_groups: int, semantic: Optional[Tensor],
               valid: Optional[Tensor], token_turn: Tensor, *, coef: float, norm_std: bool,
               eps: float, loo: bool, discount: float, max_group: int,
               out: Optional[Tensor] = None) -> Tensor:
    """``A [B, T]`` float32, same arguments as ``advantage_ref.advantages`` plus ``max_group``,
    the largest group's size (``supports(max_group, K)`` must hold); ``out`` may supply the
    output buffer."""
    B, T = token_turn.shape
    assert rewards.shape == (B,) and seg.shape == (B,)
    has_sem = semantic is not None and semantic.shape[1] > 0
    K = semantic.shape[1] if has_sem else 1
    assert supports(max_group, K), f"groups of {max_group}, {K} turns: use the torch path"
    order = torch.argsort(seg, stable=True).to(torch.int32)
    counts = torch.bincount(seg, minlength=n_groups)
    offs = torch.zeros(n_groups + 1, dtype=torch.int32, device=seg.device)
    offs[1:] = torch.cumsum(counts, 0)
    if out is None:
        out = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if B == 0 or T == 0:
        return out
    s = semantic.to(torch.float32).contiguous() if has_sem else rewards
    v = valid.to(torch.int8).contiguous() if has_sem else rewards
    tt = token_turn.contiguous()
    block_t = INTERPRETER_BLOCK_T if interpreting() else GPU_BLOCK_T
    _advantage_kernel[(n_groups, triton.cdiv(T, block_t))](
        rewards.to(torch.float32).contiguous(), s, v, tt, order, offs, out,
        T, K, float(eps), float(coef), math.log(discount) if discount > 0 else 0.0,
        K if has_sem else 0, tt.stride(0), out.stride(0),
        **_flags(norm_std, loo, has_sem, discount > 0),
        BLOCK_G=_block(max_group, GROUP_BLOCKS), BLOCK_K=_block(K, TURN_BLOCKS), BLOCK_T=block_t,
        num_warps=1 if interpreting() else NUM_WARPS)
    return out


def compile_cases() -> List[CompileCase]:
    f32 = ptr(torch.float32)
    sig = signature(_advantage_kernel, dict(
        r_ptr=f32, s_ptr=f32, valid_ptr="*i8", tt_ptr="*i64", order_ptr="*i32", offs_ptr="*i32",
        out_ptr=f32, eps="fp32", coef="fp32", log_discount="fp32"))
    cases = []
    for g in GROUP_BLOCKS:
        for kb in TURN_BLOCKS:
            for fl in flag_grid(norm_std=(False, True), loo=(False, True),
                                has_sem=(False, True), discount=(False, True)):
                if fl["discount"] and not fl["has_sem"]:
                    continue
                on = "+".join(k for k, v in fl.items() if v) or "plain"
                default = (g, kb) in ((16, 16), (64, 32)) and fl["norm_std"] and \
                    fl["discount"] and not fl["loo"]
                cases.append(CompileCase(_advantage_kernel, f"G{g} K{kb} {on}", sig,
                                         dict(_flags(**fl), BLOCK_G=g, BLOCK_K=kb,
                                              BLOCK_T=GPU_BLOCK_T),
                                         num_warps=NUM_WARPS, num_stages=1, default=default,
                                         no_mma=True))
    return cases
