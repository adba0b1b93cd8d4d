"""The policy-gradient estimator's variance at fixed weights, paired across advantage
estimators: draw ``K`` independent rollout batches with the trainer's current policy, and on
each compute the gradient of the training loss with each estimator's advantages (GRPO's, MAPO's)
on the same trajectories. ``paired_estimator_variance`` then reports how much each estimator's
gradient changes from one batch to the next, and the MAPO / GRPO ratio with a bootstrap
interval over batches. Unlike the per-step figure (``loss_gradient_variance``, groups
resampled within one batch), this is the estimator's variance in the paper's sense, and the two
estimators see the same trajectories.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..advantage import ADVANTAGE_ESTIMATORS
from ..variance import paired_estimator_variance
from . import update as U
from .metrics import StepTimer

Tensor = torch.Tensor
#: prompts of these steps are drawn for the measurement: far past any training run's, so the
#: batches are fresh prompts of the training split
FIRST_STEP = 1_000_000


def variance_params(model: Any) -> Dict[str, Tensor]:
    """The LM head's weight and the last decoder layer's parameters of a Qwen2.5-VL policy
    (the vision tower excluded), by name."""
    names = [n for n, _ in model.named_parameters() if ".layers." in n and "visual" not in n]
    if not names:
        raise ValueError("estimator_gradients: the policy has no decoder layers named "
                         "'*.layers.<i>.*'")
    last = max(int(n.split(".layers.")[1].split(".")[0]) for n in names)
    keep = {n: p for n, p in model.named_parameters()
            if n.endswith("lm_head.weight") or
            (f".layers.{last}." in n and "visual" not in n)}
    return keep


def estimator_gradients(run: Any, n_batches: int, algos: Sequence[str] = ("grpo", "mapo"),
                        *, first_step: int = FIRST_STEP,
                        params: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``{algo: [n_batches, P]}``: for each of ``n_batches`` rollout batches drawn at the
    current weights of ``run`` (a built run, ``RunParts``, or a ``Trainer``: its parts; the
    prompts of steps ``first_step + k``, each with its own sampling seed), the gradient of
    the training loss (the run's loss settings, one pass over its micro-batches, on-policy)
    w.r.t. ``params`` (default ``variance_params``), flattened, with each algorithm's
    advantages on the same trajectories. The weights, the optimizer state and the training
    step are unchanged; gradients are cleared after."""
    for a in algos:
        if a not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"estimator_gradients: `algos` must be drawn from "
                             f"{list(ADVANTAGE_ESTIMATORS.names())}, got {a!r}")
    if not isinstance(n_batches, int) or n_batches < 3:
        raise ValueError(f"estimator_gradients: `n_batches` must be an int >= 3, got "
                         f"{n_batches!r}")
    parts = getattr(run, "parts", run)
    if parts.dist.world != 1:
        raise ValueError("estimator_gradients: runs in one process (world size 1)")
    params = params if params is not None else variance_params(parts.model)
    out: Dict[str, List[Tensor]] = {a: [] for a in algos}
    parts.model.train()
    try:
        for k in range(n_batches):
            collected = U.collect(parts, first_step + k, StepTimer())
            for a in algos:
                adv = U.advantages(parts, collected, algo=a)
                parts.optimizer.zero_grad(set_to_none=True)
                U.backward(parts, collected.batch, adv)
                out[a].append(torch.cat([
                    (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                    .reshape(-1).double().cpu() for p in params.values()]))
    finally:
        parts.optimizer.zero_grad(set_to_none=True)
    return {a: torch.stack(v) for a, v in out.items()}


def estimator_variance(run: Any, n_batches: int = 16, *, n_boot: int = 2000,
                       seed: int = 0) -> Dict[str, Dict[str, float]]:
    """``paired_estimator_variance`` of GRPO's and MAPO's gradients (``estimator_gradients``)
    at ``run``'s current weights (``RunParts`` or a ``Trainer``), MAPO relative to GRPO."""
    grads = estimator_gradients(run, n_batches, ("grpo", "mapo"))
    return paired_estimator_variance(grads, reference="grpo", n_boot=n_boot, seed=seed)
