"""The C++ block manager against its Python model on random operation sequences (hypothesis):
same results, same errors, same state after every step; no block leaked or freed twice."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mapo_fast.kernels import block_manager_ref as ref

cpp = pytest.importorskip("mapo_fast.kernels._block_manager",
                          reason="the C++ extension is built by `pip install -e .`")

IMPLS = {"cpp": cpp, "py": ref}


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except (ValueError, IndexError, RuntimeError) as e:
        return (type(e).__name__, str(e).split(":")[0])


def state(m, hashes):
    return (m.num_free, [m.ref_count(b) for b in range(m.num_blocks)],
            [m.lookup(h) for h in sorted(hashes)])


def check_invariants(m, live):
    counts = [0] * m.num_blocks
    for table, _, _ in live:
        for b in table:
            counts[b] += 1
    assert [m.ref_count(b) for b in range(m.num_blocks)] == counts, "leaked or lost a reference"
    assert m.num_free == sum(c == 0 for c in counts), "free list disagrees with ref counts"


def run_ops(seed, num_blocks, block_size, steps):
    rng = random.Random(seed)
    mgrs = {k: mod.BlockManager(num_blocks, block_size) for k, mod in IMPLS.items()}
    live = []           # (table, length, tokens) per sequence, identical for both impls
    hashes = set()
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 4 * block_size))]
               for _ in range(4)]
    for _ in range(steps):
        op = rng.choice(["prompt", "prompt", "fork", "append", "append", "append", "free",
                         "register"])
        if op == "prompt":
            base = rng.choice(prompts)
            tokens = base[:rng.randrange(1, len(base) + 1)] + \
                [rng.randrange(5) for _ in range(rng.randrange(0, block_size))]
            res = {k: outcome(m.allocate_prompt, tokens) for k, m in mgrs.items()}
            assert res["cpp"] == res["py"], (op, res)
            if res["cpp"][0] == "ok":
                live.append((res["cpp"][1][0], len(tokens), tokens))
                assert res["cpp"][1][1] % block_size == 0 and res["cpp"][1][1] <= len(tokens)
        elif op == "fork" and live:
            table, n, tokens = rng.choice(live)
            res = {k: outcome(m.fork, table) for k, m in mgrs.items()}
            assert res["cpp"] == res["py"]
            live.append((res["cpp"][1], n, list(tokens)))
        elif op == "append" and live:
            i = rng.randrange(len(live))
            table, n, tokens = live[i]
            res = {k: outcome(m.append, table, n) for k, m in mgrs.items()}
            assert res["cpp"] == res["py"], (op, res)
            if res["cpp"][0] == "ok":
                new_table, src, dst = res["cpp"][1]
                if src >= 0:  # copy-on-write: the sample gets its own copy of the shared block
                    assert new_table[n // block_size] == dst and src in table
                live[i] = (new_table, n + 1, tokens + [rng.randrange(5)])
        elif op == "register" and live:
            table, n, tokens = rng.choice(live)
            if n >= block_size:
                k = n // block_size - 1
                h = 0
                for j in range(k + 1):
                    h = ref.block_hash(h, tokens, j * block_size, (j + 1) * block_size)
                assert cpp.block_hash(0, tokens, 0, block_size) == \
                    ref.block_hash(0, tokens, 0, block_size)
                hashes.add(h)
                for m in mgrs.values():
                    m.register_full(table[k], h)
        elif op == "free" and live:
            table, _, _ = live.pop(rng.randrange(len(live)))
            res = {k: outcome(m.free_table, table) for k, m in mgrs.items()}
            assert res["cpp"] == res["py"]
        for tokens in prompts:  # the prefix index sees the same hashes
            h = ref.block_hash(0, tokens, 0, block_size)
            hashes.add(h)
        assert state(mgrs["cpp"], hashes) == state(mgrs["py"], hashes)
        check_invariants(mgrs["cpp"], live)
    for table, _, _ in live:
        for m in mgrs.values():
            m.free_table(table)
    for m in mgrs.values():
        assert m.num_free == num_blocks and all(m.ref_count(b) == 0 for b in range(num_blocks))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), num_blocks=st.integers(1, 24),
       block_size=st.sampled_from([1, 2, 3, 4, 16]))
def test_cpp_matches_python_model(seed, num_blocks, block_size):
    run_ops(seed, num_blocks, block_size, steps=60)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_shares_the_prompt_and_copies_on_write(impl):
    m = IMPLS[impl].BlockManager(16, 4)
    prompt = list(range(10))                     # 2 full blocks + 2 tokens
    table, cached = m.allocate_prompt(prompt)
    assert cached == 0 and len(table) == 3
    forks = [m.fork(table) for _ in range(3)]    # G = 4 samples share every block
    assert all(m.ref_count(b) == 4 for b in table)
    new, src, dst = m.append(forks[0], 10)       # writing into the shared partial block
    assert (src, dst) == (table[2], new[2]) and new[:2] == table[:2]
    assert m.ref_count(table[2]) == 3 and m.ref_count(dst) == 1
    again, src, dst = m.append(new, 11)          # now private: no more copies
    assert (src, dst) == (-1, -1) and again == new
    # the same prompt again (another group, or a preempted sequence) finds its full blocks
    t2, cached = m.allocate_prompt(prompt)
    assert cached == 8 and t2[:2] == table[:2]


@pytest.mark.parametrize("impl", IMPLS)
def test_freed_prefix_is_revived_then_evicted(impl):
    m = IMPLS[impl].BlockManager(3, 2)
    table, _ = m.allocate_prompt([1, 2, 3, 4])
    m.free_table(table)
    again, cached = m.allocate_prompt([1, 2, 3, 4])
    assert cached == 4 and again == table
    m.free_table(again)
    other, cached = m.allocate_prompt([9, 9, 9, 9, 9, 9])  # needs all 3 blocks: evicts
    assert cached == 0 and m.num_free == 0
    m.free_table(other)
    assert m.allocate_prompt([1, 2, 3, 4])[1] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_errors(impl):
    mod = IMPLS[impl]
    m = mod.BlockManager(2, 4)
    t, _ = m.allocate_prompt(list(range(8)))
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        m.allocate_prompt([7] * 3)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        m.append(t, 8)
    with pytest.raises(ValueError, match="skips a block"):
        m.append(t, 13)
    m.free_table(t)
    with pytest.raises(RuntimeError, match="double free of block"):
        m.release(t[0])
    with pytest.raises(IndexError, match="block id 5"):
        m.release(5)
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        mod.BlockManager(0, 4)


def run_seq_ops(seed, num_blocks, block_size, steps):
    """The sequence layer (add, fork_seq, batched append_tokens, free_seq) on both."""
    rng = random.Random(seed)
    mgrs = {k: mod.BlockManager(num_blocks, block_size) for k, mod in IMPLS.items()}
    live = []
    base = [rng.randrange(4) for _ in range(3 * block_size)]
    for _ in range(steps):
        op = rng.choice(["add", "fork", "append", "append", "free"])
        if op == "add":
            tokens = base[:rng.randrange(1, len(base) + 1)]
            cost = {k: m.add_cost(tokens) for k, m in mgrs.items()}
            assert cost["cpp"] == cost["py"]
            free = mgrs["py"].num_free
            res = {k: outcome(m.add, tokens) for k, m in mgrs.items()}
            assert (res["py"][0] == "ok") == (cost["py"] <= free)  # the query is exact
        elif op == "fork" and live:
            sid = rng.choice(live)
            res = {k: outcome(m.fork_seq, sid) for k, m in mgrs.items()}
        elif op == "append" and live:
            # several tokens of one sequence in one call (a prefill chunk), in any order
            ids = [rng.choice(live) for _ in range(rng.randrange(1, 2 * len(live) + 1))]
            toks = [rng.randrange(4) for _ in ids]
            cost = {k: m.append_cost(ids, [1] * len(ids)) for k, m in mgrs.items()}
            assert cost["cpp"] == cost["py"]
            free = mgrs["py"].num_free
            res = {k: outcome(m.append_tokens, ids, toks) for k, m in mgrs.items()}
            assert (res["py"][0] == "ok") == (cost["py"] <= free)  # all or nothing
        elif op == "free" and live:
            sid = live.pop(rng.randrange(len(live)))
            res = {k: outcome(m.free_seq, sid) for k, m in mgrs.items()}
        else:
            continue
        assert res["cpp"] == res["py"], (op, res)
        if op in ("add", "fork") and res["cpp"][0] == "ok":
            live.append(res["cpp"][1][0] if op == "add" else res["cpp"][1])
        c, p = mgrs["cpp"], mgrs["py"]
        assert c.num_free == p.num_free and c.num_seqs == p.num_seqs == len(live)
        for sid in live:
            assert c.block_table(sid) == p.block_table(sid)
            assert c.num_tokens(sid) == p.num_tokens(sid)
        refs = [0] * num_blocks
        for sid in live:
            for b in c.block_table(sid):
                refs[b] += 1
        assert [c.ref_count(b) for b in range(num_blocks)] == refs
    for sid in live:
        for m in mgrs.values():
            m.free_seq(sid)
    assert all(m.num_free == num_blocks for m in mgrs.values())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), num_blocks=st.integers(1, 24),
       block_size=st.sampled_from([1, 2, 4, 16]))
def test_sequence_layer_matches_python_model(seed, num_blocks, block_size):
    run_seq_ops(seed, num_blocks, block_size, steps=60)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_append_is_all_or_nothing_and_gives_slots(impl):
    m = IMPLS[impl].BlockManager(4, 4)
    s, cached = m.add([1, 2, 3, 4, 5])            # blocks [b0 full, b1 partial]
    f = m.fork_seq(s)
    slots, copies = m.append_tokens([s, f], [6, 6])
    t_s, t_f = m.block_table(s), m.block_table(f)
    assert copies == [(t_f[1], t_s[1])]           # the first writer copies the shared block
    assert slots == [t_s[1] * 4 + 1, t_f[1] * 4 + 1]
    m.append_tokens([s, f], [7, 7])
    m.append_tokens([s, f], [8, 8])               # both last blocks full; 3 of 4 blocks used
    tables = (m.block_table(s), m.block_table(f))
    with pytest.raises(RuntimeError, match="out of KV blocks: need 2, free 1"):
        m.append_tokens([s, f], [9, 9])           # all or nothing: s gets no block either
    assert m.num_tokens(s) == 8 and (m.block_table(s), m.block_table(f)) == tables
    with pytest.raises(IndexError, match="sequence id 99"):
        m.free_seq(99)


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_queries(impl):
    """``add_cost`` counts fresh blocks and revived cached ones, not live shared ones;
    ``append_cost`` counts new blocks past the table and one copy of a shared partial block,
    adding up the counts of a repeated id; bad arguments are named."""
    m = IMPLS[impl].BlockManager(8, 4)
    prompt = list(range(10))                      # 2 full blocks + 2 tokens
    assert m.add_cost(prompt) == 3
    sid, _ = m.add(prompt)
    assert m.add_cost(prompt) == 1                # the two full blocks are shared
    fork = m.fork_seq(sid)
    assert m.append_cost([fork], [1]) == 1        # copy of the shared partial block
    assert m.append_cost([fork], [3]) == 2        # ... and a new block for tokens 12-13
    assert m.append_cost([fork, fork, fork], [1, 1, 1]) == 2
    assert m.append_cost([sid, fork], [2, 2]) == 2
    assert m.append_cost([fork], [0]) == 0
    m.free_seq(fork)
    m.free_seq(sid)
    assert m.add_cost(prompt) == 3                # cached but free: revived blocks count
    with pytest.raises(ValueError, match="append_cost: 1 ids, 2 counts"):
        m.append_cost([0], [1, 2])
    sid, _ = m.add(prompt)
    with pytest.raises(ValueError, match="negative count -1"):
        m.append_cost([sid], [-1])
    with pytest.raises(IndexError, match="sequence id 99"):
        m.append_cost([99], [1])
