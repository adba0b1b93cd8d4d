"""Python model of the C++ block manager (``csrc/block_manager.cpp``): the same pool,
reference counts, free queue, chained block hashes and prefix index, operation for operation.
Tests compare the two on random operation sequences; the benchmark shows what C++ buys.
Errors: ``ValueError`` for bad sizes or positions, ``IndexError`` for unknown block ids,
``RuntimeError`` when blocks run out or a block is freed twice (as the C++ raises them)."""

from __future__ import annotations

from collections import deque
from typing import Dict, List, Sequence, Tuple

NO_HASH = 0
MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def block_hash(prev: int, tokens: Sequence[int], begin: int, end: int) -> int:
    """Chained hash of the full block ``tokens[begin:end]`` after a block hashed ``prev``."""
    h = _mix64(prev ^ 0x5BD1E9955BD1E995)
    for t in tokens[begin:end]:
        h = _mix64(h ^ (t & MASK))
    return 1 if h == NO_HASH else h


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be > 0")
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash = [NO_HASH] * num_blocks
        self._free = deque(range(num_blocks))
        self._index: Dict[int, int] = {}
        self._seqs: Dict[int, list] = {}   # id -> [table, tokens, hash of last full block]
        self._next_id = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, b: int) -> int:
        return self._ref[self._check(b)]

    def blocks_for(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= self.num_free

    def lookup(self, h: int) -> int:
        return self._index.get(h, -1)

    def prompt_hashes(self, tokens: Sequence[int]) -> List[int]:
        bs, hashes, h = self.block_size, [], NO_HASH
        for i in range(0, len(tokens) - bs + 1, bs):
            h = block_hash(h, tokens, i, i + bs)
            hashes.append(h)
        return hashes

    def add_cost(self, tokens: Sequence[int]) -> int:
        hits = revived = 0
        for hh in self.prompt_hashes(tokens):
            b = self.lookup(hh)
            if b < 0:
                break
            hits += 1
            revived += self._ref[b] == 0
        return self.blocks_for(len(tokens)) - hits + revived

    def append_cost(self, ids: Sequence[int], counts: Sequence[int]) -> int:
        if len(ids) != len(counts):
            raise ValueError(f"append_cost: {len(ids)} ids, {len(counts)} counts")
        total: Dict[int, int] = {}
        for sid, c in zip(ids, counts):
            if c < 0:
                raise ValueError(f"append_cost: negative count {c}")
            self._seq(sid)
            total[sid] = total.get(sid, 0) + c
        need = 0
        for sid, c in total.items():
            if c == 0:
                continue
            table, toks, _ = self._seqs[sid]
            n, k = len(toks), len(toks) // self.block_size
            need += max(0, self.blocks_for(n + c) - len(table))
            need += k < len(table) and self._ref[table[k]] > 1
        return need

    def allocate_prompt(self, tokens: Sequence[int]) -> Tuple[List[int], int]:
        bs = self.block_size
        need = self.blocks_for(len(tokens))
        hashes = self.prompt_hashes(tokens)
        cost = self.add_cost(tokens)
        if cost > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {cost}, free {self.num_free}")
        table, cached, hitting = [], 0, True
        for k in range(need):
            b = -1
            if hitting and k < len(hashes):
                b = self.lookup(hashes[k])
                if b >= 0:
                    if self._ref[b] == 0:
                        self._free.remove(b)
                    self._ref[b] += 1
                    cached += bs
                else:
                    hitting = False
            if b < 0:
                b = self._pop_free()
                if k < len(hashes):
                    self._register(b, hashes[k])
            table.append(b)
        return table, cached

    def fork(self, table: Sequence[int]) -> List[int]:
        for b in table:
            self._ref[self._check(b)] += 1
        return list(table)

    def append(self, table: Sequence[int], pos: int) -> Tuple[List[int], int, int]:
        table = list(table)
        src = dst = -1
        k = pos // self.block_size
        if k > len(table):
            raise ValueError(f"append: position {pos} skips a block of the table")
        if k == len(table):
            if not self._free:
                raise RuntimeError("out of KV blocks: need 1, free 0")
            table.append(self._pop_free())
        else:
            b = self._check(table[k])
            if self._ref[b] > 1:
                if not self._free:
                    raise RuntimeError("out of KV blocks: need 1, free 0")
                nb = self._pop_free()
                self._ref[b] -= 1
                src, dst, table[k] = b, nb, nb
            elif self._hash[b] != NO_HASH:
                self._unregister(b)
        return table, src, dst

    def register_full(self, b: int, h: int) -> None:
        self._check(b)
        if self._hash[b] == NO_HASH and h not in self._index:
            self._register(b, h)

    def free_table(self, table: Sequence[int]) -> None:
        for b in table:
            self.release(b)

    def release(self, b: int) -> None:
        self._check(b)
        if self._ref[b] <= 0:
            raise RuntimeError(f"double free of block {b}")
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if self._hash[b] == NO_HASH:
                self._free.appendleft(b)
            else:
                self._free.append(b)

    # ---- sequences -------------------------------------------------------------------------
    def add(self, tokens: Sequence[int]) -> Tuple[int, int]:
        table, cached = self.allocate_prompt(tokens)
        h, bs = NO_HASH, self.block_size
        for i in range(0, len(tokens) - bs + 1, bs):
            h = block_hash(h, tokens, i, i + bs)
        return self._store([table, list(tokens), h]), cached

    def fork_seq(self, sid: int) -> int:
        table, tokens, h = self._seq(sid)
        return self._store([self.fork(table), list(tokens), h])

    def append_tokens(self, ids: Sequence[int], tokens: Sequence[int]
                      ) -> Tuple[List[int], List[Tuple[int, int]]]:
        if len(ids) != len(tokens):
            raise ValueError(f"append_tokens: {len(ids)} ids, {len(tokens)} tokens")
        bs, need = self.block_size, self.append_cost(ids, [1] * len(ids))
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, free {self.num_free}")
        slots, copies = [], []
        for sid, tok in zip(ids, tokens):
            s = self._seqs[sid]
            pos = len(s[1])
            s[0], src, dst = self.append(s[0], pos)
            if src >= 0:
                copies.append((src, dst))
            s[1].append(tok)
            n = pos + 1
            if n % bs == 0:
                s[2] = block_hash(s[2], s[1], n - bs, n)
                self.register_full(s[0][n // bs - 1], s[2])
            slots.append(s[0][pos // bs] * bs + pos % bs)
        return slots, copies

    def free_seq(self, sid: int) -> None:
        self.free_table(self._seq(sid)[0])
        del self._seqs[sid]

    def block_table(self, sid: int) -> List[int]:
        return list(self._seq(sid)[0])

    def num_tokens(self, sid: int) -> int:
        return len(self._seq(sid)[1])

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def _seq(self, sid: int) -> list:
        if sid not in self._seqs:
            raise IndexError(f"sequence id {sid}")
        return self._seqs[sid]

    def _store(self, s: list) -> int:
        self._seqs[self._next_id] = s
        self._next_id += 1
        return self._next_id - 1

    def _check(self, b: int) -> int:
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block id {b}")
        return b

    def _pop_free(self) -> int:
        b = self._free.popleft()
        if self._hash[b] != NO_HASH:
            self._unregister(b)
        self._ref[b] = 1
        return b

    def _register(self, b: int, h: int) -> None:
        old = self._index.get(h)
        if old is not None:
            self._hash[old] = NO_HASH
        self._index[h] = b
        self._hash[b] = h

    def _unregister(self, b: int) -> None:
        if self._index.get(self._hash[b]) == b:
            del self._index[self._hash[b]]
        self._hash[b] = NO_HASH
