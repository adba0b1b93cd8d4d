"""The supervised warm start: the policy imitates the task's scripted expert before RL (the
built-in task; skipped for a task without an expert or for 0 steps).

Each step takes a batch of expert trajectories, built by the task through the rollout engine
(``tasks.visual_search.scripted_trajectory``: the same prompt, tool call, observation and answer
tokens a rollout would hold), and minimises their tokens' negative log-likelihood under the
policy at temperature 1 with the banned vision tokens removed (``mapo_fast.policy``), with its
own AdamW and a warm-up / flat / cosine learning-rate schedule.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..logprobs import token_logprobs
from .batch import collate
from .metrics import MetricsLog, Progress

#: Where the warm start's samples start in the task's train split (apart from the RL steps').
FIRST_SAMPLE = 10_000_000


def lr_factor(i: int, steps: int) -> float:
    """The learning rate of step ``i`` of ``steps``, relative to ``warm_start.lr``: linear
    warm-up over the first 5%, constant, cosine decay to a tenth over the last 30%."""
    warm, flat = max(1, steps // 20), int(steps * 0.7)
    decay = max(0.0, (i - flat) / max(1, steps - flat))
    return min(1.0, (i + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * decay)))


def warm_start(parts: Any) -> None:
    """Runs the warm start of a run (``parts``, a ``RunParts``: its config, task, engine,
    policy and ranks) and writes ``warm_start.jsonl``; the rollout copy is synced at the
    end."""
    ws = parts.cfg.warm_start
    task = parts.task
    if ws.steps == 0 or not hasattr(task, "expert_trajectory"):
        return
    opt = torch.optim.AdamW(parts.policy.parameters(), lr=ws.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, ws.steps))
    log = MetricsLog(os.path.join(parts.out, "warm_start.jsonl"))
    bar = Progress(ws.steps, "warm start", enabled=parts.progress)
    dist, banned = parts.dist, parts.numerics.banned_tokens
    parts.model.train()
    for i in range(ws.steps):
        start, n = parts.shard(FIRST_SAMPLE + i * ws.batch_size, ws.batch_size)
        samples = task.batch("train", start, n)
        trajs = [task.expert_trajectory(s, parts.engine, parts.expert_tools)
                 for s in samples]
        batch = collate(trajs, [task.images(s) for s in samples], parts.adapter,
                        parts.tokenizer.pad_token_id)
        targets = batch.input_ids[:, 1:].to(parts.device)
        mask = batch.loss_mask[:, 1:].to(parts.device)
        tokens = dist.sum(float(mask.sum()))
        loss = parts.policy_call(batch, lambda h, w: -(token_logprobs(
            h[:, :-1], w, targets, banned_tokens=banned).float() * mask).sum()
            / tokens * dist.world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.policy.parameters(), parts.cfg.optim.grad_clip)
        opt.step()
        sched.step()
        rec = dist.mean({"step": i + 1, "nll": float(loss.detach()) / dist.world})
        if dist.main:
            log.append(rec)
        bar.update(i + 1, rec, ("nll",))
    bar.close()
    dist.sync_replica(parts.policy, parts.rollout_model)
