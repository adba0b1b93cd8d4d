"""A bad call to RolloutEngine.generate is refused before any work with an error naming the
argument, and a call that fails midway (a logits processor that raises, returns the wrong
shape or nothing finite) gives every KV block back: the engine then works exactly as a fresh
one, and the trainer's clear_prefix_cache() succeeds."""

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from mapo_fast.rollout.engine import RolloutEngine  # noqa: E402
from test_rollout_engine import model  # noqa: E402,F401  (the tiny Qwen2 fixture)

PROMPTS = [list(range(1, 40)), list(range(50, 70))]


def reference(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    return [t.token_ids for t in eng.generate(PROMPTS, group_size=2, max_new_tokens=8,
                                              temperature=1.0, seed=5)]


def raises(exc):
    def proc(tokens, logits):
        raise exc
    return proc


def wrong_shape(tokens, logits):
    return logits[:-1]


def all_masked(tokens, logits):
    return torch.full_like(logits, float("-inf"))


def with_nan(tokens, logits):
    out = logits.clone()
    out[3] = float("nan")
    return out


def with_inf(tokens, logits):
    out = logits.clone()
    out[3] = float("inf")
    return out


def returns_list(tokens, logits):
    return logits.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts="hello"), "`prompts` must be a list of prompts, got str"),
    (dict(prompts=[[1, 2, 256]]), r"`prompts\[0\]` holds token id 256, outside"),
    (dict(prompts=[[1, -3]]), r"`prompts\[0\]` holds token id -3"),
    (dict(prompts=[[]]), r"`prompts\[0\]` is empty"),
    (dict(prompts=[[1.5, 2]]), r"`prompts\[0\]` must be a string, a list of int token ids"),
    (dict(seed="3"), "`seed` must be an int or None, got '3'"),
    (dict(seed=1.0), "`seed` must be an int or None"),
    (dict(temperature=float("nan")), "`temperature` must be a finite number, got nan"),
    (dict(top_p=float("inf")), "`top_p` must be a finite number"),
    (dict(top_k=1.5), "`top_k` must be an int >= 0"),
    (dict(stop_token_ids=["a"]), "`stop_token_ids` must be a list of ints"),
    (dict(logits_processor=3), "`logits_processor` must be callable or have a callable `batch`"),
])
def test_bad_arguments_are_refused_before_any_work(model, kwargs, match):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    args = dict(prompts=PROMPTS, group_size=2, max_new_tokens=8, temperature=1.0, seed=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        eng.generate(args.pop("prompts"), **args)
    assert eng.blocks.num_free == eng.num_blocks and eng.stats["forward_passes"] == 0


@pytest.mark.parametrize("proc, exc, match", [
    (raises(RuntimeError("boom")), RuntimeError, "boom"),
    (raises(KeyError("k")), KeyError, "k"),
    (wrong_shape, ValueError, r"\(wrong_shape\) must return float logits of shape \(256,\)"),
    (returns_list, ValueError, "got list"),
    (all_masked, ValueError, r"\(all_masked\) returned logits with no finite value"),
    (with_nan, ValueError, r"\(with_nan\) returned logits .* with NaN or \+inf"),
    (with_inf, ValueError, r"\(with_inf\) returned logits .* with NaN or \+inf"),
])
def test_a_failed_call_leaves_the_engine_as_usable_as_before(model, proc, exc, match):
    want = reference(model)
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    with pytest.raises(exc, match=match):
        eng.generate(PROMPTS, group_size=2, max_new_tokens=8, temperature=1.0, seed=5,
                     logits_processor=proc)
    assert eng.blocks.num_free == eng.num_blocks  # nothing leaked
    eng.clear_prefix_cache()  # what the trainer calls after every optimizer step
    got = eng.generate(PROMPTS, group_size=2, max_new_tokens=8, temperature=1.0, seed=5)
    assert [t.token_ids for t in got] == want


def test_a_pool_that_holds_no_block_is_refused(model):
    for budget in (0, -5, float("nan"), 1e-6):
        with pytest.raises(ValueError, match="`memory_budget_mb`"):
            RolloutEngine(model, None, memory_budget_mb=budget)
    with pytest.raises(ValueError, match="`num_blocks` must be an int >= 1, got 0"):
        RolloutEngine(model, None, num_blocks=0)


def test_an_empty_text_prompt_is_refused(model):
    from transformers import PreTrainedTokenizerFast
    from tokenizer_util import bpe_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(), eos_token="</s>")
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=64)
    with pytest.raises(ValueError, match=r"`prompts\[1\]` is empty \(no tokens\)"):
        eng.generate(["a red circle", ""], max_new_tokens=4)
    assert eng.blocks.num_free == eng.num_blocks


