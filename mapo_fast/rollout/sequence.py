"""Sequences of the engine: a prompt waiting for (or in) prefill, and the samples forked from it.

A sequence holds its tokens, the image inserts among them (vision-language models), its M-RoPE
positions, a ``Status`` and a computed-token counter: its first ``num_computed`` tokens have
their keys and values in the paged cache; the rest (a prompt's unprefilled part, an observation,
the newest sampled token, or what a preemption evicted) go through the model in the next steps.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..trajectory import Span, ToolTurn, Trajectory, TrajectorySpans
from .multimodal import ImageInsert, VisionAdapter, image_key, render_chat
from .params import FN

Tensor = torch.Tensor
_SEQ_IDS = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"      # a prompt not yet fully prefilled
    RUNNING = "running"      # holds blocks; decodes (or prefills an observation)
    PREEMPTED = "preempted"  # its blocks were taken back; resumed when the pool has room
    FINISHED = "finished"    # done (a prompt: forked into its group)


@dataclass(eq=False)
class Seq:
    """Tokens and cache state shared by prompts and samples."""
    tokens: List[int]
    images: List[ImageInsert] = field(default_factory=list)
    positions: Optional[List[tuple]] = None  # M-RoPE (t, h, w) per token (vision-language)
    next_pos: int = 0                        # M-RoPE position of the next token
    status: Status = Status.WAITING          # written by the scheduler only
    sid: int = -1                            # block-manager sequence id while it holds blocks
    num_computed: int = 0                    # leading tokens whose KV is in the cache (scheduler)
    request: Any = None                      # the generate call's settings (engine.Request)
    seq_id: int = field(default_factory=lambda: next(_SEQ_IDS))  # unique: block-table rows

    @property
    def num_pending(self) -> int:
        """Tokens still to go through the model."""
        return len(self.tokens) - self.num_computed

    def keys(self, start: int = 0, end: Optional[int] = None) -> List[int]:
        """The prefix index's view of ``tokens[start:end]``: image-pad tokens are replaced by
        keys of their image's content and offset, so two images never share cached KV."""
        end = len(self.tokens) if end is None else end
        keys = self.tokens[start:end]
        for im in self.images:
            for j in range(max(start, im.start), min(end, im.end)):
                keys[j - start] = -1 - ((im.key * 1000003 + j - im.start) & (2 ** 62 - 1))
        return keys


@dataclass(eq=False)
class PromptSeq(Seq):
    """An encoded prompt: forked into ``group_size`` samples once prefilled."""
    index: int = 0                                           # its place in ``prompts``
    raw_images: List[Tensor] = field(default_factory=list)   # uint8 originals
    patches: List[tuple] = field(default_factory=list)       # (pixel_values, grid) per image
    ctx: Any = None                                          # its ToolContext


