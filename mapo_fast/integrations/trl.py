"""TRL: ``MAPOGRPOTrainer``, a ``trl.GRPOTrainer`` whose policy loss is ``mapo_loss``; a TRL
user switches by changing the class name.

The loss runs inside the model's forward (``add_mapo_head``: ``model(..., mapo_objective=fn)``
runs the backbone and returns ``fn(hidden, lm_head_weight)``), so a DDP / FSDP wrapper gathers
the head for it as it does for TRL's own fused LM head, and no ``[tokens x vocab]`` logits
exist. Every TRL option the loss supports is mapped (the README's option table); any other
raises ``NotImplementedError`` naming it, at construction.

Per-turn credit (MAPO): ``semantic_scores_fn(batch) -> [B, T]`` (optional) turns TRL's
per-sequence advantages into per-token ones for multi-turn tool-use completions. It is called
once per generation batch, right after TRL's ``_generate_and_score_completions`` and before
TRL shuffles and splits the batch (so whole groups are there), with TRL's batch plus
``"inputs"`` (the dataset rows, images included) and ``"group_ids"`` ``[B]`` (TRL keeps the
``num_generations`` completions of a prompt together); its result replaces
``batch["advantages"]``.

The recipe, ready: ``ZoomEnvironment`` is the zoom tool for TRL's own multi-turn loop
(``environment_factory=ZoomEnvironment.factory(processor)``: one instance per rollout, the
row's image, ``ToolRunner``'s box rules and error texts, the crop returned as an image, a
refused call raised as ``ZoomToolError`` so that TRL counts it as a failed tool call), and
``MAPOTurnScores(verifier, processor)`` is a ``semantic_scores_fn`` that finds each
description after each tool response in TRL's completions, recomputes that turn's crop, scores
them all in one verifier call and returns MAPO's per-token advantages (TRL's outcome advantage
plus ``semantic_coef`` times the group-normalised turn scores).

TRL renders tool calls only with a chat template it can parse (TRL refuses Qwen2.5-VL's own:
"does not support tool calling"); use TRL's ``trl.chat_template_utils.qwen3_vl_chat_template``
for Qwen2.5-VL, as ``examples/trl/`` does. ``tensor_image_fields(processor)`` (applied by
``ZoomEnvironment.factory`` and ``MAPOGRPOTrainer``) works around TRL 1.16 crashing on a tool
round whose every call failed, with an image processor that returns numpy grids.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..loss import mapo_loss
from ..policy import PolicyNumerics
from ..registry import Registry
from ..rewards.verifier import SemanticVerifier
from ..tools.ops import FACTOR, MAX_PIXELS, MIN_PIXELS
from ..tools.protocol import ToolRunner, ToolSession, ZoomInTool, format_tool_call
from .recipe import TurnScorer, pil_image, row_image, zoom_context

Tensor = torch.Tensor
#: TRL's loss types, by name: each ``(trainer, mask [B, T], inputs, training) -> mapo_loss
#: keywords``, TRL's normaliser of that type as ``mapo_loss``'s aggregation
#: (``LOSS_AGG_MODES``) and its globals (a loss type not registered here is refused).
LOSS_TYPES: Registry[Callable[..., Dict[str, Any]]] = Registry("TRL loss type")


def _accumulation(trainer: Any, training: bool) -> float:
    return trainer.current_gradient_accumulation_steps if training else 1.0


@LOSS_TYPES.register("grpo")
def _grpo_norm(trainer: Any, mask: Tensor, inputs: Dict[str, Any], training: bool
               ) -> Dict[str, Any]:
    """The mean over rows (all B) of each row's token mean."""
    return dict(loss_agg="seq-mean-token-mean",
                global_seqs=mask.shape[0] * _accumulation(trainer, training))


@LOSS_TYPES.register("bnpo")
def _bnpo_norm(trainer: Any, mask: Tensor, inputs: Dict[str, Any], training: bool
               ) -> Dict[str, Any]:
    """The token mean of the local batch."""
    return dict(loss_agg="token-mean",
                global_tokens=max(float(mask.sum()), 1.0) * _accumulation(trainer, training))


