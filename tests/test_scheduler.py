"""The scheduler through its own interface, with a fake model (tokens are drawn at random, no
forward pass): the token budget and chunk size are respected, prompts are admitted in arrival
order, preemption takes the most recently started samples, preempted samples resume, the pool's
capacity is never exceeded and no block leaks, over random workloads."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from types import SimpleNamespace

from mapo_fast.rollout.params import SamplingParams, SchedulerParams
from mapo_fast.rollout.scheduler import Scheduler
from mapo_fast.rollout.sequence import Observation, PromptSeq, Sample, Status, TurnEvent
from mapo_fast.trajectory import Span, ToolTurn


class ScriptedTurns:
    """The tool turns' interface with random decisions: a trajectory ends after ``max_new``
    tokens or with probability 0.05 per token; with probability 0.1 a token closes a tool
    call (once per sample) whose observation has 1-39 tokens to prefill (sequences stay
    within what the engine's capacity check admits)."""

    def __init__(self, rng=None, max_new=1 << 30, finish=0.05, call=0.1):
        self.rng, self.max_new, self.finish, self.call = rng, max_new, finish, call

    def new_session(self):
        return None

    def decide(self, s, tok):
        if s.generated >= self.max_new or (self.rng and self.rng.random() < self.finish):
            return TurnEvent.FINISHED, None
        if self.rng and self.rng.random() < self.call and not s.turns:
            return TurnEvent.TOOL_CALL, "call"
        return TurnEvent.CONTINUE, None

    def run(self, calls):
        return [Observation(tokens=[self.rng.randrange(50)
                                    for _ in range(self.rng.randrange(1, 40))],
                            turn=ToolTurn(call=Span(len(s.tokens), len(s.tokens))), error=False)
                for s, _ in calls]


def prompt(tokens, index, group_size=0, turns=None):
    """A prompt of a call with ``group_size`` samples per prompt (0: none are forked)."""
    req = SimpleNamespace(group_size=group_size, sampling=SamplingParams(temperature=0.0),
                          turns=turns or ScriptedTurns())
    return PromptSeq(tokens=list(tokens), index=index, request=req)


def make(num_blocks=64, block_size=16, max_batch_tokens=64, prefill_chunk=40, allocator="python"):
    stats = {"prefill_tokens": 0, "cached_prompt_tokens": 0}
    return Scheduler(num_blocks, block_size, SchedulerParams(max_batch_tokens, prefill_chunk),
                     stats, allocator)


def check_pool(sch):
    """Reference counts equal the block tables of the sequences holding blocks; the free list
    is exactly the unreferenced blocks."""
    m = sch.blocks
    held = [s for s in list(sch.waiting) + sch.samples if s.block_seq >= 0]
    counts = [0] * m.num_blocks
    for s in held:
        for b in m.block_table(s.block_seq):
            counts[b] += 1
    assert [m.ref_count(b) for b in range(m.num_blocks)] == counts
    assert m.num_free == sum(c == 0 for c in counts)
    assert m.num_seqs == len(held)


def check_batch(sch, batch):
    p = sch.params
    assert batch.num_tokens <= p.max_batch_tokens
    assert all(0 < b - a <= p.prefill_chunk for _, a, b in batch.chunks)
    assert len(batch.slots) == batch.num_tokens == len(set(batch.slots))  # distinct slots
    bs, k = sch.block_size, 0
    for (s, a, b), table in zip(batch.chunks, batch.tables):
        assert b <= len(s.tokens)
        if isinstance(s, Sample):  # its blocks hold exactly what is computed after the step
            assert s.block_seq >= 0 and s.status is Status.RUNNING
            assert sch.blocks.num_tokens(s.block_seq) == b
        else:  # forked in this step when this is its last chunk
            assert (s.block_seq >= 0 and s.status is Status.RUNNING) or \
                (b == len(s.tokens) and s.status is Status.FINISHED)
        for pos in range(a, b):  # each token's slot lies in its own block
            assert batch.slots[k] // bs == table[pos // bs] and batch.slots[k] % bs == pos % bs
            k += 1


def drive(sch, prompts, group_size, rng, max_new, steps=10_000):
    """Runs the scheduler to completion with a fake model (random tokens) and scripted tool
    turns (``ScriptedTurns``); returns the batches' chunks."""
    turns = ScriptedTurns(rng, max_new)
    for p in prompts:
        req = SimpleNamespace(group_size=group_size, sampling=SamplingParams(temperature=0.0),
                              turns=turns)
        p.request = req
        sch.add_prompt(p)
    history = []
    for _ in range(steps):
        if sch.done:
            return history
        batch = sch.schedule()
        assert batch.chunks, "nothing scheduled while work remains"
        check_batch(sch, batch)
        history.append([(s, a, b) for s, a, b in batch.chunks])
        sch.postprocess(batch, [(s, rng.randrange(50), 0.0) for s, _ in batch.to_sample])
        check_pool(sch)
    raise AssertionError("did not finish")


def test_budget_and_arrival_order():
    """Prompts of 30, 50, 20, 70 and 10 tokens under a 64-token budget and 40-token chunks:
    the first step prefills the first prompt whole and the second from its 17th token (its
    first block is the first prompt's, computed in the same pass), using the whole budget;
    the rest wait, in order."""
    sch = make()
    prompts = [prompt(range(1, n + 1), i) for i, n in enumerate([30, 50, 20, 70, 10])]
    for p in prompts:
        sch.add_prompt(p)
    batch = sch.schedule()
    assert [(s.index, a, b) for s, a, b in batch.chunks] == [(0, 0, 30), (1, 16, 50)]
    assert sch.stats["cached_prompt_tokens"] == 16
    assert prompts[2].block_seq < 0 and prompts[2].status is Status.WAITING
    check_batch(sch, batch)
    # both prompts complete in this step: forked (into no samples: the second step is
    # prompts only)
    assert prompts[0].status is prompts[1].status is Status.FINISHED
    sch.postprocess(batch, [])
    batch = sch.schedule()  # the others share the first blocks of the second: all fit
    assert [(s.index, a, b) for s, a, b in batch.chunks] == [(2, 16, 20), (3, 48, 70),
                                                             (4, 0, 10)]


def test_a_prompt_waits_for_the_unfinished_prefill_before_it():
    """A 100-token prompt prefilled 40 tokens at a time: the prompt after it (which shares
    its first blocks) starts only in the step that completes the first one's prefill."""
    sch = make(max_batch_tokens=64, prefill_chunk=40)
    first = prompt(range(1, 101), 0)
    second = prompt(range(1, 60), 1)
    sch.add_prompt(first)
    sch.add_prompt(second)
    seen = []
    for _ in range(3):
        batch = sch.schedule()
        seen.append([(s.index, a, b) for s, a, b in batch.chunks])
        sch.postprocess(batch, [])
    # step 3 completes the first prompt; the second then reuses its three full blocks
    assert seen == [[(0, 0, 40)], [(0, 40, 80)], [(0, 80, 100), (1, 48, 59)]]


def test_running_samples_go_before_waiting_prompts():
    sch = make(max_batch_tokens=8)
    first = prompt(range(1, 21), 0, group_size=3)
    rng = random.Random(0)
    sch.add_prompt(first)
    while first.status is not Status.FINISHED:
        batch = sch.schedule()
        sch.postprocess(batch, [(s, rng.randrange(50), 0.0) for s, _ in batch.to_sample])
    assert len(sch.samples) == 3 and all(s.num_pending == 1 for s in sch.samples)
    sch.add_prompt(prompt(range(1, 30), 1))
    batch = sch.schedule()
    kinds = [type(s).__name__ for s, _, _ in batch.chunks]
    assert kinds == ["Sample"] * 3 + ["PromptSeq"]
    assert batch.chunks[-1][2] - batch.chunks[-1][1] == 5  # the rest of the 8-token budget


def test_preemption_takes_the_most_recently_started_sample_and_resumes_it():
    """Two groups of two in a 7-block pool: when the pool runs out, the newest sample is
    preempted first; it is resumed later, and everything finishes with no block held."""
    sch = make(num_blocks=7, max_batch_tokens=256)
    victims = []
    original = sch.preempt

    def record(s):
        running = [v for v in sch.samples if v.status is Status.RUNNING]
        victims.append((s, running))
        original(s)
    sch.preempt = record
    prompts = [PromptSeq(tokens=list(range(1, 40)), index=i) for i in range(2)]
    drive(sch, prompts, 2, random.Random(1), max_new=40)
    assert victims, "the pool should have run out"
    for s, running in victims:
        assert s is running[-1] or s.status is not Status.RUNNING
    assert all(s.status is Status.FINISHED for s in sch.samples)
    assert any(s.stats.get("preemptions") for s in sch.samples)
    assert sch.blocks.num_free == 7 and sch.blocks.num_seqs == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(8, 40),
       budget=st.sampled_from([1, 7, 33, 256]), chunk=st.sampled_from([1, 5, 16, 64]),
       group=st.integers(1, 4), n_prompts=st.integers(1, 5))
