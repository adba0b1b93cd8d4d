"""The trainer's configuration: one dataclass tree, loadable from YAML, overridable from the
command line, validated up front with errors that name the key.

Command-line convention: ``--key value`` (or ``--key=value``), nested keys dotted
(``--rollout.group_size 8``); ``--config FILE.yaml`` loads a file first, and the overrides
apply on top of it in order. Booleans accept ``true/false/1/0/yes/no``; ``none`` clears an
optional value; a bare ``--resume`` means ``--resume true``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


#: Most characters of a bad value echoed in an error message.
ECHO_CHARS = 200
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12: set the limits one by one
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = ECHO_CHARS, ECHO_CHARS, 60


def echo(value: Any) -> str:
    """``repr(value)`` in at most ~``ECHO_CHARS`` characters, with bounded work however large
    or nested ``value`` is (a YAML alias bomb is millions of shared nodes)."""
    text = _REPR.repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def machine_bytes() -> int:
    """The memory the configuration's sizes are checked against: this machine's RAM, or a
    visible GPU's memory when that is larger (a run puts its KV pool and model there)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import torch
        if torch.cuda.is_available():
            ram = max(ram, torch.cuda.get_device_properties(0).total_memory)
    except ImportError:  # the documentation build reads this module without torch
        pass
    return int(ram)


#: Largest value of any integer key (the C int range that torch, numpy and pyarrow agree on).
MAX_INT = 2 ** 31 - 1
#: Bytes per parameter of the tiny model while training: weights, the rollout's copy, the
#: reference, the gradient and AdamW's two moments, in float32.
TRAIN_BYTES_PER_PARAM = 6 * 4
#: Bytes per pixel of one rendered built-in image while it is drawn (float32 planes and masks).
RENDER_BYTES_PER_PIXEL = 64
#: Most resampled group sets of the variance diagnosis (each is a loss pass per step).
MAX_GRAD_VAR_RESAMPLES = 4096


@dataclass
class ModelConfig:
    """The policy. ``path``: a local Qwen2.5-VL checkpoint (with its processor/tokenizer);
    None builds the tiny model below from a config (random weights, the task's tokenizer)."""
    path: Optional[str] = None
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vocab_size: int = 400


@dataclass
class TaskConfig:
    """``name``: ``visual_search`` (built in, generated from ``train.seed``) or ``jsonl``
    (records from ``data_path``, a .jsonl or .parquet file, images under ``image_root``).
    ``blind_spot``, ``expert`` (``hallucinating`` or ``honest``, the control) and
    ``hint_reliability`` shape the built-in task's reasoning-action gap, ``detail``
    (``solid`` or ``checker``, the zoom-only task) whether the overview shows the target's
    colour, ``describe`` whether the expert describes each crop (see
    ``mapo_fast.tasks.visual_search``)."""
    name: str = "visual_search"
    image_size: int = 224
    view_size: int = 56
    target_size: int = 28
    distractors: int = 3
    blind_spot: str = "bottom_row"
    expert: str = "hallucinating"
    hint_reliability: float = 0.75
    detail: str = "solid"
    describe: bool = True
    data_path: Optional[str] = None
    image_root: Optional[str] = None
    max_image_pixels: int = 4096 * 4096
    eval_size: int = 256


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    group_size: int = 4
    max_new_tokens: int = 48
    max_turns: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    memory_budget_mb: float = 64.0
    decode_mode: str = "auto"          # the engine's decode_mode (rollout.params.DECODE_MODES)
    cpu_linear: str = "auto"           # the engine's cpu_linear (packed_linear_cpu.CPU_LINEAR)
    cpu_malloc: str = "auto"           # the engine's cpu_malloc (rollout.cpu_malloc.CPU_MALLOC)
    min_pixels: Optional[int] = None   # default: the task's view (view_size ** 2)
    max_pixels: Optional[int] = None


@dataclass
class WarmStartConfig:
    """Supervised warm start on the scripted expert's trajectories (built-in task only)."""
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    vision_steps: int = 0               # vision pretraining before the warm start (0: none)
    vision_lr: float = 3e-3
    freeze_vision: bool = False         # the vision tower frozen after vision pretraining


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    micro_batch_size: int = 16


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    semantic_coef: float = 1.0
    turn_discount: float = 0.0