@LOSS_TYPES.register("dr_grpo")
def _dr_grpo_norm(trainer: Any, mask: Tensor, inputs: Dict[str, Any], training: bool
                  ) -> Dict[str, Any]:
    """Token sums over rows, divided by ``max_completion_length``."""
    return dict(loss_agg="seq-mean-token-sum-norm",
                global_seqs=mask.shape[0] * _accumulation(trainer, training),
                loss_scale_factor=trainer.max_completion_length)


@LOSS_TYPES.register("dapo")
def _dapo_norm(trainer: Any, mask: Tensor, inputs: Dict[str, Any], training: bool
               ) -> Dict[str, Any]:
    """The token mean over the whole generation batch (``num_items_in_batch``, all processes)."""
    norm = float(inputs["num_items_in_batch"].clamp(min=1.0)) / \
        trainer.accelerator.num_processes
    if training:
        norm = norm * trainer.current_gradient_accumulation_steps / \
            trainer.args.steps_per_generation
    return dict(loss_agg="token-mean", global_tokens=norm)


def add_mapo_head(model: Any) -> None:
    """Patches ``model.forward``: with ``mapo_objective=fn`` it runs the backbone (no cache)
    and returns ``fn(hidden, weight)``, ``hidden [B, T - 1, H]`` the last hidden states shifted
    so that position ``t`` predicts token ``t + 1``, ``weight`` the LM head's (gathered when
    FSDP2 shards it). Without it, the original forward (generation is unchanged)."""
    if getattr(model.forward, "_mapo_fast", False):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, mapo_objective: Optional[Callable] = None, **kwargs):
        if mapo_objective is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        weight = self.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # an FSDP2 DTensor
            weight = weight.full_tensor()
        return mapo_objective(out.last_hidden_state[:, :-1], weight)
    forward._mapo_fast = True
    model.forward = types.MethodType(forward, model)


def _unsupported(trainer: Any) -> Dict[str, Any]:
    """The TRL options set to something ``mapo_loss`` does not compute: name -> value."""
    args, cfg = trainer.args, trainer.model.config.get_text_config()
    out = {}
    if trainer.loss_type not in LOSS_TYPES:
        out["loss_type"] = trainer.loss_type
    if trainer.importance_sampling_level != "token":
        out["importance_sampling_level"] = trainer.importance_sampling_level
    if trainer.top_entropy_quantile < 1.0:
        out["top_entropy_quantile"] = trainer.top_entropy_quantile
    if trainer.off_policy_mask_threshold is not None:
        out["off_policy_mask_threshold"] = trainer.off_policy_mask_threshold
    if trainer._entropy_bonus_enabled:
        out["entropy_coef"] = args.entropy_coef
    if trainer.aux_loss_enabled:
        out["router_aux_loss_coef"] = trainer.router_aux_loss_coef
    if args.delta is not None and args.delta <= 1 + trainer.epsilon_high:
        out["delta"] = args.delta
    for name in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1.0):  # logit multipliers of other names
            out[f"model.config.{name}"] = getattr(cfg, name)
    return out


#: keys of TRL's batch that are not model inputs (the loss reads them, or TRL bookkeeps)
LOSS_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask",
             "advantages", "old_per_token_logps", "ref_per_token_logps",
             "sampling_per_token_logps", "importance_sampling_ratio", "num_items_in_batch")


@functools.lru_cache(maxsize=None)
def _trl_model_keys() -> Tuple[str, ...]:
    """The multimodal inputs TRL's ``_compute_loss`` hands its model-input builder: the keyword
    parameters of ``GRPOTrainer._get_per_token_logps_and_entropies`` after its own options
    (read from TRL's signature, so a key TRL adds is forwarded without a change here; once
    per process, not per step)."""
    from trl import GRPOTrainer
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    names = list(params)
    return tuple(names[names.index("compute_aux_loss") + 1:])


