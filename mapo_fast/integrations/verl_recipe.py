"""The MAPO recipe in verl: the zoom tool for verl's multi-turn tool agent loop, and the reward
that scores each description against its crop.

- ``ZoomInTool``: a verl ``BaseTool`` (declare it in the rollout's ``tool_config_path`` file,
  ``examples/verl/zoom_tool.yaml``). It crops the conversation's first image (verl's
  ``agent_data.image_data``) with ``ToolRunner`` (the box rules and error texts of
  mapo_fast's own rollouts, ``crop_and_zoom``) and returns the crop as an image.
- ``MAPORewardManager``: a verl reward manager, registered as ``mapo``
  (``reward.reward_manager.name=mapo``). Per sample it computes the outcome score (verl's
  custom reward function, ``compute_score(data_source, solution_str, ground_truth,
  extra_info)``, when one is configured; else, instead of verl's per-dataset default, the
  ``<answer>`` against the ground truth, ``AccuracyReward``), and
  finds the response's zoom turns in its token ids (``TurnScorer``: the crop recomputed from
  the sample's image in its ``raw_prompt``, the description after it). verl calls the manager
  once per sample, concurrently; the turn scoring of the samples in flight is gathered into
  one ``TurnScorer.score`` call (one crop and one verifier call), ``_Batcher``. It returns the
  score and ``mapo_turns`` (``turns_info``) in ``reward_extra_info``, which verl carries to the
  ``mapo`` advantage estimator.

Both need the processor's resize (``min_pixels`` / ``max_pixels``) and the reward the
verifier: they come from the ``"reward"`` object of ``MAPO_FAST_VERL_OPTIONS``
(``reward_options``), e.g. ``{"reward": {"verifier": "/ckpt/clip", "max_pixels": 1003520}}``;
the verifier runs on the reward worker's GPU when it has one (``"device": "auto"``).
Importing this module needs verl (``verl_worker`` imports it in every verl process).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from verl.experimental.reward_loop.reward_manager import register as register_manager
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.reward_score import default_compute_score

from ..rewards.outcome import AccuracyReward
from ..tools.ops import FACTOR, MAX_PIXELS, MIN_PIXELS
from ..tools.protocol import ToolRunner, ToolSession, ZoomInTool as _Zoom, format_tool_call
from .recipe import TurnScorer, pil_image, zoom_context
from .verl import OPTIONS_ENV, turns_info

#: the reward manager's name in verl's registry
MANAGER_NAME = "mapo"
#: keys of ``MAPO_FAST_VERL_OPTIONS["reward"]`` and their defaults
REWARD_DEFAULTS: Dict[str, Any] = {"verifier": None, "min_pixels": MIN_PIXELS,
                                   "max_pixels": MAX_PIXELS, "factor": FACTOR,
                                   "max_batch": 256, "wait_s": 0.01, "device": "auto"}


def reward_options(environ: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``REWARD_DEFAULTS`` updated with ``MAPO_FAST_VERL_OPTIONS["reward"]`` (checked)."""
    from .verl import options_from_env
    given = options_from_env(environ).get("reward") or {}
    if not isinstance(given, dict):
        raise ValueError(f"{OPTIONS_ENV}: 'reward' must be an object, got {given!r}")
    unknown = sorted(set(given) - set(REWARD_DEFAULTS))
    if unknown:
        raise ValueError(f"{OPTIONS_ENV}: unknown reward option(s) {unknown}; valid: "
                         f"{list(REWARD_DEFAULTS)}")
    return {**REWARD_DEFAULTS, **given}


