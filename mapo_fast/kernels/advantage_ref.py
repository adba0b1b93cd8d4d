"""Plain-torch MAPO advantage: the reference, and the CPU implementation (the Triton kernel in
``advantage.py`` computes the same thing). Pure functions on tensors; validation lives in
``mapo_fast.advantage``.

With ``g(b)`` the group of trajectory ``b`` (``seg`` holds dense group indices ``0..G-1``):

    out_b   = (R_b - base_g) / (std_g(R) + eps)      [no division when norm_std is False]
    sem_bk  = (s_bk - base_g(s)) / (std_g(s) + eps)  over the valid turns of the group
    cred_bk = sum_{j >= k, valid} discount^(j - k) sem_bj      (cred = sem when discount = 0)
    A[b, t] = out_b + coef * cred_{b, token_turn[b, t]}   where token_turn[b, t] >= 0, else out_b

``base`` is the group mean, or with ``loo`` the mean of the *other* members (other turns for
``s``); ``std`` is the unbiased standard deviation. A part whose group has fewer than two
members (turns), or no spread at all (max == min), is 0: never NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def group_normalize(x: Tensor, seg: Tensor, n_groups: int, *, norm_std: bool, eps: float,
                    loo: bool) -> Tensor:
    """Normalises ``x [M]`` within the segments ``seg [M]`` (values in ``[0, n_groups)``)."""
    zeros = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    cnt = zeros.index_add(0, seg, torch.ones_like(x))
    total = zeros.index_add(0, seg, x)
    mean = total / cnt.clamp_min(1)
    dev = x - mean[seg]
    std = torch.sqrt(zeros.index_add(0, seg, dev * dev) / (cnt - 1).clamp_min(1))
    hi = zeros.scatter_reduce(0, seg, x, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, seg, x, "amin", include_self=False)
    n = cnt[seg]
    base = (total[seg] - x) / (n - 1).clamp_min(1) if loo else mean[seg]
    out = x - base
    if norm_std:
        out = out / (std[seg] + eps)
    return torch.where((n > 1) & (hi[seg] > lo[seg]), out, torch.zeros_like(out))


def discounted_credit(sem: Tensor, valid: Tensor, discount: float) -> Tensor:
    """``cred[b, k] = sum_{j >= k} discount^(j-k) sem[b, j] valid[b, j]`` (``sem`` where 0)."""
    sem = torch.where(valid, sem, torch.zeros_like(sem))
    if discount == 0.0:
        return sem
    cred = torch.empty_like(sem)
    acc = torch.zeros_like(sem[:, 0])
    for k in range(sem.shape[1] - 1, -1, -1):
        acc = sem[:, k] + discount * acc
        cred[:, k] = acc
    return cred


def advantages(rewards: Tensor, seg: Tensor, n_groups: int, semantic: Optional[Tensor],
               valid: Optional[Tensor], token_turn: Tensor, *, coef: float, norm_std: bool,
               eps: float, loo: bool, discount: float) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Returns ``(A [B, T], out [B], cred [B, K] or None)`` in float32 (float64 for float64
    rewards). ``semantic``/``valid`` None means outcome only."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype)
    out = group_normalize(r, seg, n_groups, norm_std=norm_std, eps=eps, loo=loo)
    adv = out[:, None].expand(token_turn.shape).clone()
    if semantic is None:
        return adv, out, None
    s = semantic.to(dtype)
    b_idx, k_idx = torch.nonzero(valid, as_tuple=True)
    sem = torch.zeros_like(s)
    sem[b_idx, k_idx] = group_normalize(s[b_idx, k_idx], seg[b_idx], n_groups,
                                        norm_std=norm_std, eps=eps, loo=loo)
    cred = discounted_credit(sem, valid, discount)
    in_turn = token_turn >= 0
    per_token = cred.gather(1, token_turn.clamp_min(0))
    adv += coef * torch.where(in_turn, per_token, torch.zeros_like(per_token))
    return adv, out, cred
