"""The MAPO advantage estimator: group-relative outcome advantage coupled with group-relative
semantic (description-vs-crop) scores of each tool turn, scattered to tokens.

Device dispatch happens here, once: one Triton segmented-reduction kernel on CUDA
(``kernels/advantage.py``), the same math in torch elsewhere (``kernels/advantage_ref.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import _checks as chk
from ._dispatch import backend_for, triton_module
from .kernels import advantage_ref
from .registry import Registry

Tensor = torch.Tensor
KERNEL = "advantage"
BASELINES = ("mean", "loo")


@dataclass(frozen=True)
class AdvantageEstimator:
    """A named advantage estimator of ``mapo_advantages`` (its ``algo``): the group-relative
    outcome advantage, plus, when ``semantic``, the group-relative semantic scores of each
    tool turn on that turn's tokens. ``summary`` is its one-line description (the trainer's
    ``--algo`` help)."""
    name: str
    semantic: bool
    summary: str


#: The estimators, by name (``mapo_advantages(algo=...)``, ``mapo-train --algo``, the verl
#: estimator of the same name).
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")
for _est in (AdvantageEstimator("mapo", True, "outcome + per-turn semantic scores"),
             AdvantageEstimator("grpo", False, "outcome only, the ablation")):
    ADVANTAGE_ESTIMATORS.register(_est.name, _est)


def mapo_advantages(rewards: Tensor, group_ids: Tensor, semantic_scores: Optional[Tensor] = None,
                    turn_mask: Optional[Tensor] = None, token_turn: Optional[Tensor] = None, *,
                    algo: str = "mapo", semantic_coef: float = 1.0, norm_std: bool = True,
                    eps: float = 1e-6, baseline: str = "mean", turn_discount: float = 0.0,
                    return_parts: bool = False
                    ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """Per-token MAPO advantages.

    Args:
        rewards: ``[B]`` outcome rewards.
        group_ids: ``[B]`` integers; the G rollouts of one prompt share an id (groups may differ
            in size and need not be contiguous).
        semantic_scores: ``[B, K]`` per-tool-turn semantic scores (K = max tool turns, padded);
            only entries where ``turn_mask`` is set are read. Not needed for ``algo="grpo"``.
        turn_mask: ``[B, K]`` bool (or 0/1), the valid turns.
        token_turn: ``[B, T]`` int, ``k`` where token ``t`` belongs to tool turn ``k`` of its
            trajectory, ``-1`` elsewhere (prompt, answer, padding). When None (only with
            ``algo="grpo"``) the result is per sequence, ``[B]``.
        algo: the estimator (``ADVANTAGE_ESTIMATORS``): ``"mapo"`` (outcome + semantic) or
            ``"grpo"`` (outcome only).
        semantic_coef: weight of the semantic part.
        norm_std: divide by the group std (False: Dr.GRPO, centre only).
        eps: added to the std.
        baseline: ``"mean"`` (group mean) or ``"loo"`` (leave-one-out: the mean of the other
            trajectories of the group, and of the other turns of the group for the scores).
        turn_discount: ``gamma`` in ``[0, 1]``; > 0 credits later turns' semantic scores to
            earlier turns: ``cred_bk = sum_{j >= k} gamma^(j-k) sem_bj``.
        return_parts: also return ``{"outcome": [B], "semantic": [B, K]}`` (the normalised
            outcome and the credited semantic scores).

    The estimator, with ``g`` the group of trajectory ``b``::

        out_b   = (R_b - mean_g R) / (std_g R + eps)        std unbiased, as verl and TRL
        sem_bk  = (s_bk - mean_g s) / (std_g s + eps)       over all valid turns of group g
        A[b, t] = out_b + semantic_coef * cred_{b, token_turn[b, t]}   on tokens of tool turns
        A[b, t] = out_b                                                 on every other token

    A group of one trajectory (one valid turn for ``s``), or with zero spread, gives 0 for that
    part, never NaN. With ``semantic_coef=0`` (or ``algo="grpo"``) this is exactly GRPO's
    group-normalised outcome advantage.

    Returns:
        ``[B, T]`` float32 (float64 for float64 rewards on CPU), or ``[B]`` without
        ``token_turn``; with ``return_parts`` a ``(advantages, parts)`` tuple.
    """
    fn = "mapo_advantages"
    chk.choice(fn, "algo", algo, ADVANTAGE_ESTIMATORS.names())
    semantic_part = ADVANTAGE_ESTIMATORS.get(algo).semantic
    chk.flag(fn, "norm_std", norm_std)
    chk.choice(fn, "baseline", baseline, BASELINES)
    coef = chk.number(fn, "semantic_coef", semantic_coef)
    eps = chk.number(fn, "eps", eps, lo=0.0, lo_open=True)
    discount = chk.number(fn, "turn_discount", turn_discount, lo=0.0, hi=1.0)
    per_sequence = token_turn is None
    token_turn, semantic, valid = _checked_tensors(fn, algo, semantic_part, rewards, group_ids,
                                                   semantic_scores, turn_mask, token_turn)
    kw = dict(coef=coef if semantic_part else 0.0, norm_std=norm_std, eps=eps,
              loo=baseline == "loo", discount=discount)
    adv, parts = _advantages(rewards, group_ids, semantic, valid, token_turn, kw, return_parts)
    if per_sequence:
        adv = adv[:, 0]
    return (adv, parts) if return_parts else adv


def _checked_tensors(fn: str, algo: str, semantic_part: bool, rewards: Tensor,
                     group_ids: Tensor, semantic_scores: Optional[Tensor],
                     turn_mask: Optional[Tensor], token_turn: Optional[Tensor]
                     ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``mapo_advantages``' tensors checked (shapes, dtypes, devices, finite values, turn
    indices): ``(token_turn [B, T] int64, semantic scores or None, valid turns [B, K] bool
    or None)``; without ``token_turn`` (GRPO per sequence) one column of -1."""
    chk.tensor(fn, "rewards", rewards, dims=(1,), floating=True)
    B = rewards.shape[0]
    chk.tensor(fn, "group_ids", group_ids, dims=(1,), integer=True)
    chk.shape(fn, "group_ids", group_ids, (B,), "one group id per reward")
    chk.same_device(fn, "rewards", rewards, group_ids=group_ids, semantic_scores=semantic_scores,
                    turn_mask=turn_mask, token_turn=token_turn)
    chk.finite_tensor(fn, "rewards", rewards)
    if token_turn is None:
        if semantic_part:
            chk.fail(fn, "token_turn", f"is required for algo={algo!r} (the semantic part is "
                                       "given to the tokens of each tool turn)")
        token_turn = torch.full((B, 1), -1, dtype=torch.int64, device=rewards.device)
    chk.tensor(fn, "token_turn", token_turn, dims=(2,), integer=True)
    if token_turn.shape[0] != B:
        chk.fail(fn, "token_turn", f"must have shape [B={B}, T], got {tuple(token_turn.shape)}")
    token_turn = token_turn.to(torch.int64)
    if not semantic_part:
        if bool((token_turn < -1).any()):
            chk.fail(fn, "token_turn", f"holds {int(token_turn.min())}; turns are >= 0, -1 "
                                       "marks tokens outside tool turns")
        return token_turn, None, None
    if semantic_scores is None or turn_mask is None:
        missing = "semantic_scores" if semantic_scores is None else "turn_mask"
        chk.fail(fn, missing, f"is required for algo={algo!r} (use algo='grpo' for outcome "
                              "only)")
    chk.tensor(fn, "semantic_scores", semantic_scores, dims=(2,), floating=True)
    if semantic_scores.shape[0] != B:
        chk.fail(fn, "semantic_scores", f"must have shape [B={B}, K], got "
                                        f"{tuple(semantic_scores.shape)}")
    chk.tensor(fn, "turn_mask", turn_mask, dims=(2,))
    chk.binary(fn, "turn_mask", turn_mask)
    chk.shape(fn, "turn_mask", turn_mask, tuple(semantic_scores.shape), "like `semantic_scores`")
    valid = turn_mask.to(torch.bool)
    if valid.any():
        chk.finite_tensor(fn, "semantic_scores", semantic_scores[valid])
    _check_token_turn(fn, token_turn, valid)
    return token_turn, semantic_scores, valid


