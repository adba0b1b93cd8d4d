"""A run, built once (``RunParts``): the configuration checked, the device and ranks, the task,
the tokenizer and model (vision pretraining before sharding), the optimizer, the rollout
engine with its capacity checked against the task's prompts, the policy numerics, the tool
runners, the reward and the verifier, and a resumed checkpoint's weights and RNG states. The
stages take this record (``rollouts``, ``evaluation``, ``warm_start``, ``update``,
``checkpoint.save_run``, ``estimator``) and the loop (``trainer/loop.py``) calls them; a
setting that cannot work is one ``ConfigError`` line naming its key, raised here before any
work.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Any, Dict, Optional, Tuple

import torch

from .._checks import ConfigError
from ..policy import PolicyNumerics
from ..rewards import (AccuracyReward, CompositeReward, FormatReward, OracleVerifier,
                       ToolUseReward)
from ..rollout import RolloutEngine
from ..rollout.multimodal import VisionAdapter, render_chat
from ..tools import ToolRunner
from ..trajectory import OBSERVATION_TEMPLATE
from . import checkpoint as ckpt
from .batch import PolicyBatch
from .config import TrainConfig
from .distributed import DistContext
from .model import PolicyWithLoss, load_pretrained, tiny_vl_model

TEMPLATE = OBSERVATION_TEMPLATE


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


class RunParts:
    """Everything a run is made of, built once from ``cfg`` (``progress``: show progress bars
    and lines on the main rank). Attributes: ``cfg``, ``dist`` (ranks), ``device``, ``out``,
    ``progress``, ``task``, ``tokenizer``, ``model`` (the policy's model), ``policy``
    (``PolicyWithLoss``), ``rollout_model`` (what the engine runs: the policy, sharded when
    distributed), ``optimizer``, ``engine``, ``adapter`` (the engine's vision adapter),
    ``numerics``, ``runner`` (the rollouts' tools), ``expert_tools`` (the warm start's),
    ``reward``, ``verifier``, ``ref_model`` (None without a KL term), ``vision_report`` and
    ``resumed`` (the checkpoint resumed from, or None)."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg.validate()
        self._place(progress)
        _check_writable(self.out)
        with config_errors("task.data_path"):
            self.task = build_task(cfg)
        ckpt.seed_everything(cfg.seed)
        state = self._checkpoint() if cfg.resume else None
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
        self._build_verifier()
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.rollout_model).eval().requires_grad_(False)
        #: the checkpoint this run resumes from (its weights, optimizer and RNG states are
        #: restored here; its step and evaluations are the loop's), else None
        self.resumed = state
        if state is not None:
            self.dist.load_state(self.policy, self.optimizer, state)
            self.dist.sync_replica(self.policy, self.rollout_model)
            ckpt.set_rng_state(state["rng"])

    def _place(self, progress: bool) -> None:
        """The device and the ranks (``device``, ``dist``), where output goes and whether
        progress shows."""
        cfg = self.cfg
        want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                        else "cpu")
        _check_device(want)
        self.dist = DistContext.from_env(torch.device(want).type)
        if self.dist.enabled and cfg.rollout.prompts_per_step % self.dist.world:
            raise ConfigError(f"config: `rollout.prompts_per_step` "
                              f"({cfg.rollout.prompts_per_step}) must be a multiple of the "
                              f"{self.dist.world} ranks")
        if want.startswith("cuda") and self.dist.enabled:
            want = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(want)
        self.progress = progress and self.dist.main
        self.out = cfg.out

    def _checkpoint(self) -> Dict[str, Any]:
        """The newest intact checkpoint in ``out`` (``resume``), or one ``ConfigError``."""
        try:
            _, state = ckpt.load_latest(os.path.join(self.out, "checkpoints"),
                                        warn=lambda m: print(f"mapo-train: {m}",
                                                             file=sys.stderr, flush=True))
        except ckpt.CheckpointError as e:
            raise ConfigError(f"config: `resume`: {e}") from None
        return state

    def _build_verifier(self) -> None:
        """The semantic verifier: the task's oracle, or a local CLIP on the run's device."""
        v = self.cfg.verifier
        if v.kind == "oracle":
            self.verifier = OracleVerifier(self.task.vocabulary)
            return
        from ..rewards import CLIPVerifier
        if not os.path.isdir(v.clip_path):
            raise ConfigError(f"config: `verifier.clip_path` {v.clip_path!r} is not a local "
                              "checkpoint folder")
        with config_errors("verifier.clip_path"):
            self.verifier = CLIPVerifier.from_pretrained(v.clip_path)
        self.verifier.model.to(self.device)

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
                progress=self.progress, autocast=self.autocast, write=self.dist.main)
            self.say("vision pretraining: held-out crop accuracy "
                      f"{self.vision_report['vision_crop_accuracy']:.3f}, where the tint is "
                      f"wrong {self.vision_report['vision_tint_wrong_accuracy']:.3f}")
        if ws.freeze_vision:
            from .vision_pretrain import freeze_vision
            freeze_vision(self.model)

    # ---- helpers -------------------------------------------------------------------------------
    def autocast(self):
        """The policy's autocast: bfloat16 on CUDA, none on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def policy_call(self, batch: PolicyBatch, fn: Any) -> Any:
        """``fn(hidden, lm_head_weight)`` inside the policy's forward (see PolicyWithLoss)."""
        with self.autocast():
            return self.policy(batch, fn)

    def shard(self, start: int, n: int) -> Tuple[int, int]:
        """This rank's ``(start, count)`` of ``n`` items from ``start``."""
        per = n // self.dist.world
        return start + self.dist.rank * per, per

    def say(self, text: str) -> None:
        """Prints ``text`` on the main rank when progress is shown."""
        if self.dist.main and self.progress:
            print(text, flush=True)