def test_the_smallest_pool_a_call_is_admitted_to_finishes(model):
    """One 32-token block for a group of two: the admission rule and the resume rule are one
    (Scheduler.need), so the samples take turns in the block (preempted, resumed) and finish
    with the large pool's tokens; before, the second sample waited forever."""
    tiny = RolloutEngine(model, None, block_size=32, num_blocks=1)
    got = tiny.generate([[1, 2]], group_size=2, max_new_tokens=10, temperature=0,
                        stop_token_ids=[])
    big = RolloutEngine(model, None, block_size=32, num_blocks=16)
    want = big.generate([[1, 2]], group_size=2, max_new_tokens=10, temperature=0,
                        stop_token_ids=[])
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert tiny.stats.get("preemptions", 0) >= 1 and tiny.blocks.num_free == 1
    with pytest.raises(ValueError, match="exceeds the KV budget of 32 tokens"):
        tiny.generate([[1, 2]], group_size=2, max_new_tokens=31, temperature=0)


def test_a_nested_generate_is_refused_and_the_outer_call_cleans_up(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)

    def nested(tokens, logits):
        eng.generate([[1, 2, 3]], max_new_tokens=2)
        return logits
    with pytest.raises(RuntimeError, match="another generate call is running on this engine"):
        eng.generate(PROMPTS, group_size=2, max_new_tokens=8, logits_processor=nested)
    assert eng.blocks.num_free == eng.num_blocks
    assert [t.token_ids for t in eng.generate(PROMPTS, group_size=2, max_new_tokens=8,
                                              temperature=1.0, seed=5)] == reference(model)


def test_nothing_of_a_call_outlives_it(model, monkeypatch):
    """After generate returns (or fails), no prompt, sample or request of the call is
    reachable (their weak references die) and the device block tables hold no row: the
    engine keeps no per-call state (each sequence points to its call's Request), and rows are
    keyed by sequence id and released when a sequence ends."""
    import gc
    import weakref
    from mapo_fast.rollout.scheduler import Scheduler
    refs = []
    add_prompt, schedule = Scheduler.add_prompt, Scheduler.schedule

    def tracked_add(self, prompt):
        refs.extend([weakref.ref(prompt), weakref.ref(prompt.request)])
        add_prompt(self, prompt)

    def tracked_schedule(self):  # every sample, as it draws (first when forked)
        batch = schedule(self)
        refs.extend(weakref.ref(s) for s, _ in batch.to_sample)
        return batch
    monkeypatch.setattr(Scheduler, "add_prompt", tracked_add)
    monkeypatch.setattr(Scheduler, "schedule", tracked_schedule)
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    out = eng.generate(PROMPTS, group_size=2, max_new_tokens=8, temperature=1.0, seed=5)
    assert len(out) == 4 and eng.runner.tables.rows == {}
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(PROMPTS, group_size=2, max_new_tokens=8,
                     logits_processor=raises(RuntimeError("boom")))
    assert eng.runner.tables.rows == {}
    del out
    gc.collect()
    assert len(refs) >= 2 * 2 + 4 and all(r() is None for r in refs)
