"""Where each tool turn's call, observation and description, and the final answer, sit in a
trajectory's token sequence.

The rollout engine fills these records as it generates; users with their own rollout code
build them from the conversation text and their tokenizer with ``spans_from_text``.

A tool turn ``k`` is: the model writes (reasoning and) a tool call, the environment inserts an
observation (the crop's image tokens, or an error text), and the model writes
``<description>...</description>`` of what it received. For the advantage, the tokens of turn
``k`` run from the end of turn ``k-1`` (or of the prompt) to the end of description ``k`` (or of
observation ``k`` when there is none): the call that chose the crop and the description of it.
Tokens after the last turn (final reasoning, the answer) belong to no turn (``-1``).
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

#: Default markers: an image observation is a Qwen2-VL-style image insertion (a crop); a
#: text observation is a ``<tool_response>`` block (the tool's error text returned to the model).
DESCRIPTION_TAG = "description"
TOOL_CALL_TAG = "tool_call"
ANSWER_TAG = "answer"
#: ``(open, close)`` markers; ``spans_from_text`` also takes a regex in their place.
IMAGE_PATTERN = ("<|vision_start|>", "<|vision_end|>")
TEXT_RESPONSE_PATTERN = ("<tool_response>", "</tool_response>")
#: How a tool's result is inserted after its call (``{}``: the crop's image tokens or a text).
OBSERVATION_TEMPLATE = "{}".join(TEXT_RESPONSE_PATTERN)

Block = Tuple[int, int, int, int]


def find_blocks(text: str, open_: str, close: str) -> List[Block]:
    """Every ``open_ ... close`` block of ``text``, left to right, not overlapping, as
    ``(start, end, body_start, body_end)`` character offsets; a block's body runs to the first
    ``close`` after its ``open_`` (what the lazy regex ``open_(.*?)close`` matches). One linear
    pass: model output is untrusted, and a text of many unclosed ``open_`` costs no more than
    any other text of its length."""
    out: List[Block] = []
    pos = 0
    while True:
        a = text.find(open_, pos)
        if a < 0:
            return out
        b = text.find(close, a + len(open_))
        if b < 0:
            return out
        out.append((a, b + len(close), a + len(open_), b))
        pos = b + len(close)


def find_tags(text: str, tag: str) -> List[Block]:
    """``find_blocks`` of ``<tag>...</tag>``."""
    return find_blocks(text, f"<{tag}>", f"</{tag}>")


@dataclass(frozen=True)
class Span:
    """Half-open token range ``[start, end)``."""
    start: int
    end: int

    def __post_init__(self):
        if not (0 <= self.start <= self.end):
            raise ValueError(f"Span: need 0 <= start <= end, got start={self.start}, "
                             f"end={self.end}")

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class ToolTurn:
    """One tool call and what followed it.

    ``call``: the ``<tool_call>...</tool_call>`` tokens; ``observation``: the tokens the
    environment inserted (None when the call produced none); ``description``: the model's
    ``<description>`` tokens after the observation (None if it wrote none: the turn then gets
    the minimum semantic score); ``crop_index``: index into ``Trajectory.crops`` (None when the
    call failed) and ``box`` the cropped box ``(image_index, x1, y1, x2, y2)`` in original
    pixels; ``error``: the tool error text returned to the model, if any.
    """
    call: Span
    observation: Optional[Span] = None
    description: Optional[Span] = None
    description_text: Optional[str] = None
    crop_index: Optional[int] = None
    error: Optional[str] = None
    box: Optional[Tuple[float, ...]] = None  # (image_index, x1, y1, x2, y2), original pixels
    region: Any = None  # task-provided ground truth of the cropped region (OracleVerifier)

    @property
    def ok(self) -> bool:
        """The call succeeded and returned a crop."""
        return self.error is None and self.crop_index is not None


@dataclass
class TrajectorySpans:
    """The structure of one trajectory: its tool turns in order, and the answer."""
    turns: List[ToolTurn] = field(default_factory=list)
    answer: Optional[Span] = None
    answer_text: Optional[str] = None
    prompt_len: int = 0

    def token_turn(self, length: int) -> Tensor:
        """``[length]`` int64: ``k`` on the tokens of tool turn ``k`` (see the module doc),
        ``-1`` elsewhere. Only successful turns (``ToolTurn.ok``) are numbered, in order, as the
        rows of ``semantic_scores``; a failed call's tokens belong to the next turn."""
        out = torch.full((length,), -1, dtype=torch.int64)
        for k, (start, end) in enumerate(self.turn_ranges(length)):
            out[start:end] = k
        return out

    def turn_ranges(self, length: int) -> List[Tuple[int, int]]:
        """``[start, end)`` of each successful turn's tokens (turn ``k`` is entry ``k``),
        clipped to ``length``: the ranges ``token_turn`` numbers."""
        out, start = [], self.prompt_len
        for turn in self.turns:
            end = (turn.description or turn.observation or turn.call).end
            if turn.ok:
                out.append((max(0, start), min(length, end)))
                start = end
        return out

    @property
    def n_scored_turns(self) -> int:
        return sum(t.ok for t in self.turns)


