"""Run outputs a person reads: ``metrics.jsonl`` (one JSON object per step), a progress bar
with live metrics on a terminal (plain lines otherwise), and ``curves.png``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from ..rewards.verifier import FAITHFUL_SCORE

#: The reasoning-action gap, per step and at evaluation (see ``gap_metrics``).
GAP_KEYS = ("action_accuracy", "faithfulness", "right_answer_wrong_action")
#: Keys every step's record has (the trainer adds more).
STEP_KEYS = ("step", "reward_mean", "accuracy", "semantic_score", "grad_var", "loss",
             "tokens_per_s") + GAP_KEYS
CURVES = (("reward_mean", "reward"), ("accuracy", "accuracy"),
          ("semantic_score", "semantic score"), ("action_accuracy", "action accuracy"),
          ("faithfulness", "faithfulness"), ("grad_var", "relative gradient variance"))


def gap_metrics(correct: torch.Tensor, scores: torch.Tensor, turn_mask: torch.Tensor,
                hits: Optional[Sequence[Sequence[bool]]] = None) -> Dict[str, Optional[float]]:
    """The reasoning-action gap of a batch of trajectories.

    Args:
        correct: ``[B]`` float, 1 where the answer is right.
        scores, turn_mask: ``[B, K]`` semantic scores of the successful tool turns and their
            mask (``SemanticVerifier.score_trajectories``).
        hits: per trajectory, per successful tool turn, whether its crop holds the target (the
            task's ground truth); None where the task has none.

    Returns ``faithfulness`` (share of described turns whose score reaches ``FAITHFUL_SCORE``),
    ``action_accuracy`` (share of successful tool turns whose crop holds the target) and
    ``right_answer_wrong_action`` (share of trajectories answered right with no turn on the
    target); a share with nothing to count, or needing ``hits`` that are absent, is None.
    """
    out: Dict[str, Optional[float]] = dict.fromkeys(GAP_KEYS)
    if turn_mask.any():
        out["faithfulness"] = float((scores[turn_mask] >= FAITHFUL_SCORE).float().mean())
    if hits is not None:
        if len(hits) != len(correct):
            raise ValueError(f"gap_metrics: {len(hits)} rows of `hits` for {len(correct)} "
                             "trajectories")
        turns = [h for row in hits for h in row]
        if turns:
            out["action_accuracy"] = sum(turns) / len(turns)
        if len(hits):
            wrong = [float(c) > 0.5 and not any(row) for c, row in zip(correct.tolist(), hits)]
            out["right_answer_wrong_action"] = sum(wrong) / len(wrong)
    return out


class MetricsLog:
    """Appends records to ``path``; ``truncate_after(step)`` drops records of later steps (a
    resumed run continues the interrupted curve without duplicates)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def read(self) -> List[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        keep = [r for r in self.read() if r.get("step", -1) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")


def _clean(record: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None  # JSON has no inf/nan
        out[k] = v
    return out


class Progress:
    """A tqdm bar with the latest metrics when stderr is a terminal, else one plain line per
    update."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True):
        self.enabled, self.desc, self.total = enabled, desc, total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int, metrics: Dict[str, Any], keys: Iterable[str]) -> None:
        if not self.enabled:
            return
        shown = {k: metrics[k] for k in keys if k in metrics and metrics[k] is not None}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.desc}] {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_curves(records: List[Dict[str, Any]], path: str, *, title: Optional[str] = None,
                evals: Optional[Dict[str, float]] = None) -> None:
    """Reward, accuracy, semantic score, action accuracy, faithfulness and gradient variance
    over steps, one panel each;
    ``evals`` (name -> accuracy) are drawn as horizontal lines on the accuracy panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    steps = [r["step"] for r in records]
    for ax, (key, label) in zip(axes.flat, CURVES):
        ys = [r.get(key) for r in records]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
        if key == "grad_var" and pts and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        if key == "accuracy" and evals:
            for name, acc in evals.items():
                ax.axhline(acc, ls="--", lw=1, color="grey")
                ax.annotate(f"eval {name}: {acc:.2f}", (0.01, acc), xycoords=("axes fraction",
                                                                               "data"),
                            fontsize=8, va="bottom")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class StepTimer:
    """Wall time per phase of a step: ``with timer("loss"): ...`` adds to ``times["loss"]``
    (a phase entered twice accumulates)."""

    #: The phases of a step, in order (each record has ``time_<phase>``).
    PHASES = ("rollout", "verifier", "advantage", "loss", "grad_var", "optimizer")

    def __init__(self):
        self.times: Dict[str, float] = {k: 0.0 for k in self.PHASES}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if phase not in self.times:
            raise ValueError(f"StepTimer: `phase` must be one of {', '.join(self.PHASES)}, got "
                             f"{phase!r}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] += time.perf_counter() - t0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def step_record(step: int, trajs: Sequence[Any], rewards: torch.Tensor,
                parts: Dict[str, torch.Tensor], scores: torch.Tensor, turn_mask: torch.Tensor,
                gap: Dict[str, Optional[float]], *, losses: Sequence[float],
                loss_stats: Sequence[Dict[str, float]], epochs: int,
                grad_var: Dict[str, float], grad_norm: float,
                times: Dict[str, float]) -> Dict[str, Any]:
    """One training step's record for ``metrics.jsonl`` (this rank's; the trainer averages it
    over ranks): rewards, accuracy, semantic score, the gap metrics, gradient variance and
    norm, tool use, response length, entropy, clip fraction, the loss path and the time of
    each phase."""
    n = len(trajs)
    return {
        "step": step, "reward_mean": float(rewards.mean()),
        "accuracy": float(parts["accuracy"].mean()),
        "semantic_score": float(scores[turn_mask].mean()) if turn_mask.any() else 0.0,
        "grad_var": grad_var["relative_var"], "grad_var_trace": grad_var["trace_var"],
        "loss": float(sum(losses) / epochs),
        "tokens_per_s": sum(len(t.token_ids) for t in trajs) / sum(times.values()),
        "grad_norm": grad_norm, **gap,
        "tool_use": sum(any(t.ok for t in x.spans.turns) for x in trajs) / n,
        "tool_errors": sum(x.stats.get("tool_errors", 0) for x in trajs) / n,
        "response_tokens": sum(sum(x.loss_mask) for x in trajs) / n,
        "entropy": _mean([s["entropy"] for s in loss_stats]),
        "clipfrac": _mean([s["pg_clipfrac"] for s in loss_stats]),
        "loss_path": loss_stats[0].get("loss_path") if loss_stats else None,
        **{f"time_{k}": v for k, v in times.items()},
    }


def run_summary(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """From a run's step records: the mean time of each phase and the mean gradient
    variance (``{}`` for a run without steps)."""
    if not records:
        return {}
    keys = [k for k in records[0] if k.startswith("time_")]
    grad_vars = [r["grad_var"] for r in records if r.get("grad_var") is not None]
    return {"mean_step_time": {k[5:]: _mean([r[k] for r in records]) for k in keys},
            "mean_grad_var": _mean(grad_vars) if grad_vars else None}


def format_eval(e: Dict[str, Any]) -> str:
    """One line of an evaluation's results, for the console."""
    gap = "".join(f", {k.replace('_', ' ')} {e[k]:.3f}" for k in GAP_KEYS
                  if e.get(k) is not None)
    return (f"accuracy {e['accuracy']:.3f}, semantic {e['semantic_score']:.3f}{gap}, tool "
            f"use {e['tool_use']:.2f} (n={e['eval_size']})")


def write_outputs(out: str, summary: Dict[str, Any], records: Sequence[Dict[str, Any]],
                  evals: Dict[str, Dict[str, Any]], title: str) -> None:
    """The end of a run: ``eval.json`` (``summary`` with the step records' summary, see
    ``run_summary``) and ``curves.png`` (the step curves with the evaluations' accuracy)."""
    summary.update(run_summary(records))
    if records:
        plot_curves(records, os.path.join(out, "curves.png"), title=title,
                    evals={k: v["accuracy"] for k, v in evals.items()
                           if not k.startswith("step_")})
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
