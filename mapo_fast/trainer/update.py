"""One RL step's work on a built run (``RunParts``), stage by stage: ``collect`` (sampled
groups, their rewards and semantic scores, the padded policy batch), ``advantages`` (MAPO or
GRPO per token), ``update`` (the loss and its gradients over micro-batches and PPO epochs,
no ``[tokens x vocab]`` logits), ``diagnose`` (the gradient's relative variance over
resampled groups) and ``optimizer_step`` (clipping, AdamW, the rollout copy synced)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..advantage import mapo_advantages
from ..logprobs import token_logprobs
from ..loss import mapo_loss
from ..trajectory import Trajectory
from ..variance import loss_gradient_variance
from .batch import PolicyBatch, collate
from .metrics import StepTimer
from .model import policy_hidden
from .rollouts import generate, score

Tensor = torch.Tensor


@dataclass
class Collected:
    """What one step collected: trajectories, rewards ``[B]`` and their parts, semantic scores
    ``[B, K]`` with their turn mask, the gap metrics, and the padded policy batch."""
    trajs: List[Trajectory]
    rewards: Tensor
    parts: Dict[str, Tensor]
    scores: Tensor
    turn_mask: Tensor
    gap: Dict[str, Optional[float]]
    batch: PolicyBatch


@dataclass
class Update:
    """The update's losses and loss metrics per micro-batch, the first epoch's hidden
    states, and the LM head they were computed with (the step's weights before any PPO
    epoch's optimizer step)."""
    losses: List[float] = field(default_factory=list)
    stats: List[Dict[str, float]] = field(default_factory=list)
    hidden: Optional[Tensor] = None
    head: Optional[Tensor] = None


def collect(parts: Any, step: int, timer: StepTimer) -> Collected:
    """This rank's prompts of ``step``: sampled groups (a seed from the run's seed, the step
    and the rank's first prompt), their rewards and semantic scores, and the padded policy
    batch; each stage timed by ``timer``."""
    cfg, r = parts.cfg, parts.cfg.rollout
    with timer("rollout"):
        start, per = parts.shard((step - 1) * r.prompts_per_step, r.prompts_per_step)
        samples = parts.task.batch("train", start, per)
        seed = (cfg.seed * 1_000_003 + step * 7_919 + start * 131) % 2 ** 31
        trajs = generate(parts, samples, group_size=r.group_size, greedy=False, seed=seed)
    with timer("verifier"):
        rewards, reward_parts, scores, turn_mask, gap = score(parts, samples, trajs)
    with timer("advantage"):  # the batch's tensors (counted with the advantages)
        images = [parts.task.images(samples[t.group_id]) for t in trajs]
        batch = collate(trajs, images, parts.adapter, parts.tokenizer.pad_token_id)
    return Collected(trajs, rewards, reward_parts, scores, turn_mask, gap, batch)


def advantages(parts: Any, collected: Collected, algo: Optional[str] = None) -> Tensor:
    """Per-token advantages ``[B, T]`` float32 (``algo``, default ``cfg.algo``: an estimator
    registered in ``ADVANTAGE_ESTIMATORS``)."""
    cfg, c = parts.cfg, collected
    return mapo_advantages(c.rewards, c.batch.group_ids, c.scores, c.turn_mask,
                           c.batch.token_turn, algo=algo or cfg.algo,
                           semantic_coef=cfg.loss.semantic_coef,
                           turn_discount=cfg.loss.turn_discount)


def update(parts: Any, full: PolicyBatch, adv: Tensor) -> Update:
    """The loss and its gradients over micro-batches, for each PPO epoch (an optimizer step
    between epochs; the last one is the caller's). Keeps the first epoch's hidden states
    ``[B, T - 1, H]`` for the gradient-variance estimate."""
    epochs = parts.cfg.optim.ppo_epochs
    parts.model.train()
    # the rollout copy holds the full weights of this step (synced after the last one);
    # later epochs' optimizer steps change it, so keep the head the hidden states go with
    head = parts.rollout_model.lm_head.weight.detach()
    out = Update(head=head.clone() if epochs > 1 else head)
    parts.optimizer.zero_grad(set_to_none=True)
    for epoch in range(epochs):
        backward(parts, full, adv, out, keep_hidden=epoch == 0)
        if epoch + 1 < epochs:
            optimizer_step(parts)
    return out


def backward(parts: Any, full: PolicyBatch, adv: Tensor, out: Optional[Update] = None, *,
             keep_hidden: bool = False) -> None:
    """One pass of the loss over ``full``'s micro-batches, forward and backward (gradients
    accumulate in the policy's parameters; the loss is normalised over the whole batch on
    every rank). ``out`` records each micro-batch's loss and metrics, and with
    ``keep_hidden`` the hidden states ``[B, T - 1, H]``."""
    B, T = full.input_ids.shape
    norm = dict(global_tokens=parts.dist.sum(float(full.loss_mask[:, 1:].sum())),
                global_seqs=parts.dist.sum(float(B)))
    mb = parts.cfg.optim.micro_batch_size
    for lo in range(0, B, mb):
        rows = list(range(lo, min(B, lo + mb)))
        loss, stats, hidden = micro_step(parts, full.select(rows), adv[rows], norm)
        if out is None:
            continue
        out.losses.append(loss)
        out.stats.append(stats)
        if keep_hidden:
            if out.hidden is None:
                out.hidden = hidden.new_zeros(B, T - 1, hidden.shape[-1])
            out.hidden[rows, :hidden.shape[1]] = hidden


def reference_logprobs(parts: Any, batch: PolicyBatch, targets: Tensor) -> Optional[Tensor]:
    """The reference model's log-probs of ``targets`` ``[b, T_m - 1]`` float32, or None
    without a reference (``loss.kl_coef`` 0)."""
    if parts.ref_model is None:
        return None
    with torch.no_grad(), parts.autocast():
        rh = policy_hidden(parts.ref_model, batch)
        return token_logprobs(rh[:, :-1], parts.ref_model.lm_head.weight.to(rh.dtype),
                              targets, **parts.numerics.loss_kwargs()).float()


def micro_step(parts: Any, batch: PolicyBatch, adv: Tensor, norm: Dict[str, float]
               ) -> Tuple[float, Dict[str, float], Tensor]:
    """Forward and backward of one micro-batch; returns its loss, loss metrics and hidden
    states (detached, ``[b, T_m - 1, H]``)."""
    cfg, dev = parts.cfg, parts.device
    Tm = batch.input_ids.shape[1]
    targets = batch.input_ids[:, 1:].to(dev)
    ref = reference_logprobs(parts, batch, targets)

    def objective(h: Tensor, w: Tensor):
        loss, m = mapo_loss(
            h[:, :-1], w, targets, adv[:, 1:Tm].to(dev), batch.loss_mask[:, 1:].to(dev),
            old_logprobs=batch.old_logprobs[:, 1:].to(dev), ref_logprobs=ref,
            clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high,
            kl_coef=cfg.loss.kl_coef, loss_agg=cfg.loss.loss_agg, **norm,
            **parts.numerics.loss_kwargs())
        return loss, m, h[:, :-1].detach()

    loss, m, hidden = parts.policy_call(batch, objective)
    (loss * parts.dist.world).backward()
    return float(loss.detach()), {**{k: float(v) for k, v in m.items()},
                                 "loss_path": m.path}, hidden


def diagnose(parts: Any, full: PolicyBatch, adv: Tensor, upd: Update, step: int
             ) -> Dict[str, float]:
    """The relative variance of the loss gradient over resampled groups
    (``loss_gradient_variance``) at the step's weights: the first epoch's hidden states
    with the head they were computed with."""
    hidden = upd.hidden
    dev, cfg = hidden.device, parts.cfg
    head = upd.head.to(hidden.dtype)
    return loss_gradient_variance(
        hidden, head, full.input_ids[:, 1:].to(dev), adv[:, 1:].to(dev),
        full.loss_mask[:, 1:].to(dev), full.group_ids.to(dev),
        n_resamples=cfg.grad_var_resamples, seed=step,
        old_logprobs=full.old_logprobs[:, 1:].to(dev), loss_agg=cfg.loss.loss_agg,
        **parts.numerics.loss_kwargs())


def optimizer_step(parts: Any) -> float:
    """Clips the gradient (``optim.grad_clip``), steps AdamW, clears the gradients and syncs
    the rollout copy; returns the gradient's norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(parts.policy.parameters(), parts.cfg.optim.grad_clip)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.dist.sync_replica(parts.policy, parts.rollout_model)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
