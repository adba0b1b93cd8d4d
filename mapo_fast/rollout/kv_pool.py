"""The engine's KV pool: how many blocks it holds, and its memory.

Its size is, in this order of precedence, ``num_blocks``, the blocks ``memory_budget_mb`` holds,
or a fraction (``memory_fraction``) of the memory the device has free when the engine is built:
on CUDA ``torch.cuda.mem_get_info``'s free bytes, on CPU the kernel's ``MemAvailable`` (as
``gpu_memory_utilization`` sizes the pool from what is left in vLLM and nano-vllm; here the
fraction is of the free memory, after the model is loaded).

The pool must read as zeros where nothing was written: attention masks the padding of a block
with a weight of 0, and 0 times a NaN left in memory is NaN. On CPU the pool is one anonymous
memory map, which the kernel hands out as zero pages and commits only when a block is first
written, so a large pool costs resident memory only for the blocks rollouts use. On other
devices it is ``torch.zeros``.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any, List, Optional, Tuple

import torch

#: Fraction of the device's free memory the KV pool takes when neither ``num_blocks`` nor
#: ``memory_budget_mb`` is given.
MEMORY_FRACTION = 0.5

FN = "RolloutEngine"


def free_memory_bytes(device: torch.device) -> int:
    """Bytes the device has free now: CUDA's free memory, or on CPU ``MemAvailable`` from
    ``/proc/meminfo`` (the available physical pages where that file is missing).

    Raises:
        ValueError: another device type (give ``memory_budget_mb`` or ``num_blocks`` there).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise ValueError(f"{FN}: cannot read the free memory of a `{device.type}` device; give "
                     "`memory_budget_mb` or `num_blocks`")


def _positive_number(name: str, v: Any, high: Optional[float] = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            v <= 0 or (high is not None and v > high):
        bound = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ValueError(f"{FN}: `{name}` must be a finite number {bound}, got {v!r}")
    return float(v)


def pool_blocks(num_blocks: Any, memory_budget_mb: Any, memory_fraction: Any, block_bytes: int,
                device: torch.device) -> int:
    """Blocks in the pool: ``num_blocks``; else ``memory_budget_mb`` MiB; else
    ``memory_fraction`` of ``free_memory_bytes(device)``. Each argument is checked when it is
    the one used (``memory_fraction`` always).

    Raises:
        ValueError: a bad value, named; or a size that holds no block.
    """
    fraction = _positive_number("memory_fraction", memory_fraction, 1.0)
    if num_blocks is not None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"{FN}: `num_blocks` must be an int >= 1, got {num_blocks!r}")
        return _fits(num_blocks, block_bytes, device, f"`num_blocks` {num_blocks}")
    if memory_budget_mb is not None:
        nbytes, source = _positive_number("memory_budget_mb", memory_budget_mb) * 2 ** 20, \
            f"`memory_budget_mb` {memory_budget_mb!r}"
    else:
        free = free_memory_bytes(device)
        nbytes, source = fraction * free, \
            f"`memory_fraction` {fraction:g} of the {free / 2 ** 20:.1f} MiB free on {device}"
    blocks = int(nbytes) // block_bytes
    if blocks < 1:
        raise ValueError(f"{FN}: {source} holds no KV block (one block takes "
                         f"{block_bytes / 2 ** 20:.4g} MiB)")
    return _fits(blocks, block_bytes, device, source)


def _fits(blocks: int, block_bytes: int, device: torch.device, source: str) -> int:
    """``blocks``, after checking that a CPU pool of them (and the padding block) fits this
    machine's physical memory: asked before the map is made, which the kernel would refuse."""
    if device.type == "cpu":
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        need = (blocks + 1) * block_bytes
        if need > have:
            raise ValueError(f"{FN}: {source} asks for a {need / 2 ** 20:.0f} MiB KV pool, more "
                             f"than this machine's {have / 2 ** 20:.0f} MiB of memory")
    return blocks


def allocate(layers: int, shape: Tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Keys and values of every layer, each ``shape`` in ``dtype`` on ``device``, all zeros
    (see the module's note: on CPU committed page by page as blocks are written)."""
    if device.type != "cpu":
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        return k, [torch.zeros_like(k[0]) for _ in range(layers)]
    numel = math.prod(shape)
    size = numel * torch.empty((), dtype=dtype).element_size()
    # one map for the whole pool; every tensor is a view of it, and keeps it alive
    whole = torch.frombuffer(mmap.mmap(-1, max(1, 2 * layers * size)), dtype=torch.uint8)
    views = [whole[i * size:(i + 1) * size].view(dtype).view(shape) for i in range(2 * layers)]
    return views[:layers], views[layers:]
