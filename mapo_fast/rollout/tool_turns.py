"""Turns of a sample: stop rules, closed tool calls, running the tools of a step together, the
observations they insert, and the description spans of a finished trajectory.

A turn ends on a stop token or string, at ``max_new_tokens``, or when its text closes a
``</tool_call>`` (while turns remain): the tool calls closed in one step run in one
``ToolRunner`` call, and for vision-language models the crops it returns (cut once, by
``crop_and_zoom`` at the vision tower's patch grid) go through the vision tower in one pass,
their patches made from the crops without resampling. Each observation is inserted with the
call's template (``observation_tokens``, the one builder of observation tokens).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..trajectory import DESCRIPTION_TAG, TOOL_CALL_TAG, Span, ToolTurn
from .multimodal import ImageInsert, VisionAdapter, crop_key, image_key
from .params import SamplingParams, ToolParams
from .sequence import Sample

Tensor = torch.Tensor
CALL_OPEN, CALL_CLOSE = f"<{TOOL_CALL_TAG}>", f"</{TOOL_CALL_TAG}>"


class TurnEvent(enum.Enum):
    """What a sampled token did to its sample (``ToolTurns.emit``); the scheduler, the only
    writer of a sequence's status and counters, applies it (``Scheduler.sampled``)."""
    CONTINUE = "continue"    # the turn goes on
    TOOL_CALL = "tool_call"  # the turn closed a tool call: ``run`` appends its observation
    FINISHED = "finished"    # the trajectory is done (a stop, its token limit)


def observation_tokens(tokenizer: Any, template: str, *, vision: Optional[VisionAdapter] = None,
                       grid: Optional[Tuple[int, int, int]] = None, text: str = "",
                       max_tokens: Optional[int] = None) -> Tuple[List[int], int]:
    """The tokens of one observation: ``template`` with ``{}`` replaced by the image tokens of
    a crop of patch grid ``grid`` (``vision`` given), else by ``text`` (image placeholders and
    vision markers removed from it, cut to ``max_tokens``). Returns ``(tokens, offset of the
    first image-pad token or -1)``."""
    ids = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    if grid is not None:
        pre, post = template.split("{}", 1)
        head = ids(pre)
        return head + vision.placeholder(grid) + ids(post), len(head) + 1
    obs = ids(template.format(text))
    if vision is not None:  # text never carries image placeholders
        special = (vision.image_token_id, vision.vision_start_id, vision.vision_end_id)
        obs = [t for t in obs if t not in special]
    return obs[:max_tokens], -1


def find_marker(tokenizer: Any, tokens: Sequence[int], start: int, marker: str) -> int:
    """The token index >= start where ``marker`` (ASCII) first begins in the text of
    ``tokens[start:]``, or ``start``. Linear: each token is decoded once, up to the one that
    completes the marker, and only the new text (with an overlap) is searched."""
    text, ends = "", []
    for t in tokens[start:]:
        seen = len(text)
        text += tokenizer.decode([t])
        ends.append(len(text))
        at = text.find(marker, max(0, seen - len(marker) + 1))
        if at >= 0:
            return start + bisect.bisect_right(ends, at)
    return start


