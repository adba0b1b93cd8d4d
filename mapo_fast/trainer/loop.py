"""The thin MAPO trainer. Each step is a call into the package's pieces, nothing more:

    rollout      RolloutEngine.generate (group-shared paged KV, zoom tool, crops as tokens)
    rewards      CompositeReward (accuracy + format) and the SemanticVerifier on every turn
    advantage    mapo_advantages (algo "mapo" or "grpo")
    loss         mapo_loss over micro-batches: the policy's last hidden states and its LM head
                 weight (no logits), old log-probs from the rollout, optional reference KL
    optimizer    AdamW, gradient clipping

plus the relative gradient variance of each step (``loss_gradient_variance``), a supervised warm
start on the task's scripted expert, greedy evaluation on the held-out split, checkpoints and
resume, metrics and curves.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..advantage import mapo_advantages
from ..logprobs import token_logprobs
from ..loss import mapo_loss
from ..policy import PolicyNumerics
from ..rewards import (AccuracyReward, CompositeReward, FormatReward, OracleVerifier,
                       ToolUseReward)
from ..rollout import RolloutEngine
from ..rollout.multimodal import VisionAdapter, render_chat
from ..tools import ToolRunner
from ..trajectory import OBSERVATION_TEMPLATE, Trajectory
from ..variance import loss_gradient_variance
from . import checkpoint as ckpt
from .batch import PolicyBatch, collate
from .._checks import ConfigError
from .config import TrainConfig
from .distributed import DistContext
from .metrics import (MetricsLog, Progress, StepTimer, format_eval, gap_metrics, step_record,
                      write_outputs)
from .model import PolicyWithLoss, load_pretrained, policy_hidden, tiny_vl_model
from .warm_start import warm_start as run_warm_start

Tensor = torch.Tensor
TEMPLATE = OBSERVATION_TEMPLATE
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


@contextlib.contextmanager
def config_errors(key: str):
    """Loading what ``key`` names (a data file, a checkpoint folder): a ``ValueError`` or
    ``OSError`` it raises (transformers' missing files, pyarrow's bad tables, PIL, bad JSON)
    becomes one ``ConfigError`` line naming the key, at most ~300 characters of its message."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        text = text[len("config: "):] if text.startswith("config: ") else text
        named = text.startswith(f"`{key}`")  # the message names the key already: once
        raise ConfigError(f"config: {'' if named else f'`{key}`: '}{text[:300]}") from None


def build_task(cfg: TrainConfig):
    if cfg.task.name == "visual_search":
        return cfg.visual_search_task()
    from ..tasks.records import RecordsTask
    return RecordsTask(cfg.task.data_path, image_root=cfg.task.image_root, seed=cfg.seed,
                       max_image_pixels=cfg.task.max_image_pixels, eval_size=cfg.task.eval_size)