def verifier_device(option: str, cuda_available: Optional[bool] = None) -> torch.device:
    """The device of the reward worker's verifier: ``auto`` (default) is the worker's GPU when
    Ray gave it one (CUDA visible), else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given (a
    CUDA device on a worker without one is refused, naming the option)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    name = str(option).strip().lower()
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and
                                                 name[5:].isdigit())):
        raise ValueError(f"{OPTIONS_ENV}: reward option 'device' must be 'auto', 'cpu', 'cuda' "
                         f"or 'cuda:N', got {option!r}")
    if name.startswith("cuda") and not cuda:
        raise ValueError(f"{OPTIONS_ENV}: reward option 'device' is {option!r}, but this "
                         f"reward worker sees no CUDA device (use 'auto' or 'cpu')")
    return torch.device(name)


def _resize(options: Dict[str, Any]) -> Dict[str, int]:
    return {k: int(options[k]) for k in ("min_pixels", "max_pixels", "factor")}


def _load_image(value: Any) -> Any:
    """A PIL image or a uint8 tensor from what verl's dataset holds for an image: a PIL image,
    a path, or a ``{"bytes": ...}`` / ``{"image": ...}`` / ``{"path": ...}`` dict."""
    if isinstance(value, dict):
        if value.get("image") is not None:
            return _load_image(value["image"])
        if value.get("bytes") is not None:
            from io import BytesIO

            from PIL import Image
            return Image.open(BytesIO(value["bytes"]))
        if value.get("path") is not None:
            return _load_image(value["path"])
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image
        return Image.open(os.fspath(value))
    return value


def sample_image(non_tensor: Dict[str, Any]) -> Any:
    """The sample's image: the first image part of its ``raw_prompt`` (verl's dataset puts the
    row's images there), else ``extra_info["image"]``; ``ValueError`` when neither exists."""
    messages = non_tensor.get("raw_prompt")
    messages = messages.tolist() if isinstance(messages, np.ndarray) else messages
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                return _load_image(part.get("image", part))
    extra = non_tensor.get("extra_info") or {}
    if isinstance(extra, dict) and extra.get("image") is not None:
        return _load_image(extra["image"])
    raise ValueError("MAPORewardManager: the sample has no image (no image part in its "
                     "raw_prompt, no extra_info['image']): the zoom turns cannot be scored")


class ZoomInTool(BaseTool):
    """``image_zoom_in_tool`` for verl's tool agent loop. ``config`` (the tool config file's
    ``config`` block): ``min_pixels``, ``max_pixels``, ``factor`` (the processor's resize,
    default ``reward_options()``'s) and ``max_calls`` (per rollout, default 4)."""

    def __init__(self, config: Dict[str, Any], tool_schema: Optional[OpenAIFunctionToolSchema]
                 = None):
        resize = _resize({**reward_options(), **{k: v for k, v in (config or {}).items()
                                                 if k in ("min_pixels", "max_pixels", "factor")}})
        self._resize, self._runner = resize, ToolRunner()
        self._max_calls = int((config or {}).get("max_calls", 4))
        self._sessions: Dict[str, ToolSession] = {}
        super().__init__(config, tool_schema or OpenAIFunctionToolSchema.model_validate(
            {"type": "function", "function": {"name": _Zoom.name, "description": _Zoom.description,
                                              "parameters": _Zoom.parameters}}))

    async def create(self, instance_id: Optional[str] = None, **kwargs: Any
                     ) -> Tuple[str, ToolResponse]:
        instance_id, response = await super().create(instance_id, **kwargs)
        self._sessions[instance_id] = ToolSession(max_calls=self._max_calls)
        return instance_id, response

    async def execute(self, instance_id: str, parameters: Dict[str, Any], **kwargs: Any
                      ) -> Tuple[ToolResponse, float, dict]:
        agent = kwargs.get("agent_data")
        images = getattr(agent, "image_data", None) or []
        images = images if isinstance(images, list) else [images]
        if not images:
            return ToolResponse(text="Error: the conversation has no image to zoom into"), 0.0, {}
        ctx = zoom_context(_load_image(images[0]), self._resize, "agent_data.image_data[0]")
        session = self._sessions.setdefault(instance_id, ToolSession(max_calls=self._max_calls))
        (result,) = self._runner.run([format_tool_call(self.name, parameters)], [ctx], [session])
        if not result.ok:
            return ToolResponse(text=result.text), 0.0, {"error": result.code}
        return ToolResponse(image=[pil_image(result.crop)]), 0.0, {}

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._sessions.pop(instance_id, None)


