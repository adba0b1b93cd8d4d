"""Rollouts and their scores on a built run (``RunParts``): the task's samples through the
rollout engine with the zoom tool, sampled or greedy, optionally with each first turn's
opening forced (``ForcedOpening``), then the rewards, the verifier's semantic scores and the
reasoning-action gap metrics of the trajectories."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..rewards import OracleVerifier
from ..rollout.multimodal import render_chat
from ..trajectory import Trajectory
from .build import TEMPLATE
from .metrics import gap_metrics

Tensor = torch.Tensor


class ForcedOpening:
    """A logits processor that makes a turn begin with the tokens ``ids``: while fewer than
    ``len(ids)`` tokens follow the ``prompt_len``-token prompt, only the next one of ``ids``
    can be drawn; after that the logits pass unchanged."""

    def __init__(self, prompt_len: int, ids: Sequence[int]):
        self.prompt_len, self.ids = prompt_len, list(ids)

    def __call__(self, tokens: Sequence[int], logits: Tensor) -> Tensor:
        k = len(tokens) - self.prompt_len
        if not 0 <= k < len(self.ids):
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[self.ids[k]] = 0.0
        return out


def generate(parts: Any, samples: Sequence[Any], *, group_size: int, greedy: bool, seed: int,
             opening: Optional[str] = None,
             logits_processor: Optional[Any] = None) -> List[Trajectory]:
    """Rollouts of ``samples`` (``group_size`` each) on ``parts``' engine and rollout copy,
    under its autocast, greedy or with its sampling settings; with ``opening`` (one of the
    task's ``OPENINGS``) each first turn begins with the task's text for it
    (``generate_opened``). The engine's prefix cache is emptied after (the weights change)."""
    if opening is not None:
        return generate_opened(parts, samples, greedy=greedy, seed=seed, opening=opening)
    r = parts.cfg.rollout
    parts.rollout_model.eval()
    with parts.autocast():
        draw = dict(temperature=0.0) if greedy else parts.numerics.sampling_kwargs()
        trajs = parts.engine.generate(
            [parts.task.prompt(s) for s in samples], group_size=group_size,
            max_new_tokens=r.max_new_tokens, tools=parts.runner, max_turns=r.max_turns,
            observation_template=TEMPLATE, seed=seed, logits_processor=logits_processor,
            **draw)
    parts.engine.clear_prefix_cache()
    return trajs


def generate_opened(parts: Any, samples: Sequence[Any], *, greedy: bool, seed: int,
                    opening: str) -> List[Trajectory]:
    """One ``generate`` call per (opening text, prompt length), so that ``ForcedOpening``
    knows where each turn starts; the trajectories come back in the samples' order."""
    limit = parts.cfg.rollout.max_new_tokens
    keys = [(parts.task.opening(s, opening),
             len(render_chat(parts.task.prompt(s), parts.tokenizer, parts.adapter)[0]))
            for s in samples]
    out: List[Optional[Trajectory]] = [None] * len(samples)
    for text, n in dict.fromkeys(keys):
        rows = [i for i, k in enumerate(keys) if k == (text, n)]
        ids = parts.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            raise ValueError(f"Trainer.evaluate: the {opening!r} opening {text!r} takes "
                             f"{len(ids)} tokens, not fewer than `rollout.max_new_tokens` "
                             f"({limit})")
        trajs = generate(parts, [samples[i] for i in rows], group_size=1, greedy=greedy,
                         seed=seed, logits_processor=ForcedOpening(n, ids))
        for i, t in zip(rows, trajs):
            t.group_id, out[i] = i, t
    return out  # type: ignore[return-value]


def score(parts: Any, samples: Sequence[Any], trajs: Sequence[Trajectory]
          ) -> Tuple[Tensor, Dict[str, Tensor], Tensor, Tensor, Dict[str, float]]:
    """Rewards ``[B]``, their parts, semantic scores ``[B, K]`` with their turn mask, and the
    reasoning-action gap metrics (``gap_metrics``) of ``trajs`` (``t.group_id`` indexes
    ``samples``). With the oracle verifier, each successful turn's region is named first."""
    task = parts.task
    truths = [samples[t.group_id].answer for t in trajs]
    rewards, reward_parts = parts.reward.batch([t.response_text for t in trajs], truths,
                                               [t.spans for t in trajs])
    if isinstance(parts.verifier, OracleVerifier):
        for t in trajs:
            for turn in t.spans.turns:
                if turn.ok:
                    turn.region = task.region_terms(samples[t.group_id], turn.box)
    scores, turn_mask = parts.verifier.score_trajectories(trajs)
    hits = None
    if hasattr(task, "target_in"):
        hits = [[task.target_in(samples[t.group_id], turn.box)
                 for turn in t.spans.turns if turn.ok] for t in trajs]
    gap = gap_metrics(reward_parts["accuracy"], scores, turn_mask, hits)
    return rewards, reward_parts, scores, turn_mask, gap
