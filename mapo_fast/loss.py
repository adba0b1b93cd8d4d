"""The fused MAPO policy loss: token log-probs from hidden states and the LM head, fused with
verl's clipped, advantage-weighted objective (``compute_policy_loss_vanilla`` + ``agg_loss``),
an optional KL to a reference policy (``KL_ESTIMATORS``), an optional entropy bonus, and
metrics from the same pass.

Only the per-token formula lives here (``token_terms``); chunking, the vocabulary pass and the
gradient of hidden/weight/bias belong to ``logprobs.fused_linear_objective``. A variant of the
objective is a per-token function registered in ``POLICY_LOSSES`` (``mapo_fast.registry``),
nothing else; KL estimators and aggregation modes are registered the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _checks as chk
from .logprobs import LOGITS_DTYPES, check_linear_inputs, fused_linear_objective
from .policy import banned_bias
from .registry import Registry

Tensor = torch.Tensor
Number = Union[int, float, Tensor]


#: Per-token estimators of KL(policy || reference), by name (Schulman's k1, k2, k3), each
#: ``(logp, ref, ratio) -> [N]``.
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(logp: Tensor, ref: Tensor, ratio: Tensor) -> Tensor:
    """``logp - ref``."""
    return logp - ref


@KL_ESTIMATORS.register("k2")
def _k2(logp: Tensor, ref: Tensor, ratio: Tensor) -> Tensor:
    """``(logp - ref)^2 / 2``."""
    return 0.5 * (logp - ref) ** 2


@KL_ESTIMATORS.register("k3")
def _k3(logp: Tensor, ref: Tensor, ratio: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``."""
    kl = ref - logp
    return torch.exp(kl) - kl - 1.0


@KL_ESTIMATORS.register("low_var_kl")
def _low_var_kl(logp: Tensor, ref: Tensor, ratio: Tensor) -> Tensor:
    """verl's k3: its difference clamped to +-20, the value to +-10."""
    kl = torch.clamp(ref - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(kl) - kl - 1.0, -10.0, 10.0)


@KL_ESTIMATORS.register("k3_ratio")
def _k3_ratio(logp: Tensor, ref: Tensor, ratio: Tensor) -> Tensor:
    """k3 times the importance ratio (TRL's ``use_bias_correction_kl``)."""
    return ratio * _k3(logp, ref, ratio)