@dataclass
class RewardConfig:
    """Weights of the outcome reward's parts (``CompositeReward``)."""
    accuracy: float = 1.0
    format: float = 0.1
    tool_use: float = 0.2


@dataclass
class VerifierConfig:
    """``oracle`` (the task's ground truth) or ``clip`` (``clip_path``: a local CLIP)."""
    kind: str = "oracle"
    clip_path: Optional[str] = None


@dataclass
class TrainConfig:
    algo: str = "mapo"
    seed: int = 0
    steps: int = 120
    out: str = "runs/mapo"
    resume: bool = False
    device: str = "auto"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 40
    grad_var_resamples: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def validate(self) -> "TrainConfig":
        """Checks every value; raises ``ConfigError`` naming the first bad key."""
        def need(key: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"config: `{key}` must be {what}, got {echo(get(self, key))}")

        from ..loss import LOSS_AGG_MODES
        for key in _float_keys(self):
            need(key, math.isfinite(get(self, key)), "a finite number")
        need("algo", self.algo in ("mapo", "grpo"), "'mapo' or 'grpo'")
        need("device", self.device in ("auto", "cpu") or
             bool(re.fullmatch(r"cuda(:\d+)?", self.device)),
             "'auto', 'cpu' or 'cuda[:i]'")
        for key in ("steps", "checkpoint_every", "keep_checkpoints", "model.hidden_size",
                    "model.layers", "model.heads", "model.kv_heads", "model.intermediate_size",
                    "model.vision_hidden_size", "model.vision_depth", "task.image_size",
                    "task.view_size", "task.target_size", "task.eval_size",
                    "task.max_image_pixels", "rollout.prompts_per_step", "rollout.group_size",
                    "rollout.max_new_tokens", "rollout.max_turns", "warm_start.batch_size",
                    "optim.ppo_epochs", "optim.micro_batch_size", "grad_var_resamples"):
            need(key, get(self, key) >= (0 if key == "steps" else 1), "an int >= "
                 f"{0 if key == 'steps' else 1}")
        for key, _, value, _ in reference(self):
            if isinstance(value, int) and not isinstance(value, bool):
                need(key, value <= MAX_INT, f"at most {MAX_INT}")
        need("seed", 0 <= self.seed < 2 ** 32, "in [0, 2**32) (numpy's seed range)")
        need("warm_start.steps", self.warm_start.steps >= 0, "an int >= 0")
        need("warm_start.vision_steps", self.warm_start.vision_steps >= 0, "an int >= 0")
        need("warm_start.vision_steps", self.warm_start.vision_steps == 0
             or self.task.name == "visual_search", "0 unless task.name is 'visual_search' "
             "(vision pretraining names the built-in task's crops)")
        need("warm_start.freeze_vision", not self.warm_start.freeze_vision
             or self.warm_start.vision_steps > 0, "false unless warm_start.vision_steps > 0 "
             "(a tower frozen untrained never learns to read a crop)")
        need("grad_var_resamples", self.grad_var_resamples <= MAX_GRAD_VAR_RESAMPLES,
             f"at most {MAX_GRAD_VAR_RESAMPLES} (each is a loss pass per step)")
        need("grad_var_resamples", self.grad_var_resamples >= 2, "an int >= 2")
        need("model.vocab_size", self.model.vocab_size >= 300, "an int >= 300")
        need("model.heads", self.model.hidden_size % self.model.heads == 0,
             f"a divisor of model.hidden_size ({self.model.hidden_size})")
        need("model.kv_heads", self.model.heads % self.model.kv_heads == 0,
             f"a divisor of model.heads ({self.model.heads})")
        if self.model.path is None:  # a checkpoint brings its own shapes
            self._check_model_shapes(need)
        self._check_memory(need)
        need("task.name", self.task.name in ("visual_search", "jsonl"),
             "'visual_search' or 'jsonl'")
        need("task.data_path", self.task.name != "jsonl" or bool(self.task.data_path),
             "a .jsonl or .parquet file when task.name is 'jsonl'")
        need("model.path", self.task.name != "jsonl" or bool(self.model.path),
             "a local Qwen2.5-VL checkpoint when task.name is 'jsonl' (the tiny model's "
             "tokenizer is trained on the built-in task's text)")
        need("task.view_size", self.task.view_size % 28 == 0, "a multiple of 28")
        need("task.distractors", self.task.distractors >= 0, "an int >= 0")
        from ..tasks.visual_search import BLIND_SPOTS, DETAILS, EXPERTS
        need("task.detail", self.task.detail in DETAILS, f"one of {list(DETAILS)}")
        need("task.expert", self.task.expert in EXPERTS, f"one of {list(EXPERTS)}")
        need("task.blind_spot", self.task.blind_spot in BLIND_SPOTS, f"one of {list(BLIND_SPOTS)}")
        need("task.hint_reliability", 0 <= self.task.hint_reliability <= 1, "in [0, 1]")
        need("eval_every", self.eval_every >= 0, "an int >= 0 (0: evaluate at the end only)")
        need("rollout.temperature", self.rollout.temperature > 0, "> 0 (sampling)")
        need("rollout.top_p", 0 < self.rollout.top_p <= 1, "in (0, 1]")
        need("rollout.memory_budget_mb", self.rollout.memory_budget_mb > 0, "> 0")
        from ..rollout.params import DECODE_MODES
        need("rollout.decode_mode", self.rollout.decode_mode in DECODE_MODES,
             f"one of {list(DECODE_MODES)}")
        from ..kernels.packed_linear_cpu import CPU_LINEAR
        need("rollout.cpu_linear", self.rollout.cpu_linear in CPU_LINEAR,
             f"one of {list(CPU_LINEAR)}")
        from ..rollout.cpu_malloc import CPU_MALLOC
        need("rollout.cpu_malloc", self.rollout.cpu_malloc in CPU_MALLOC,
             f"one of {list(CPU_MALLOC)}")
        for key in ("rollout.min_pixels", "rollout.max_pixels"):
            v = get(self, key)
            need(key, v is None or v >= 28 * 28, "None or an int >= 784")
        lo, hi = self.rollout.min_pixels, self.rollout.max_pixels
        need("rollout.min_pixels", lo is None or hi is None or lo <= hi,
             f"at most rollout.max_pixels ({hi})")
        if self.task.name == "visual_search":
            view = self.task.view_size ** 2
            need("rollout.max_pixels", hi is None or hi >= view,
                 f"None or at least the task's view, task.view_size ** 2 = {view}")
            need("rollout.min_pixels", lo is None or lo <= view,
                 f"None or at most the task's view, task.view_size ** 2 = {view}")
            self._check_task()
        need("warm_start.lr", self.warm_start.lr > 0, "> 0")
        need("warm_start.vision_lr", self.warm_start.vision_lr > 0, "> 0")
        need("optim.lr", self.optim.lr > 0, "> 0")
        need("optim.weight_decay", self.optim.weight_decay >= 0, ">= 0")
        need("optim.grad_clip", self.optim.grad_clip > 0, "> 0")
        need("loss.clip_low", 0 <= self.loss.clip_low < 1, "in [0, 1)")
        need("loss.clip_high", self.loss.clip_high >= 0, ">= 0")
        need("loss.kl_coef", self.loss.kl_coef >= 0, ">= 0")
        need("loss.loss_agg", self.loss.loss_agg in LOSS_AGG_MODES, f"one of {LOSS_AGG_MODES}")
        need("loss.semantic_coef", self.loss.semantic_coef >= 0, ">= 0")
        need("loss.turn_discount", 0 <= self.loss.turn_discount <= 1, "in [0, 1]")
        for key in ("reward.accuracy", "reward.format", "reward.tool_use"):
            need(key, get(self, key) >= 0, ">= 0")
        need("verifier.kind", self.verifier.kind in ("oracle", "clip"), "'oracle' or 'clip'")
        need("verifier.clip_path", self.verifier.kind != "clip" or bool(self.verifier.clip_path),
             "a local CLIP checkpoint when verifier.kind is 'clip'")
        need("verifier.kind", self.verifier.kind != "oracle" or self.task.name == "visual_search",
             "'clip' for task.name 'jsonl' (the oracle needs the task's ground truth)")
        return self

    def _check_model_shapes(self, need: Any) -> None:
        """What the tiny Qwen2.5-VL's layers need of its sizes (checked here: a config that
        passes builds and runs its first step)."""
        m = self.model
        need("model.heads", (m.hidden_size // m.heads) % 2 == 0,
             f"such that the head size (model.hidden_size / model.heads = "
             f"{m.hidden_size / m.heads:g}) is even (rotary embeddings rotate pairs)")
        vheads = max(1, m.vision_hidden_size // 32)
        need("model.vision_hidden_size", m.vision_hidden_size % vheads == 0 and
             (m.vision_hidden_size // vheads) % 4 == 0,
             f"such that its {vheads} head(s) of 32 or more channels each have a multiple of 4 "
             "channels (the vision tower's 2-D rotary embedding), e.g. 32, 36, 48, 64")

    def _check_memory(self, need: Any) -> None:
        """Sizes bounded by what the machine holds (``machine_bytes``): the tiny model while it
        trains, the KV pool, the built-in task's images while they are drawn."""
        have = machine_bytes()
        gib = f"{have / 2 ** 30:.1f} GiB"
        if self.model.path is None:
            m = self.model
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
        need("rollout.memory_budget_mb", self.rollout.memory_budget_mb * 2 ** 20 <= have,
             f"at most this machine's memory ({have / 2 ** 20:.0f} MiB)")
        if self.task.name == "visual_search":
            t, r = self.task, self.rollout
            for key, side in (("task.image_size", t.image_size), ("task.view_size", t.view_size)):
                need(key, RENDER_BYTES_PER_PIXEL * side ** 2 <= have // 4,
                     f"small enough to draw one image in a quarter of {gib}")
            images = max(r.prompts_per_step, t.eval_size, self.warm_start.batch_size)
            need("rollout.prompts_per_step" if images == r.prompts_per_step else
                 "task.eval_size" if images == t.eval_size else "warm_start.batch_size",
                 images * 3 * t.image_size ** 2 <= have // 4,
                 f"small enough that a step's {t.image_size}-pixel images fit in a quarter of "
                 f"{gib}")
            cells = 3 * max(1, t.image_size // 2 // t.target_size) ** 2
            need("task.distractors", t.distractors <= cells,
                 f"at most {cells} (three quadrants of target-sized cells)")

    def visual_search_task(self) -> Any:
        """The built-in ``VisualSearchTask`` this config describes (``train.seed``, ``task.*``)."""
        from ..tasks.visual_search import VisualSearchTask
        t = self.task
        return VisualSearchTask(self.seed, image_size=t.image_size, view_size=t.view_size,
                                target_size=t.target_size, distractors=t.distractors,
                                blind_spot=t.blind_spot, expert=t.expert,
                                hint_reliability=t.hint_reliability, detail=t.detail,
                                describe=t.describe)

    def _check_task(self) -> None:
        """The built-in task's own checks (sizes it can draw), as config errors."""
        try:
            self.visual_search_task()
        except ValueError as e:
            msg = re.sub(r"^VisualSearchTask: ", "", str(e))
            raise ConfigError("config: " + re.sub(r"`(\w+)`", r"`task.\1`", msg)) from None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


#: What each key does: ``mapo-train --help`` and the documentation's CLI reference are made
#: from this table and the dataclasses' defaults (a test checks that every key has an entry).
KEY_HELP: Dict[str, str] = {
    "algo": "`mapo` (outcome + per-turn semantic scores) or `grpo` (outcome only, the ablation)",
    "seed": "seeds every RNG; each step's data and sampling seeds derive from (seed, step)",
    "steps": "RL steps after the warm start",
    "out": "output folder: metrics.jsonl, eval.json, curves.png, checkpoints/",
    "resume": "continue from the newest intact checkpoint in `out`",
    "device": "`auto` (CUDA when available), `cpu` or `cuda[:i]`",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "newest checkpoints kept",
    "eval_every": "steps between greedy evaluations on the held-out split (0: at the end only)",
    "grad_var_resamples": "resampled group sets for the step's relative gradient variance",
    "model.path": "a local Qwen2.5-VL checkpoint with its processor; none: the tiny model below",
    "model.hidden_size": "tiny model: hidden size of the language model",
    "model.layers": "tiny model: decoder layers",
    "model.heads": "tiny model: attention heads (a divisor of hidden_size)",
    "model.kv_heads": "tiny model: key/value heads (a divisor of heads)",
    "model.intermediate_size": "tiny model: MLP width",
    "model.vision_hidden_size": "tiny model: vision tower width",
    "model.vision_depth": "tiny model: vision tower blocks",
    "model.vocab_size": "tiny model: size of the BPE trained on the task's text",
    "task.name": "`visual_search` (built in, generated from `seed`) or `jsonl` (records)",
    "task.image_size": "built-in task: image side in pixels",
    "task.view_size": "built-in task: side of the overview the model sees (a multiple of 28)",
    "task.target_size": "built-in task: side of the ringed target shape",
    "task.distractors": "built-in task: distractor shapes per image",
    "task.blind_spot": "built-in task: where the scripted expert misses (`bottom_row`, "
                       "`bottom_right`, `none`)",
    "task.expert": "built-in task: `hallucinating` (describes the overview after a miss) or "
                   "`honest` (the control)",
    "task.hint_reliability": "built-in task: probability that the tinted disc shows the "
                             "target's colour",
    "task.detail": "built-in task: `solid` shapes (their colour shows in the overview) or "
                   "`checker` (the zoom-only task: only a crop shows their colour)",
    "task.describe": "built-in task: the expert describes each crop before answering (false: "
                     "it answers at once; the policy learns not to describe)",
    "task.data_path": "records: a .jsonl or .parquet file (image path, question, answer)",
    "task.image_root": "records: the folder image paths are resolved under",
    "task.max_image_pixels": "records: larger images are skipped (read from the header)",
    "task.eval_size": "held-out prompts per evaluation",
    "rollout.prompts_per_step": "prompts per RL step",
    "rollout.group_size": "samples per prompt (G)",
    "rollout.max_new_tokens": "tokens per assistant turn, at most",
    "rollout.max_turns": "tool turns per trajectory, at most",
    "rollout.temperature": "sampling temperature; the loss, reference and diagnosis use the same "
                           "(mapo_fast.policy)",
    "rollout.top_p": "nucleus truncation of the draw (not part of the trained distribution)",
    "rollout.memory_budget_mb": "KV cache pool of the rollout engine",
    "rollout.decode_mode": "decode steps: auto (CUDA graphs on a GPU, else eager), eager, "
                           "static (padded, not captured) or graph",
    "rollout.cpu_linear": "linear layers of a float32 model on CPU: auto (oneDNN on prepacked "
                          "weights where torch has it), onednn or torch",
    "rollout.cpu_malloc": "glibc's malloc on CPU: auto (freed memory kept for reuse, not "
                          "returned at every step; once per process) or keep",
    "rollout.min_pixels": "smallest image the vision tower sees (none: the task's view)",
    "rollout.max_pixels": "largest image the vision tower sees (none: the task's view)",
    "warm_start.steps": "supervised steps on the scripted expert (built-in task; 0: none)",
    "warm_start.batch_size": "expert trajectories per warm-start step",
    "warm_start.lr": "warm-start learning rate (warm-up, flat, cosine decay)",
    "warm_start.vision_steps": "vision pretraining steps before the warm start: the vision "
                               "tower and a linear probe learn to name the colour of each "
                               "quadrant zoom (built-in task; 0: none)",
    "warm_start.vision_lr": "vision pretraining learning rate (AdamW, constant)",
    "warm_start.freeze_vision": "freeze the vision tower after vision pretraining (the warm "
                                "start and RL train the rest)",
    "optim.lr": "AdamW learning rate of the RL steps",
    "optim.weight_decay": "AdamW weight decay",
    "optim.grad_clip": "gradient norm clip",
    "optim.ppo_epochs": "passes over each step's rollouts (an optimizer step after each)",
    "optim.micro_batch_size": "trajectories per forward/backward",
    "loss.clip_low": "PPO clip below 1 (ratio >= 1 - clip_low)",
    "loss.clip_high": "PPO clip above 1 (ratio <= 1 + clip_high)",
    "loss.kl_coef": "KL to the initial policy (0: no reference model)",
    "loss.loss_agg": "aggregation, verl's `loss_agg_mode` names",
    "loss.semantic_coef": "weight of the per-turn semantic advantage (MAPO)",
    "loss.turn_discount": "discount of later turns' semantic credit (0: each turn its own)",
    "reward.accuracy": "weight of the answer's correctness in the outcome reward",
    "reward.format": "weight of the format reward (tags well formed)",
    "reward.tool_use": "bonus for a trajectory that made a successful tool call",
    "verifier.kind": "`oracle` (the built-in task's ground truth) or `clip`",
    "verifier.clip_path": "a local CLIP checkpoint for `verifier.kind clip`",
}


def _leaves(obj: Any, prefix: str = "") -> List[tuple]:
    """``(dotted key, base type, optional, value)`` of every non-section field of ``obj``, in
    the dataclasses' order (the one walk of the configuration tree)."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _leaves(v, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out.append((f"{prefix}{f.name}", args[0] if args else hint, bool(args), v))
    return out


def reference(obj: Any = None) -> List[tuple]:
    """``(key, type, default, help)`` of every key, in the dataclasses' order: the source of
    ``mapo-train --help`` and of the documentation's CLI reference."""
    return [(key, base.__name__ + (" or none" if optional else ""), v, KEY_HELP.get(key, ""))
            for key, base, optional, v in _leaves(TrainConfig() if obj is None else obj)]


def _float_keys(obj: Any) -> List[str]:
    """Dotted keys of every float (or optional float) field holding a float, for the
    finiteness check."""
    return [key for key, base, _, v in _leaves(obj) if base is float and isinstance(v, float)]


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fields(obj: Any) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` (from YAML or the command line) as the field's type, or ``ConfigError``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config: `{key}` cannot be none (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: `{key}` must be {base.__name__}, got {echo(value)}") from None
    raise ConfigError(f"config: `{key}` has an unsupported type")


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Sets a dotted ``key``; unknown keys and wrong types raise ``ConfigError``."""
    obj, parts = cfg, key.split(".")
    hints_owner = obj
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            where = ".".join(parts[:i])
            known = sorted(fields)
            close = difflib.get_close_matches(part, known, n=1)
            # a bare leaf name given at the top level (`lr`): the dotted keys that end in it
            dotted = [k for k, *_ in reference(cfg) if k.endswith("." + part)] if i == 0 \
                else []
            hint = f"; did you mean `{'.'.join(parts[:i] + close)}`?" if close else ""
            if dotted and not close:
                hint = f"; did you mean {' or '.join(f'`{k}`' for k in dotted)}?"
            raise ConfigError(f"config: unknown key `{key[:ECHO_CHARS]}`{hint} (keys of "
                              f"`{where or 'the top level'}`: {', '.join(known)})")
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config: unknown key `{key[:ECHO_CHARS]}`: "
                                  f"`{'.'.join(parts[:i + 1])[:ECHO_CHARS]}` "
                                  "has no sub-keys")
            obj = getattr(obj, part)
            continue
        hints_owner = obj
        if dataclasses.is_dataclass(getattr(obj, part)):
            if not isinstance(value, dict):
                raise ConfigError(f"config: `{key}` is a section; give its keys "
                                  f"({', '.join(sorted(_fields(getattr(obj, part))))})")
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(f"config: the keys of `{key}` must be strings, got "
                                      f"{echo(k)}")
                set_key(cfg, f"{key}.{k}", v)
            return
        hint = typing.get_type_hints(type(hints_owner))[part]
        setattr(obj, part, _coerce(key, value, hint))


def load_yaml(path: str) -> Dict[str, Any]:
    """The mapping of a ``--config`` file; any problem is one ``ConfigError`` line (the file's
    text must be UTF-8 YAML whose keys are strings)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read `--config` file {echo(path)}: "
                          f"{e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: `--config` file {echo(path)} is not UTF-8 text (byte "
                          f"{e.start})") from None
    except (yaml.YAMLError, RecursionError) as e:
        first = " ".join(str(e).split())[:ECHO_CHARS]
        raise ConfigError(f"config: `--config` file {echo(path)} is not valid YAML: "
                          f"{first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: `--config` file {echo(path)} must hold a mapping of keys, "
                          f"got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config: `--config` file {echo(path)}: keys must be strings, got "
                          f"{echo(bad[0])}")
    return data


def parse_args(argv: Sequence[str], base: Optional[TrainConfig] = None) -> TrainConfig:
    """``mapo-train`` arguments (see the module doc) to a validated ``TrainConfig``."""
    cfg = base if base is not None else TrainConfig()
    pairs: List[tuple] = []
    i, argv = 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"config: expected `--key value`, got {echo(arg)} (keys are "
                              "dotted, e.g. --rollout.group_size 8)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key == "resume" and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"config: `--{key[:ECHO_CHARS]}` needs a value")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1
    for key, value in pairs:
        if key == "config":
            for k, v in load_yaml(value).items():
                set_key(cfg, k, v)
    for key, value in pairs:
        if key != "config":
            set_key(cfg, key, value)
    return cfg.validate()
