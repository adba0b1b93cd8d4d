"""How noisy is a policy gradient? Resampling estimates of its variance, so that the trainer
and the benchmarks can compare advantage estimators (MAPO vs GRPO) on the same rollouts.

The gradient of a minibatch of groups is an estimate of the full-batch gradient; its spread
over random minibatches is the estimator's variance. Advantage estimators differ in scale
(MAPO adds a term), so besides the trace of the covariance the utilities report the
*relative* variance ``trace(Cov) / ||mean gradient||^2``: noise over signal, unchanged when the
advantages are rescaled, the fair basis for comparing estimators.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import _checks as chk
from .loss import mapo_loss

Tensor = torch.Tensor


def gradient_variance(loss_fn: Callable[[Tensor], Tensor], params: Sequence[Tensor],
                      n_items: int, *, n_resamples: int = 16, subset_size: Optional[int] = None,
                      seed: int = 0) -> Dict[str, float]:
    """Spread of ``grad(loss_fn(subset), params)`` over random subsets of items.

    Args:
        loss_fn: maps an int64 tensor of item indices (trajectories or groups) to the scalar
            loss of that minibatch.
        params: the tensors the gradient is taken with respect to (``requires_grad``).
        n_items: number of items to draw from.
        n_resamples: number of random minibatches (>= 2).
        subset_size: items per minibatch, drawn without replacement (default ``n_items // 2``;
            1 gives per-sample gradients).
        seed: seed of the draws.

    Returns ``trace_var`` (unbiased, sum over parameters of the per-coordinate variance),
    ``mean_sq_norm`` (``||mean gradient||^2``), ``relative_var`` (their ratio; ``inf`` for a
    zero mean gradient) and ``n_resamples``.
    """
    fn = "gradient_variance"
    n_items = int(chk.number(fn, "n_items", n_items, lo=1, integer=True))
    n_resamples = int(chk.number(fn, "n_resamples", n_resamples, lo=2, integer=True))
    if subset_size is None:
        subset_size = max(1, n_items // 2)
    size = int(chk.number(fn, "subset_size", subset_size, lo=1, hi=n_items, integer=True))
    params = list(params)
    if not params or not all(p.requires_grad for p in params):
        chk.fail(fn, "params", "must be a non-empty sequence of tensors that require grad")
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(n_resamples):
        idx = torch.randperm(n_items, generator=gen)[:size]
        g = torch.autograd.grad(loss_fn(idx), params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1).double()
                                for p, gi in zip(params, g)]))
    G = torch.stack(grads)
    mean = G.mean(0)
    trace_var = float(((G - mean) ** 2).sum(1).sum() / (n_resamples - 1))
    sq = float(mean.pow(2).sum())
    return {"trace_var": trace_var, "mean_sq_norm": sq,
            "relative_var": trace_var / sq if sq > 0 else float("inf"),
            "n_resamples": float(n_resamples)}


def loss_gradient_variance(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                           mask: Tensor, group_ids: Tensor, *, n_resamples: int = 16,
                           groups_per_batch: Optional[int] = None, seed: int = 0,
                           **loss_kwargs) -> Dict[str, float]:
    """``gradient_variance`` of ``mapo_loss`` w.r.t. the LM-head ``weight``, resampling whole
    groups (prompts): each minibatch holds ``groups_per_batch`` random groups (default half).

    ``hidden [B, T, H]``, ``weight [V, H]``, ``targets``/``mask``/``advantages [B, T]`` (or
    ``[B]``), ``group_ids [B]``; ``loss_kwargs`` go to ``mapo_loss`` (e.g. ``old_logprobs``,
    ``loss_agg``). Per-token tensors in ``loss_kwargs`` are sliced with the minibatch.
    """
    fn = "loss_gradient_variance"
    chk.tensor(fn, "group_ids", group_ids, dims=(1,), integer=True)
    if group_ids.shape[0] != targets.shape[0]:
        chk.fail(fn, "group_ids", f"must have one entry per sequence ({targets.shape[0]}), got "
                                  f"{tuple(group_ids.shape)}")
    uniq, seg = torch.unique(group_ids, return_inverse=True)
    w = weight.detach().requires_grad_(True)
    per_seq = {k: v for k, v in loss_kwargs.items()
               if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == targets.shape[0]}
    fixed = {k: v for k, v in loss_kwargs.items() if k not in per_seq}

    def loss_fn(group_idx: Tensor) -> Tensor:
        rows = torch.isin(seg, group_idx.to(seg.device)).nonzero().squeeze(1)
        sliced = {k: v.index_select(0, rows.to(v.device)) for k, v in per_seq.items()}
        loss, _ = mapo_loss(hidden.detach().index_select(0, rows), w,
                            targets.index_select(0, rows), advantages.index_select(0, rows),
                            mask.index_select(0, rows), **sliced, **fixed)
        return loss

    return gradient_variance(loss_fn, [w], len(uniq), n_resamples=n_resamples,
                             subset_size=groups_per_batch, seed=seed)


def _trace_and_signal(gram: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """The unbiased trace of the covariance and the squared norm of the mean of K gradients
    drawn with multiplicities ``counts [..., K]`` (each row sums to K) from K batches whose
    gradients have the Gram matrix ``gram [K, K]``: every figure is a quadratic form of the
    Gram matrix, so a bootstrap never materialises its resampled gradients."""
    K = counts.shape[-1]
    sum_sq = counts @ torch.diagonal(gram)                    # sum_k ||g_k||^2
    mean_sq = ((counts @ gram) * counts).sum(-1) / K ** 2     # ||mean||^2
    return (sum_sq - K * mean_sq) / (K - 1), mean_sq


def paired_estimator_variance(grads: Dict[str, Tensor], *, reference: str, n_boot: int = 2000,
                              level: float = 0.95, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """The variance of policy-gradient estimators measured on the same rollouts.

    ``grads[name]``: ``[K, P]``, the gradient estimator ``name`` gives on each of ``K``
    independent rollout batches drawn at one set of weights; row ``k`` of every entry comes
    from the same batch ``k`` (the same trajectories, only the advantages differ). For each
    estimator: ``trace_var`` (the unbiased trace of the covariance over batches: how much the
    gradient changes from one batch to the next), ``mean_sq_norm`` (the squared norm of the
    mean gradient) and ``relative_var`` (their ratio). For each estimator but ``reference``:
    ``var_ratio`` = its ``trace_var`` over the reference's and ``relative_var_ratio`` likewise,
    each with a percentile bootstrap interval at ``level`` (``*_lo``, ``*_hi``) from ``n_boot``
    resamplings of the batches, the same resampled batches for both estimators (paired;
    resamples in which the reference has no spread are left out).
    """
    fn = "paired_estimator_variance"
    if not isinstance(grads, dict) or reference not in grads:
        chk.fail(fn, "reference", f"must name one of the estimators {sorted(grads)}, got "
                                  f"{reference!r}")
    K, P = None, None
    for name, g in grads.items():
        chk.tensor(fn, f"grads[{name!r}]", g, dims=(2,), floating=True)
        chk.finite_tensor(fn, f"grads[{name!r}]", g)
        if K is None:
            K, P = g.shape
        elif tuple(g.shape) != (K, P):
            chk.fail(fn, f"grads[{name!r}]", f"must be [{K}, {P}] like the others (the same "
                                             f"batches), got {tuple(g.shape)}")
    if K < 3:
        chk.fail(fn, "grads", f"needs at least 3 batches per estimator, got {K}")
    n_boot = int(chk.number(fn, "n_boot", n_boot, lo=10, integer=True))
    level = chk.number(fn, "level", level, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, K, (n_boot, K), generator=gen)
    counts = torch.zeros(n_boot, K, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, K, dtype=torch.float64))
    out: Dict[str, Dict[str, float]] = {}
    boot: Dict[str, Tuple[Tensor, Tensor]] = {}
    for name, g in grads.items():
        G = g.detach().double().cpu()
        G = G - G.mean(0)  # centred: the same covariance, a better-conditioned Gram matrix
        mean = g.detach().double().cpu().mean(0)
        gram = G @ G.T
        tv, _ = _trace_and_signal(gram, torch.ones(K, dtype=torch.float64))
        sq = mean.pow(2).sum()
        out[name] = {"trace_var": float(tv), "mean_sq_norm": float(sq),
                     "relative_var": float(tv / sq) if sq > 0 else float("inf"),
                     "batches": float(K)}
        # a resample's mean: the full mean plus the resampled centred rows' mean
        full = torch.cat([G, mean[None]], 0)
        gram_full = full @ full.T  # [K + 1, K + 1]
        btv, _ = _trace_and_signal(gram, counts)
        w = torch.cat([counts / K, torch.ones(n_boot, 1, dtype=torch.float64)], 1)
        bsq = ((w @ gram_full) * w).sum(-1)
        boot[name] = (btv, btv / bsq.clamp(min=torch.finfo(torch.float64).tiny))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    ref_tv, ref_rel = boot[reference]
    for name in grads:
        if name == reference:
            continue
        r = out[reference]
        for key, num, den, b_num, b_den in (
                ("var_ratio", out[name]["trace_var"], r["trace_var"], boot[name][0], ref_tv),
                ("relative_var_ratio", out[name]["relative_var"], r["relative_var"],
                 boot[name][1], ref_rel)):
            out[name][key] = num / den if den > 0 else float("inf")
            valid = b_den > 0  # a resample of one batch repeated has no spread: skipped
            ratio = b_num[valid] / b_den[valid]
            lo, hi = torch.quantile(ratio, q).tolist() if valid.any() else (math.nan,) * 2
            out[name][f"{key}_lo"], out[name][f"{key}_hi"] = lo, hi
    return out