@dataclass(frozen=True)
class PolicyLossConfig:
    """The one settings object of the policy loss (validated by ``check``): ``mapo_loss``'s
    keywords of the same names, ``MAPOLoss``'s constructor, the trainer's ``loss.*`` keys.
    ``policy_loss`` names the per-token objective (``POLICY_LOSSES``), ``kl_type`` the KL
    estimator (``KL_ESTIMATORS``), ``loss_agg`` the aggregation (``LOSS_AGG_MODES``)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: Optional[float] = None
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    loss_scale_factor: Optional[float] = None
    temperature: float = 1.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    logit_scale: float = 1.0             # the logits' map (see mapo_loss)
    softcap: Optional[float] = None
    logits_dtype: str = "float32"
    banned_tokens: Optional[Sequence[int]] = None   # removed from the softmax (policy.py)
    policy_loss: str = "vanilla"

    def check(self, fn: str) -> "PolicyLossConfig":
        chk.number(fn, "clip_low", self.clip_low, lo=0.0, hi=1.0, hi_open=True)
        chk.number(fn, "clip_high", self.clip_high, lo=0.0)
        if self.clip_ratio_c is not None:
            chk.number(fn, "clip_ratio_c", self.clip_ratio_c, lo=1.0, lo_open=True)
        chk.number(fn, "kl_coef", self.kl_coef, lo=0.0)
        chk.choice(fn, "policy_loss", self.policy_loss, POLICY_LOSSES.names())
        chk.choice(fn, "loss_agg", self.loss_agg, LOSS_AGG_MODES.names())
        if self.loss_scale_factor is not None:
            chk.number(fn, "loss_scale_factor", self.loss_scale_factor, lo=0.0, lo_open=True)
        chk.number(fn, "temperature", self.temperature, lo=0.0, lo_open=True)
        chk.choice(fn, "kl_type", self.kl_type, KL_ESTIMATORS.names())
        chk.number(fn, "entropy_coef", self.entropy_coef)
        chk.number(fn, "logit_scale", self.logit_scale, lo=0.0, lo_open=True)
        if self.softcap is not None:
            chk.number(fn, "softcap", self.softcap, lo=0.0, lo_open=True)
        chk.choice(fn, "logits_dtype", self.logits_dtype, LOGITS_DTYPES)
        return self


#: Per-token policy objectives, by name: each ``(logp, adv, old, ref, is_weights, cfg, ent)
#: -> terms`` on ``[N]`` vectors, ``terms["loss"]`` the per-token loss and ``terms["pg"]`` its
#: policy-gradient part, plus ``log_ratio``, ``ratio``, ``pg_clipped`` (and ``kl``,
#: ``dual_clipped`` when computed), from which the metrics are read.
POLICY_LOSSES: Registry[Callable[..., Dict[str, Tensor]]] = Registry("policy loss")
#: Loss aggregations, by name (verl's ``loss_agg_mode`` names): each ``(mask [B, T],
#: loss_scale_factor, global_tokens, global_seqs) -> c [B, T]`` (``aggregation_weights``).
LOSS_AGG_MODES: Registry[Callable[..., Tensor]] = Registry("loss aggregation")


def token_terms(logp: Tensor, adv: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
                is_weights: Optional[Tensor], cfg: PolicyLossConfig,
                ent: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The per-token terms of ``cfg.policy_loss`` (``POLICY_LOSSES``) on ``[N]`` vectors."""
    return POLICY_LOSSES.get(cfg.policy_loss)(logp, adv, old, ref, is_weights, cfg, ent)


