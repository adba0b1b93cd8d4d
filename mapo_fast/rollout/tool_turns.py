"""Turns of a sample: stop rules, closed tool calls, running the tools of a step together, the
observations they insert, and the description spans of a finished trajectory. The tool turns
compute (what a sampled token did, an observation, the descriptions) and never write a
sample: the scheduler applies what they return.

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
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..trajectory import DESCRIPTION_TAG, TOOL_CALL_TAG, Span, ToolTurn
from .multimodal import ImageInsert, VisionAdapter, crop_key, image_key
from .params import SamplingParams, ToolParams
from .sequence import Observation, Sample, TurnEvent

Tensor = torch.Tensor
CALL_OPEN, CALL_CLOSE = f"<{TOOL_CALL_TAG}>", f"</{TOOL_CALL_TAG}>"


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
    def decide(self, s: Sample, tok: int) -> Tuple[TurnEvent, Optional[str]]:
        """What ``s``'s newest token (``tok``, already appended) did, and the turn's text when
        it closed a tool call: the trajectory ends on its limit (``TRUNCATED``); a turn ends
        on a stop token or string or its token limit (``FINISHED``), or by closing a tool call
        while turns remain (``TOOL_CALL``)."""
        p = self.sampling
        if p.max_trajectory_tokens is not None and s.generated >= p.max_trajectory_tokens:
            return TurnEvent.TRUNCATED, None
        if self.tools.enabled and len(s.turns) + 1 < self.tools.max_turns and \
                ">" in self.tokenizer.decode([tok]):  # a call can only close on a '>'
            text = self.tokenizer.decode(s.tokens[s.turn_start:])
            if text.rstrip().endswith(CALL_CLOSE):
                return TurnEvent.TOOL_CALL, text
        stop = tok in self.stops or s.turn_tokens >= p.max_new_tokens
        if not stop and p.stop_strings:
            tail = self.tokenizer.decode(s.tokens[max(s.turn_start,
                                                      len(s.tokens) - p.stop_window):])
            stop = any(x in tail for x in p.stop_strings)
        return (TurnEvent.FINISHED if stop else TurnEvent.CONTINUE), None

    # ---- the tool calls closed in a step -----------------------------------------------------
    def run(self, calls: Sequence[Tuple[Sample, str]]) -> List[Observation]:
        """The observation of each ``(sample, call text)`` closed this step, all run together:
        one runner call, and for vision-language models one vision-tower pass over all the
        crops."""
        todo = [s for s, _ in calls]
        results = list(self.tools.runner.run([text for _, text in calls],
                                             [s.ctx for s in todo], [s.session for s in todo]))
        if len(results) != len(todo):
            raise RuntimeError(f"RolloutEngine: `tools.run` returned {len(results)} result(s) "
                               f"for {len(todo)} tool call text(s); it must return one per text")
        feats = self._encode_crops(todo, results)
        return [self.observation(s, r, feats.get(id(r))) for s, r in zip(todo, results)]

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

    def observation(self, s: Sample, result: Any, feat: Optional[tuple]) -> Observation:
        """The observation of ``s``'s tool call (``result``; ``feat``: its crop's encoding):
        the crop's image tokens, or the text; its turn's call and observation spans."""
        from ..tools import ToolResult
        if result is not None and result.ok and result.crop is not None and feat is None:
            result = ToolResult.error("tool_failed", "this model cannot receive images; use a "
                                                     "text tool")
        start = len(s.tokens)
        turn = ToolTurn(call=Span(find_marker(self.tokenizer, s.tokens, s.turn_start, CALL_OPEN),
                                  start))
        out = dict(error=result is None or not result.ok)
        grids = []
        if feat is not None:
            f, grid, key, patches = feat
            obs, at = observation_tokens(self.tokenizer, self.tools.observation_template,
                                         vision=self.vision, grid=grid)
            out.update(image=ImageInsert(start + at, f, key), crop=result.crop, patches=patches)
            turn.box, grids = tuple(result.box), [grid]
        else:
            text = "no tool call found" if result is None else (result.text or "")
            obs, _ = observation_tokens(self.tokenizer, self.tools.observation_template,
                                        vision=self.vision, text=text,
                                        max_tokens=self.tools.max_observation_tokens)
            turn.error = None if result is not None and result.ok else text
        turn.observation = Span(start, start + len(obs))
        if s.positions is not None:
            out["positions"], out["next_pos"] = self.vision.positions(obs, grids, s.next_pos)
        return Observation(tokens=obs, turn=turn, **out)

    # ---- a finished trajectory ---------------------------------------------------------------
    def described(self, s: Sample) -> List[ToolTurn]:
        """``s``'s turns with their description spans and texts: the ``<description>`` written
        after observation ``k`` and before the next call (copies; ``s`` is unchanged)."""
        turns = [dataclasses.replace(t) for t in s.turns]
        if self.tokenizer is None:
            return turns
        open_tag, close_tag = f"<{DESCRIPTION_TAG}>", f"</{DESCRIPTION_TAG}>"
        for k, turn in enumerate(turns):
            end = turns[k + 1].call.start if k + 1 < len(turns) else len(s.tokens)
            start = turn.observation.end
            seg = self.tokenizer.decode(s.tokens[start:end])
            if open_tag in seg and close_tag in seg:
                d0 = find_marker(self.tokenizer, s.tokens, start, open_tag)
                d1 = find_marker(self.tokenizer, s.tokens, d0, close_tag)
                turn.description = Span(d0, min(end, d1 + 1))
                turn.description_text = seg.split(open_tag, 1)[1].split(close_tag)[0].strip()
        return turns
