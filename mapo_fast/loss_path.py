"""Which implementation computes the fused linear log-prob / loss.

``"torch"``: the chunked plain-torch path (CPU; float64 anywhere; CUDA without Triton).
On CUDA with Triton, two paths with the same math and outputs:

- ``"fused"``: the Triton kernels that recompute logits tile by tile (``kernels/linear_logprob.py``):
  no workspace beyond the gradients, fp32 atomics (not bitwise reproducible);
- ``"chunked"``: cuBLAS GEMMs per token chunk plus Triton row kernels
  (``kernels/linear_logprob_chunked.py``): a bounded workspace, no atomics (deterministic).

``MAPO_FAST_LOSS_PATH=fused|chunked|auto`` (default ``auto``) picks one; deterministic mode
(``torch.use_deterministic_algorithms(True)`` or ``MAPO_FAST_DETERMINISTIC=1``) always takes
``chunked``. ``auto`` measures: on the first call for a key (device capability, dtype, hidden
size, vocabulary, token-count bucket, flags) it runs the call's own work through both paths
(once to compile, then ``TRIALS`` times each, fresh outputs every time, timed with CUDA
events) and keeps the faster (in memory; also in the JSON file ``MAPO_FAST_LOSS_PATH_CACHE``
names, when set). ``chunked`` is skipped when ``torch.cuda.mem_get_info`` shows less free
memory than twice its workspace. Under ``torch.distributed`` rank 0's choice is broadcast, and
the token-count bucket is left out of the key, so every rank makes the same choices in the
same order (one collective each). The path that ran is reported as the loss metric
``loss_path``.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import _checks as chk

ENV = "MAPO_FAST_LOSS_PATH"
DETERMINISTIC_ENV = "MAPO_FAST_DETERMINISTIC"
CACHE_ENV = "MAPO_FAST_LOSS_PATH_CACHE"
CHOICES = ("auto", "fused", "chunked")
PATHS = ("torch", "fused", "chunked")
#: Timed runs per path after the compiling one.
TRIALS = 3


def requested() -> str:
    """The path asked for by the environment (validated): ``"chunked"`` in deterministic
    mode, else ``MAPO_FAST_LOSS_PATH`` (default ``"auto"``)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in CHOICES:
        chk.fail("loss path", f"environment variable {ENV}", f"must be one of {CHOICES}, got "
                 f"{choice!r}")
    if torch.are_deterministic_algorithms_enabled() or \
            os.environ.get(DETERMINISTIC_ENV, "0") == "1":
        return "chunked"
    return choice


@dataclass(frozen=True)
class PathKey:
    """What a measured choice holds for."""
    capability: str
    dtype: str
    hidden: int
    vocab: int
    tokens: int  # bucket: the next power of two; 0 under torch.distributed
    flags: str

    def __str__(self) -> str:
        return (f"sm{self.capability}/{self.dtype}/H{self.hidden}/V{self.vocab}/"
                f"N{self.tokens}/{self.flags}")


def token_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_key(hidden: torch.Tensor, vocab: int, tokens: int, flags: str) -> PathKey:
    dev = hidden.device
    cap = "".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" \
        else dev.type
    return PathKey(cap, str(hidden.dtype).replace("torch.", ""), int(hidden.shape[-1]),
                   int(vocab), 0 if _distributed() else token_bucket(tokens), flags)


def cuda_event_timer(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes on the current CUDA stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class PathChooser:
    """Measured choices between the fused and chunked paths (see the module doc). ``timer``
    times one call (CUDA events by default; tests pass their own)."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_event_timer,
                 cache_file: Optional[str] = None):
        self.timer = timer
        self.cache_file = cache_file
        self.choices: Dict[str, str] = {}
        #: keys settled in this process (after the broadcast under torch.distributed): a choice
        #: read from the cache file still goes through the broadcast once, so that ranks with
        #: different files agree and every rank takes part in the same collectives
        self.agreed: set = set()
        self.timings: Dict[str, Dict[str, float]] = {}
        if cache_file and os.path.exists(cache_file):
            with open(cache_file) as f:
                self.choices.update({k: v for k, v in json.load(f).items() if v in PATHS})

    def choose(self, key: PathKey, runners: Dict[str, Callable[[], object]],
               chunked_fits: bool = True) -> str:
        """The path for ``key``: cached, or measured now by running each of ``runners``
        (``{"fused": fn, "chunked": fn}``, each doing the call's whole work)."""
        name = str(key)
        if name in self.agreed:
            return self.choices[name]
        if name in self.choices:  # from the cache file: no measurement, still the broadcast
            choice = self.choices[name]
        elif chunked_fits:
            times = {p: self._measure(fn) for p, fn in runners.items()}
            choice = min(times, key=times.get)
            self.timings[name] = times
        else:
            choice = "fused"
        choice = self._broadcast(choice)
        self.choices[name] = choice
        self.agreed.add(name)
        self._save()
        return choice

    def _measure(self, fn: Callable[[], object]) -> float:
        fn()  # compiles (Triton) and warms cuBLAS
        return statistics.median(self.timer(fn) for _ in range(TRIALS))

    @staticmethod
    def _broadcast(choice: str) -> str:
        if not _distributed():
            return choice
        box = [choice]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _save(self) -> None:
        if not self.cache_file or (_distributed() and torch.distributed.get_rank() != 0):
            return
        tmp = self.cache_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.choices, f, indent=1, sort_keys=True)
        os.replace(tmp, self.cache_file)


_CHOOSER: Optional[PathChooser] = None


def chooser() -> PathChooser:
    """The process's chooser (its cache file from ``MAPO_FAST_LOSS_PATH_CACHE``)."""
    global _CHOOSER
    if _CHOOSER is None or _CHOOSER.cache_file != os.environ.get(CACHE_ENV):
        _CHOOSER = PathChooser(cache_file=os.environ.get(CACHE_ENV))
    return _CHOOSER


def chunked_fits(device: torch.device, workspace_bytes: int) -> bool:
    """Whether the chunked path's workspace leaves room on ``device`` (twice its size free)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free >= 2 * workspace_bytes
