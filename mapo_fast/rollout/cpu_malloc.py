"""glibc's malloc settings for rollouts on CPU (``RolloutEngine(cpu_malloc=...)``).

A CPU step allocates and frees tensors of hundreds of KiB to tens of MiB in every layer
(activations, the ``[n, V]`` logits, the sampler's copies). glibc's malloc serves an
allocation above its mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) with
fresh pages from the kernel and unmaps them on free, and it gives the top of its heap back to
the kernel beyond its trim threshold. Such a tensor then costs a page fault and the zeroing of
each of its pages, again at every step. vLLM's CPU worker avoids it by preloading tcmalloc;
a library running in its user's process cannot preload anything, so ``tune`` raises both
thresholds once per process (``mallopt``): freed blocks stay in the heap and are reused.

Measured on two cores (``bench/bench_rollout.py``'s multi-turn workload, 27.7M-parameter
Qwen2, 32 samples): 740,268 and 442,530 minor page faults in two runs with glibc's defaults,
1.47 s and 1.05 s of system time; tuned, 120,443 in the first run (the heap growing to its
size) and 17 in the second, 0.23 s and 0.10 s. The cost: memory the process frees stays with
it (up to ``TRIM_THRESHOLD`` beyond what it uses) instead of going back to the system.

Nothing changes where glibc's malloc is not the allocator (another libc, or tcmalloc /
jemalloc / mimalloc preloaded) or where the user set its settings (``MALLOC_*_`` variables,
``glibc.malloc`` tunables): ``MallocStatus`` says which.
"""

from __future__ import annotations

import ctypes
import enum
import os
import platform
import threading
from typing import Dict, Optional, Tuple

from .. import _checks as chk

#: what ``RolloutEngine(cpu_malloc=...)`` takes: ``auto`` (``tune``, for a model on CPU) or
#: ``keep`` (the process's allocator left as it is)
CPU_MALLOC = ("auto", "keep")
#: allocations up to this many bytes come from the heap (glibc's mallopt M_MMAP_THRESHOLD);
#: where glibc refuses it, ``FALLBACK_MMAP_THRESHOLD``, the most every glibc takes
MMAP_THRESHOLD = 1 << 30
FALLBACK_MMAP_THRESHOLD = 32 << 20
#: free bytes kept at the top of the heap before it is trimmed (mallopt M_TRIM_THRESHOLD)
TRIM_THRESHOLD = 1 << 30
#: mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: environment variables by which a user sets glibc's malloc (the tunables' older names)
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")
#: allocators that replace glibc's malloc when loaded, by library name
OTHER_ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")


class MallocStatus(enum.Enum):
    """What ``tune`` did (once per process)."""
    TUNED = "tuned"                      #: both thresholds raised
    KEPT = "kept"                        #: ``cpu_malloc="keep"``, or a model not on CPU
    USER_SETTINGS = "user settings"      #: the user set glibc's malloc: left alone
    OTHER_ALLOCATOR = "other allocator"  #: tcmalloc / jemalloc / mimalloc loaded
    NOT_GLIBC = "not glibc"              #: another C library
    REFUSED = "refused"                  #: glibc refused the settings


_lock = threading.Lock()
#: the process's outcome and the mmap threshold set (None until ``tune`` has run)
_done: Optional[Tuple[MallocStatus, int]] = None


def _loaded_allocator() -> Optional[str]:
    """The name of a replacement allocator mapped into this process, if any (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return None
    return next((a for a in OTHER_ALLOCATORS if a in maps), None)


def _check() -> Optional[MallocStatus]:
    """Why glibc's malloc must be left alone here, or None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return MallocStatus.NOT_GLIBC
    if any(v in os.environ for v in USER_VARIABLES) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return MallocStatus.USER_SETTINGS
    if _loaded_allocator() is not None:
        return MallocStatus.OTHER_ALLOCATOR
    return None


def tune() -> Tuple[MallocStatus, int]:
    """Raises glibc's mmap and trim thresholds, once per process (later calls return the first
    outcome). Returns the status and the mmap threshold set (0 unless ``TUNED``)."""
    global _done
    with _lock:
        if _done is None:
            _done = _apply()
        return _done


def _apply() -> Tuple[MallocStatus, int]:
    why = _check()
    if why is not None:
        return why, 0
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in (MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD):
        if mallopt(M_MMAP_THRESHOLD, threshold) == 1:  # mallopt returns 1 on success
            break
    else:
        return MallocStatus.REFUSED, 0
    if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return MallocStatus.REFUSED, 0
    return MallocStatus.TUNED, threshold


def environment() -> Dict[str, str]:
    """The environment variables that give another process the settings ``tune`` gave this
    one (glibc reads them at start; empty unless this process was ``TUNED``): for a side by
    side run of another engine in its own process under the same allocator settings."""
    status, threshold = _done if _done is not None else (None, 0)
    if status is not MallocStatus.TUNED:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(threshold),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def resolve(choice: str, device_type: str) -> MallocStatus:
    """``choice`` applied for a model on ``device_type``: ``tune``'s status for ``auto`` on
    CPU, else ``KEPT``. ``ValueError`` naming ``cpu_malloc`` for an unknown choice."""
    chk.choice("RolloutEngine", "cpu_malloc", choice, CPU_MALLOC)
    if choice == "keep" or device_type != "cpu":
        return MallocStatus.KEPT
    return tune()[0]