class _Batcher:
    """Gathers the turn scoring of concurrent samples into one ``TurnScorer.score`` call: the
    first request of a batch schedules its flush ``wait_s`` later, ``max_batch`` pending
    requests flush at once; the batch is scored off the event loop and each request gets its
    row (or the batch's error: no request is left waiting)."""

    def __init__(self, scorer: TurnScorer, max_batch: int, wait_s: float):
        self.scorer, self.max_batch, self.wait_s = scorer, max_batch, wait_s
        self.pending: List[Tuple[List[int], Any, asyncio.Future]] = []
        self.calls = 0

    async def score(self, ids: List[int], image: Any
                    ) -> Tuple[List[Tuple[int, int, float]], Dict[str, float]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((ids, image, future))
        if len(self.pending) >= self.max_batch:
            self._flush(loop)
        elif len(self.pending) == 1:
            loop.call_later(self.wait_s, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending, []
        if batch:
            loop.create_task(self._run(batch))

    async def _run(self, batch: list) -> None:
        self.calls += 1
        try:
            turns = await asyncio.get_running_loop().run_in_executor(
                None, self.scorer.score, [b[0] for b in batch], [b[1] for b in batch])
        except Exception as e:  # every waiting sample gets the error, none hangs
            for _, _, future in batch:
                future.set_exception(e)
            return
        for i, (_, _, future) in enumerate(batch):
            n = int(turns.mask[i].sum())
            future.set_result((turns.turn_spans(i), {
                "mapo_scored_turns": float(n), "mapo_batch": float(len(batch)),
                "mapo_score_mean": float(turns.scores[i][turns.mask[i]].mean()) if n else 0.0}))


@register_manager(MANAGER_NAME)
class MAPORewardManager(RewardManagerBase):
    """verl reward manager ``mapo`` (see the module doc). ``verifier``: a ``SemanticVerifier``
    (default: ``CLIPVerifier.from_pretrained(reward_options()["verifier"])``)."""

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None,
                 reward_router_address: Any = None, reward_model_tokenizer: Any = None,
                 verifier: Any = None):
        super().__init__(config, tokenizer, compute_score)
        options = reward_options()
        if verifier is None:
            if not options["verifier"]:
                raise ValueError(f"MAPORewardManager: no verifier: set {OPTIONS_ENV}="
                                 "'{\"reward\": {\"verifier\": \"<a local CLIP or SigLIP "
                                 "checkpoint>\"}}'")
            from ..rewards.clip import CLIPVerifier
            verifier = CLIPVerifier.from_pretrained(options["verifier"],
                                                    device=verifier_device(options["device"]))
        self.accuracy = AccuracyReward()
        self.batcher = _Batcher(TurnScorer(verifier, tokenizer, **_resize(options)),
                                int(options["max_batch"]), float(options["wait_s"]))

    def _outcome(self, ids: List[int], item: Any) -> Tuple[float, Dict[str, Any]]:
        """The custom reward function on the text verl's naive manager gives it (special tokens
        skipped), or ``AccuracyReward`` on the full text (tags kept whatever the tokenizer
        calls special)."""
        nt = item.non_tensor_batch
        truth = (nt.get("reward_model") or {}).get("ground_truth")
        if self.compute_score is None or self.compute_score is default_compute_score:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            return float(self.accuracy(text, str(truth))), {}
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        result = self.compute_score(data_source=nt.get("data_source"), solution_str=text,
                                    ground_truth=truth, extra_info=nt.get("extra_info") or {})
        if isinstance(result, dict):
            return float(result["score"]), {k: v for k, v in result.items() if k != "score"}
        return float(result), {}

    async def run_single(self, data: Any) -> Dict[str, Any]:
        item = data[-1:][0]  # as verl's naive manager: the last sequence of the sample
        ids = item.batch["responses"]
        n = int(item.batch["attention_mask"][-ids.shape[-1]:].sum())
        ids = ids[:n].tolist()
        score, extra = self._outcome(ids, item)
        spans, stats = await self.batcher.score(ids, sample_image(item.non_tensor_batch))
        info = turns_info([s[:2] for s in spans], [s[2] for s in spans])
        return {"reward_score": score,
                "reward_extra_info": {"score": score, **extra, **stats, **info}}
