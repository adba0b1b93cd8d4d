"""The tool-call protocol of thinking-with-images agents: parse the model's text for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, look the tool up in a registry,
validate its arguments and run the calls of a whole batch of trajectories together (all crops in
one ``crop_and_zoom`` call).

Nothing from the model's text is ever evaluated: it is read with ``json.loads`` alone, length-
capped. Every malformed call becomes a ``ToolResult`` with ``ok=False``, an error ``code`` (counted
by ``ToolRunner.stats``) and a short, specific ``text`` to return to the model; the parser and
the executor never raise on model output.
"""

from __future__ import annotations

import abc
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..trajectory import TOOL_CALL_TAG, find_tags
from .ops import (FACTOR, MAX_PIXELS, MIN_PIXELS, BoxError, check_box, crop_and_zoom,
                  smart_resize)

Tensor = torch.Tensor

#: Every error code the protocol can produce, with what it means.
ERROR_CODES = {
    "unclosed_tag": "a <tool_call> without its closing tag",
    "call_too_long": "the call's text is longer than the limit",
    "bad_json": "the call is not valid JSON",
    "bad_call": "the JSON is not an object with a string \"name\" and an object \"arguments\"",
    "unknown_tool": "no tool of that name is registered",
    "multiple_calls": "more than one call in one turn",
    "too_many_calls": "the trajectory has used all its tool calls",
    "missing_bbox": "no bbox_2d argument",
    "bbox_not_numeric": "bbox_2d is not a list of 4 numbers",
    "bbox_not_finite": "bbox_2d holds NaN or infinity",
    "bbox_empty": "bbox_2d has x2 <= x1 or y2 <= y1",
    "bbox_outside": "bbox_2d reaches outside the image",
    "bbox_too_small": "bbox_2d is smaller than the minimum size",
    "bbox_aspect": "bbox_2d is too thin (aspect ratio above 200)",
    "bad_image_index": "image_index names no image of the conversation",
    "tool_failed": "the tool raised an unexpected error",
}


@dataclass
class ToolCall:
    """A parsed call: the tool's ``name``, its ``arguments`` and the raw JSON text."""
    name: str
    arguments: Dict[str, Any]
    raw: str


@dataclass
class ToolResult:
    """The outcome of one call: ``ok`` with a ``crop`` (uint8 ``[3, h, w]``) and its ``box``
    ``(image_index, x1, y1, x2, y2)`` in original pixels, or an error ``code`` and ``text``."""
    ok: bool
    code: Optional[str] = None
    text: Optional[str] = None
    crop: Optional[Tensor] = None
    box: Optional[Tuple[float, ...]] = None
    call: Optional[ToolCall] = None
    label: Optional[str] = None

    @classmethod
    def error(cls, code: str, text: str, call: Optional[ToolCall] = None) -> "ToolResult":
        return cls(ok=False, code=code, text=f"Error: {text}", call=call)


