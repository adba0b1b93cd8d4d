"""The scheduler: which tokens of which sequences go through the model in the next step, and the
KV blocks they take.

It owns the block allocator (the C++ ``BlockManager``, or its Python model). Each step it
(1) resumes preempted samples, oldest first, while the pool holds them; (2) gives every running
sample with pending tokens its next chunk (a decode token, or up to ``prefill_chunk`` tokens of
an observation or of a recomputed prefix), oldest first; (3) fills the rest of the token budget
(``max_batch_tokens``) with prompt chunks of waiting prompts in arrival order (several prompts
share one forward: batched prefill; a prompt starts in the step that completes the prefill of
those before it at the latest, so a prefix it shares with them is computed when it is read). Room is checked before anything is allocated
(``add_cost`` / ``append_cost``): when a running sample's chunk does not fit, the most
recently started running samples are preempted (their blocks freed, their tokens kept), or it
waits for the next step when older samples took the room. Waiting prompts never preempt; a
new prompt is admitted only when no sample waits to be resumed. All running samples' new
tokens are then appended in one batched ``append_tokens`` call, whose slots (and copy-on-write
copies) go straight to the model runner.

A prompt whose last chunk is scheduled is forked into its group in the same step (its samples
share its blocks and read its row of the step's logits: ``Batch.to_sample``).

The scheduler is the only writer of a sequence: its status, its computed-token count, the
token counters, and (through ``Sample.append_sampled`` / ``Sample.observe``) its tokens. After
the forward pass ``postprocess(batch, draws)`` records what each chunk computed, appends each
sampled token, applies what it did (``TurnEvent``, which the tool turns decide without writing
anything), finishes samples, and appends the observations of the tool calls that closed (the
tool turns run them and build them). One capacity rule (``need``) admits a call's prompts and
resumes preempted samples, so every call the engine admits can finish.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from .params import SchedulerParams
from .sequence import Batch, PromptSeq, Sample, Seq, Status, TurnEvent


def block_manager_class(name: str = "cpp") -> Any:
    """The allocator: ``"cpp"`` (the extension) or ``"python"`` (its model)."""
    if name == "cpp":
        from ..kernels._block_manager import BlockManager
    elif name == "python":
        from ..kernels.block_manager_ref import BlockManager
    else:
        raise ValueError(f"block_manager_class: `name` must be one of 'cpp', 'python', got "
                         f"{name!r}")
    return BlockManager


class Scheduler:
    """Waiting prompts, running and preempted samples, and the block allocator.

    Args:
        num_blocks, block_size: the KV pool.
        params: the per-step token budget.
        stats: counters to update (``preemptions``, ``peak_blocks``, ``cached_prompt_tokens``,
            ``prefill_tokens`` of prompts).
        allocator: ``"cpp"`` or ``"python"`` (``block_manager_class``).
    """

    def __init__(self, num_blocks: int, block_size: int, params: SchedulerParams,
                 stats: Dict[str, int], allocator: str = "cpp"):
        self.num_blocks, self.block_size, self.params = num_blocks, block_size, params
        self.stats = stats
        self._manager = block_manager_class(allocator)
        self._block_hash = sys.modules[self._manager.__module__].block_hash
        self.blocks = self._manager(num_blocks, block_size)
        self.waiting: Deque[PromptSeq] = collections.deque()
        self.samples: List[Sample] = []  # in the order they started
        self.finished_ids: List[int] = []  # seq_ids done since the last ``drain_finished``

    def need(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` tokens needs to run a step: their KV and the next
        token's slot. The one capacity rule: a call is admitted when its longest trajectory
        (less its last, never computed, token) needs at most the pool, and a preempted sample
        resumes when it needs at most the free blocks."""
        return self.blocks.blocks_for(tokens + 1)

    @property
    def idle(self) -> bool:
        """No sequence is queued or in flight (no ``generate`` call is running)."""
        return not self.waiting and not self.samples

    def drain_finished(self) -> List[int]:
        """The ``seq_id`` of every sequence finished since the last call (their block-table
        rows can go)."""
        out, self.finished_ids = self.finished_ids, []
        return out

    # ---- queues ----------------------------------------------------------------------------
    def add_prompt(self, prompt: PromptSeq) -> None:
        self.waiting.append(prompt)

    def _fork(self, prompt: PromptSeq, row: int, batch: Batch) -> None:
        """Forks a prompt whose last chunk is in ``batch`` (row ``row``) into its group: the
        call's ``group_size`` samples, each with its own generator and tool session, share its
        blocks (until they write) and draw their first token from its row."""
        req = prompt.request
        G = req.group_size
        for j in range(prompt.index * G, (prompt.index + 1) * G):
            s = Sample.fork(prompt, j, generator=req.sampling.generator(j),
                            session=req.turns.new_session())
            s.block_seq = self.blocks.fork_seq(prompt.block_seq)
            s.status, s.num_computed = Status.RUNNING, len(prompt.tokens)
            self.samples.append(s)
            batch.to_sample.append((s, row))
        self.blocks.free_seq(prompt.block_seq)
        prompt.block_seq, prompt.status = -1, Status.FINISHED
        self.finished_ids.append(prompt.seq_id)
        self.waiting.remove(prompt)

    def finish(self, s: Sample) -> None:
        """A finished sample's blocks go back at once (the prefix index keeps them findable
        until they are reused)."""
        self.blocks.free_seq(s.block_seq)
        s.block_seq, s.status = -1, Status.FINISHED
        s.num_computed = len(s.tokens)  # nothing follows its last token
        self.finished_ids.append(s.seq_id)

    # ---- after the forward pass ------------------------------------------------------------
    def postprocess(self, batch: Batch, draws: Sequence[Tuple[Sample, int, float]]) -> None:
        """Records what the step computed (each chunk's tokens are in the cache; the token
        counters: a chunk's tokens are prefill, but for a sample's newest token decode), then
        applies ``draws`` (``(sample, token, log-prob)`` of each row of ``batch.to_sample``):
        appends each token, finishes the samples it ends, and appends the observations of the
        tool calls it closed (run together, by the call's tool turns)."""
        for s, a, b in batch.chunks:
            s.num_computed = b
            if isinstance(s, PromptSeq):
                continue
            decoded = int(b == len(s.tokens))  # else a chunk of an observation or a recompute
            for counts in (s.stats, self.stats):
                counts["prefill_tokens"] = counts.get("prefill_tokens", 0) + b - a - decoded
                counts["decode_tokens"] = counts.get("decode_tokens", 0) + decoded
        if any(isinstance(s, PromptSeq) for s, _, _ in batch.chunks):
            self.stats["prefill_passes"] = self.stats.get("prefill_passes", 0) + 1
        calls: List[Tuple[Sample, str]] = []
        for s, token, logprob in draws:
            s.append_sampled(token, logprob)
            event, call = s.request.turns.decide(s, token)
            if event is TurnEvent.TRUNCATED:
                s.stats["truncated"] = 1
            if event in (TurnEvent.FINISHED, TurnEvent.TRUNCATED):
                self.finish(s)
                continue
            s.num_computed = len(s.tokens) - 1  # its new token goes through the next step
            if event is TurnEvent.TOOL_CALL:
                calls.append((s, call))
        if calls:
            turns = calls[0][0].request.turns
            for (s, _), obs in zip(calls, turns.run(calls)):
                s.observe(obs)

    @property
    def done(self) -> bool:
        return not self.waiting and all(s.status is Status.FINISHED for s in self.samples)

    def reset(self) -> None:
        """Every block back to the pool, an empty prefix index and no sequence (after a failed
        call)."""
        self.blocks = self._manager(self.num_blocks, self.block_size)
        self.finished_ids += [s.seq_id for s in list(self.waiting) + self.samples]
        self.waiting.clear()
        self.samples = []

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> Batch:
        """The next step's ``Batch`` (empty only when nothing is left to run)."""
        self._resume()
        batch, budget = Batch(), self.params.max_batch_tokens
        running = [s for s in self.samples if s.status is Status.RUNNING and s.num_pending]
        plan = []  # (sample, chunk end) within the budget
        for s in running:
            end = self._chunk_end(s, budget)
            if end == s.num_computed:
                break
            plan.append((s, end))
            budget -= end - s.num_computed
        # one capacity query for the whole plan; only when the pool is short, sample by sample
        # (oldest first), preempting the most recently started
        reserved = self.blocks.append_cost([s.block_seq for s, _ in plan],
                                           [e - s.num_computed for s, e in plan])
        if reserved <= self.blocks.num_free:
            batch.chunks = [(s, s.num_computed, e) for s, e in plan]
        else:
            budget, reserved = self._plan_short(batch, running)
        self._admit(batch, budget, reserved,
                    admit_new=not any(s.status is Status.PREEMPTED for s in self.samples))
        self._allocate(batch)
        for row, (s, a, b) in enumerate(batch.chunks):
            if isinstance(s, Sample):
                if b == len(s.tokens):  # its newest token: the next one is drawn
                    batch.to_sample.append((s, row))
            elif b == len(s.tokens):  # the prompt's last chunk: its group starts
                self._fork(s, row, batch)
        used = self.num_blocks - self.blocks.num_free
        self.stats["peak_blocks"] = max(self.stats.get("peak_blocks", 0), used)
        return batch

    def _plan_short(self, batch: Batch, running: List[Sample]) -> Tuple[int, int]:
        """The running samples' chunks when the pool cannot hold them all: oldest first, each
        one's room made by preempting newer samples. Returns (budget left, blocks reserved)."""
        budget, reserved = self.params.max_batch_tokens, 0
        for s in running:
            if budget == 0:
                break
            if s.status is not Status.RUNNING:  # preempted for an older sample's room
                continue
            end = self._chunk_end(s, budget)
            cost = self._room_for(s, end, reserved, batch)
            if cost is None:
                continue
            reserved += cost
            batch.chunks.append((s, s.num_computed, end))
            budget -= end - s.num_computed
        return budget, reserved

    def _chunk_end(self, s: Seq, budget: int) -> int:
        """End of ``s``'s next chunk: its pending tokens, at most ``prefill_chunk`` and
        ``budget``."""
        return s.num_computed + min(s.num_pending, self.params.prefill_chunk, budget)

    def _room_for(self, s: Sample, end: int, reserved: int, batch: Batch) -> Optional[int]:
        """Blocks that appending ``s``'s tokens up to ``end`` takes, after preempting the most
        recently started running samples not in ``batch`` while the pool lacks them; None when
        ``s`` must wait (preempted itself if nothing else runs)."""
        chosen = {id(c) for c, _, _ in batch.chunks}
        while True:
            cost = self.blocks.append_cost([s.block_seq], [end - s.num_computed])
            if reserved + cost <= self.blocks.num_free:
                return cost
            victims = [v for v in self.samples if v.status is Status.RUNNING and v is not s
                       and id(v) not in chosen]
            if victims:
                self.preempt(victims[-1])
            elif not batch.chunks:
                self.preempt(s)
                return None
            else:
                return None

    def _admit(self, batch: Batch, budget: int, reserved: int, admit_new: bool) -> None:
        """Prompt chunks of waiting prompts, in arrival order, while the budget and the pool
        allow; a prompt's blocks are allocated with its first chunk (``admit_new``: new prompts
        may start; prompts already started always continue)."""
        for p in self.waiting:
            if budget == 0:
                break
            if p.block_seq < 0:
                if not admit_new:
                    break
                keys = p.keys()
                if reserved + self.blocks.add_cost(keys) > self.blocks.num_free:
                    break
                p.block_seq, cached = self.blocks.add(keys)
                self.stats["cached_prompt_tokens"] += cached
                self.stats["prefill_tokens"] += len(p.tokens) - cached
                # a fully cached prompt recomputes its last token for the logits (its KV
                # slot gets the values it already holds)
                p.num_computed = min(cached, len(p.tokens) - 1)
                p.status = Status.RUNNING
            end = self._chunk_end(p, budget)
            batch.chunks.append((p, p.num_computed, end))
            budget -= end - p.num_computed
            if end < len(p.tokens):
                # a later prompt may share this one's blocks (its prefix, registered when
                # allocated): it starts only once they are all computed, in this step at the
                # latest (each layer writes the step's keys and values before attending)
                break

    def _allocate(self, batch: Batch) -> None:
        """One ``append_tokens`` call for every running sample's new tokens (a running sample's
        blocks hold exactly its computed tokens); the slots of all chunk tokens: from that
        call, or from the block table for a prompt (allocated whole when admitted)."""
        ids, keys = [], []
        for s, a, b in batch.chunks:
            if isinstance(s, Sample):
                ids += [s.block_seq] * (b - a)
                keys += s.keys(a, b)
        new_slots, batch.copies = self.blocks.append_tokens(ids, keys)
        at, bs = 0, self.block_size
        for s, a, b in batch.chunks:
            table = self.blocks.block_table(s.block_seq)
            if isinstance(s, Sample):
                batch.slots += new_slots[at:at + b - a]
                at += b - a
            else:
                batch.slots += [table[p // bs] * bs + p % bs for p in range(a, b)]
            batch.tables.append(table)

    # ---- memory pressure -------------------------------------------------------------------
    def preempt(self, s: Sample) -> None:
        self.blocks.free_seq(s.block_seq)
        s.block_seq, s.status = -1, Status.PREEMPTED
        s.stats["preemptions"] = s.stats.get("preemptions", 0) + 1
        self.stats["preemptions"] = self.stats.get("preemptions", 0) + 1

    def _resume(self) -> None:
        """Re-adds preempted samples, oldest first, while the pool holds them whole: the
        leading blocks of their tokens still in the prefix index are taken back as they are;
        the rest is recomputed in chunks."""
        for s in self.samples:
            if s.status is not Status.PREEMPTED:
                continue
            if self.need(len(s.tokens)) > self.blocks.num_free:
                break
            keys = s.keys(0, s.num_computed)
            s.block_seq, s.num_computed = self.blocks.add(keys[:self._cached_prefix(keys)])
            s.status = Status.RUNNING

    def _cached_prefix(self, keys: List[int]) -> int:
        """How many leading tokens of ``keys`` the prefix index holds (whole blocks)."""
        block_hash = self._block_hash
        bs, h, n = self.block_size, 0, 0  # 0: the chain's start (no previous block)
        while n + bs <= len(keys):
            h = block_hash(h, keys[n:n + bs], 0, bs)
            if self.blocks.lookup(h) < 0:
                break
            n += bs
        return n