def _advantages(rewards: Tensor, group_ids: Tensor, semantic: Optional[Tensor],
                valid: Optional[Tensor], token_turn: Tensor, kw: Dict[str, Any],
                return_parts: bool) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
    """The checked inputs' advantages ``[B, T]`` (the Triton kernel where the backend and
    the group sizes allow it, else the torch path) and, with ``return_parts``, the parts."""
    B = rewards.shape[0]
    seg = torch.unique(group_ids, return_inverse=True)[1]
    n_groups = int(seg.max()) + 1 if B else 0
    use_kernel = backend_for(rewards, KERNEL) == "triton"
    max_group = _max_group(seg) if use_kernel else 0
    if use_kernel and _kernel_fits(max_group, semantic):
        adv = triton_module(KERNEL).advantages(rewards, seg, n_groups, semantic, valid,
                                               token_turn, max_group=max_group, **kw)
        if not return_parts:
            return adv, None
        # the [B] / [B, K] parts are tiny: the torch path gives them
        _, out, cred = advantage_ref.advantages(rewards, seg, n_groups, semantic, valid,
                                                token_turn[:, :0], **kw)
        return adv, _parts(out, cred)
    adv, out, cred = advantage_ref.advantages(rewards, seg, n_groups, semantic, valid,
                                              token_turn, **kw)
    return adv, _parts(out, cred) if return_parts else None


def _max_group(seg: Tensor) -> int:
    return int(torch.bincount(seg).max()) if seg.numel() else 1


def _kernel_fits(max_group: int, semantic: Optional[Tensor]) -> bool:
    """Whether the Triton kernel takes groups of up to ``max_group`` trajectories and these
    turns (else the torch path)."""
    turns = semantic.shape[1] if semantic is not None and semantic.shape[1] else 1
    return triton_module(KERNEL).supports(max_group, turns)


def _parts(out: Tensor, cred: Optional[Tensor]) -> Dict[str, Tensor]:
    return {"outcome": out, "semantic": cred if cred is not None else out.new_zeros(out.shape[0], 0)}


def _check_token_turn(fn: str, token_turn: Tensor, valid: Tensor) -> None:
    K = valid.shape[1]
    lo, hi = (int(token_turn.min()), int(token_turn.max())) if token_turn.numel() else (0, -1)
    if lo < -1 or hi >= K:
        chk.fail(fn, "token_turn", f"holds {lo if lo < -1 else hi}, outside [-1, K={K}) "
                                   "(K = semantic_scores.shape[1])")
    in_turn = token_turn >= 0
    if in_turn.any():
        refers = valid.gather(1, token_turn.clamp_min(0))
        bad = in_turn & ~refers
        if bad.any():
            b, t = (int(v) for v in torch.nonzero(bad)[0])
            chk.fail(fn, "token_turn", f"[{b}, {t}] = {int(token_turn[b, t])} names a turn that "
                                       f"`turn_mask` marks invalid for trajectory {b}")