class ToolTurns:
    """Turn rules and tool execution for one ``generate`` call.

    Args:
        tokenizer: the engine's tokenizer (None only without tools and stop strings).
        vision: the engine's ``VisionAdapter`` (vision-language models) or None.
        sampling, tools: the call's parameters.
        stats: the engine's counters (vision images and patches).
    """

    def __init__(self, tokenizer: Any, vision: Optional[VisionAdapter], sampling: SamplingParams,
                 tools: ToolParams, stats: Dict[str, int]):
        self.tokenizer, self.vision, self.sampling, self.stats = tokenizer, vision, sampling, stats
        if vision is not None and dataclasses.is_dataclass(tools.runner) and \
                hasattr(tools.runner, "crop_kwargs"):
            # crops are cut once, at the vision tower's patch grid (the runner's stats stay
            # shared); their patches are made from them without resampling
            kw = {k: v for k, v in tools.runner.crop_kwargs.items() if k != "size"}
            tools = dataclasses.replace(tools, runner=dataclasses.replace(
                tools.runner, crop_kwargs={**kw, **vision.crop_kwargs}))
        self.tools = tools
        stops: Set[int] = set(sampling.stop_token_ids or ())
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if sampling.stop_token_ids is None and eos is not None:
            stops.add(int(eos))
        self.stops = stops
        self.image_keys: Dict[int, int] = {}  # id(original image) -> its content key

    def new_session(self) -> Any:
        if self.tools.runner is None:
            return None
        from ..tools import ToolSession
        return ToolSession(max_calls=self.tools.max_tool_calls)

    # ---- one sampled token -------------------------------------------------------------------
    def emit(self, s: Sample, tok: int, lp: float) -> TurnEvent:
        """Records a sampled token and decides what it did: ends the trajectory on a stop
        token or string, the turn's token limit (with no tool call) or the trajectory's limit
        (``stats["truncated"]``), or closes a tool call (``tool_text``; ``run`` runs it)."""
        p = self.sampling
        s.append([tok], lp)
        s.new_tokens += 1
        s.generated += 1
        stop = tok in self.stops or s.new_tokens >= p.max_new_tokens
        if not stop and p.stop_strings:
            tail = self.tokenizer.decode(s.tokens[max(s.turn_start,
                                                      len(s.tokens) - p.stop_window):])
            stop = any(x in tail for x in p.stop_strings)
        text = None
        if self.tools.enabled and len(s.turns) + 1 < self.tools.max_turns and \
                ">" in self.tokenizer.decode([tok]):  # a call can only close on a '>'
            text = self.tokenizer.decode(s.tokens[s.turn_start:])
        if p.max_trajectory_tokens is not None and s.generated >= p.max_trajectory_tokens:
            s.stats["truncated"] = 1
            return TurnEvent.FINISHED
        if text is not None and text.rstrip().endswith(CALL_CLOSE):
            s.tool_text = text
            return TurnEvent.TOOL_CALL
        return TurnEvent.FINISHED if stop else TurnEvent.CONTINUE

    # ---- the tool calls closed in a step -----------------------------------------------------
    def run(self, batch: Sequence[Sample]) -> None:
        """Runs the tool calls that closed this step, all together: one runner call, and for
        vision-language models one vision-tower pass over all the crops; appends each
        sample's observation."""
        todo = [s for s in batch if s.tool_text is not None]
        if not todo:
            return
        results = list(self.tools.runner.run([s.tool_text for s in todo],
                                             [s.ctx for s in todo], [s.session for s in todo]))
        if len(results) != len(todo):
            raise RuntimeError(f"RolloutEngine: `tools.run` returned {len(results)} result(s) "
                               f"for {len(todo)} tool call text(s); it must return one per text")
        feats = self._encode_crops(todo, results)
        for s, r in zip(todo, results):
            s.tool_text = None
            self.observe(s, r, feats.get(id(r)))

    def _encode_crops(self, todo: Sequence[Sample], results: Sequence[Any]) -> Dict[int, tuple]:
        """``id(result) -> (features, grid, key, patches)`` of every crop, one vision pass."""
        crops = [(s, r) for s, r in zip(todo, results)
                 if r is not None and r.ok and r.crop is not None]
        if not crops or self.vision is None:
            return {}
        v = self.vision
        pixel_values, grid = v.crop_patches([r.crop for _, r in crops])
        encoded = v.encode_patches(pixel_values, grid, self.stats)
        out = {}
        for (s, r), (f, g), patches in zip(crops, encoded, v.split_patches(pixel_values, grid)):
            im = s.ctx.images[r.box[0]]
            if id(im) not in self.image_keys:  # a tool context's own image
                self.image_keys[id(im)] = image_key(im)
            out[id(r)] = (f, g, crop_key(self.image_keys[id(im)], r.box), patches)
        return out

    def observe(self, s: Sample, result: Any, feat: Optional[tuple]) -> None:
        """Appends the observation of a tool call (its crop's image tokens, or text); its
        tokens are pending, to be prefilled in the next steps."""
        from ..tools import ToolResult
        if result is not None and result.ok and result.crop is not None and feat is None:
            result = ToolResult.error("tool_failed", "this model cannot receive images; use a "
                                                     "text tool")
        s.stats["tool_calls"] += 1
        s.stats["tool_errors"] += int(result is None or not result.ok)
        start = len(s.tokens)
        turn = ToolTurn(call=Span(find_marker(self.tokenizer, s.tokens, s.turn_start, CALL_OPEN),
                                  start))
        grids = []
        if feat is not None:
            f, grid, key, patches = feat
            obs, at = observation_tokens(self.tokenizer, self.tools.observation_template,
                                         vision=self.vision, grid=grid)
            s.images.append(ImageInsert(start + at, f, key))
            s.crops.append(result.crop)
            s.patches.append(patches)
            turn.crop_index, turn.box, grids = len(s.crops) - 1, tuple(result.box), [grid]
        else:
            text = "no tool call found" if result is None else (result.text or "")
            obs, _ = observation_tokens(self.tokenizer, self.tools.observation_template,
                                        vision=self.vision, text=text,
                                        max_tokens=self.tools.max_observation_tokens)
            turn.error = None if result is not None and result.ok else text
        turn.observation = Span(start, start + len(obs))
        s.turns.append(turn)
        pos = nxt = None
        if s.positions is not None:
            pos, nxt = self.vision.positions(obs, grids, s.next_pos)
        s.append(obs, positions=pos, next_pos=nxt)
        s.turn_start = len(s.tokens)
        s.new_tokens = 0

    # ---- a finished trajectory ---------------------------------------------------------------
    def describe(self, s: Sample) -> None:
        """Sets the description span and text of each turn: the ``<description>`` written
        after observation ``k`` and before the next call."""
        if self.tokenizer is None:
            return
        open_tag, close_tag = f"<{DESCRIPTION_TAG}>", f"</{DESCRIPTION_TAG}>"
        for k, turn in enumerate(s.turns):
            end = s.turns[k + 1].call.start if k + 1 < len(s.turns) else len(s.tokens)
            start = turn.observation.end
            seg = self.tokenizer.decode(s.tokens[start:end])
            if open_tag in seg and close_tag in seg:
                d0 = find_marker(self.tokenizer, s.tokens, start, open_tag)
                d1 = find_marker(self.tokenizer, s.tokens, d0, close_tag)
                turn.description = Span(d0, min(end, d1 + 1))
                turn.description_text = seg.split(open_tag, 1)[1].split(close_tag)[0].strip()
