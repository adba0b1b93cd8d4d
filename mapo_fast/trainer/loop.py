"""The thin MAPO trainer. Each step is a call into the package's pieces, nothing more:

    rollout      RolloutEngine.generate (group-shared paged KV, zoom tool, crops as tokens)
    rewards      CompositeReward (accuracy + format) and the SemanticVerifier on every turn
    advantage    mapo_advantages (algo "mapo" or "grpo")
    loss         mapo_loss over micro-batches: the policy's last hidden states and its LM head
                 weight (no logits), old log-probs from the rollout, optional reference KL
    optimizer    AdamW, gradient clipping

plus the relative gradient variance of each step (``loss_gradient_variance``), a supervised warm
start on the task's scripted expert, greedy evaluation on the held-out split, checkpoints and
resume, metrics and curves. What a run is made of (model, tokenizer, engine, task, verifier,
optimizer, ...) is built once by ``trainer/build.py`` (``RunParts``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..advantage import mapo_advantages
from ..logprobs import token_logprobs
from ..loss import mapo_loss
from ..rewards import OracleVerifier
from ..rollout.multimodal import render_chat
from ..trajectory import Trajectory
from ..variance import loss_gradient_variance
from . import checkpoint as ckpt
from .batch import PolicyBatch, collate
from .build import TEMPLATE, RunParts
from .config import TrainConfig
from .metrics import (MetricsLog, Progress, StepTimer, format_eval, gap_metrics, step_record,
                      write_outputs)
from .model import policy_hidden
from .warm_start import warm_start as run_warm_start

Tensor = torch.Tensor
SHOWN = ("reward_mean", "accuracy", "action_accuracy", "semantic_score", "loss")


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

    def _generate(self, samples: Sequence[Any], *, group_size: int, greedy: bool,
                  seed: int, opening: Optional[str] = None,
                  logits_processor: Optional[Any] = None) -> List[Trajectory]:
        """Rollouts of ``samples``; with ``opening`` (one of the task's ``OPENINGS``) each
        first turn begins with the task's text for it (``_generate_opened``)."""
        if opening is not None:
            return self._generate_opened(samples, greedy=greedy, seed=seed, opening=opening)
        r = self.cfg.rollout
        self.rollout_model.eval()
        with self.autocast():
            draw = dict(temperature=0.0) if greedy else self.numerics.sampling_kwargs()
            trajs = self.engine.generate(
                [self.task.prompt(s) for s in samples], group_size=group_size,
                max_new_tokens=r.max_new_tokens, tools=self.runner, max_turns=r.max_turns,
                observation_template=TEMPLATE, seed=seed, logits_processor=logits_processor,
                **draw)
        self.engine.clear_prefix_cache()
        return trajs

    def _generate_opened(self, samples: Sequence[Any], *, greedy: bool, seed: int,
                         opening: str) -> List[Trajectory]:
        """One ``_generate`` call per (opening text, prompt length), so that ``ForcedOpening``
        knows where each turn starts; the trajectories come back in the samples' order."""
        limit = self.cfg.rollout.max_new_tokens
        keys = [(self.task.opening(s, opening),
                 len(render_chat(self.task.prompt(s), self.tokenizer, self.adapter)[0]))
                for s in samples]
        out: List[Optional[Trajectory]] = [None] * len(samples)
        for text, n in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == (text, n)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= limit:
                raise ValueError(f"Trainer.evaluate: the {opening!r} opening {text!r} takes "
                                 f"{len(ids)} tokens, not fewer than `rollout.max_new_tokens` "
                                 f"({limit})")
            trajs = self._generate([samples[i] for i in rows], group_size=1, greedy=greedy,
                                   seed=seed, logits_processor=ForcedOpening(n, ids))
            for i, t in zip(rows, trajs):
                t.group_id, out[i] = i, t
        return out  # type: ignore[return-value]

    def _score(self, samples: Sequence[Any], trajs: Sequence[Trajectory]
               ) -> Tuple[Tensor, Dict[str, Tensor], Tensor, Tensor, Dict[str, float]]:
        """Rewards, their parts, semantic scores ``[B, K]`` with their turn mask, and the
        reasoning-action gap metrics (``gap_metrics``)."""
        truths = [samples[t.group_id].answer for t in trajs]
        rewards, parts = self.reward.batch([t.response_text for t in trajs], truths,
                                           [t.spans for t in trajs])
        if isinstance(self.verifier, OracleVerifier):
            for t in trajs:
                for turn in t.spans.turns:
                    if turn.ok:
                        turn.region = self.task.region_terms(samples[t.group_id], turn.box)
        scores, turn_mask = self.verifier.score_trajectories(trajs)
        hits = None
        if hasattr(self.task, "target_in"):
            hits = [[self.task.target_in(samples[t.group_id], turn.box)
                     for turn in t.spans.turns if turn.ok] for t in trajs]
        gap = gap_metrics(parts["accuracy"], scores, turn_mask, hits)
        return rewards, parts, scores, turn_mask, gap

    # ---- warm start ----------------------------------------------------------------------------
    def warm_start(self) -> None:
        """Supervised warm start on the task's scripted expert (``trainer/warm_start.py``)."""
        run_warm_start(self.parts)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, opening: Optional[str] = None) -> Dict[str, float]:
        """Greedy rollouts on the held-out split: accuracy, semantic score, tool use, format
        and the gap metrics (``action_accuracy``, ``faithfulness``,
        ``right_answer_wrong_action``; see ``gap_metrics``). ``opening``, one of the built-in
        task's ``OPENINGS``, forces how each first turn begins (``no_zoom``: the answer at
        once; ``wrong_zoom``: the call above or below the target's quadrant; ``right_zoom``:
        the call on it); the policy writes the rest."""
        if opening is not None:
            from ..tasks.visual_search import OPENINGS
            if not hasattr(self.task, "opening"):
                raise ValueError(f"Trainer.evaluate: `opening` {opening!r} needs the built-in "
                                 f"task (task.name 'visual_search'), got "
                                 f"{self.cfg.task.name!r}")
            if opening not in OPENINGS:
                raise ValueError(f"Trainer.evaluate: `opening` must be one of "
                                 f"{list(OPENINGS)} or None, got {opening!r}")
        n = self.cfg.task.eval_size - self.cfg.task.eval_size % self.dist.world
        start, per = self.shard(0, n)
        samples = self.task.batch("eval", start, per)
        trajs = self._generate(samples, group_size=1, greedy=True, seed=0, opening=opening)
        _, parts, scores, turn_mask, gap = self._score(samples, trajs)
        res = {"accuracy": float(parts["accuracy"].mean()),
               "semantic_score": float(scores[turn_mask].mean()) if turn_mask.any() else 0.0,
               "tool_use": float(sum(any(t.ok for t in x.spans.turns) for x in trajs)) / len(trajs),
               "format": float(parts["format"].mean()), **gap}
        res = self.dist.mean(res)
        res["eval_size"] = n
        return res

    # ---- one MAPO step -------------------------------------------------------------------------
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
            update = self.update(collected.batch, adv)
        with timer("grad_var"):
            grad_var = self.diagnose(collected.batch, adv, update, step)
        with timer("optimizer"):
            grad_norm = self._optimizer_step()
        self.step = step
        c = collected
        rec = step_record(step, c.trajs, c.rewards, c.parts, c.scores, c.turn_mask, c.gap,
                          losses=update.losses, loss_stats=update.stats,
                          epochs=self.cfg.optim.ppo_epochs, grad_var=grad_var,
                          grad_norm=grad_norm, times=timer.times)
        rec = self.dist.mean(rec)
        rec["step"] = step
        return rec

    def collect(self, step: int, timer: "StepTimer") -> "Collected":
        """This rank's prompts of ``step``: sampled groups, their rewards and semantic scores,
        and the padded policy batch."""
        cfg, r = self.cfg, self.cfg.rollout
        with timer("rollout"):
            start, per = self.shard((step - 1) * r.prompts_per_step, r.prompts_per_step)
            samples = self.task.batch("train", start, per)
            seed = (cfg.seed * 1_000_003 + step * 7_919 + start * 131) % 2 ** 31
            trajs = self._generate(samples, group_size=r.group_size, greedy=False, seed=seed)
        with timer("verifier"):
            rewards, parts, scores, turn_mask, gap = self._score(samples, trajs)
        with timer("advantage"):  # the batch's tensors (counted with the advantages)
            images = [self.task.images(samples[t.group_id]) for t in trajs]
            batch = collate(trajs, images, self.adapter, self.tokenizer.pad_token_id)
        return Collected(trajs, rewards, parts, scores, turn_mask, gap, batch)

    def advantages(self, collected: "Collected", algo: Optional[str] = None) -> Tensor:
        """Per-token advantages ``[B, T]`` (``algo``, default ``cfg.algo``: MAPO or GRPO)."""
        cfg = self.cfg
        c = collected
        return mapo_advantages(c.rewards, c.batch.group_ids, c.scores, c.turn_mask,
                               c.batch.token_turn, algo=algo or cfg.algo,
                               semantic_coef=cfg.loss.semantic_coef,
                               turn_discount=cfg.loss.turn_discount)

    def update(self, full: PolicyBatch, adv: Tensor) -> "Update":
        """The loss and its gradients over micro-batches, for each PPO epoch (an optimizer
        step between epochs; the last one is the caller's). Keeps the first epoch's hidden
        states ``[B, T - 1, H]`` for the gradient-variance estimate."""
        cfg = self.cfg
        self.model.train()
        # the rollout copy holds the full weights of this step (synced after the last one);
        # later epochs' optimizer steps change it, so keep the head the hidden states go with
        head = self.rollout_model.lm_head.weight.detach()
        out = Update(head=head.clone() if cfg.optim.ppo_epochs > 1 else head)
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(cfg.optim.ppo_epochs):
            self.backward(full, adv, out, keep_hidden=epoch == 0)
            if epoch + 1 < cfg.optim.ppo_epochs:
                self._optimizer_step()
        return out

    def backward(self, full: PolicyBatch, adv: Tensor, out: Optional["Update"] = None, *,
                 keep_hidden: bool = False) -> None:
        """One pass of the loss over ``full``'s micro-batches, forward and backward (gradients
        accumulate in the policy's parameters; the loss is normalised over the whole batch).
        ``out`` records each micro-batch's loss and metrics, and with ``keep_hidden`` the
        hidden states ``[B, T - 1, H]``."""
        B, T = full.input_ids.shape
        norm = dict(global_tokens=self.dist.sum(float(full.loss_mask[:, 1:].sum())),
                    global_seqs=self.dist.sum(float(B)))
        mb = self.cfg.optim.micro_batch_size
        for lo in range(0, B, mb):
            rows = list(range(lo, min(B, lo + mb)))
            loss, stats, hidden = self._micro_step(full.select(rows), adv[rows], norm)
            if out is None:
                continue
            out.losses.append(loss)
            out.stats.append(stats)
            if keep_hidden:
                if out.hidden is None:
                    out.hidden = hidden.new_zeros(B, T - 1, hidden.shape[-1])
                out.hidden[rows, :hidden.shape[1]] = hidden

    def _micro_step(self, batch: PolicyBatch, adv: Tensor, norm: Dict[str, float]
                    ) -> Tuple[float, Dict[str, float], Tensor]:
        """Forward and backward of one micro-batch; returns its loss, loss metrics and hidden
        states (detached, ``[b, T_m - 1, H]``)."""
        cfg, dev = self.cfg, self.device
        Tm = batch.input_ids.shape[1]
        targets = batch.input_ids[:, 1:].to(dev)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad(), self.autocast():
                rh = policy_hidden(self.ref_model, batch)
                ref = token_logprobs(rh[:, :-1], self.ref_model.lm_head.weight.to(rh.dtype),
                                     targets, **self.numerics.loss_kwargs()).float()

        def objective(h: Tensor, w: Tensor):
            loss, m = mapo_loss(
                h[:, :-1], w, targets, adv[:, 1:Tm].to(dev), batch.loss_mask[:, 1:].to(dev),
                old_logprobs=batch.old_logprobs[:, 1:].to(dev), ref_logprobs=ref,
                clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high,
                kl_coef=cfg.loss.kl_coef, loss_agg=cfg.loss.loss_agg, **norm,
                **self.numerics.loss_kwargs())
            return loss, m, h[:, :-1].detach()

        loss, m, hidden = self.policy_call(batch, objective)
        (loss * self.dist.world).backward()
        return float(loss.detach()), {**{k: float(v) for k, v in m.items()},
                                     "loss_path": m.path}, hidden

    def diagnose(self, full: PolicyBatch, adv: Tensor, update: "Update", step: int
                 ) -> Dict[str, float]:
        """The relative variance of the loss gradient over resampled groups
        (``loss_gradient_variance``) at the step's weights: the first epoch's hidden states
        with the head they were computed with."""
        hidden = update.hidden
        dev, cfg = hidden.device, self.cfg
        head = update.head.to(hidden.dtype)
        return loss_gradient_variance(
            hidden, head, full.input_ids[:, 1:].to(dev), adv[:, 1:].to(dev),
            full.loss_mask[:, 1:].to(dev), full.group_ids.to(dev),
            n_resamples=cfg.grad_var_resamples, seed=step,
            old_logprobs=full.old_logprobs[:, 1:].to(dev), loss_agg=cfg.loss.loss_agg,
            **self.numerics.loss_kwargs())

    def _optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.sync_replica(self.policy, self.rollout_model)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Optional[str]:
        state = self.dist.checkpoint_state(self.policy, self.optimizer)
        path = None
        if self.dist.main:
            tok = getattr(self.tokenizer, "backend_tokenizer", None)
            path = ckpt.save(os.path.join(self.out, "checkpoints"), self.step, dict(
                state, rng=ckpt.rng_state(), evals=self.evals, config=self.cfg.to_dict(),
                vision_report=self.vision_report,
                tokenizer=tok.to_str() if tok is not None and not self.cfg.model.path else None),
                keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        return path

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
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
        summary = {"algo": cfg.algo, "steps": self.step, "evals": self.evals,
                   "vision_pretrain": self.vision_report,
                   "wall_s": time.perf_counter() - t_start, "world_size": self.dist.world,
                   "parameter_checksums": self.dist.gather(self.checksum())}
        if hasattr(self.task, "counts"):
            summary["records"], summary["skipped_records"] = self.task.counts()
        if self.dist.main:
            write_outputs(self.out, summary, self.metrics.read(), self.evals,
                          title=f"{cfg.algo} on {cfg.task.name} (seed {cfg.seed})")
        return summary

    def checksum(self) -> str:
        """A hash of this rank's full rollout weights (equal on every rank when in sync)."""
        import hashlib
        h = hashlib.sha256()
        for name, p in sorted(self.rollout_model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]