def test_random_workloads_never_exceed_the_pool_nor_leak(seed, num_blocks, budget, chunk,
                                                         group, n_prompts):
    rng = random.Random(seed)
    sch = make(num_blocks=num_blocks, max_batch_tokens=budget, prefill_chunk=chunk)
    # prompts share prefixes (the prefix index is exercised); each fits the pool with room
    # for its longest sample
    base = [rng.randrange(50) for _ in range(48)]
    max_new = 12
    limit = num_blocks * 16 - max_new - 40 - 16
    prompts = [PromptSeq(tokens=(base[:rng.randrange(1, 48)] +
                                 [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
                                 )[:max(1, limit)], index=i) for i in range(n_prompts)]
    drive(sch, prompts, group, rng, max_new)
    assert sch.blocks.num_free == num_blocks and sch.blocks.num_seqs == 0
    assert len(sch.samples) == n_prompts * group


def test_both_allocators_schedule_alike():
    """The same workload under the C++ allocator and its Python model: same chunks."""
    runs = {}
    for name in ("cpp", "python"):
        sch = make(num_blocks=12, max_batch_tokens=48, prefill_chunk=16, allocator=name)
        prompts = [PromptSeq(tokens=list(range(1 + i, 30 + 7 * i)), index=i) for i in range(3)]
        hist = drive(sch, prompts, 2, random.Random(5), max_new=20)
        runs[name] = [[(type(s).__name__, s.index, a, b) for s, a, b in step] for step in hist]
    assert runs["cpp"] == runs["python"]


def test_unknown_allocator_is_named():
    with pytest.raises(ValueError, match="`name` must be one of 'cpp', 'python', got 'rust'"):
        make(allocator="rust")