@dataclass
class Trajectory:
    """One rollout: ``token_ids`` (prompt and everything after it), ``logprobs`` and
    ``loss_mask`` aligned with them (the sampler's log-prob of each generated token, 0 for
    prompt and observation tokens; mask 1 on model-written tokens), ``spans``, ``crops``
    (uint8 ``[3, h, w]`` tensors), ``stats`` (counters), plus the group id and the text of the
    response. ``RolloutEngine`` fills ``stats`` with ``tool_calls``, ``tool_errors``,
    ``new_tokens`` (model-written), ``decode_tokens`` and ``prefill_tokens`` (what this sample
    pushed through the model: its observations and any recomputation; the prompt, prefilled
    once for the group, is in the engine's stats), and ``preemptions`` / ``truncated`` when
    they happened. ``vision_inputs``: for vision-language rollouts, the vision tower's input of
    each image the tokens hold, in order (prompt images, then each turn's crop):
    ``(pixel_values [patches, C] float32, (t, gh, gw))``, made once by the engine and reused by
    the trainer (empty otherwise)."""
    token_ids: List[int]
    logprobs: List[float]
    loss_mask: List[int]
    spans: TrajectorySpans
    crops: List[Tensor] = field(default_factory=list)
    stats: Dict[str, int] = field(default_factory=dict)
    group_id: int = 0
    response_text: str = ""
    vision_inputs: List[Tuple[Tensor, Tuple[int, int, int]]] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.token_ids)
        for name in ("logprobs", "loss_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory: `{name}` has {len(getattr(self, name))} entries, "
                                 f"`token_ids` has {n}")

    def token_turn(self) -> Tensor:
        return self.spans.token_turn(len(self.token_ids))


def _blocks(pattern: Union[str, Tuple[str, str]], text: str) -> List[Tuple[int, int, str]]:
    """``(start, end, body)`` of each block of an ``(open, close)`` pair (linear) or of each
    match of a regex (its first group, or the whole match, as the body)."""
    if isinstance(pattern, tuple):
        return [(a, b, text[c:d]) for a, b, c, d in find_blocks(text, *pattern)]
    return [(m.start(), m.end(), m.group(1) if m.re.groups else m.group(0))
            for m in re.finditer(pattern, text, re.DOTALL)]


