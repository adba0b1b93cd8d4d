"""The thin MAPO trainer. Each step is a call into the package's pieces, nothing more:

    rollout      RolloutEngine.generate (group-shared paged KV, zoom tool, crops as tokens)
    rewards      CompositeReward (accuracy + format) and the SemanticVerifier on every turn
    advantage    mapo_advantages (algo "mapo" or "grpo")
    loss         mapo_loss over micro-batches: the policy's last hidden states and its LM head
                 weight (no logits), old log-probs from the rollout, optional reference KL
    optimizer    AdamW, gradient clipping

plus the relative gradient variance of each step (``loss_gradient_variance``), a supervised warm
start on the task's scripted expert, greedy evaluation on the held-out split, checkpoints and
resume, metrics and curves. A run is built once (``trainer/build.py``: ``RunParts``); the
stages are modules that take it (``rollouts``, ``evaluation``, ``warm_start``, ``update``,
``checkpoint``); the ``Trainer`` holds the loop's state (the step, the evaluations, the
metrics log) and calls them in order.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch

from . import checkpoint as ckpt
from . import update as U
from .batch import PolicyBatch
from .build import RunParts
from .config import TrainConfig
from .evaluation import evaluate
from .metrics import MetricsLog, Progress, StepTimer, format_eval, step_record, write_outputs
from .update import Collected, Update
from .warm_start import warm_start as run_warm_start

Tensor = torch.Tensor
SHOWN = ("reward_mean", "accuracy", "action_accuracy", "semantic_score", "loss")


class Trainer:
    """Runs ``cfg`` end to end (``run``); the stages are also callable one by one. The run's
    parts are built once (``self.parts``, a ``RunParts``: model, tokenizer, engine, task,
    verifier, optimizer, ...) and read as the trainer's attributes (``trainer.engine`` is
    ``trainer.parts.engine``); the trainer itself holds the loop's state: the step, the
    evaluations, the metrics log."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.parts = RunParts(cfg, progress=progress)
        self.metrics = MetricsLog(os.path.join(self.parts.out, "metrics.jsonl"))
        self.step = 0
        self.evals: Dict[str, Dict[str, float]] = {}
        self.warm_done = False
        state = self.parts.resumed
        if state is not None:
            self.step, self.evals, self.warm_done = state["step"], state["evals"], True
            if self.parts.dist.main:
                self.metrics.truncate_after(self.step)

    def __getattr__(self, name: str) -> Any:
        # only called for names the trainer does not hold: the run's parts
        if name == "parts":
            raise AttributeError(name)
        return getattr(self.parts, name)

    def warm_start(self) -> None:
        """Supervised warm start on the task's scripted expert (``trainer/warm_start.py``)."""
        run_warm_start(self.parts)

    def evaluate(self, opening: Optional[str] = None) -> Dict[str, float]:
        """Greedy rollouts on the held-out split (``trainer/evaluation.py``: ``evaluate``,
        where ``opening`` is described)."""
        return evaluate(self.parts, opening)

    # ---- one MAPO step: the stages of trainer/update.py -----------------------------------
    def train_step(self) -> Dict[str, Any]:
        """One step: collect (rollouts, rewards, semantic scores), advantages, update (the
        loss over micro-batches and PPO epochs), diagnose (the gradient variance), then the
        optimizer step. Returns the step's metrics record."""
        step = self.step + 1
        timer = StepTimer()
        collected = self.collect(step, timer)
        with timer("advantage"):
            adv = self.advantages(collected)
        with timer("loss"):
            upd = self.update(collected.batch, adv)
        with timer("grad_var"):
            grad_var = self.diagnose(collected.batch, adv, upd, step)
        with timer("optimizer"):
            grad_norm = U.optimizer_step(self.parts)
        self.step = step
        c = collected
        rec = step_record(step, c.trajs, c.rewards, c.parts, c.scores, c.turn_mask, c.gap,
                          losses=upd.losses, loss_stats=upd.stats,
                          epochs=self.cfg.optim.ppo_epochs, grad_var=grad_var,
                          grad_norm=grad_norm, times=timer.times)
        rec = self.dist.mean(rec)
        rec["step"] = step
        return rec

    def collect(self, step: int, timer: StepTimer) -> Collected:
        """``update.collect``: this rank's groups of ``step``, scored and batched."""
        return U.collect(self.parts, step, timer)

    def advantages(self, collected: Collected, algo: Optional[str] = None) -> Tensor:
        """``update.advantages``: per-token advantages ``[B, T]`` (default ``cfg.algo``)."""
        return U.advantages(self.parts, collected, algo)

    def update(self, full: PolicyBatch, adv: Tensor) -> Update:
        """``update.update``: the loss and its gradients over micro-batches and PPO epochs."""
        return U.update(self.parts, full, adv)

    def backward(self, full: PolicyBatch, adv: Tensor, out: Optional[Update] = None, *,
                 keep_hidden: bool = False) -> None:
        """``update.backward``: one pass of the loss over ``full``'s micro-batches."""
        U.backward(self.parts, full, adv, out, keep_hidden=keep_hidden)

    def diagnose(self, full: PolicyBatch, adv: Tensor, upd: Update, step: int
                 ) -> Dict[str, float]:
        """``update.diagnose``: the gradient's relative variance over resampled groups."""
        return U.diagnose(self.parts, full, adv, upd, step)

    def save(self) -> Optional[str]:
        """``checkpoint.save_run``: the step's checkpoint (the path on the main rank)."""
        return ckpt.save_run(self.parts, self.step, self.evals)

    # ---- the whole run ---------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """The warm start and its evaluation (unless resumed), the RL steps with their
        metrics, evaluations and checkpoints, the final evaluation; writes the outputs and
        returns the summary."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if not self.warm_done:
            self.warm_start()
            self.evals["warm_start"] = self.evaluate()
            self.say(f"eval after warm start: {format_eval(self.evals['warm_start'])}")
            self.save()
        bar = Progress(cfg.steps, cfg.algo, initial=self.step, enabled=self.progress)
        while self.step < cfg.steps:
            rec = self.train_step()
            if self.dist.main:
                self.metrics.append(rec)
            bar.update(self.step, rec, SHOWN)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evals[f"step_{self.step}"] = self.evaluate()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        # a run of no RL steps (a warm start alone) is already evaluated
        self.evals["final"] = self.evaluate() if self.step or "warm_start" not in self.evals \
            else self.evals["warm_start"]
        self.say(f"eval after {cfg.algo}: {format_eval(self.evals['final'])}")
        return self.summarize(time.perf_counter() - t_start)

    def summarize(self, wall_s: float) -> Dict[str, Any]:
        """The run's summary (evaluations, wall time, each rank's weight checksum, the
        records a data task read); the main rank writes it with the metrics and curves."""
        cfg = self.cfg
        summary = {"algo": cfg.algo, "steps": self.step, "evals": self.evals,
                   "vision_pretrain": self.vision_report, "wall_s": wall_s,
                   "world_size": self.dist.world,
                   "parameter_checksums": self.dist.gather(self.checksum())}
        if hasattr(self.task, "counts"):
            summary["records"], summary["skipped_records"] = self.task.counts()
        if self.dist.main:
            write_outputs(self.out, summary, self.metrics.read(), self.evals,
                          title=f"{cfg.algo} on {cfg.task.name} (seed {cfg.seed})")
        return summary

    def checksum(self) -> str:
        """A hash of this rank's full rollout weights (equal on every rank when in sync)."""
        return ckpt.weights_checksum(self.rollout_model)
