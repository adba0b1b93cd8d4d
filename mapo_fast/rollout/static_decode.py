"""Decode steps on static buffers, padded up to a capture size: the path CUDA graphs need.

An eager decode step of a small model on a GPU is launch-bound: one kernel per operator, about
a thousand per step, each costing microseconds of host time, far above the step's arithmetic.
A CUDA graph replays a captured step's kernels in one launch, but only on the tensors it was
captured with. So a decode step here runs on buffers that never move: the token ids ``[B]``,
positions ``[3, B]`` (M-RoPE triples; one row for text models), KV slots ``[B]``, context
lengths ``[B]``, query offsets ``[B + 1]`` (one query per row) and block tables ``[B, width]``,
where ``B`` is the largest capture size. A step of ``n`` rows is padded up to the smallest
capture size ``b >= n``: rows ``n..b`` are padding (token 0 at position 0, writing its key and
value to the pool's scratch block, which the block manager never hands out, and attending to
that alone), and only the first ``n`` rows of the logits are returned. ``graph`` mode captures
a graph for every capture size at the first step that needs one, largest first, in one
memory pool, each writing its logits into one shared output buffer ``[B, V]`` (so the sizes
share their intermediates' memory and keep no output of their own), after two warm-up passes
on a side stream (all rows padding), and replays them; ``static`` mode runs the same padded
forward eagerly, so the bookkeeping is exercised, and compared token for token with eager, on
any device. A step that needs wider block tables than the buffers widens them (doubling) and
drops the graphs and their pool; they are captured again at the next step.

What a graph reads: the model's parameters and the KV pool where they were at capture, so
weights updated in place (an optimizer step, ``load_state_dict``) are seen by the next replay;
parameters replaced by new tensors (moving the model to another device or dtype) need a new
engine. Under ``torch.autocast`` (a trainer's mixed precision) the graphs are captured with
autocast's weight cache off (``capture_context``): the cast of each live weight is recorded
in the graph, instead of the address of a cached copy that autocast frees when its block
exits. Graphs are tied to the autocast setting (enabled, dtype) they were captured under; a
step under another one drops them and captures again.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
#: first width of the block-table buffer (entries per row); doubled as steps need
MIN_WIDTH = 16


class StaticDecode:
    """The static-buffer decode path of a ``ModelRunner``.

    Args:
        forward: ``(ids [b] int64, positions, slots [b], tables [b, w] int32, lens [b] int32,
            cu_q [b + 1] int32) -> (logits [b, V] float32, attention path)``: the runner's
            forward pass over a decode batch (positions ``[3, 1, b]`` or ``[1, b]``).
        device: the model's device; ``mrope``: positions are M-RoPE triples.
        scratch_block: the pool's block that padding rows write to (never allocated).
        block_size: tokens per block; ``sizes``: the capture sizes (increasing).
        capture: capture CUDA graphs (``graph`` mode) or run eagerly (``static``).
        stats: counters: ``decode_static_passes``, ``decode_graph_replays``,
            ``decode_graphs_captured``, ``decode_padding_rows``.
    """

    def __init__(self, forward: Callable[..., Tuple[Tensor, str]], device: torch.device,
                 mrope: bool, scratch_block: int, block_size: int, sizes: Sequence[int],
                 capture: bool, stats: Dict[str, int]):
        self.forward, self.device, self.mrope = forward, device, mrope
        self.sizes, self.capture, self.stats = tuple(sizes), capture, stats
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        B = self.sizes[-1]
        kw = dict(device=device)
        self.ids = torch.zeros(B, dtype=torch.int64, **kw)
        self.pos = torch.zeros(3, B, dtype=torch.int64, **kw)
        self.slots = torch.full((B,), self.scratch_slot, dtype=torch.int64, **kw)
        self.lens = torch.ones(B, dtype=torch.int32, **kw)
        self.cu = torch.arange(B + 1, dtype=torch.int32, **kw)
        self.tables = torch.full((B, MIN_WIDTH), scratch_block, dtype=torch.int32, **kw)
        self.real = 0  # rows [real, B) hold padding
        self.graphs: Dict[int, Tuple[Any, str]] = {}  # size -> (graph, attention path)
        self.pool: Any = None
        self.logits: Optional[Tensor] = None  # [B, V] float32: every graph's output
        self.captured_under: Optional[Tuple[bool, torch.dtype]] = None  # autocast setting

    def bucket(self, rows: int) -> Optional[int]:
        """The smallest capture size holding ``rows`` (None: more than the largest)."""
        return next((b for b in self.sizes if b >= rows), None)

    def run(self, ids: List[int], positions: List[Tuple[int, int, int]], slots: List[int],
            lens: List[int], tables: Tensor) -> Tuple[Tensor, str]:
        """One decode step of ``n = len(ids)`` rows (``n`` fits a capture size): ``tables``
        ``[n, w]`` int32 on the device. Returns the logits ``[n, V]`` float32 (a tensor of
        its own) and the attention path."""
        n, b = len(ids), self.bucket(len(ids))
        if tables.shape[1] > self.tables.shape[1]:
            self._widen(tables.shape[1])
        if self.capture and (not self.graphs or self.captured_under != self.autocast_setting()):
            self._capture_all()
        self._fill(ids, positions, slots, lens, tables)
        self.stats["decode_padding_rows"] = self.stats.get("decode_padding_rows", 0) + b - n
        if not self.capture:
            self.stats["decode_static_passes"] = self.stats.get("decode_static_passes", 0) + 1
            logits, path = self.forward(*self._inputs(b))
            return logits[:n], path
        graph, path = self.graphs[b]
        graph.replay()
        self.stats["decode_graph_replays"] = self.stats.get("decode_graph_replays", 0) + 1
        return self.logits[:n].clone(), path

    def autocast_setting(self) -> Tuple[bool, torch.dtype]:
        """``(enabled, dtype)`` of autocast on the model's device type, as the caller set it."""
        kind = self.device.type
        return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)

    def capture_context(self):
        """The caller's autocast setting with its weight cache off: under it a forward casts
        the live weights itself (what a captured graph must replay), never reading a cached
        copy."""
        enabled, dtype = self.autocast_setting()
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled,
                              cache_enabled=False)

    def _inputs(self, b: int) -> tuple:
        pos = self.pos[:, None, :b] if self.mrope else self.pos[0, None, :b]
        return (self.ids[:b], pos, self.slots[:b], self.tables[:b], self.lens[:b],
                self.cu[:b + 1])

    def _fill(self, ids: List[int], positions: List[Tuple[int, int, int]], slots: List[int],
              lens: List[int], tables: Tensor) -> None:
        """The step's rows into the buffers (one host-to-device copy of the scalars), and the
        rows the previous step used beyond them back to padding."""
        n = len(ids)
        host = torch.tensor([ids, *zip(*positions), slots, lens], dtype=torch.int64)
        dev = host.to(self.device, non_blocking=True)
        self._pad(n)
        self.ids[:n].copy_(dev[0])
        self.pos[:, :n].copy_(dev[1:4])
        self.slots[:n].copy_(dev[4])
        self.lens[:n].copy_(dev[5])
        self.tables[:n, :tables.shape[1]].copy_(tables)
        self.real = n

    def _pad(self, start: int) -> None:
        """Rows ``[start, real)`` back to padding."""
        if start < self.real:
            rows = slice(start, self.real)
            self.ids[rows] = 0
            self.pos[:, rows] = 0
            self.slots[rows] = self.scratch_slot
            self.lens[rows] = 1
            self.tables[rows, 0] = self.scratch_block
        self.real = min(self.real, start)

    def _widen(self, width: int) -> None:
        """Block tables of at least ``width`` entries per row; captured graphs read the old
        buffer, so they are dropped."""
        wider = torch.full((self.tables.shape[0], max(width, 2 * self.tables.shape[1])),
                           self.scratch_block, dtype=torch.int32, device=self.device)
        wider[:, :self.tables.shape[1]] = self.tables
        self.tables = wider
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forgets every graph and their memory pool (captured again at the next step)."""
        self.graphs.clear()
        self.pool = None
        self.captured_under = None

    def _capture_all(self) -> None:
        """A graph for every capture size, largest first (the shared pool is sized by the
        first), under the caller's autocast setting with the weight cache off."""
        self.drop_graphs()
        self._pad(0)
        setting = self.autocast_setting()
        with self.capture_context():
            for b in sorted(self.sizes, reverse=True):
                self._capture(b)
        self.captured_under = setting

    def _capture(self, b: int) -> None:
        """Captures the forward of ``b`` rows (all padding: the warm-up passes write only to
        the scratch block), its logits copied into the shared output buffer, after two
        warm-up passes on a side stream (kernels compiled, the allocator's pool settled)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                logits, _ = self.forward(*self._inputs(b))
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.logits is None or self.logits.shape[1] != logits.shape[1]:
            self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=torch.float32,
                                      device=self.device)
        del logits
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, path = self.forward(*self._inputs(b))
            self.logits[:b].copy_(logits)
        del logits  # its memory stays the pool's, reused by the next (smaller) capture
        self.pool = graph.pool()
        self.graphs[b] = (graph, path)
        self.stats["decode_graphs_captured"] = self.stats.get("decode_graphs_captured", 0) + 1
