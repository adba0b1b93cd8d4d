"""Checks of a ``TrainConfig``, before any work: ``validate(cfg)`` raises ``ConfigError`` naming
the first bad key and its value. One function per concern: numbers and ranges, the tiny
model's shapes, the task, the rollout, optimisation and loss, the verifier, and the sizes the
machine must hold (``machine_bytes``)."""

from __future__ import annotations

import math
import os
import re
from typing import Callable

from .._checks import ConfigError, short_repr
from .config import TrainConfig, _float_keys, get, reference

#: Largest value of any integer key (the C int range that torch, numpy and pyarrow agree on).
MAX_INT = 2 ** 31 - 1
#: Bytes per parameter of the tiny model while training: weights, the rollout's copy, the
#: reference, the gradient and AdamW's two moments, in float32.
TRAIN_BYTES_PER_PARAM = 6 * 4
#: Bytes per pixel of one rendered built-in image while it is drawn (float32 planes and masks).
RENDER_BYTES_PER_PIXEL = 64
#: Most resampled group sets of the variance diagnosis (each is a loss pass per step).
MAX_GRAD_VAR_RESAMPLES = 4096
#: Integer keys that count something (at least 1); ``steps`` may be 0 (the warm start only).
COUNT_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "model.hidden_size",
              "model.layers", "model.heads", "model.kv_heads", "model.intermediate_size",
              "model.vision_hidden_size", "model.vision_depth", "task.image_size",
              "task.view_size", "task.target_size", "task.eval_size", "task.max_image_pixels",
              "rollout.prompts_per_step", "rollout.group_size", "rollout.max_new_tokens",
              "rollout.max_turns", "warm_start.batch_size", "optim.ppo_epochs",
              "optim.micro_batch_size", "grad_var_resamples")

Need = Callable[[str, bool, str], None]


def machine_bytes() -> int:
    """The memory the configuration's sizes are checked against: this machine's RAM, or a
    visible GPU's memory when that is larger (a run puts its KV pool and model there)."""
    import torch
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        ram = max(ram, torch.cuda.get_device_properties(0).total_memory)
    return int(ram)


def validate(cfg: TrainConfig) -> None:
    """Checks every value of ``cfg``; raises ``ConfigError`` naming the first bad key."""
    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"config: `{key}` must be {what}, got {short_repr(get(cfg, key))}")

    _numbers(cfg, need)
    _model(cfg, need)
    _memory(cfg, need)
    _task(cfg, need)
    _rollout(cfg, need)
    _optimisation(cfg, need)
    _verifier(cfg, need)


def _numbers(cfg: TrainConfig, need: Need) -> None:
    """Finite floats, counts >= 1, every int in the C range, the seed, the top-level keys."""
    from ..advantage import ADVANTAGE_ESTIMATORS
    for key in _float_keys(cfg):
        need(key, math.isfinite(get(cfg, key)), "a finite number")
    need("algo", cfg.algo in ADVANTAGE_ESTIMATORS,
         f"one of {list(ADVANTAGE_ESTIMATORS.names())}")
    need("device", cfg.device in ("auto", "cpu") or
         bool(re.fullmatch(r"cuda(:\d+)?", cfg.device)), "'auto', 'cpu' or 'cuda[:i]'")
    for key in COUNT_KEYS:
        low = 0 if key == "steps" else 1
        need(key, get(cfg, key) >= low, f"an int >= {low}")
    for key, _, value, _ in reference(cfg):
        if isinstance(value, int) and not isinstance(value, bool):
            need(key, value <= MAX_INT, f"at most {MAX_INT}")
    need("seed", 0 <= cfg.seed < 2 ** 32, "in [0, 2**32) (numpy's seed range)")
    need("eval_every", cfg.eval_every >= 0, "an int >= 0 (0: evaluate at the end only)")
    need("grad_var_resamples", cfg.grad_var_resamples <= MAX_GRAD_VAR_RESAMPLES,
         f"at most {MAX_GRAD_VAR_RESAMPLES} (each is a loss pass per step)")
    need("grad_var_resamples", cfg.grad_var_resamples >= 2, "an int >= 2")