def _check_inputs(inputs: Dict[str, Any]) -> None:
    """Refuses a batch key that is neither read by the loss nor a model input TRL forwards (a
    model input this integration would drop), naming it."""
    known = set(LOSS_KEYS) | set(_trl_model_keys())
    extra = sorted(k for k, v in inputs.items() if k not in known and v is not None)
    if extra:
        raise NotImplementedError(
            f"MAPOGRPOTrainer: TRL's batch holds {extra}, which TRL's _compute_loss does not pass "
            f"to the model and mapo_fast's loss does not read; known keys: {sorted(known)}")


class _ModelCall:
    """Stands in for the model in TRL's ``_get_per_token_logps_and_entropies``: called with
    TRL's model inputs (plus its ``labels`` and ``fused_lm_head``, which the objective
    replaces), it runs ``model(**inputs, mapo_objective=objective)`` once, keeps its
    ``(loss, metrics)`` in ``result`` and returns what TRL slices (placeholder log-probs)."""

    def __init__(self, model: Any, objective: Callable):
        self.model, self.objective, self.result = model, objective, None

    def __call__(self, *, labels: Tensor, fused_lm_head: bool = True, **model_inputs: Any):
        if self.result is not None:
            raise RuntimeError("MAPOGRPOTrainer: TRL split the batch into several model calls; "
                               "the loss needs one")
        self.result = self.model(mapo_objective=self.objective, **model_inputs)
        return types.SimpleNamespace(log_probs=torch.zeros(labels.shape),
                                     entropy=None, aux_loss=None)


def _resize_of(processing_class: Any) -> Dict[str, int]:
    """``min_pixels`` / ``max_pixels`` of a Qwen2-VL-style processor's image processor (the
    resize the model's view of the image went through); the defaults where it has none."""
    ip = getattr(processing_class, "image_processor", None)
    size = getattr(ip, "size", None)

    def field(name: str) -> Any:
        return size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    lo = getattr(ip, "min_pixels", None) or field("shortest_edge") or MIN_PIXELS
    hi = getattr(ip, "max_pixels", None) or field("longest_edge") or MAX_PIXELS
    factor = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2) if ip else FACTOR
    return dict(min_pixels=int(lo), max_pixels=int(hi), factor=int(factor))


#: the processor outputs TRL's tool loop splits per image (``split_pixel_values_by_grid`` calls
#: ``image_grid_thw.prod``: a tensor's method, not a list's)
IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


