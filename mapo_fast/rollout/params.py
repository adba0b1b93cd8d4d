"""The settings of one ``RolloutEngine.generate`` call, validated once: how to sample
(``SamplingParams``), how tool turns run (``ToolParams``), and the engine's scheduling budget
(``SchedulerParams``). ``generate`` keeps its keyword arguments for users and builds these; a bad
value raises ``ValueError`` naming the keyword."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ..trajectory import OBSERVATION_TEMPLATE

FN = "RolloutEngine.generate"
#: Tokens of all sequences in one forward pass (prefill chunks and decode tokens), by default.
MAX_BATCH_TOKENS = 8192
#: Most tokens of one sequence in one forward pass, by default.
PREFILL_CHUNK = 2048
#: Headroom per turn in the KV capacity a call reserves (``RolloutEngine.turn_tokens``) beyond
#: the turn's written tokens and its longest observation, both exact bounds: a safety margin.
TURN_MARGIN_TOKENS = 8
#: The batch sizes (rows) a decode step is padded up to on the static path (one CUDA graph
#: each, captured on first use); a decode step of more rows runs eagerly.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: How decode steps run: ``eager`` (the forward as written), ``static`` (padded to a capture
#: size, on static buffers, without capture: the graph path's bookkeeping on any device),
#: ``graph`` (``static``, captured as one CUDA graph per size and replayed; CUDA only),
#: ``auto`` (``graph`` on CUDA, else ``eager``).
DECODE_MODES = ("auto", "eager", "static", "graph")


def _fail(fn: str, name: str, message: str) -> None:
    raise ValueError(f"{fn}: `{name}` {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_at_least(fn: str, name: str, v: Any, low: int) -> None:
    if not _is_int(v) or v < low:
        _fail(fn, name, f"must be an int >= {low}, got {v!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How each sample draws its tokens.

    Args:
        max_new_tokens: tokens of one assistant turn, at most.
        temperature: 0 is greedy; the recorded log-probs are then those at temperature 1.
        top_k, top_p: the usual truncations (0 and 1.0: none) of what is drawn; the recorded
            log-probs are those of the untruncated tempered softmax (``mapo_fast.policy``).
        seed: sample ``j`` of a call draws from its own generator seeded ``seed + j``.
        stop_token_ids: a turn ends on any of them (None: the tokenizer's EOS).
        stop_strings: a turn also ends when its text comes to contain one (tokens are kept).
        max_trajectory_tokens: model-written tokens of a whole trajectory, at most (None: no
            bound).
        logits_processor: ``(token_ids, logits [V] float32) -> logits`` per sample, or an
            object whose ``batch(token_ids_list, logits [n, V] float32) -> [n, V]`` takes a
            step's rows at once (no Python per sample); applied before sampling, and like the
            truncations it shapes the draw, not the recorded log-probs.
    """
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[Tuple[int, ...]] = None
    stop_strings: Tuple[str, ...] = ()
    max_trajectory_tokens: Optional[int] = None
    logits_processor: Optional[Callable[..., torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.seed is not None and not _is_int(self.seed):
            _fail(FN, "seed", f"must be an int or None, got {self.seed!r}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(FN, name, f"must be a finite number, got {v!r}")
        if not _is_int(self.top_k):
            _fail(FN, "top_k", f"must be an int >= 0, got {self.top_k!r}")
        if self.stop_token_ids is not None and (
                not isinstance(self.stop_token_ids, (tuple, list)) or
                not all(_is_int(t) for t in self.stop_token_ids)):
            _fail(FN, "stop_token_ids", f"must be a list of ints, got {self.stop_token_ids!r}")
        proc = self.logits_processor
        if proc is not None and not callable(proc) and not callable(getattr(proc, "batch", None)):
            _fail(FN, "logits_processor", f"must be callable or have a callable `batch`, got "
                                          f"{type(proc).__name__}")
        _int_at_least(FN, "max_new_tokens", self.max_new_tokens, 1)
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ValueError(f"{FN}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{self.temperature!r}, {self.top_p!r}, {self.top_k!r}")
        if not isinstance(self.stop_strings, (tuple, list)) or not all(
                isinstance(x, str) and x for x in self.stop_strings):
            _fail(FN, "stop_strings", f"must be a list of non-empty strings, got "
                                      f"{self.stop_strings!r}")
        if self.max_trajectory_tokens is not None and (
                not _is_int(self.max_trajectory_tokens) or self.max_trajectory_tokens < 1):
            _fail(FN, "max_trajectory_tokens", f"must be an int >= 1 or None, got "
                                               f"{self.max_trajectory_tokens!r}")

    @property
    def stop_window(self) -> int:
        """Tokens at the end of a turn whose text can hold a stop string: a string of n
        characters spans at most 4n tokens (byte-level BPE)."""
        return 4 * max(map(len, self.stop_strings), default=0) + 4

    def generator(self, sample: int) -> Optional[torch.Generator]:
        """Sample ``sample``'s own generator (None when greedy)."""
        if self.temperature == 0:
            return None
        return torch.Generator().manual_seed((self.seed if self.seed is not None else 0) +
                                             sample)


@dataclass(frozen=True)
class ToolParams:
    """How tool turns run.

    Args:
        runner: a ``ToolRunner`` (None: no tools; every trajectory is one turn).
        max_turns: assistant turns of a trajectory, at most (tool calls close all but the last).
        max_tool_calls: calls per trajectory the runner accepts (``ToolSession.max_calls``).
        max_observation_tokens: tokens of a text observation, at most.
        observation_template: how a result is inserted (``{}``: the crop's image tokens or the
            text).
    """
    runner: Any = None
    max_turns: int = 1
    max_tool_calls: int = 4
    max_observation_tokens: int = 256
    observation_template: str = OBSERVATION_TEMPLATE

    def __post_init__(self) -> None:
        _int_at_least(FN, "max_turns", self.max_turns, 1)
        _int_at_least(FN, "max_tool_calls", self.max_tool_calls, 0)
        _int_at_least(FN, "max_observation_tokens", self.max_observation_tokens, 1)
        if self.runner is not None and not callable(getattr(self.runner, "run", None)):
            _fail(FN, "tools", f"must be a ToolRunner (with .run), got "
                               f"{type(self.runner).__name__}")
        if not isinstance(self.observation_template, str) or (
                self.runner is not None and "{}" not in self.observation_template):
            _fail(FN, "observation_template", f"must contain '{{}}', got "
                                              f"{self.observation_template!r}")

    @property
    def enabled(self) -> bool:
        """Tool calls can close turns (a runner and more than one turn)."""
        return self.runner is not None and self.max_turns > 1


@dataclass(frozen=True)
class SchedulerParams:
    """The engine's per-step budget.

    Args:
        max_batch_tokens: tokens of one forward pass, all sequences together: running
            samples' decode tokens and observation chunks first, then prompt chunks of as many
            waiting prompts as fit (batched prefill).
        prefill_chunk: tokens of one sequence in one forward pass, at most (longer prompts and
            observations are prefilled over several steps).
    """
    max_batch_tokens: int = MAX_BATCH_TOKENS
    prefill_chunk: int = PREFILL_CHUNK

    def __post_init__(self) -> None:
        _int_at_least("RolloutEngine", "prefill_chunk", self.prefill_chunk, 1)
        _int_at_least("RolloutEngine", "max_batch_tokens", self.max_batch_tokens, 1)


@dataclass(frozen=True)
class DecodeParams:
    """How the engine runs decode steps (every sequence of the step one token, no image).

    Args:
        mode: one of ``DECODE_MODES`` (``auto``: CUDA graphs on CUDA, eager elsewhere).
        capture_sizes: increasing positive batch sizes a step is padded up to.
    """
    mode: str = "auto"
    capture_sizes: Tuple[int, ...] = CAPTURE_SIZES

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            _fail("RolloutEngine", "decode_mode", f"must be one of {', '.join(DECODE_MODES)}; "
                                                  f"got {self.mode!r}")
        sizes = self.capture_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (tuple, list)) or \
                not sizes or not all(_is_int(b) and b >= 1 for b in sizes) or \
                any(a >= b for a, b in zip(sizes, sizes[1:])):
            _fail("RolloutEngine", "capture_sizes", f"must be increasing ints >= 1, got "
                                                    f"{sizes!r}")

    def resolve(self, device: torch.device) -> str:
        """The mode on ``device``: ``auto`` resolved; ``graph`` refused off CUDA."""
        if self.mode == "auto":
            return "graph" if device.type == "cuda" else "eager"
        if self.mode == "graph" and device.type != "cuda":
            _fail("RolloutEngine", "decode_mode", f"'graph' needs a CUDA model, got one on "
                                                  f"{device.type} (use 'static' to run the same "
                                                  "padded static-buffer steps without capture)")
        return self.mode