def _offsets(tokenizer: Any, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Token ids and character offsets, from a ``transformers`` fast tokenizer or a
    ``tokenizers.Tokenizer``."""
    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError:  # only transformers tokenizers then
        RawTokenizer = ()
    if isinstance(tokenizer, RawTokenizer):
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise ValueError("spans_from_text: `tokenizer` must give character offsets (a "
                         "transformers fast tokenizer or a tokenizers.Tokenizer); "
                         f"{type(tokenizer).__name__} does not ({e})") from e
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


class _TokenIndex:
    """Character ranges to token spans in O(log n) each (the offsets are read once)."""

    def __init__(self, offsets: Sequence[Tuple[int, int]]):
        # running max of the ends, suffix min of the starts: monotone even where a tokenizer
        # gives a special token an empty or out-of-order offset
        self.ends = list(itertools.accumulate((b for _, b in offsets), max))
        self.starts = list(itertools.accumulate((a for a, _ in reversed(offsets)), min))[::-1]

    def span(self, start: int, end: int) -> Span:
        """Smallest token span covering characters ``[start, end)``."""
        first = bisect.bisect_right(self.ends, start)
        last = bisect.bisect_left(self.starts, end) - 1
        return Span(first, max(first, last + 1))


def _first_from(blocks: Sequence[Tuple[int, int, Any]], starts: Sequence[int], lo: int,
                hi: int) -> Optional[Tuple[int, int, Any]]:
    """The first of ``blocks`` (sorted by start) starting in ``[lo, hi)``, or None."""
    i = bisect.bisect_left(starts, lo)
    return blocks[i] if i < len(blocks) and blocks[i][0] < hi else None


def spans_from_text(text: str, tokenizer: Any, *, prompt_chars: int = 0,
                    description_tag: str = DESCRIPTION_TAG, tool_call_tag: str = TOOL_CALL_TAG,
                    answer_tag: str = ANSWER_TAG,
                    image_pattern: Union[str, Tuple[str, str]] = IMAGE_PATTERN,
                    text_response_pattern: Union[str, Tuple[str, str]] = TEXT_RESPONSE_PATTERN
                    ) -> Tuple[List[int], TrajectorySpans]:
    """Builds the spans of a trajectory from its full text (prompt and response).

    Each ``<tool_call>`` opens a turn; the first observation after it (before the next call) is
    its observation: an image (``image_pattern``) is the turn's crop, numbered in order; a text
    response (``text_response_pattern``, its first group the text) is a tool error, recorded in
    ``error`` (unless it wraps an image: a chat template's tool message holding the crop). The
    first ``<description>`` after an image observation (before the next call) is
    its description. A call followed by no observation is recorded with ``error`` set. The last
    ``<answer>`` is the answer. ``prompt_chars``: length of the prompt part of ``text`` (tool
    calls in it are ignored). Returns ``(token_ids, spans)``.
    """
    ids, offsets = _offsets(tokenizer, text)
    return ids, _spans(text, offsets, prompt_chars, description_tag, tool_call_tag, answer_tag,
                       image_pattern, text_response_pattern)


def spans_from_ids(ids: Sequence[int], tokenizer: Any, **markers: Any) -> TrajectorySpans:
    """``spans_from_text``'s spans for token ids as they were generated (no re-encoding: a
    policy may sample a tokenization its tokenizer would not produce, and a framework's
    response holds observation tokens its decoder drops as special). The text is the ids'
    pieces, each decoded alone with special tokens kept, so every character maps to the token
    it came from. ``markers``: ``spans_from_text``'s tag and pattern options."""
    pieces = [tokenizer.decode([int(t)], skip_special_tokens=False) for t in ids]
    ends = list(itertools.accumulate(len(p) for p in pieces))
    offsets = [(e - len(p), e) for p, e in zip(pieces, ends)]
    markers.setdefault("prompt_chars", 0)
    return _spans("".join(pieces), offsets, **markers)


def _spans(text: str, offsets: Sequence[Tuple[int, int]], prompt_chars: int = 0,
           description_tag: str = DESCRIPTION_TAG, tool_call_tag: str = TOOL_CALL_TAG,
           answer_tag: str = ANSWER_TAG,
           image_pattern: Union[str, Tuple[str, str]] = IMAGE_PATTERN,
           text_response_pattern: Union[str, Tuple[str, str]] = TEXT_RESPONSE_PATTERN
           ) -> TrajectorySpans:
    """The spans of ``text`` whose tokens cover ``offsets`` (see ``spans_from_text``)."""
    index = _TokenIndex(offsets)
    calls = [c for c in find_tags(text, tool_call_tag) if c[0] >= prompt_chars]
    images = [(a, b, None) for a, b, _ in _blocks(image_pattern, text)]
    image_starts = [a for a, _, _ in images]
    # a text response wrapping an image (a chat template's tool message holding the crop) is
    # that image's observation, not an error
    texts = [(a, b, body.strip()) for a, b, body in _blocks(text_response_pattern, text)
             if _first_from(images, image_starts, a, b) is None]
    observations = sorted(images + texts, key=lambda o: o[:2])
    obs_starts = [o[0] for o in observations]
    descriptions = [(a, b, text[c:d].strip()) for a, b, c, d in find_tags(text, description_tag)]
    desc_starts = [d[0] for d in descriptions]
    spans = TrajectorySpans(prompt_len=index.span(prompt_chars, prompt_chars).start
                            if prompt_chars else 0)
    n_crops = 0
    for i, (c0, c1, _, _) in enumerate(calls):
        limit = calls[i + 1][0] if i + 1 < len(calls) else len(text)
        obs = _first_from(observations, obs_starts, c1, limit)
        turn = ToolTurn(call=index.span(c0, c1))
        if obs is None:
            turn.error = "no observation followed the call"
        else:
            turn.observation = index.span(obs[0], obs[1])
            if obs[2] is not None:
                turn.error = obs[2] or "tool error"
            else:
                turn.crop_index, n_crops = n_crops, n_crops + 1
                desc = _first_from(descriptions, desc_starts, obs[1], limit)
                if desc is not None:
                    turn.description = index.span(desc[0], desc[1])
                    turn.description_text = desc[2]
        spans.turns.append(turn)
    answers = find_tags(text, answer_tag)
    if answers:
        a, b, c, d = answers[-1]
        spans.answer = index.span(a, b)
        spans.answer_text = text[c:d].strip()
    return spans


def token_turns(spans: Sequence[TrajectorySpans], lengths: Sequence[int],
                pad_to: Optional[int] = None) -> Tensor:
    """``[B, T]`` int64: each trajectory's ``token_turn`` (see ``TrajectorySpans.token_turn``),
    padded with ``-1`` to ``T = pad_to`` or the longest length."""
    if len(lengths) != len(spans):
        raise ValueError(f"token_turns: got {len(spans)} spans and {len(lengths)} lengths; "
                         "they must match")
    T = pad_to if pad_to is not None else max(list(lengths) + [1])
    tt = torch.full((len(spans), T), -1, dtype=torch.int64)
    for b, (sp, n) in enumerate(zip(spans, lengths)):
        tt[b, :min(n, T)] = sp.token_turn(n)[:T]
    return tt


def turn_batch(spans: Sequence[TrajectorySpans], lengths: Sequence[int],
               scores: Sequence[Sequence[float]], pad_to: Optional[int] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Pads per-trajectory scored turns into ``(semantic_scores [B, K], turn_mask [B, K],
    token_turn [B, T])`` for ``mapo_advantages``; ``scores[b]`` has one score per successful
    turn of trajectory ``b``; ``T = pad_to`` or the longest length."""
    B = len(spans)
    if len(scores) != B:
        raise ValueError(f"turn_batch: got {B} spans and {len(scores)} score lists; they must "
                         "match")
    tt = token_turns(spans, lengths, pad_to)
    K = max([s.n_scored_turns for s in spans] + [1])
    sem = torch.zeros(B, K, dtype=torch.float32)
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b, (sp, sc) in enumerate(zip(spans, scores)):
        if len(sc) != sp.n_scored_turns:
            raise ValueError(f"turn_batch: trajectory {b} has {sp.n_scored_turns} scored turns "
                             f"but {len(sc)} scores")
        sem[b, :len(sc)] = torch.tensor(list(sc), dtype=torch.float32)
        mask[b, :len(sc)] = True
    return sem, mask, tt
