"""Sequences of the engine, and the records its parts pass each other: a prompt waiting for (or
in) prefill, the samples forked from it, one step's work (``Batch``), what a sampled token did
(``TurnEvent``) and a tool call's observation (``Observation``).

A sequence holds its tokens, the image inserts among them (vision-language models), its M-RoPE
positions, a ``Status`` and a computed-token counter: its first ``num_computed`` tokens have
their keys and values in the paged cache; the rest (a prompt's unprefilled part, an observation,
the newest sampled token, or what a preemption evicted) go through the model in the next steps.
Only the scheduler changes a sequence (its status and counters directly, its tokens through
``Sample.append_sampled`` and ``Sample.observe``, the one place positions advance).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

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


class TurnEvent(enum.Enum):
    """What a sampled token did to its sample (``ToolTurns.decide``); the scheduler applies
    it (``Scheduler.postprocess``)."""
    CONTINUE = "continue"    # the turn goes on
    TOOL_CALL = "tool_call"  # the turn closed a tool call: its observation follows
    FINISHED = "finished"    # the trajectory is done (a stop token or string, the turn's limit)
    TRUNCATED = "truncated"  # the trajectory reached ``max_trajectory_tokens``


@dataclass(eq=False)
class Seq:
    """Tokens and cache state shared by prompts and samples."""
    tokens: List[int]
    images: List[ImageInsert] = field(default_factory=list)
    positions: Optional[List[tuple]] = None  # M-RoPE (t, h, w) per token (vision-language)
    next_pos: int = 0                        # M-RoPE position of the next token
    status: Status = Status.WAITING          # written by the scheduler only
    block_seq: int = -1                      # its id in the block manager while it holds blocks
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
    turn_tokens: int = 0           # model-written tokens of the current turn
    generated: int = 0             # model-written tokens of the whole trajectory
    turn_start: int = 0            # first token of the current assistant turn
    turns: List[ToolTurn] = field(default_factory=list)
    session: Any = None            # its ToolSession
    ctx: Any = None                # its prompt's ToolContext
    stats: Dict[str, int] = field(default_factory=dict)
    crops: List[Tensor] = field(default_factory=list)
    patches: List[tuple] = field(default_factory=list)   # (pixel_values, grid) per image

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

    def append_sampled(self, token: int, logprob: float) -> None:
        """Appends a token the model wrote (loss mask 1) and counts it."""
        self.append([token], logprob)
        self.turn_tokens += 1
        self.generated += 1

    def observe(self, obs: "Observation") -> None:
        """Appends a tool call's observation (loss mask 0; pending, to be prefilled): its
        tokens and positions, its image and crop, its turn record; the next turn starts."""
        self.stats["tool_calls"] += 1
        self.stats["tool_errors"] += int(obs.error)
        if obs.image is not None:
            self.images.append(obs.image)
            self.crops.append(obs.crop)
            self.patches.append(obs.patches)
            obs.turn.crop_index = len(self.crops) - 1
        self.turns.append(obs.turn)
        self.append(obs.tokens, positions=obs.positions, next_pos=obs.next_pos)
        self.turn_start = len(self.tokens)
        self.turn_tokens = 0

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

    def trajectory(self, tokenizer: Any, group_size: int,
                   turns: Optional[List[ToolTurn]] = None) -> Trajectory:
        """The finished sample as a ``Trajectory`` (``turns``: its turn records, with their
        description spans, ``ToolTurns.described``; default its own)."""
        text = tokenizer.decode(self.tokens[self.prompt_len:]) if tokenizer is not None else ""
        spans = TrajectorySpans(turns=self.turns if turns is None else turns,
                                prompt_len=self.prompt_len,
                                answer=Span(self.turn_start, len(self.tokens)))
        n = self.prompt_len
        return Trajectory(token_ids=list(self.tokens), logprobs=[0.0] * n + self.logprobs,
                          loss_mask=[0] * n + self.loss_mask, spans=spans, crops=self.crops,
                          stats=dict(self.stats, new_tokens=sum(self.loss_mask)),
                          group_id=self.index // group_size, response_text=text,
                          vision_inputs=self.patches)


@dataclass
class Batch:
    """One step's work: ``chunks`` ``(seq, start, end)`` (tokens ``[start, end)`` of ``seq`` go
    through the model; its context is its first ``end`` tokens), the KV ``slots`` of those
    tokens in order, each chunk's block ``tables``, the ``copies`` ``(src, dst)`` of shared
    blocks to make before the forward writes, and ``to_sample``: the samples that draw their
    next token from this step's logits, with the row (chunk) it is read from (a sample whose
    chunk reaches its newest token, and each sample forked from a prompt whose prefill this
    step completes, reading the prompt's row)."""
    chunks: List[Tuple[Seq, int, int]] = field(default_factory=list)
    slots: List[int] = field(default_factory=list)
    tables: List[List[int]] = field(default_factory=list)
    copies: List[Tuple[int, int]] = field(default_factory=list)
    to_sample: List[Tuple["Sample", int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(b - a for _, a, b in self.chunks)


@dataclass
class Observation:
    """A tool call's observation, as the tool turns build it (``ToolTurns.run``) and
    ``Sample.observe`` appends it: its ``tokens`` (and M-RoPE ``positions`` / ``next_pos``,
    None for one position per token), the crop's ``image`` insert, ``crop`` and ``patches``
    (None for a text observation), the ``turn`` record (call and observation spans, box,
    error) and whether the call failed (``error``)."""
    tokens: List[int]
    turn: ToolTurn
    error: bool
    positions: Optional[List[tuple]] = None
    next_pos: Optional[int] = None
    image: Optional[ImageInsert] = None
    crop: Optional[Tensor] = None
    patches: Optional[tuple] = None


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