def tensor_image_fields(processor: Any) -> Any:
    """``processor`` (changed in place, returned) with its ``apply_chat_template`` returning
    ``IMAGE_FIELDS`` as torch tensors. TRL 1.16 renders each prompt of an environment batch
    with ``apply_chat_template(tokenize=True, return_dict=True)``; an image processor on its
    PIL backend returns the grids as numpy arrays there, which TRL keeps as a list and then
    calls ``.prod(-1)`` on in the tool round where every call failed (``'list' object has no
    attribute 'prod'``). Tensors are what the torchvision backend returns. Idempotent; a
    processor without ``apply_chat_template`` is returned unchanged."""
    original = getattr(processor, "apply_chat_template", None)
    if original is None or getattr(original, "_mapo_tensor_image_fields", False):
        return processor

    @functools.wraps(original)
    def apply_chat_template(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if hasattr(out, "keys"):
            for key in IMAGE_FIELDS:
                if key in out.keys() and not isinstance(out[key], torch.Tensor):
                    import numpy as np
                    out[key] = torch.as_tensor(np.asarray(out[key]))
        return out
    apply_chat_template._mapo_tensor_image_fields = True  # type: ignore[attr-defined]
    processor.apply_chat_template = apply_chat_template
    return processor


class ZoomToolError(ValueError):
    """A zoom call the tool refused (a box outside the image, too small, too many calls...):
    raised so that TRL counts it as a failed tool call (``tools/failure_frequency``). Its
    text is ``ToolRunner``'s error message, which TRL returns to the model (as
    ``{'error': text}``)."""


class ZoomEnvironment:
    """The zoom tool in TRL's multi-turn loop: pass ``environment_factory=
    ZoomEnvironment.factory(processor)``. TRL makes one instance per rollout, calls ``reset``
    with the dataset row (its ``image_key`` column holds the image) and exposes
    ``image_zoom_in_tool`` to the model. A call goes through ``ToolRunner`` (the box rules and
    error texts of mapo_fast's own rollouts, ``crop_and_zoom``); a crop comes back to TRL as
    an image part, which TRL merges into the conversation and the forward; a refused call
    raises ``ZoomToolError`` with the tool's error text. ``max_calls``: zoom calls per
    rollout (>= 0)."""

    def __init__(self, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 factor: int = FACTOR, max_calls: int = 4, image_key: str = "image"):
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
            raise ValueError(f"ZoomEnvironment: `max_calls` must be an int >= 0, got "
                             f"{max_calls!r}")
        self._resize = dict(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
        self._runner = ToolRunner()
        self._max_calls, self._image_key = max_calls, image_key
        self._context, self._session = None, None

    @classmethod
    def factory(cls, processing_class: Any = None, **kwargs: Any
                ) -> Callable[[], "ZoomEnvironment"]:
        """A zero-argument factory for TRL, with ``processing_class``'s resize rule (and
        ``tensor_image_fields`` applied to it)."""
        if processing_class is not None:
            tensor_image_fields(processing_class)
        options = dict(_resize_of(processing_class), **kwargs)
        return functools.partial(cls, **options)

    def reset(self, **row: Any) -> None:
        image = row_image(row, self._image_key, "ZoomEnvironment.reset: the row")
        self._context = zoom_context(image, self._resize, f"row[{self._image_key!r}]")
        self._session = ToolSession(max_calls=self._max_calls)

    def image_zoom_in_tool(self, bbox_2d: list, label: str = "") -> list:
        """Zoom in on a region of the image: crops the bounding box and returns it at a higher
        resolution. Describe what you see in <description>...</description>.

        Args:
            bbox_2d: The box [x1, y1, x2, y2], in pixels of the image as you see it.
            label: What you expect to find there.
        """
        if self._context is None:
            raise RuntimeError("ZoomEnvironment: image_zoom_in_tool called before reset")
        call = format_tool_call(ZoomInTool.name, {"bbox_2d": bbox_2d, "label": label})
        (result,) = self._runner.run([call], [self._context], [self._session])
        if not result.ok:
            raise ZoomToolError(result.text)
        return [{"type": "image", "image": pil_image(result.crop)}]


class MAPOTurnScores:
    """A ready ``semantic_scores_fn`` for ``MAPOGRPOTrainer``: for each completion of TRL's
    batch, finds every zoom turn (call, the crop's image tokens TRL inserted, the description
    after it), recomputes the crop from the row's image (``TurnScorer``), scores all
    descriptions of the batch in one ``verifier`` call and returns ``[B, T]`` advantages: TRL's
    outcome advantage on every token plus ``semantic_coef`` times the group-normalised
    (``norm_std``: by the std too, as TRL's ``scale_rewards="group"``) credited scores on each
    turn's tokens. ``metrics`` holds the last batch's counts and mean score (logged by the
    trainer under ``mapo/``). With several processes (``num_processes`` and ``process_index``
    in the batch, as ``MAPOGRPOTrainer`` passes them) every process's scores are gathered and
    each group is normalised over all its rows, wherever TRL put them, as TRL does for its
    outcome advantage; each process then keeps its own rows."""

    def __init__(self, verifier: SemanticVerifier, processing_class: Any, *,
                 semantic_coef: float = 1.0, turn_discount: float = 0.0, norm_std: bool = True,
                 image_key: str = "image"):
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.scorer = TurnScorer(verifier, tokenizer, **_resize_of(processing_class))
        self.options = dict(semantic_coef=semantic_coef, turn_discount=turn_discount,
                            norm_std=norm_std)
        self.image_key = image_key
        self.metrics: Dict[str, float] = {}

    def __call__(self, batch: Dict[str, Any]) -> Tensor:
        ids, mask = batch["completion_ids"], batch["completion_mask"]
        lengths = [int(m.nonzero().max()) + 1 if m.any() else 0 for m in mask]
        responses = [row[:n].tolist() for row, n in zip(ids, lengths)]
        images = [row_image(row, self.image_key, f"MAPOTurnScores: inputs[{b}]")
                  for b, row in enumerate(batch["inputs"])]
        turns = self.scorer.score(responses, images)
        T = ids.shape[1]
        pad = torch.full((ids.shape[0], T), -1, dtype=torch.int64)
        pad[:, :turns.token_turn.shape[1]] = turns.token_turn[:, :T]
        turns.token_turn = pad
        group_ids = batch["group_ids"]
        processes = int(batch.get("num_processes", 1))
        index = int(batch.get("process_index", 0))
        parts = gather_objects(turns.part(group_ids), processes)
        adv = turns.advantages(batch["advantages"], group_ids, parts=parts, index=index,
                               **self.options)
        self.metrics = dict(turns.stats)
        return adv.to(ids.device)


def gather_objects(obj: Any, processes: int) -> List[Any]:
    """``obj`` of every process, in process order (``[obj]`` for one process); several need
    the default process group (which accelerate starts for TRL) of that size."""
    if processes == 1:
        return [obj]
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() != processes:
        group = f"has {dist.get_world_size()}" if dist.is_initialized() else "is not started"
        raise RuntimeError(f"MAPOTurnScores: the batch says {processes} processes, but the "
                           f"default process group {group}")
    out: List[Any] = [None] * processes
    dist.all_gather_object(out, obj)
    return out


def _trainer_class():
    from . import _compat
    _compat.check(_compat.TRL)
    from trl import GRPOTrainer

    class MAPOGRPOTrainer(GRPOTrainer):
        """``trl.GRPOTrainer`` with mapo_fast's fused policy loss; same arguments, plus
        ``semantic_scores_fn`` (see the module doc)."""

        def __init__(self, *args: Any, semantic_scores_fn: Optional[Callable] = None,
                     **kwargs: Any):
            if kwargs.get("processing_class") is not None:
                tensor_image_fields(kwargs["processing_class"])
            super().__init__(*args, **kwargs)
            bad = _unsupported(self)
            if bad:
                raise NotImplementedError(
                    "MAPOGRPOTrainer: these GRPOConfig options are not supported by mapo_fast's "
                    "loss: " + ", ".join(f"{k}={v!r}" for k, v in bad.items()) + " (see the "
                    "README's TRL section)")
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") \
                else self.model
            add_mapo_head(base)
            self.semantic_scores_fn = semantic_scores_fn

        def _generate_and_score_completions(self, inputs: Any) -> Dict[str, Any]:
            """TRL's batch; with ``semantic_scores_fn``, its per-token advantages in place of
            TRL's per-sequence ones (see the module doc)."""
            out = super()._generate_and_score_completions(inputs)
            if self.semantic_scores_fn is None:
                return out
            B, T = out["completion_ids"].shape
            G = self.num_generations if self.model.training else self.num_generations_eval
            # TRL's global batch is the processes' batches in process order; a group's G rows
            # may span two processes (its own process_slice)
            index = self.accelerator.process_index
            adv = self.semantic_scores_fn(dict(
                out, inputs=inputs, group_ids=(torch.arange(B) + index * B) // G,
                process_index=index, num_processes=self.accelerator.num_processes))
            if not isinstance(adv, Tensor) or tuple(adv.shape) != (B, T):
                raise ValueError(f"MAPOGRPOTrainer: semantic_scores_fn must return a [B, T] = "
                                 f"[{B}, {T}] tensor, got "
                                 f"{tuple(adv.shape) if isinstance(adv, Tensor) else type(adv)}")
            out["advantages"] = adv.to(out["completion_ids"].device, torch.float32)
            mode = "train" if self.model.training else "eval"
            for k, v in getattr(self.semantic_scores_fn, "metrics", {}).items():
                self._metrics[mode][f"mapo/{k}"].append(float(v))
            return out

        def _logit_map(self) -> Dict[str, Any]:
            """The model's ``logit_scale`` and ``final_logit_softcapping``, as TRL's fused head
            applies them (scale, then the cap, then the temperature), and its logits' dtype
            (rounded to the autocast dtype unless ``cast_lm_head_to_fp32``)."""
            fp32 = getattr(self.args, "cast_lm_head_to_fp32", False)
            return dict(PolicyNumerics.logit_map_of(self.model),
                        logits_dtype="float32" if fp32 else "autocast")

        def _compute_loss(self, model: Any, inputs: Dict[str, Any]) -> Tensor:
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            L = completion_ids.size(1)
            mask = completion_mask if "tool_mask" not in inputs else \
                completion_mask * inputs["tool_mask"]
            adv = inputs["advantages"]
            training = self.model.training
            isw = None
            if self.use_vllm and self.vllm_importance_sampling_correction:
                isw = inputs["importance_sampling_ratio"].expand_as(mask).float()
            kw = dict(old_logprobs=inputs.get("old_per_token_logps"),
                      ref_logprobs=inputs.get("ref_per_token_logps") if self.beta else None,
                      clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                      clip_ratio_c=self.args.delta, kl_coef=self.beta,
                      kl_type="k3_ratio" if self.args.use_bias_correction_kl else "k3",
                      temperature=self.temperature, rollout_is_weights=isw,
                      **self._logit_map(),
                      **LOSS_TYPES.get(self.loss_type)(self, mask, inputs, training))

            def objective(hidden: Tensor, weight: Tensor):
                if kw["logits_dtype"] == "float32":  # cast_lm_head_to_fp32, as TRL does
                    hidden, weight = hidden.float(), weight.float()
                else:  # one dtype for both; under autocast both then go to its dtype
                    weight = weight.to(hidden.dtype)
                return mapo_loss(hidden[:, -L:], weight, completion_ids, adv, mask, **kw)

            loss, metrics = self._forward(model, inputs, input_ids, attention_mask, L,
                                          objective)
            self._log_loss_metrics(metrics, training)
            return loss

        def _forward(self, model: Any, inputs: Dict[str, Any], input_ids: Tensor,
                     attention_mask: Tensor, L: int, objective: Callable) -> Tuple[Tensor, Any]:
            """The model's forward with ``mapo_objective``, on exactly the inputs TRL's own
            ``_compute_loss`` gives it: TRL's ``_get_per_token_logps_and_entropies`` builds
            them (every multimodal key its ``_compute_loss`` passes: pixel values, grids,
            ``mm_token_type_ids``, ...) and calls ``_ModelCall``, which runs the model with the
            objective instead of TRL's fused head. A key TRL's batch holds that its call
            does not forward is refused (``_check_inputs``)."""
            _check_inputs(inputs)
            call = _ModelCall(model, objective)
            self._get_per_token_logps_and_entropies(
                call, input_ids, attention_mask, L, batch_size=input_ids.size(0),
                compute_entropy=False, compute_aux_loss=False,
                **{k: inputs.get(k) for k in _trl_model_keys()})
            return call.result

        def _log_loss_metrics(self, m: Dict[str, Tensor], training: bool) -> None:
            """TRL's loss metrics (global token means over processes) from mapo_loss's."""
            mode = "train" if training else "eval"
            tokens = m["tokens"].float()

            def global_mean(mean: Tensor) -> float:
                totals = self.accelerator.reduce(torch.stack([mean.float() * tokens, tokens]),
                                                 reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()
            if self.beta != 0.0:
                self._metrics[mode]["kl"].append(global_mean(m["kl"]))
            self._metrics[mode]["entropy"].append(global_mean(m["entropy"]))
            self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(m["clipfrac_low"]))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(m["clipfrac_high"]))
            self._metrics[mode]["clip_ratio/region_mean"].append(
                global_mean(m["clipfrac_low"] + m["clipfrac_high"]))

    return MAPOGRPOTrainer


def __getattr__(name: str) -> Any:
    # the class is built on first access, so importing this module does not import TRL
    if name == "MAPOGRPOTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