@dataclass
class ToolContext:
    """What a tool may use: the conversation's original images (uint8 ``[3, H, W]``) and, for
    each, its size ``(h, w)`` as the model sees it (after the vision encoder's resize)."""
    images: List[Tensor]
    model_sizes: List[Tuple[int, int]]

    @classmethod
    def for_images(cls, images: Sequence[Tensor], factor: int = FACTOR,
                   min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> "ToolContext":
        """Model sizes by Qwen2-VL's ``smart_resize`` of each image."""
        return cls(list(images), [smart_resize(im.shape[1], im.shape[2], factor, min_pixels,
                                               max_pixels) for im in images])


@dataclass
class CropRequest:
    """A validated zoom: ``box`` ``(x1, y1, x2, y2)`` in original pixels of image ``image``."""
    image: int
    box: Tuple[float, float, float, float]
    label: Optional[str] = None


class Tool(abc.ABC):
    """A tool the model can call. ``prepare`` validates the arguments against the context and
    returns either a ``CropRequest`` (run batched by ``ToolRunner.run``) or a finished
    ``ToolResult``; it raises ``ToolArgumentError`` for bad arguments."""
    name: str = ""
    description: str = ""
    parameters: Dict[str, Any] = {}

    @abc.abstractmethod
    def prepare(self, arguments: Dict[str, Any], context: ToolContext):
        ...

    def schema(self) -> Dict[str, Any]:
        """The function description to put in the system prompt."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


class ToolArgumentError(Exception):
    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fits_float(v: Any) -> bool:
    """An int of any size is valid JSON; only those a float holds can be a coordinate."""
    return not isinstance(v, int) or v.bit_length() <= 1023


class ZoomInTool(Tool):
    """``image_zoom_in_tool``: crop ``bbox_2d = [x1, y1, x2, y2]``, given in pixels of the image
    *as the model sees it*, out of the original image (so zooming adds real detail).

    Arguments: ``bbox_2d`` (required), ``label`` (optional string), ``image_index`` (optional,
    default 0, for conversations with several images). Boxes must lie inside the image and be
    at least ``min_box_size`` model pixels on each side.
    """
    name = "image_zoom_in_tool"
    description = ("Zoom in on a region of the image: crops the bounding box bbox_2d "
                   "[x1, y1, x2, y2] (pixels of the image as you see it) and returns it at a "
                   "higher resolution. Describe what you see in <description>...</description>.")
    parameters = {"type": "object", "required": ["bbox_2d"], "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"}, "image_index": {"type": "integer"}}}

    def __init__(self, min_box_size: float = 4.0):
        self.min_box_size = float(min_box_size)

    def prepare(self, arguments: Dict[str, Any], context: ToolContext) -> CropRequest:
        if "bbox_2d" not in arguments:
            raise ToolArgumentError("missing_bbox", "missing argument bbox_2d: give "
                                                    "[x1, y1, x2, y2] in pixels")
        bbox = arguments["bbox_2d"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ToolArgumentError("bbox_not_numeric", "bbox_2d must be 4 numbers "
                                                        f"[x1, y1, x2, y2], got {_short(bbox)}")
        if not all(_fits_float(v) for v in bbox):
            raise ToolArgumentError("bbox_not_finite", f"bbox_2d {_short(bbox)} has a "
                                                       "coordinate too large to represent")
        index = arguments.get("image_index", 0)
        if not (isinstance(index, int) and not isinstance(index, bool)
                and 0 <= index < len(context.images)):
            raise ToolArgumentError("bad_image_index", f"image_index {_short(index)} names no "
                                                       f"image; there are {len(context.images)}")
        mh, mw = context.model_sizes[index]
        try:  # every rule in the pixels the model sees, and the message in them
            x1, y1, x2, y2 = check_box(bbox, mw, mh, min_size=self.min_box_size, name="bbox_2d")
        except BoxError as e:
            raise ToolArgumentError(e.code, str(e)) from None
        H, W = context.images[index].shape[1:]
        sx, sy = W / mw, H / mh
        # inside, non-empty and finite in original pixels too; any aspect ratio is cropped
        box = (x1 * sx, y1 * sy, min(x2 * sx, W), min(y2 * sy, H))
        label = arguments.get("label")
        return CropRequest(index, box, label if isinstance(label, str) else None)


def _short(v: Any, limit: int = 60) -> str:
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


class ToolRegistry:
    """Tools by name. ``ToolRegistry.default()`` holds ``image_zoom_in_tool``; ``register``
    adds yours."""

    def __init__(self, tools: Sequence[Tool] = ()):
        self._tools: Dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    @classmethod
    def default(cls) -> "ToolRegistry":
        return cls([ZoomInTool()])

    def register(self, tool: Tool) -> Tool:
        if not isinstance(tool, Tool) or not tool.name:
            raise ValueError(f"ToolRegistry.register: `tool` must be a Tool with a name, got "
                             f"{tool!r}")
        if tool.name in self._tools:
            raise ValueError(f"ToolRegistry.register: a tool named {tool.name!r} is already "
                             "registered")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Optional[Tool]:
        return self._tools.get(name)

    @property
    def names(self) -> List[str]:
        return sorted(self._tools)

    def schemas(self) -> List[Dict[str, Any]]:
        return [self._tools[n].schema() for n in self.names]

    def system_prompt(self) -> str:
        """The tools' part of a system prompt, from ``schemas()``: each tool's JSON schema in
        ``<tools>`` and the call format (Qwen2.5's)."""
        tools = "\n".join(json.dumps(x) for x in self.schemas())
        return (f"You may call these tools:\n<tools>\n{tools}\n</tools>\nTo call one, write "
                + format_tool_call("<name>", {"<argument>": "<value>"}) + ".")


def format_tool_call(name: str, arguments: Dict[str, Any], *, tag: str = TOOL_CALL_TAG) -> str:
    """The text of one call, as ``parse_tool_calls`` reads it back."""
    return f"<{tag}>{json.dumps({'name': name, 'arguments': arguments})}</{tag}>"


def parse_tool_calls(text: str, *, tag: str = TOOL_CALL_TAG, max_chars: int = 4096
                     ) -> Tuple[List[ToolCall], List[ToolResult]]:
    """All calls in ``text``: ``(calls, errors)``. Never raises."""
    calls: List[ToolCall] = []
    errors: List[ToolResult] = []
    try:
        bodies = [text[c:d] for _, _, c, d in find_tags(text, tag)]
        if text.count(f"<{tag}>") > len(bodies):
            errors.append(ToolResult.error("unclosed_tag", f"unclosed <{tag}> tag: end the call "
                                                           f"with </{tag}>"))
        for body in bodies:
            body = body.strip()
            if len(body) > max_chars:
                errors.append(ToolResult.error("call_too_long", f"tool call is {len(body)} "
                                                                f"characters; the limit is {max_chars}"))
                continue
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
                errors.append(ToolResult.error("bad_json", f"tool call is not valid JSON ({msg})"))
                continue
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                    and isinstance(obj.get("arguments", {}), dict)):
                errors.append(ToolResult.error("bad_call", 'tool call must be a JSON object '
                                                           'with a string "name" and an object '
                                                           '"arguments"'))
                continue
            calls.append(ToolCall(obj["name"], obj.get("arguments", {}), body))
    except Exception as e:  # defensive: model text must never break a rollout
        errors.append(ToolResult.error("bad_call", f"unreadable tool call ({type(e).__name__})"))
    return calls, errors


@dataclass
class ToolSession:
    """Per-trajectory state: how many calls were made, within ``max_calls``."""
    max_calls: int = 4
    calls: int = 0


@dataclass
class ToolRunner:
    """Runs the tool calls of a batch of trajectories: parse, validate, crop all valid zooms in
    one batched ``crop_and_zoom`` call. ``stats`` counts calls, successes and each error code.
    ``crop_kwargs`` go to ``crop_and_zoom`` (e.g. ``max_pixels``)."""
    registry: ToolRegistry = field(default_factory=ToolRegistry.default)
    max_calls_per_turn: int = 1
    max_chars: int = 4096
    crop_kwargs: Dict[str, Any] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)

    def run(self, texts: Sequence[str], contexts: Sequence[ToolContext],
            sessions: Sequence[ToolSession]) -> List[Optional[ToolResult]]:
        """One result per text: None when the text makes no call (a final answer), else the
        call's ``ToolResult``. Never raises on model output."""
        results: List[Optional[ToolResult]] = [None] * len(texts)
        pending: List[Tuple[int, CropRequest, ToolCall]] = []
        for i, (text, ctx, sess) in enumerate(zip(texts, contexts, sessions)):
            res = self._prepare(text, ctx, sess)
            if isinstance(res, tuple):
                pending.append((i, *res))
            else:
                results[i] = res
        if pending:
            self._crop(pending, contexts, results)
        for r in results:
            if r is not None:
                self.stats["calls"] += 1
                self.stats["ok" if r.ok else f"error:{r.code}"] += 1
        return results

    def _prepare(self, text: str, ctx: ToolContext, sess: ToolSession):
        calls, errors = parse_tool_calls(text, max_chars=self.max_chars)
        if errors:
            return errors[0]
        if not calls:
            return None
        if len(calls) > self.max_calls_per_turn:
            return ToolResult.error("multiple_calls", f"{len(calls)} tool calls in one turn; "
                                                      f"make at most {self.max_calls_per_turn}")
        call = calls[0]
        if sess.calls >= sess.max_calls:
            return ToolResult.error("too_many_calls", f"too many tool calls: at most "
                                                      f"{sess.max_calls} per trajectory; answer "
                                                      "now", call)
        sess.calls += 1
        tool = self.registry.get(call.name)
        if tool is None:
            return ToolResult.error("unknown_tool", f"unknown tool {_short(call.name)}; "
                                                    f"available: {', '.join(self.registry.names)}",
                                    call)
        try:
            req = tool.prepare(call.arguments, ctx)
        except ToolArgumentError as e:
            return ToolResult.error(e.code, e.text, call)
        except Exception as e:  # a user tool's bug must not break the rollout either
            return ToolResult.error("tool_failed", f"{call.name} failed ({type(e).__name__})",
                                    call)
        if isinstance(req, ToolResult):
            req.call = call
            return req
        return req, call

    def _crop(self, pending, contexts, results) -> None:
        """One ``crop_and_zoom`` call over every image of every pending call whose request
        holds in original pixels; a request that does not (a user tool's) becomes that call's
        error alone, so one call never changes another's result."""
        images, boxes, where, ok = [], [], {}, []
        for i, req, call in pending:
            im = contexts[i].images[req.image]
            try:
                check_box(req.box, im.shape[2], im.shape[1], name="crop box", max_aspect=None)
            except BoxError as e:
                results[i] = ToolResult.error(e.code, str(e), call)
                continue
            key = (i, req.image)
            if key not in where:
                where[key] = len(images)
                images.append(im)
            boxes.append((where[key], *req.box))
            ok.append((i, req, call))
        crops = crop_and_zoom(images, boxes, **self.crop_kwargs) if ok else []
        for (i, req, call), crop, box in zip(ok, crops, boxes):
            results[i] = ToolResult(ok=True, crop=crop, box=(req.image, *box[1:]), call=call,
                                    label=req.label)