def _model(cfg: TrainConfig, need: Need) -> None:
    """The tiny model's sizes (a checkpoint, ``model.path``, brings its own shapes)."""
    m = cfg.model
    need("model.vocab_size", m.vocab_size >= 300, "an int >= 300")
    need("model.heads", m.hidden_size % m.heads == 0,
         f"a divisor of model.hidden_size ({m.hidden_size})")
    need("model.kv_heads", m.heads % m.kv_heads == 0, f"a divisor of model.heads ({m.heads})")
    if m.path is not None:
        return
    # what the tiny Qwen2.5-VL's layers need of its sizes: a config that passes builds and
    # runs its first step
    need("model.heads", (m.hidden_size // m.heads) % 2 == 0,
         f"such that the head size (model.hidden_size / model.heads = "
         f"{m.hidden_size / m.heads:g}) is even (rotary embeddings rotate pairs)")
    vheads = max(1, m.vision_hidden_size // 32)
    need("model.vision_hidden_size", m.vision_hidden_size % vheads == 0 and
         (m.vision_hidden_size // vheads) % 4 == 0,
         f"such that its {vheads} head(s) of 32 or more channels each have a multiple of 4 "
         "channels (the vision tower's 2-D rotary embedding), e.g. 32, 36, 48, 64")


def _memory(cfg: TrainConfig, need: Need) -> None:
    """Sizes bounded by what the machine holds (``machine_bytes``): the tiny model while it
    trains, the KV pool, the built-in task's images while they are drawn."""
    have = machine_bytes()
    gib = f"{have / 2 ** 30:.1f} GiB"
    if cfg.model.path is None:
        m = cfg.model
        head = m.hidden_size // m.heads
        per_layer = (m.hidden_size * (m.heads + 2 * m.kv_heads) * head
                     + m.heads * head * m.hidden_size + 3 * m.hidden_size * m.intermediate_size)
        # each size's share; the key named is the one that holds the most of them
        shares = {"model.vocab_size": 2 * m.vocab_size * m.hidden_size,
                  "model.layers": m.layers * per_layer,
                  "model.vision_depth": m.vision_depth * 12 * m.vision_hidden_size ** 2}
        params = sum(shares.values())
        need(max(shares, key=shares.get), params * TRAIN_BYTES_PER_PARAM <= have,
             f"small enough for the tiny model ({params:.3g} parameters, "
             f"{TRAIN_BYTES_PER_PARAM} bytes each while training) to fit in {gib}")
    need("rollout.memory_budget_mb", cfg.rollout.memory_budget_mb * 2 ** 20 <= have,
         f"at most this machine's memory ({have / 2 ** 20:.0f} MiB)")
    if cfg.task.name != "visual_search":
        return
    t, r = cfg.task, cfg.rollout
    for key, side in (("task.image_size", t.image_size), ("task.view_size", t.view_size)):
        need(key, RENDER_BYTES_PER_PIXEL * side ** 2 <= have // 4,
             f"small enough to draw one image in a quarter of {gib}")
    images = max(r.prompts_per_step, t.eval_size, cfg.warm_start.batch_size)
    need("rollout.prompts_per_step" if images == r.prompts_per_step else
         "task.eval_size" if images == t.eval_size else "warm_start.batch_size",
         images * 3 * t.image_size ** 2 <= have // 4,
         f"small enough that a step's {t.image_size}-pixel images fit in a quarter of {gib}")
    cells = 3 * max(1, t.image_size // 2 // t.target_size) ** 2
    need("task.distractors", t.distractors <= cells,
         f"at most {cells} (three quadrants of target-sized cells)")


def _task(cfg: TrainConfig, need: Need) -> None:
    """The task's keys, and the warm start's that depend on the task."""
    from ..tasks.visual_search import BLIND_SPOTS, DETAILS, EXPERTS
    t, w = cfg.task, cfg.warm_start
    need("task.name", t.name in ("visual_search", "jsonl"), "'visual_search' or 'jsonl'")
    need("task.data_path", t.name != "jsonl" or bool(t.data_path),
         "a .jsonl or .parquet file when task.name is 'jsonl'")
    need("model.path", t.name != "jsonl" or bool(cfg.model.path),
         "a local Qwen2.5-VL checkpoint when task.name is 'jsonl' (the tiny model's "
         "tokenizer is trained on the built-in task's text)")
    need("task.view_size", t.view_size % 28 == 0, "a multiple of 28")
    need("task.distractors", t.distractors >= 0, "an int >= 0")
    need("task.detail", t.detail in DETAILS, f"one of {list(DETAILS)}")
    need("task.expert", t.expert in EXPERTS, f"one of {list(EXPERTS)}")
    need("task.blind_spot", t.blind_spot in BLIND_SPOTS, f"one of {list(BLIND_SPOTS)}")
    need("task.hint_reliability", 0 <= t.hint_reliability <= 1, "in [0, 1]")
    need("warm_start.steps", w.steps >= 0, "an int >= 0")
    need("warm_start.vision_steps", w.vision_steps >= 0, "an int >= 0")
    need("warm_start.vision_steps", w.vision_steps == 0 or t.name == "visual_search",
         "0 unless task.name is 'visual_search' (vision pretraining names the built-in "
         "task's crops)")
    need("warm_start.freeze_vision", not w.freeze_vision or w.vision_steps > 0,
         "false unless warm_start.vision_steps > 0 (a tower frozen untrained never learns "
         "to read a crop)")
    need("warm_start.lr", w.lr > 0, "> 0")
    need("warm_start.vision_lr", w.vision_lr > 0, "> 0")


def _rollout(cfg: TrainConfig, need: Need) -> None:
    """Sampling, the engine's modes, and the pixel bounds against the task's view."""
    from ..kernels.packed_linear_cpu import CPU_LINEAR
    from ..rollout.cpu_malloc import CPU_MALLOC
    from ..rollout.params import DECODE_MODES
    r = cfg.rollout
    need("rollout.temperature", r.temperature > 0, "> 0 (sampling)")
    need("rollout.top_p", 0 < r.top_p <= 1, "in (0, 1]")
    need("rollout.memory_budget_mb", r.memory_budget_mb > 0, "> 0")
    need("rollout.decode_mode", r.decode_mode in DECODE_MODES, f"one of {list(DECODE_MODES)}")
    need("rollout.cpu_linear", r.cpu_linear in CPU_LINEAR, f"one of {list(CPU_LINEAR)}")
    need("rollout.cpu_malloc", r.cpu_malloc in CPU_MALLOC, f"one of {list(CPU_MALLOC)}")
    for key in ("rollout.min_pixels", "rollout.max_pixels"):
        v = get(cfg, key)
        need(key, v is None or v >= 28 * 28, "None or an int >= 784")
    lo, hi = r.min_pixels, r.max_pixels
    need("rollout.min_pixels", lo is None or hi is None or lo <= hi,
         f"at most rollout.max_pixels ({hi})")
    if cfg.task.name != "visual_search":
        return
    view = cfg.task.view_size ** 2
    need("rollout.max_pixels", hi is None or hi >= view,
         f"None or at least the task's view, task.view_size ** 2 = {view}")
    need("rollout.min_pixels", lo is None or lo <= view,
         f"None or at most the task's view, task.view_size ** 2 = {view}")
    _built_in_task(cfg)


def _built_in_task(cfg: TrainConfig) -> None:
    """The built-in task's own checks (sizes it can draw), as config errors."""
    try:
        cfg.visual_search_task()
    except ValueError as e:
        msg = re.sub(r"^VisualSearchTask: ", "", str(e))
        raise ConfigError("config: " + re.sub(r"`(\w+)`", r"`task.\1`", msg)) from None


def _optimisation(cfg: TrainConfig, need: Need) -> None:
    """The RL optimiser, the loss (its aggregation from ``LOSS_AGG_MODES``) and the reward."""
    from ..loss import LOSS_AGG_MODES
    o, loss = cfg.optim, cfg.loss
    need("optim.lr", o.lr > 0, "> 0")
    need("optim.weight_decay", o.weight_decay >= 0, ">= 0")
    need("optim.grad_clip", o.grad_clip > 0, "> 0")
    need("loss.clip_low", 0 <= loss.clip_low < 1, "in [0, 1)")
    need("loss.clip_high", loss.clip_high >= 0, ">= 0")
    need("loss.kl_coef", loss.kl_coef >= 0, ">= 0")
    need("loss.loss_agg", loss.loss_agg in LOSS_AGG_MODES,
         f"one of {list(LOSS_AGG_MODES.names())}")
    need("loss.semantic_coef", loss.semantic_coef >= 0, ">= 0")
    need("loss.turn_discount", 0 <= loss.turn_discount <= 1, "in [0, 1]")
    for key in ("reward.accuracy", "reward.format", "reward.tool_use"):
        need(key, get(cfg, key) >= 0, ">= 0")


def _verifier(cfg: TrainConfig, need: Need) -> None:
    v = cfg.verifier
    need("verifier.kind", v.kind in ("oracle", "clip"), "'oracle' or 'clip'")
    need("verifier.clip_path", v.kind != "clip" or bool(v.clip_path),
         "a local CLIP checkpoint when verifier.kind is 'clip'")
    need("verifier.kind", v.kind != "oracle" or cfg.task.name == "visual_search",
         "'clip' for task.name 'jsonl' (the oracle needs the task's ground truth)")
