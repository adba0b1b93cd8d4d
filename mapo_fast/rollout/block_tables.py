"""The block tables of the sequences in flight, kept as one int32 tensor on the model's device and
updated in place: a step copies to the device only the entries that changed since the sequence's
last step (a new block every ``block_size`` tokens, the last block after a copy-on-write), not
every table (rebuilding a ``[256, 512]`` table from Python lists takes tens of milliseconds)."""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence

import torch

Tensor = torch.Tensor


def _changed_from(old: List[int], new: Sequence[int]) -> int:
    """The first index where ``new`` differs from ``old`` (``len(old)`` when ``new`` extends
    it; one less when only ``old``'s last entry changed; else 0: rewrite the row)."""
    n = len(old)
    if len(new) < n:
        return 0
    if new[:n] == old:
        return n
    if n and new[:n - 1] == old[:-1]:
        return n - 1
    return 0


class DeviceBlockTables:
    """Rows of one ``[rows, width]`` int32 tensor on ``device``, one per sequence seen recently.
    A sequence absent from a step keeps its row (a prompt waiting for its next chunk, a sample
    paused by a tool call) until more than ``max(KEEP_MIN, 2 x step size)`` rows are held;
    then the least recently used absent ones are given back (a sequence that returns after
    that has its whole table copied again). ``stats["block_table_entries_copied"]`` counts the
    entries sent."""

    KEEP_MIN = 64

    def __init__(self, device: torch.device, stats: Dict[str, int]):
        self.device, self.stats = device, stats
        self.table = torch.zeros((0, 0), dtype=torch.int32, device=device)
        self.rows: Dict[Hashable, int] = {}
        self.last_used: Dict[Hashable, int] = {}
        self.mirror: List[List[int]] = []
        self.free: List[int] = []
        self.steps = 0

    def release(self, keys: Sequence[Hashable]) -> None:
        """Gives back the rows of finished sequences (a key never seen is ignored)."""
        for key in keys:
            row = self.rows.pop(key, None)
            if row is not None:
                self.free.append(row)
                del self.last_used[key]

    def _evict(self, present: set, step_size: int) -> None:
        keep = max(self.KEEP_MIN, 2 * step_size)
        if len(self.rows) + step_size <= keep:
            return
        absent = sorted((k for k in self.rows if k not in present), key=self.last_used.get)
        for key in absent[:len(self.rows) + step_size - keep]:
            self.free.append(self.rows.pop(key))
            del self.last_used[key]

    def _grow(self, rows: int, width: int) -> None:
        r0, w0 = self.table.shape
        if rows <= r0 and width <= w0:
            return
        bigger = torch.zeros((max(rows, 2 * r0), max(width, 2 * w0)), dtype=torch.int32,
                             device=self.device)
        bigger[:r0, :w0] = self.table
        self.table = bigger

    def _row(self, key: Hashable) -> int:
        row = self.rows.get(key)
        if row is None:
            row = self.free.pop() if self.free else len(self.mirror)
            if row == len(self.mirror):
                self.mirror.append([])
            self.mirror[row] = []
            self.rows[key] = row
        return row

    def update(self, keys: Sequence[Hashable], tables: Sequence[Sequence[int]]) -> Tensor:
        """The step's block tables ``[len(keys), max table length]`` int32 on the device, row
        ``i`` for ``keys[i]`` (entries past a table's length are never read)."""
        self.steps += 1
        self._evict(set(keys), len(keys))
        width = max((len(t) for t in tables), default=0)
        self._grow(len(self.mirror) + len(keys), width)
        rows, r_idx, c_idx, vals = [], [], [], []
        for key, table in zip(keys, tables):
            row = self._row(key)
            self.last_used[key] = self.steps
            rows.append(row)
            old = self.mirror[row]
            if old == table:
                continue
            k = _changed_from(old, table)
            r_idx += [row] * (len(table) - k)
            c_idx += range(k, len(table))
            vals += table[k:]
            self.mirror[row] = list(table)
        if vals:
            self.table[torch.tensor(r_idx, device=self.device),
                       torch.tensor(c_idx, device=self.device)] = \
                torch.tensor(vals, dtype=torch.int32, device=self.device)
            self.stats["block_table_entries_copied"] = \
                self.stats.get("block_table_entries_copied", 0) + len(vals)
        return self.table.index_select(0, torch.tensor(rows, device=self.device))[:, :width]
