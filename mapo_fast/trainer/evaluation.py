"""Greedy evaluation of a built run's policy (``RunParts``) on the task's held-out split,
optionally with each first turn's opening forced (the built-in task's ``OPENINGS``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .rollouts import generate, score


def check_opening(parts: Any, opening: Optional[str]) -> None:
    """``ValueError`` for an ``opening`` that is not None or one of the built-in task's
    ``OPENINGS``, or for an opening on a task without them."""
    if opening is None:
        return
    from ..tasks.visual_search import OPENINGS
    if not hasattr(parts.task, "opening"):
        raise ValueError(f"Trainer.evaluate: `opening` {opening!r} needs the built-in task "
                         f"(task.name 'visual_search'), got {parts.cfg.task.name!r}")
    if opening not in OPENINGS:
        raise ValueError(f"Trainer.evaluate: `opening` must be one of {list(OPENINGS)} or "
                         f"None, got {opening!r}")


def evaluate(parts: Any, opening: Optional[str] = None) -> Dict[str, float]:
    """Greedy rollouts on the held-out split (``task.eval_size`` samples, rounded down to a
    multiple of the world size, split over the ranks): accuracy, semantic score, tool use,
    format and the gap metrics (``action_accuracy``, ``faithfulness``,
    ``right_answer_wrong_action``; see ``gap_metrics``), averaged over the ranks. ``opening``
    forces how each first turn begins (``no_zoom``: the answer at once; ``wrong_zoom``: the
    call above or below the target's quadrant; ``right_zoom``: the call on it); the policy
    writes the rest."""
    check_opening(parts, opening)
    n = parts.cfg.task.eval_size - parts.cfg.task.eval_size % parts.dist.world
    start, per = parts.shard(0, n)
    samples = parts.task.batch("eval", start, per)
    trajs = generate(parts, samples, group_size=1, greedy=True, seed=0, opening=opening)
    _, reward_parts, scores, turn_mask, gap = score(parts, samples, trajs)
    res = {"accuracy": float(reward_parts["accuracy"].mean()),
           "semantic_score": float(scores[turn_mask].mean()) if turn_mask.any() else 0.0,
           "tool_use": float(sum(any(t.ok for t in x.spans.turns) for x in trajs)) / len(trajs),
           "format": float(reward_parts["format"].mean()), **gap}
    res = parts.dist.mean(res)
    res["eval_size"] = n
    return res