@POLICY_LOSSES.register("vanilla")
def vanilla_terms(logp: Tensor, adv: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
                  is_weights: Optional[Tensor], cfg: PolicyLossConfig,
                  ent: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """verl's per-token policy loss (``compute_policy_loss_vanilla``), on ``[N]`` vectors.

    ``log_ratio = clamp(logp - old, -20, 20)``, ``ratio = exp(log_ratio)``,
    ``pg = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))``; with ``clip_ratio_c``
    the dual clip ``pg = min(pg, -A clip_ratio_c)`` where ``A < 0``; times ``rollout_is_weights``.
    ``loss = pg + kl_coef * kl - entropy_coef * ent`` with ``kl`` the ``kl_type`` estimator
    (``KL_ESTIMATORS``) and ``ent`` the token's entropy.
    """
    old = logp.detach() if old is None else old
    log_ratio = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clipped = torch.maximum(pg1, pg2)
    pg = clipped
    terms = {"log_ratio": log_ratio, "ratio": ratio, "pg_clipped": (pg2 > pg1)}
    if cfg.clip_ratio_c is not None:
        pg3 = -adv * cfg.clip_ratio_c
        pg = torch.where(adv < 0, torch.minimum(pg3, clipped), clipped)
        terms["dual_clipped"] = (clipped > pg3) & (adv < 0)
    if is_weights is not None:
        pg = pg * is_weights
    loss = pg
    if ref is not None and cfg.kl_coef > 0:
        kl = KL_ESTIMATORS.get(cfg.kl_type)(logp, ref, ratio)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl
    if ent is not None and cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * ent
    terms["pg"], terms["loss"] = pg, loss
    return terms


def aggregation_weights(mask: Tensor, mode: str, loss_scale_factor: Optional[float],
                        global_tokens: Optional[float], global_seqs: Optional[float]) -> Tensor:
    """Per-token weights ``c [B, T]`` such that verl's ``agg_loss(l, mask, mode) = sum(c * l)``
    (verl 0.9; ``dp_size`` 1: a data-parallel caller scales the loss itself); ``mode`` names
    one of ``LOSS_AGG_MODES``:

    - ``token-mean``: ``c = m / N``, N = ``global_tokens`` or ``sum(m)``;
    - ``token-sum``: ``c = m``;
    - ``seq-mean-token-sum``: ``c = m / S``;
    - ``seq-mean-token-mean``: ``c = m / sum_t(m) / S`` on non-empty sequences;
    - ``seq-mean-token-sum-norm``: ``c = m / S / loss_scale_factor`` (default ``T``), as verl
      0.8 and later define it (the seq-mean first). Earlier verl divided the token sum by the
      factor alone (no seq-mean): pass ``loss_scale_factor = factor / S`` to match it.
    S = ``global_seqs`` or the number of non-empty sequences. Empty denominators (no token,
    ``global_tokens = 0``, ``global_seqs = 0``: an empty batch) give ``c = 0``.
    """
    return LOSS_AGG_MODES.get(mode)(mask, loss_scale_factor, global_tokens, global_seqs)


@LOSS_AGG_MODES.register("token-mean")
def _token_mean(m: Tensor, factor: Optional[float], global_tokens: Optional[float],
                global_seqs: Optional[float]) -> Tensor:
    denom = m.sum() if global_tokens is None else torch.tensor(global_tokens, dtype=m.dtype)
    return m / denom if float(denom) > 0 else torch.zeros_like(m)


@LOSS_AGG_MODES.register("token-sum")
def _token_sum(m: Tensor, factor: Optional[float], global_tokens: Optional[float],
               global_seqs: Optional[float]) -> Tensor:
    return m.clone()


def _seq_count(m: Tensor, global_seqs: Optional[float]) -> Tensor:
    """S: ``global_seqs``, or the sequences of ``m`` with at least one token."""
    if global_seqs is not None:
        return torch.tensor(global_seqs, dtype=m.dtype)
    return (m.sum(-1) > 0).sum().to(m.dtype)


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(m: Tensor, factor: Optional[float], global_tokens: Optional[float],
                        global_seqs: Optional[float]) -> Tensor:
    seqs = _seq_count(m, global_seqs)
    return m / seqs if float(seqs) > 0 else torch.zeros_like(m)


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(m: Tensor, factor: Optional[float], global_tokens: Optional[float],
                         global_seqs: Optional[float]) -> Tensor:
    seqs = _seq_count(m, global_seqs)
    if float(seqs) == 0:
        return torch.zeros_like(m)
    per_seq = m.sum(-1, keepdim=True)
    return torch.where(per_seq > 0, m / per_seq.clamp_min(1e-30), 0.0) / seqs


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(m: Tensor, factor: Optional[float],
                             global_tokens: Optional[float],
                             global_seqs: Optional[float]) -> Tensor:
    seqs = _seq_count(m, global_seqs)
    if float(seqs) == 0:
        return torch.zeros_like(m)
    return m / seqs / (m.shape[-1] if factor is None else factor)


def _as_number(fn: str, arg: str, x: Optional[Number]) -> Optional[float]:
    """A global count: a number >= 0 (0: an empty batch, whose loss is 0)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            chk.fail(fn, arg, f"must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        x = x.item()
    return chk.number(fn, arg, x, lo=0.0)


def _per_token(fn: str, arg: str, x: Optional[Tensor], bt: Tuple[int, int],
               hidden: Tensor) -> Optional[Tensor]:
    if x is None:
        return None
    chk.tensor(fn, arg, x, floating=True)
    if x.numel() != bt[0] * bt[1] or x.dim() not in (1, 2) or \
            (x.dim() == 2 and tuple(x.shape) != bt):
        chk.fail(fn, arg, f"must have shape {bt} (one value per token, like `targets`), "
                          f"got {tuple(x.shape)}")
    chk.same_device(fn, "hidden", hidden, **{arg: x})
    chk.finite_tensor(fn, arg, x)
    return x.reshape(bt)


def mapo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor,
              *, old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, clip_low: float = 0.2, clip_high: float = 0.28,
              clip_ratio_c: Optional[float] = None, kl_coef: float = 0.0,
              loss_agg: str = "token-mean", loss_scale_factor: Optional[float] = None,
              global_tokens: Optional[Number] = None, global_seqs: Optional[Number] = None,
              rollout_is_weights: Optional[Tensor] = None, temperature: float = 1.0,
              kl_type: str = "k3", entropy_coef: float = 0.0, logit_scale: float = 1.0,
              softcap: Optional[float] = None, logits_dtype: str = "float32",
              banned_tokens: Optional[Sequence[int]] = None, policy_loss: str = "vanilla"
              ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped, advantage-weighted policy loss fused with the LM head; a drop-in for verl's actor
    loss (``compute_policy_loss_vanilla`` + ``agg_loss``) that never forms ``[tokens x vocab]``.

    Logits: ``(hidden @ weight.T + bias) * logit_scale / temperature``, or with ``softcap``
    ``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature``.
    Per token (see ``token_terms``): ``ratio = exp(clamp(logp - old, -20, 20))``, ``pg =
    max(-A ratio, -A clamp(ratio, 1-clip_low, 1+clip_high))``, dual clip ``min(pg, -A
    clip_ratio_c)`` for ``A < 0``, times ``rollout_is_weights``, plus ``kl_coef * kl``, minus
    ``entropy_coef`` times the token's entropy; then aggregated by ``loss_agg``. Only tokens
    with ``mask != 0`` are computed at all.

    Args:
        hidden: the states before the head, ``[B, T, H]`` or ``[B*T, H]``; float32, bfloat16,
            float16 or float64. Position ``t`` predicts ``targets[t]``.
        weight: the LM head's weight ``[V, H]``, the dtype of ``hidden``.
        targets: the sampled token ids, integer ``[B, T]`` (or ``[N]``, read as B = 1).
        advantages: float ``[B, T]`` (per token) or ``[B]`` (per sequence); finite.
        mask: 0/1 (bool, int or float) of the shape of ``targets``: the response tokens.
        old_logprobs: the sampler's log-probs ``[B, T]`` (default: ``logp.detach()``, ratio
            1).
        ref_logprobs: the reference policy's log-probs ``[B, T]`` for the KL term.
        bias: the head's bias ``[V]``, if it has one.
        clip_low: PPO's lower clip, the ratio floor is ``1 - clip_low``.
        clip_high: the upper clip, the ratio ceiling is ``1 + clip_high`` (DAPO's clip-higher).
        clip_ratio_c: dual clip for negative advantages (verl's ``clip_ratio_c``; None: off).
        kl_coef: weight of the KL term to ``ref_logprobs`` (0: none).
        loss_agg: how token terms become the loss (``LOSS_AGG_MODES``, see
            ``aggregation_weights``: verl 0.9's ``agg_loss`` modes, ``token-sum`` included).
        loss_scale_factor: the divisor of the ``seq-mean-token-sum-norm`` mode (default: T).
        global_tokens: masked-in tokens of the whole batch, when this call is one micro-batch
            of it (token modes); 0 means an empty batch (the loss is 0).
        global_seqs: sequences of the whole batch, likewise (sequence modes).
        rollout_is_weights: per-token importance weights ``[B, T]`` of the rollout
            correction (detached), multiplied into the policy-gradient term.
        temperature: the sampler's temperature, positive; the logits are divided by it.
        kl_type: the KL estimator (``KL_ESTIMATORS``): ``k1``, ``k2``, ``k3`` (default),
            verl's clamped ``low_var_kl``, or ``k3_ratio`` (k3 times the ratio, as TRL's
            ``use_bias_correction_kl``).
        entropy_coef: the entropy bonus's weight (verl's ``entropy_coeff``), with its
            gradient.
        logit_scale: positive; multiplies the logits before the soft cap (a model's
            ``logit_scale``).
        softcap: the final logit soft cap (Gemma-style; None: none); the gradient goes
            through the tanh.
        logits_dtype: ``"float32"`` (default) keeps the logits in float32 (the closest to
            float64); ``"autocast"`` rounds them as an autocast of the inputs' bf16/fp16
            dtype would (frameworks that run the head under autocast, e.g. TRL's fused head
            without ``cast_lm_head_to_fp32``). The statistics are float32 either way.
        banned_tokens: ids removed from the softmax, as the sampler never draws them. Pass
            ``mapo_fast.policy.PolicyNumerics.loss_kwargs()`` for this, ``temperature``,
            ``logit_scale`` and ``softcap``, so that the loss computes the distribution the
            rollout sampled from and the first on-policy ratio is 1.
        policy_loss: the per-token objective (``POLICY_LOSSES``; ``"vanilla"``, verl's
            ``compute_policy_loss_vanilla``, is the one described above).

    The knobs (every argument from ``clip_low`` on but the batch's ``global_tokens``,
    ``global_seqs`` and ``rollout_is_weights``) are the fields of ``PolicyLossConfig``.

    Returns:
        ``(loss, metrics)``: a scalar (float32; float64 for float64 inputs) and a
        ``LossMetrics`` dict of detached scalars from the same pass: ``entropy``, ``kl`` (to
        ref, when given), ``ppo_kl`` (mean ``old - logp``), ``pg_loss``, ``kl_loss``,
        ``entropy_loss``, ``pg_clipfrac`` (verl's), ``clipfrac_low``, ``clipfrac_high``,
        ``dual_clipfrac``, ``ratio_mean``, ``ratio_max``, ``tokens``: masked-token means (0
        when no token is masked in). ``metrics.path`` names the implementation that ran
        (``"torch"``, ``"fused"`` or ``"chunked"``, ``mapo_fast.loss_path``).

    Raises:
        ValueError: a bad argument, named, with its value or shape.
    """
    cfg = PolicyLossConfig(
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, kl_coef=kl_coef,
        loss_agg=loss_agg, loss_scale_factor=loss_scale_factor, temperature=temperature,
        kl_type=kl_type, entropy_coef=entropy_coef, logit_scale=logit_scale, softcap=softcap,
        logits_dtype=logits_dtype, banned_tokens=banned_tokens, policy_loss=policy_loss)
    return policy_loss_of(cfg.check("mapo_loss"), hidden, weight, targets, advantages, mask,
                          old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias,
                          global_tokens=global_tokens, global_seqs=global_seqs,
                          rollout_is_weights=rollout_is_weights)


def policy_loss_of(cfg: PolicyLossConfig, hidden: Tensor, weight: Tensor, targets: Tensor,
                   advantages: Tensor, mask: Tensor, *, old_logprobs: Optional[Tensor] = None,
                   ref_logprobs: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   global_tokens: Optional[Number] = None, global_seqs: Optional[Number] = None,
                   rollout_is_weights: Optional[Tensor] = None, fn: str = "mapo_loss"
                   ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``mapo_loss`` with its knobs in ``cfg`` (checked): the batch is checked here
    (``_checked_batch``), errors name ``fn``."""
    lm, bias, bt, (old, ref, isw), (g_tokens, g_seqs) = _checked_batch(
        fn, cfg, hidden, weight, targets, advantages, mask, bias, old_logprobs, ref_logprobs,
        rollout_is_weights, global_tokens, global_seqs)

    cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    m = mask.reshape(bt).to(cdtype)
    if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
        chk.fail(fn, "mask", "must hold finite, non-negative values (0/1)")
    # per token or per sequence; an empty batch (B = 0) has nothing to infer -1 from
    adv = advantages.reshape(bt[0], -1 if bt[0] else 1).to(cdtype).expand(bt)
    c = aggregation_weights(m, cfg.loss_agg, cfg.loss_scale_factor, g_tokens, g_seqs)

    flat_m = m.reshape(-1)
    rows = torch.nonzero(flat_m != 0).squeeze(1)
    all_rows = rows.numel() == flat_m.numel()

    def take(x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None:
            return None
        x = x.reshape(-1).to(cdtype)
        return x if all_rows else x.index_select(0, rows)

    sel = {k: take(v) for k, v in
           dict(adv=adv, old=old, ref=ref, isw=isw, c=c, m=flat_m).items()}
    y = targets.reshape(-1).to(torch.int64)
    y = y if all_rows else y.index_select(0, rows)

    def pick(x: Optional[Tensor], sl: slice) -> Optional[Tensor]:
        return None if x is None else x[sl]

    def objective(sl: slice, logp: Tensor, ent: Tensor) -> Tensor:
        terms = token_terms(logp, sel["adv"][sl], pick(sel["old"], sl), pick(sel["ref"], sl),
                            pick(sel["isw"], sl), cfg, ent)
        return sel["c"][sl] * terms["loss"]

    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    loss, logp, ent, path = fused_linear_objective(hidden2d, weight, bias, y,
                                                   None if all_rows else rows, lm, objective)
    return loss, LossMetrics(_metrics(logp, ent, sel, cfg), path=path)


def _checked_batch(fn: str, cfg: PolicyLossConfig, hidden: Tensor, weight: Tensor,
                   targets: Tensor, advantages: Tensor, mask: Tensor, bias: Optional[Tensor],
                   old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
                   rollout_is_weights: Optional[Tensor], global_tokens: Optional[Number],
                   global_seqs: Optional[Number]) -> Tuple[Any, ...]:
    """``policy_loss_of``'s inputs checked, errors naming ``fn`` and the argument: ``(logit
    map, bias with the banned tokens, [B, T] of the batch, (old, ref, importance weights) per
    token or None, (global tokens, global sequences))``."""
    lm = check_linear_inputs(fn, hidden, weight, targets, bias, cfg.temperature,
                             cfg.logit_scale, cfg.softcap, cfg.logits_dtype)
    bias = banned_bias(fn, bias, weight, cfg.banned_tokens, lm.inv_temp, cfg.softcap)
    if targets.dim() not in (1, 2):
        chk.fail(fn, "targets", f"must be [B, T] or [N], got shape {tuple(targets.shape)}")
    bt = tuple(targets.shape) if targets.dim() == 2 else (1, targets.shape[0])
    chk.tensor(fn, "mask", mask)
    if tuple(mask.shape) != tuple(targets.shape):
        chk.fail(fn, "mask", f"must have the shape of `targets` {tuple(targets.shape)}, "
                             f"got {tuple(mask.shape)}")
    chk.tensor(fn, "advantages", advantages, floating=True)
    if tuple(advantages.shape) not in (bt, (bt[0],)) and \
            not (targets.dim() == 1 and tuple(advantages.shape) == tuple(targets.shape)):
        chk.fail(fn, "advantages", f"must have shape {bt} (per token) or ({bt[0]},) (per "
                                   f"sequence), got {tuple(advantages.shape)}")
    chk.same_device(fn, "hidden", hidden, mask=mask, advantages=advantages)
    chk.finite_tensor(fn, "advantages", advantages)
    old = _per_token(fn, "old_logprobs", old_logprobs, bt, hidden)
    ref = _per_token(fn, "ref_logprobs", ref_logprobs, bt, hidden)
    isw = _per_token(fn, "rollout_is_weights", rollout_is_weights, bt, hidden)
    if isw is not None and isw.numel() and bool((isw < 0).any()):
        chk.fail(fn, "rollout_is_weights", f"must be >= 0 (importance weights), found "
                                           f"{float(isw[isw < 0].flatten()[0])}")
    if cfg.kl_coef > 0 and ref is None:
        chk.fail(fn, "ref_logprobs", f"is required when kl_coef > 0 (kl_coef={cfg.kl_coef})")
    g_tokens = _as_number(fn, "global_tokens", global_tokens)
    g_seqs = _as_number(fn, "global_seqs", global_seqs)
    return lm, bias, bt, (old, ref, isw), (g_tokens, g_seqs)


class LossMetrics(dict):
    """``mapo_loss``'s metrics: ``{name: 0-dim tensor}``, plus ``path``, the implementation
    that computed the loss (``"torch"``, ``"fused"`` or ``"chunked"``). Rebuilt from its items
    alone, as tools that walk nested outputs do (accelerate converting a mixed-precision
    model's outputs to float32), it keeps them and its ``path`` is None."""

    def __init__(self, values: Any = (), path: Optional[str] = None):
        super().__init__(values)
        self.path = path


def _metrics(logp: Tensor, ent: Tensor, sel: Dict[str, Optional[Tensor]],
             cfg: PolicyLossConfig) -> Dict[str, Tensor]:
    """Masked means of the per-token terms, from the pass's ``logp``/entropy ([N] math only)."""
    with torch.no_grad():
        t = token_terms(logp, sel["adv"], sel["old"], sel["ref"], sel["isw"], cfg)
        m, c, adv = sel["m"], sel["c"], sel["adv"]
        total = m.sum()
        denom = total.clamp_min(1e-30)

        def mean(x: Tensor) -> Tensor:
            return (x.to(m.dtype) * m).sum() / denom

        zero = torch.zeros((), dtype=m.dtype, device=m.device)
        ratio = t["ratio"]
        out = {
            "entropy": mean(ent),
            "kl": mean(t["kl"]) if "kl" in t else zero,
            "ppo_kl": mean(-t["log_ratio"]),
            "pg_loss": (c * t["pg"]).sum(),
            "kl_loss": (c * t["kl"]).sum() if "kl" in t else zero,
            "entropy_loss": (c * ent.to(c.dtype)).sum(),
            "pg_clipfrac": mean(t["pg_clipped"]),
            "clipfrac_low": mean((ratio < 1.0 - cfg.clip_low) & (adv < 0)),
            "clipfrac_high": mean((ratio > 1.0 + cfg.clip_high) & (adv > 0)),
            "dual_clipfrac": mean(t["dual_clipped"]) if "dual_clipped" in t else zero,
            "ratio_mean": mean(ratio),
            "ratio_max": ratio.max() if ratio.numel() else zero,
            "tokens": total,
        }
    return out


class MAPOLoss(nn.Module):
    """``nn.Module`` form of ``mapo_loss``: the objective's knobs at construction (a
    ``PolicyLossConfig``, or its fields as keywords), the batch at call time.
    ``forward(hidden, weight, targets, advantages, mask, *, old_logprobs=None,
    ref_logprobs=None, bias=None, global_tokens=None, global_seqs=None,
    rollout_is_weights=None) -> (loss, metrics)``; shapes as in ``mapo_loss``."""

    def __init__(self, config: Optional[PolicyLossConfig] = None, **knobs: Any) -> None:
        super().__init__()
        if config is not None and knobs:
            raise ValueError(f"MAPOLoss: pass `config` or its fields as keywords, not both "
                             f"(got config and {sorted(knobs)})")
        if config is not None and not isinstance(config, PolicyLossConfig):
            raise ValueError(f"MAPOLoss: `config` must be a PolicyLossConfig, got "
                             f"{type(config).__name__}")
        fields = PolicyLossConfig.__dataclass_fields__
        unknown = sorted(k for k in knobs if k not in fields)
        if unknown:
            raise ValueError(f"MAPOLoss: unknown knob(s) {unknown}; valid: {list(fields)}")
        self.config = (config or PolicyLossConfig(**knobs)).check("MAPOLoss")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.__dict__.items())

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                mask: Tensor, *, old_logprobs: Optional[Tensor] = None,
                ref_logprobs: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                global_tokens: Optional[Number] = None, global_seqs: Optional[Number] = None,
                rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        return policy_loss_of(self.config, hidden, weight, targets, advantages, mask,
                              old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias,
                              global_tokens=global_tokens, global_seqs=global_seqs,
                              rollout_is_weights=rollout_is_weights, fn="MAPOLoss")