@dataclass(eq=False)
class Sample(Seq):
    """One trajectory being generated."""
    index: int = 0                 # trajectory index in the call's output
    prompt_len: int = 0
    logprobs: List[float] = field(default_factory=list)  # aligned with tokens[prompt_len:]
    loss_mask: List[int] = field(default_factory=list)   # likewise
    generator: Optional[torch.Generator] = None
    new_tokens: int = 0            # generated tokens in this turn
    generated: int = 0             # generated tokens in the whole trajectory
    turn_start: int = 0            # first token of the current assistant turn
    turns: List[ToolTurn] = field(default_factory=list)
    session: Any = None            # its ToolSession
    ctx: Any = None                # its prompt's ToolContext
    stats: Dict[str, int] = field(default_factory=dict)
    crops: List[Tensor] = field(default_factory=list)
    patches: List[tuple] = field(default_factory=list)   # (pixel_values, grid) per image
    tool_text: Optional[str] = None  # the turn's text when it closed a tool call this step

    @classmethod
    def fork(cls, prompt: PromptSeq, index: int, **kw: Any) -> "Sample":
        """A sample of ``prompt`` (its blocks are forked by the scheduler)."""
        n = len(prompt.tokens)
        return cls(tokens=list(prompt.tokens), images=list(prompt.images),
                   positions=None if prompt.positions is None else list(prompt.positions),
                   next_pos=prompt.next_pos, num_computed=n,
                   index=index, prompt_len=n, turn_start=n, ctx=prompt.ctx,
                   request=prompt.request,
                   patches=list(prompt.patches),
                   stats={"tool_calls": 0, "tool_errors": 0, "prefill_tokens": 0,
                          "decode_tokens": 0}, **kw)

    def append(self, tokens: List[int], logprob: Optional[float] = None,
               positions: Optional[List[tuple]] = None, next_pos: Optional[int] = None) -> None:
        """Appends one sampled token (``logprob`` given, loss mask 1) or observation tokens
        (log-prob 0, loss mask 0). The one place positions advance: a sampled token takes the
        next position; an observation takes ``positions`` / ``next_pos`` (M-RoPE: its image's
        grid positions, from ``VisionAdapter.positions``), else one position per token."""
        self.tokens += tokens
        sampled = logprob is not None
        self.logprobs += [logprob] if sampled else [0.0] * len(tokens)
        self.loss_mask += [int(sampled)] * len(tokens)
        if self.positions is not None:
            if positions is None:
                positions = [(self.next_pos + i,) * 3 for i in range(len(tokens))]
                next_pos = self.next_pos + len(tokens)
            self.positions += positions
            self.next_pos = next_pos
        else:
            self.next_pos += len(tokens)

    def trajectory(self, tokenizer: Any, group_size: int) -> Trajectory:
        text = tokenizer.decode(self.tokens[self.prompt_len:]) if tokenizer is not None else ""
        spans = TrajectorySpans(turns=self.turns, prompt_len=self.prompt_len,
                                answer=Span(self.turn_start, len(self.tokens)))
        n = self.prompt_len
        return Trajectory(token_ids=list(self.tokens), logprobs=[0.0] * n + self.logprobs,
                          loss_mask=[0] * n + self.loss_mask, spans=spans, crops=self.crops,
                          stats=dict(self.stats, new_tokens=sum(self.loss_mask)),
                          group_id=self.index // group_size, response_text=text,
                          vision_inputs=self.patches)


def encode_prompt(prompt: Any, i: int, tokenizer: Any, vision: Optional[VisionAdapter],
                  vocab_size: int) -> PromptSeq:
    """``prompts[i]`` (a string, token ids, or a chat message list) as a ``PromptSeq`` with its
    images' vision inputs; ``ValueError`` naming it when it is malformed."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise ValueError(f"{FN}: `prompts[{i}]` is text but the engine has no tokenizer")
        if isinstance(prompt, str):
            toks = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if not toks:
                raise ValueError(f"{FN}: `prompts[{i}]` is empty (no tokens)")
            return PromptSeq(tokens=toks, index=i)
        toks, ims = render_chat(prompt, tokenizer, vision, where=f"prompts[{i}]")
        return PromptSeq(tokens=toks, index=i, raw_images=ims)
    if not isinstance(prompt, (list, tuple, torch.Tensor)) or not all(
            isinstance(t, int) and not isinstance(t, bool) or
            isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point()
            for t in prompt):
        raise ValueError(f"{FN}: `prompts[{i}]` must be a string, a list of int token ids "
                         f"or a chat message list, got {type(prompt).__name__}")
    toks = [int(t) for t in prompt]
    if not toks:
        raise ValueError(f"{FN}: `prompts[{i}]` is empty")
    bad = next((t for t in toks if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{FN}: `prompts[{i}]` holds token id {bad}, outside the model's "
                         f"vocabulary [0, {vocab_size})")
    return PromptSeq(tokens=toks, index=i)


def attach_images(p: PromptSeq, vision: VisionAdapter, stats: Dict[str, int]) -> None:
    """Vision features of the prompt's images (one vision-tower pass) and its M-RoPE
    positions; the image-pad runs must match the images."""
    i = p.index
    pixel_values, grids = vision.full_patches(p.raw_images)
    feats = vision.encode_patches(pixel_values, grids, stats)
    try:
        p.positions, p.next_pos = vision.positions(p.tokens, [g for _, g in feats], 0)
    except ValueError:
        raise ValueError(f"{FN}: `prompts[{i}]` has image-pad tokens but only {len(feats)} "
                         "image(s)") from None
    pad = vision.image_token_id
    runs = [k for k, t in enumerate(p.tokens)
            if t == pad and (k == 0 or p.tokens[k - 1] != pad)]
    if len(runs) != len(feats):
        raise ValueError(f"{FN}: `prompts[{i}]` has {len(runs)} image placeholder(s) for "
                         f"{len(feats)} image(s)")
    p.images = [ImageInsert(k, f, image_key(im)) for k, (f, _), im in zip(runs, feats,
                                                                         p.raw_images)]
    p.patches = vision.split_patches(pixel_values, grids)
