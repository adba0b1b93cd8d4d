"""The trainer's configuration schema: one dataclass tree, each key with its default and its
help (the field's ``metadata["help"]``: ``mapo-train --help`` and the documentation's CLI
reference are made from it, ``reference()``). Checking the values is
``trainer.validation``'s job, reading them from the command line and YAML
``trainer.parsing``'s.

This module imports nothing of the package at load time (the documentation build reads it
alone).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def key(default: Any, help: str) -> Any:
    """A configuration key: its default and its one-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The policy. ``path``: a local Qwen2.5-VL checkpoint (with its processor/tokenizer);
    None builds the tiny model below from a config (random weights, the task's tokenizer)."""
    path: Optional[str] = key(None,
        "a local Qwen2.5-VL checkpoint with its processor; none: the tiny model below")
    hidden_size: int = key(128, "tiny model: hidden size of the language model")
    layers: int = key(2, "tiny model: decoder layers")
    heads: int = key(4, "tiny model: attention heads (a divisor of hidden_size)")
    kv_heads: int = key(2, "tiny model: key/value heads (a divisor of heads)")
    intermediate_size: int = key(256, "tiny model: MLP width")
    vision_hidden_size: int = key(64, "tiny model: vision tower width")
    vision_depth: int = key(2, "tiny model: vision tower blocks")
    vocab_size: int = key(400, "tiny model: size of the BPE trained on the task's text")


@dataclass
class TaskConfig:
    """``name``: ``visual_search`` (built in, generated from ``train.seed``) or ``jsonl``
    (records from ``data_path``, a .jsonl or .parquet file, images under ``image_root``).
    ``blind_spot``, ``expert`` (``hallucinating`` or ``honest``, the control) and
    ``hint_reliability`` shape the built-in task's reasoning-action gap, ``detail``
    (``solid`` or ``checker``, the zoom-only task) whether the overview shows the target's
    colour, ``describe`` whether the expert describes each crop (see
    ``mapo_fast.tasks.visual_search``)."""
    name: str = key("visual_search",
        "`visual_search` (built in, generated from `seed`) or `jsonl` (records)")
    image_size: int = key(224, "built-in task: image side in pixels")
    view_size: int = key(56,
        "built-in task: side of the overview the model sees (a multiple of 28)")
    target_size: int = key(28, "built-in task: side of the ringed target shape")
    distractors: int = key(3, "built-in task: distractor shapes per image")
    blind_spot: str = key("bottom_row",
        "built-in task: where the scripted expert misses (`bottom_row`, `bottom_right`, "
        "`none`)")
    expert: str = key("hallucinating",
        "built-in task: `hallucinating` (describes the overview after a miss) or `honest` "
        "(the control)")
    hint_reliability: float = key(0.75,
        "built-in task: probability that the tinted disc shows the target's colour")
    detail: str = key("solid",
        "built-in task: `solid` shapes (their colour shows in the overview) or `checker` (the"
        " zoom-only task: only a crop shows their colour)")
    describe: bool = key(True,
        "built-in task: the expert describes each crop before answering (false: it answers at"
        " once; the policy learns not to describe)")
    data_path: Optional[str] = key(None,
        "records: a .jsonl or .parquet file (image path, question, answer)")
    image_root: Optional[str] = key(None, "records: the folder image paths are resolved under")
    max_image_pixels: int = key(4096 * 4096,
        "records: larger images are skipped (read from the header)")
    eval_size: int = key(256, "held-out prompts per evaluation")


@dataclass
class RolloutConfig:
    prompts_per_step: int = key(16, "prompts per RL step")
    group_size: int = key(4, "samples per prompt (G)")
    max_new_tokens: int = key(48, "tokens per assistant turn, at most")
    max_turns: int = key(3, "tool turns per trajectory, at most")
    temperature: float = key(1.0,
        "sampling temperature; the loss, reference and diagnosis use the same "
        "(mapo_fast.policy)")
    top_p: float = key(1.0,
        "nucleus truncation of the draw (not part of the trained distribution)")
    memory_budget_mb: float = key(64.0, "KV cache pool of the rollout engine")
    decode_mode: str = key("auto",
        "decode steps: auto (CUDA graphs on a GPU, else eager), eager, static (padded, not "
        "captured) or graph")
    cpu_linear: str = key("auto",
        "linear layers of a float32 model on CPU: auto (oneDNN on prepacked weights where "
        "torch has it), onednn or torch")
    cpu_malloc: str = key("auto",
        "glibc's malloc on CPU: auto (freed memory kept for reuse, not returned at every "
        "step; once per process) or keep")
    min_pixels: Optional[int] = key(None,
        "smallest image the vision tower sees (none: the task's view)")
    max_pixels: Optional[int] = key(None,
        "largest image the vision tower sees (none: the task's view)")


@dataclass
class WarmStartConfig:
    """Supervised warm start on the scripted expert's trajectories (built-in task only)."""
    steps: int = key(300, "supervised steps on the scripted expert (built-in task; 0: none)")
    batch_size: int = key(16, "expert trajectories per warm-start step")
    lr: float = key(1e-3, "warm-start learning rate (warm-up, flat, cosine decay)")
    vision_steps: int = key(0,
        "vision pretraining steps before the warm start: the vision tower and a linear probe "
        "learn to name the colour of each quadrant zoom (built-in task; 0: none)")
    vision_lr: float = key(3e-3, "vision pretraining learning rate (AdamW, constant)")
    freeze_vision: bool = key(False,
        "freeze the vision tower after vision pretraining (the warm start and RL train the "
        "rest)")


@dataclass
class OptimConfig:
    lr: float = key(3e-4, "AdamW learning rate of the RL steps")
    weight_decay: float = key(0.0, "AdamW weight decay")
    grad_clip: float = key(1.0, "gradient norm clip")
    ppo_epochs: int = key(1, "passes over each step's rollouts (an optimizer step after each)")
    micro_batch_size: int = key(16, "trajectories per forward/backward")


@dataclass
class LossConfig:
    clip_low: float = key(0.2, "PPO clip below 1 (ratio >= 1 - clip_low)")
    clip_high: float = key(0.28, "PPO clip above 1 (ratio <= 1 + clip_high)")
    kl_coef: float = key(0.0, "KL to the initial policy (0: no reference model)")
    loss_agg: str = key("token-mean", "aggregation, verl's `loss_agg_mode` names")
    semantic_coef: float = key(1.0, "weight of the per-turn semantic advantage (MAPO)")
    turn_discount: float = key(0.0,
        "discount of later turns' semantic credit (0: each turn its own)")


@dataclass
class RewardConfig:
    """Weights of the outcome reward's parts (``CompositeReward``)."""
    accuracy: float = key(1.0, "weight of the answer's correctness in the outcome reward")
    format: float = key(0.1, "weight of the format reward (tags well formed)")
    tool_use: float = key(0.2, "bonus for a trajectory that made a successful tool call")


@dataclass
class VerifierConfig:
    """``oracle`` (the task's ground truth) or ``clip`` (``clip_path``: a local CLIP)."""
    kind: str = key("oracle", "`oracle` (the built-in task's ground truth) or `clip`")
    clip_path: Optional[str] = key(None, "a local CLIP checkpoint for `verifier.kind clip`")


@dataclass
class TrainConfig:
    algo: str = key("mapo",
        "`mapo` (outcome + per-turn semantic scores) or `grpo` (outcome only, the ablation)")
    seed: int = key(0,
        "seeds every RNG; each step's data and sampling seeds derive from (seed, step)")
    steps: int = key(120, "RL steps after the warm start")
    out: str = key("runs/mapo",
        "output folder: metrics.jsonl, eval.json, curves.png, checkpoints/")
    resume: bool = key(False, "continue from the newest intact checkpoint in `out`")
    device: str = key("auto", "`auto` (CUDA when available), `cpu` or `cuda[:i]`")
    checkpoint_every: int = key(10, "steps between checkpoints")
    keep_checkpoints: int = key(2, "newest checkpoints kept")
    eval_every: int = key(40,
        "steps between greedy evaluations on the held-out split (0: at the end only)")
    grad_var_resamples: int = key(8,
        "resampled group sets for the step's relative gradient variance")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def validate(self) -> "TrainConfig":
        """Checks every value (``trainer.validation``); raises ``ConfigError`` naming the first
        bad key. Returns ``self``."""
        from .validation import validate
        validate(self)
        return self

    def visual_search_task(self) -> Any:
        """The built-in ``VisualSearchTask`` this config describes (``train.seed``, ``task.*``)."""
        from ..tasks.visual_search import VisualSearchTask
        t = self.task
        return VisualSearchTask(self.seed, image_size=t.image_size, view_size=t.view_size,
                                target_size=t.target_size, distractors=t.distractors,
                                blind_spot=t.blind_spot, expert=t.expert,
                                hint_reliability=t.hint_reliability, detail=t.detail,
                                describe=t.describe)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _leaves(obj: Any, prefix: str = "") -> List[tuple]:
    """``(dotted key, base type, optional, value, help)`` of every non-section field of
    ``obj``, in the dataclasses' order (the one walk of the configuration tree)."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _leaves(v, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out.append((f"{prefix}{f.name}", args[0] if args else hint, bool(args), v,
                    f.metadata.get("help", "")))
    return out


def reference(obj: Any = None) -> List[tuple]:
    """``(key, type, default, help)`` of every key, in the dataclasses' order: the source of
    ``mapo-train --help`` and of the documentation's CLI reference."""
    obj = TrainConfig() if obj is None else obj
    return [(key, base.__name__ + (" or none" if optional else ""), v, help_text)
            for key, base, optional, v, help_text in _leaves(obj)]


def _float_keys(obj: Any) -> List[str]:
    """Dotted keys of every float (or optional float) field holding a float, for the
    finiteness check."""
    return [key for key, base, _, v, _ in _leaves(obj) if base is float and isinstance(v, float)]


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