def _check_device(device: str) -> None:
    """``ConfigError`` for a device this machine does not have."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"config: `device` {device!r}: no CUDA device is available here "
                          "(use cpu or auto)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"config: `device` {device!r}: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")


def _check_writable(folder: str) -> None:
    """Creates ``folder`` and writes a file in it, or ``ConfigError`` saying why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_check.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"config: `out` {folder!r} cannot be created or written: "
                          f"{e.strerror or e}") from None


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
    """Runs ``cfg`` end to end (``run``); the stages are also callable one by one."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg.validate()
        want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                        else "cpu")
        _check_device(want)
        self.dist = DistContext.from_env(torch.device(want).type)
        if self.dist.enabled and cfg.rollout.prompts_per_step % self.dist.world:
            raise ConfigError(f"config: `rollout.prompts_per_step` ({cfg.rollout.prompts_per_step}) "
                              f"must be a multiple of the {self.dist.world} ranks")
        if want.startswith("cuda") and self.dist.enabled:
            want = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(want)
        self.progress = progress and self.dist.main
        self.out = cfg.out
        _check_writable(self.out)
        with config_errors("task.data_path"):
            self.task = build_task(cfg)
        ckpt.seed_everything(cfg.seed)
        state = None
        if cfg.resume:
            try:
                _, state = ckpt.load_latest(os.path.join(self.out, "checkpoints"),
                                            warn=lambda m: print(f"mapo-train: {m}",
                                                                 file=sys.stderr, flush=True))
            except ckpt.CheckpointError as e:
                raise ConfigError(f"config: `resume`: {e}") from None
        self._build_model(state)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self._build_engine()
        #: the one vision adapter: the engine's (prompts, crops, batches and the warm start
        #: all see images as the rollout does)
        self.adapter = self.engine.vision
        r = cfg.rollout
        #: the distribution sampled, recorded and trained on: one setting (mapo_fast.policy)
        self.numerics = PolicyNumerics(temperature=r.temperature, top_p=r.top_p,
                                       banned_tokens=self.engine.banned_tokens)
        self.runner = ToolRunner()
        self.expert_tools = ToolRunner(crop_kwargs=self.adapter.crop_kwargs)  # warm start's
        w = cfg.reward
        self.reward = CompositeReward([("accuracy", AccuracyReward(), w.accuracy),
                                       ("format", FormatReward(), w.format),
                                       ("tool", ToolUseReward(w.tool_use), 1.0)])
        if cfg.verifier.kind == "oracle":
            self.verifier = OracleVerifier(self.task.vocabulary)
        else:
            from ..rewards import CLIPVerifier
            if not os.path.isdir(cfg.verifier.clip_path):
                raise ConfigError(f"config: `verifier.clip_path` {cfg.verifier.clip_path!r} is "
                                  "not a local checkpoint folder")
            with config_errors("verifier.clip_path"):
                self.verifier = CLIPVerifier.from_pretrained(cfg.verifier.clip_path)
            self.verifier.model.to(self.device)
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.rollout_model).eval().requires_grad_(False)
        self.metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"))
        self.step = 0
        self.evals: Dict[str, Dict[str, float]] = {}
        self.warm_done = False
        if state is not None:
            self.dist.load_state(self.policy, self.optimizer, state)
            self.dist.sync_replica(self.policy, self.rollout_model)
            ckpt.set_rng_state(state["rng"])
            self.step, self.evals, self.warm_done = state["step"], state["evals"], True
            if self.dist.main:
                self.metrics.truncate_after(self.step)

    def _build_engine(self) -> None:
        """The rollout engine, its pool checked against one group's longest rollout (the
        first training prompt's length) before any work starts."""
        r = self.cfg.rollout
        pixels = self.cfg.task.view_size ** 2
        try:
            self.engine = RolloutEngine(self.rollout_model, self.tokenizer,
                                        memory_budget_mb=r.memory_budget_mb,
                                        decode_mode=r.decode_mode,
                                        cpu_linear=r.cpu_linear,
                                        cpu_malloc=r.cpu_malloc,
                                        min_pixels=r.min_pixels or pixels,
                                        max_pixels=r.max_pixels or pixels)
        except ValueError as e:
            raise ConfigError(f"config: `rollout.memory_budget_mb`: {e}") from None
        first = self.task.batch("train", 0, 1)[0]  # the built-in task's prompts are all alike
        prompt, _ = render_chat(self.task.prompt(first), self.tokenizer, self.engine.vision)
        need, have = self.engine.group_capacity(len(prompt), r.group_size, r.max_new_tokens,
                                                r.max_turns, True, TEMPLATE)
        if need > have:
            blocks = -(-need // self.engine.block_size) + r.group_size
            raise ConfigError(
                f"config: `rollout.memory_budget_mb` ({r.memory_budget_mb:g}) holds {have} KV "
                f"tokens; one group of {r.group_size} samples may need {need} (prompt "
                f"{len(prompt)} + {r.max_turns} turns each): give at least "
                f"{blocks * self.engine.block_bytes / 2 ** 20:.3g} MiB")
        if hasattr(self.task, "bound_questions"):
            self._bound_questions(len(prompt), first.question)

    def _bound_questions(self, prompt_len: int, question: str) -> None:
        """Records whose question would not fit the text model's positions beside the rest of
        the prompt and every turn are skipped (``RecordsTask.bound_questions``)."""
        r = self.cfg.rollout

        def count(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        positions = getattr(self.engine.text_config, "max_position_embeddings", None)
        if not positions:
            return
        turns = r.max_turns * self.engine.turn_tokens(r.max_new_tokens, True, TEMPLATE)
        most = int(positions) - (prompt_len - count(question)) - turns
        if most < 1:
            raise ConfigError(
                f"config: `rollout.max_turns` ({r.max_turns}) turns of up to "
                f"{turns // r.max_turns} tokens and the prompt leave no room for a question in "
                f"the model's {positions} positions")
        with config_errors("task.data_path"):
            self.task.bound_questions(count, most)

    def _build_model(self, state: Optional[Dict[str, Any]]) -> None:
        cfg = self.cfg
        if cfg.model.path:
            with config_errors("model.path"):
                model, self.tokenizer = load_pretrained(cfg.model.path, self.device)
        else:
            from ..tasks.tokenizer import build_tokenizer, tokenizer_from_string
            if state is not None and state.get("tokenizer"):
                self.tokenizer = tokenizer_from_string(state["tokenizer"])
            else:
                self.tokenizer = build_tokenizer(self.task.corpus(),
                                                 vocab_size=cfg.model.vocab_size)
            model = tiny_vl_model(cfg.model, self.tokenizer, seed=cfg.seed).to(self.device)
        self.model = model
        self._vision_stage(state)
        self.policy = PolicyWithLoss(model)
        self.rollout_model = self.dist.shard(self.policy)

    def _vision_stage(self, state: Optional[Dict[str, Any]]) -> None:
        """Vision pretraining (``trainer/vision_pretrain.py``) on a fresh run, before the
        model is sharded; the tower frozen (``warm_start.freeze_vision``), on a resumed run
        too."""
        ws = self.cfg.warm_start
        self.vision_report: Dict[str, float] = dict(state.get("vision_report", {})) \
            if state is not None else {}
        if ws.vision_steps and state is None:
            from .vision_pretrain import pretrain_vision
            pixels = self.cfg.rollout.min_pixels or self.cfg.task.view_size ** 2
            adapter = VisionAdapter(self.model, min_pixels=pixels,
                                    max_pixels=self.cfg.rollout.max_pixels or pixels)
            self.vision_report = pretrain_vision(
                self.model, self.task, adapter, steps=ws.vision_steps,
                batch_size=ws.batch_size, lr=ws.vision_lr, out=self.out,
                progress=self.progress, autocast=self._autocast, write=self.dist.main)
            self._say("vision pretraining: held-out crop accuracy "
                      f"{self.vision_report['vision_crop_accuracy']:.3f}, where the tint is "
                      f"wrong {self.vision_report['vision_tint_wrong_accuracy']:.3f}")
        if ws.freeze_vision:
            from .vision_pretrain import freeze_vision
            freeze_vision(self.model)

    # ---- helpers -------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def policy_call(self, batch: PolicyBatch, fn: Any) -> Any:
        """``fn(hidden, lm_head_weight)`` inside the policy's forward (see PolicyWithLoss)."""
        with self._autocast():
            return self.policy(batch, fn)

    def _generate(self, samples: Sequence[Any], *, group_size: int, greedy: bool,
                  seed: int, opening: Optional[str] = None,
                  logits_processor: Optional[Any] = None) -> List[Trajectory]:
        """Rollouts of ``samples``; with ``opening`` (one of the task's ``OPENINGS``) each
        first turn begins with the task's text for it (``_generate_opened``)."""
        if opening is not None:
            return self._generate_opened(samples, greedy=greedy, seed=seed, opening=opening)
        r = self.cfg.rollout
        self.rollout_model.eval()
        with self._autocast():
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

    def shard(self, start: int, n: int) -> Tuple[int, int]:
        """This rank's ``(start, count)`` of ``n`` items from ``start``."""
        per = n // self.dist.world
        return start + self.dist.rank * per, per

    # ---- warm start ----------------------------------------------------------------------------
    def warm_start(self) -> None:
        """Supervised warm start on the task's scripted expert (``trainer/warm_start.py``)."""
        run_warm_start(self)

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
            with torch.no_grad(), self._autocast():
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
            self._say(f"eval after warm start: {format_eval(self.evals['warm_start'])}")
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
        self._say(f"eval after {cfg.algo}: {format_eval(self.evals['final'])}")
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

    def _say(self, text: str) -> None:
        if self.dist.main and self.progress:
            print(text, flush=True)
