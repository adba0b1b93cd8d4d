"""RolloutEngine on a tiny Qwen2 built from a config: token-for-token equal to Hugging Face
generate under greedy decoding, log-probs equal to a full forward of the HF model over each
final sequence, one prefill per group with no leakage between samples, prefix-cache reuse;
every linear layer on the oneDNN path that real sizes take (``pack_tiny_linears``).

Tolerance for log-probs: the paged attention sums in another order than HF's eager attention
(fp32), so values agree to ~1e-5; 1e-4 is the bound."""

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from mapo_fast.rollout.engine import RolloutEngine  # noqa: E402

PROMPTS = [list(range(1, 40)), list(range(50, 70)), [7] * 16]  # 39, 20 and exactly one block
#: every test once eagerly and once on the static decode path (padded, static buffers)
pytestmark = pytest.mark.usefixtures("each_decode_mode", "pack_tiny_linears")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    m = Qwen2ForCausalLM(cfg).eval()
    m.config._attn_implementation = "eager"
    return m


def full_logprobs(model, tokens, start):
    """log p(tokens[t] | tokens[:t]) for t >= start, from one full forward of the HF model."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return logp[start - 1:]


def test_greedy_equals_hf_generate(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    trajs = eng.generate(PROMPTS, group_size=2, max_new_tokens=12, temperature=0.0)
    assert len(trajs) == 6 and [t.group_id for t in trajs] == [0, 0, 1, 1, 2, 2]
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                                 min_new_tokens=12, pad_token_id=0)[0].tolist()
        for g in range(2):
            t = trajs[2 * i + g]
            assert t.token_ids == ref
            assert t.loss_mask == [0] * len(p) + [1] * 12 and len(t.logprobs) == len(ref)
    # one prefill per group: each prompt's tokens once, not group_size times
    assert eng.stats["prefill_tokens"] == sum(map(len, PROMPTS))
    assert eng.blocks.num_free == eng.num_blocks  # every block returned


def test_sampled_logprobs_equal_full_forward_and_samples_do_not_leak(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    trajs = eng.generate(PROMPTS[:2], group_size=4, max_new_tokens=20, temperature=1.0,
                         seed=3)
    conts = [tuple(t.token_ids[len(PROMPTS[t.group_id]):]) for t in trajs]
    assert len(set(conts[:4])) > 1, "samples of a group should differ"
    for t in trajs:
        n = len(PROMPTS[t.group_id])
        want = full_logprobs(model, t.token_ids, n)
        got = torch.tensor(t.logprobs[n:])
        # the sampler's log-probs are at temperature 1 here: equal to the model's own
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_prefix_cache_and_seeds(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    a = eng.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=11)
    assert eng.stats["cached_prompt_tokens"] == 0
    b = eng.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=11)
    assert eng.stats["cached_prompt_tokens"] == 32   # the prompt's two full blocks were reused
    assert a[0].token_ids == b[0].token_ids           # same seed, same result
    greedy = eng.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0)
    top1 = eng.generate(PROMPTS[:1], max_new_tokens=8, temperature=1.0, top_k=1, seed=5)
    assert greedy[0].token_ids == top1[0].token_ids


def test_stop_tokens(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    free = eng.generate(PROMPTS[:1], max_new_tokens=12, temperature=0.0)[0]
    stop = free.token_ids[len(PROMPTS[0]) + 3]
    t = eng.generate(PROMPTS[:1], max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])[0]
    assert t.token_ids[-1] == stop and len(t.token_ids) <= len(free.token_ids)


def test_bad_input_is_named_before_generation(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=4)
    with pytest.raises(ValueError, match="`group_size` must be an int >= 1, got 0"):
        eng.generate(PROMPTS[:1], group_size=0)
    with pytest.raises(ValueError, match=r"`prompts\[0\]` \(39 tokens\) plus 1 turn\(s\) of up"):
        eng.generate(PROMPTS[:1], max_new_tokens=30)
    with pytest.raises(ValueError, match=r"`prompts\[1\]` is text but the engine has no tokenizer"):
        eng.generate([[1, 2], "hello"])
    with pytest.raises(ValueError, match="`model`.*cannot drive it"):
        RolloutEngine(torch.nn.Linear(2, 2))
    for bad in (0, -16, 16.0, True):
        with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
            RolloutEngine(model, None, block_size=bad)


class _Forced:
    """Logits processor that makes the model write `script` (token ids) at the start of its
    first turn, then leaves it free."""

    def __init__(self, prompt_len, script):
        self.prompt_len, self.script = prompt_len, script

    def __call__(self, tokens, logits):
        i = len(tokens) - self.prompt_len
        if i < len(self.script):
            forced = torch.full_like(logits, float("-inf"))
            forced[self.script[i]] = 0.0
            return forced
        return logits


@pytest.fixture(scope="module")
def chat():
    from tokenizer_util import byte_level_tokenizer
    tok = byte_level_tokenizer()
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    m = Qwen2ForCausalLM(cfg).eval()
    m.config._attn_implementation = "eager"
    return m, tok


def lookup_runner():
    from mapo_fast.tools import Tool, ToolRegistry, ToolResult, ToolRunner

    class Lookup(Tool):
        name = "lookup"

        def prepare(self, arguments, context):
            return ToolResult(ok=True, text=f"value of {arguments.get('key')} is 42")

    return ToolRunner(registry=ToolRegistry([Lookup()]))


LOOKUP_CALL = '<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call>'


def lookup_turn(tok, call=LOOKUP_CALL):
    """A question prompt, the tokens of ``call``, and ``generate`` options under which two
    greedy samples write ``call`` as their first turn (then 4 free tokens per turn)."""
    prompt = tok("What colour is the small square? ")["input_ids"]
    script = tok(call)["input_ids"]
    kw = dict(group_size=2, max_new_tokens=len(script) + 4, temperature=0.0,
              tools=lookup_runner(), max_turns=2, stop_token_ids=[], max_observation_tokens=32,
              logits_processor=_Forced(len(prompt), script))
    return prompt, script, kw


@pytest.mark.parametrize("call, observation, errors", [
    (LOOKUP_CALL,
     "<tool_response>value of a is 42</tool_response>", 0),
    ('<tool_call>{"name": "lookup", "arguments": {"key": </tool_call>',
     "<tool_response>Error: tool call is not valid JSON", 1),
])
def test_tool_turn_continues_like_a_naive_loop(chat, call, observation, errors):
    """A (forced) tool call ends the turn; the observation is inserted and prefilled alone;
    the model's free continuation equals HF generate re-run on the whole history."""
    model, tok = chat
    prompt, script, kw = lookup_turn(tok, call)
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=128)
    traj = eng.generate([prompt], **kw)
    for t in traj:
        turn, = t.spans.turns
        assert tok.decode(t.token_ids[turn.call.start:turn.call.end]) == call
        obs_text = tok.decode(t.token_ids[turn.observation.start:turn.observation.end])
        assert obs_text.startswith(observation)
        assert t.stats["tool_calls"] == 1 and t.stats["tool_errors"] == errors
        history = t.token_ids[:turn.observation.end]
        free = len(t.token_ids) - turn.observation.end
        assert free == len(script) + 4  # the second turn ran to its token limit
        with torch.no_grad():
            ref = model.generate(torch.tensor([history]), do_sample=False, max_new_tokens=free,
                                 min_new_tokens=free, pad_token_id=0)[0].tolist()
        assert t.token_ids == ref
        # observation tokens are not the model's: mask 0; its free tokens' log-probs are real
        assert t.loss_mask[turn.observation.start:turn.observation.end] == \
            [0] * len(turn.observation)
        got = torch.tensor(t.logprobs[turn.observation.end:])
        torch.testing.assert_close(got, full_logprobs(model, t.token_ids, turn.observation.end),
                                   atol=1e-4, rtol=0)
    # the prompt once (one group), each sample's observation once: no history re-prefilled
    obs_len = len(traj[0].spans.turns[0].observation)
    assert eng.stats["prefill_tokens"] == len(prompt) + 2 * obs_len
    # per sample: its observation prefilled, every token but the first (from the prompt's
    # logits) decoded
    for t in traj:
        assert t.stats["prefill_tokens"] == obs_len
        assert t.stats["decode_tokens"] == sum(t.loss_mask) - 1
    assert sum(t.stats["decode_tokens"] for t in traj) == eng.stats["decode_tokens"]


def test_preemption_under_a_tiny_pool_gives_the_same_greedy_results(model):
    """8 samples whose sequences need ~24 blocks in a 10-block pool: samples are preempted and
    resumed (recomputing only what was evicted) and every result equals the large pool's."""
    kw = dict(group_size=4, max_new_tokens=40, temperature=0.0)
    big = RolloutEngine(model, None, block_size=16, num_blocks=128)
    want = big.generate(PROMPTS[:2], **kw)
    small = RolloutEngine(model, None, block_size=16, num_blocks=10)
    got = small.generate(PROMPTS[:2], **kw)
    assert small.stats["preemptions"] > 0 and "preemptions" not in big.stats
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   atol=1e-5, rtol=0)
    assert small.blocks.num_free == 10
    assert sum(t.stats.get("preemptions", 0) for t in got) == small.stats["preemptions"]


def test_prompts_that_do_not_fit_together_preempt_running_samples(model):
    """Three 39-token prompts (3 blocks each) in a 6-block pool: the third prompt's allocation
    preempts the second group, which resumes later; results equal a large pool's."""
    prompts = [list(range(1, 40)), list(range(41, 80)), list(range(81, 120))]
    kw = dict(group_size=2, max_new_tokens=20, temperature=0.0)
    want = RolloutEngine(model, None, block_size=16, num_blocks=64).generate(prompts, **kw)
    small = RolloutEngine(model, None, block_size=16, num_blocks=6)
    got = small.generate(prompts, **kw)
    assert small.stats["preemptions"] > 0
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert small.blocks.num_free == 6 and small.blocks.num_seqs == 0


@pytest.mark.parametrize("chunk", [1, 5, 23])
def test_chunked_prefill_equals_one_pass(model, chunk):
    """Prompts prefilled in chunks of 1, 5 or 23 tokens (not block multiples): the same greedy
    tokens and log-probs (within 1e-5: only the summation order of a few rows differs) and the
    same prefill count as one pass, in more forward passes."""
    kw = dict(group_size=2, max_new_tokens=10, temperature=0.0)
    one = RolloutEngine(model, None, block_size=16, num_blocks=64)
    want = one.generate(PROMPTS, **kw)
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64, prefill_chunk=chunk)
    got = eng.generate(PROMPTS, **kw)
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   atol=1e-5, rtol=0)
    assert eng.stats["prefill_tokens"] == one.stats["prefill_tokens"]
    assert eng.stats["forward_passes"] > one.stats["forward_passes"]
    assert eng.blocks.num_free == 64


def test_chunked_resume_under_a_tiny_pool(model):
    """Preempted samples resumed and recomputed 7 tokens per step give the large pool's
    greedy results."""
    kw = dict(group_size=4, max_new_tokens=40, temperature=0.0)
    want = RolloutEngine(model, None, block_size=16, num_blocks=128).generate(PROMPTS[:2], **kw)
    small = RolloutEngine(model, None, block_size=16, num_blocks=10, prefill_chunk=7)
    got = small.generate(PROMPTS[:2], **kw)
    assert small.stats["preemptions"] > 0
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert small.blocks.num_free == 10 and small.blocks.num_seqs == 0


def test_chunked_observation_prefill_continues_like_one_pass(chat):
    """A tool observation prefilled 3 tokens per step (its sample waits, without sampling,
    until the whole observation is in the cache) continues exactly as with one pass."""
    model, tok = chat
    prompt, script, kw = lookup_turn(tok)
    one = RolloutEngine(model, tok, block_size=16, num_blocks=128)
    want = one.generate([prompt], **kw)
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=128, prefill_chunk=3)
    got = eng.generate([prompt], **kw)
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert [t.loss_mask for t in got] == [t.loss_mask for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   atol=1e-5, rtol=0)
    assert eng.stats["prefill_tokens"] == one.stats["prefill_tokens"]
    assert eng.stats["decode_tokens"] == one.stats["decode_tokens"]


def test_bad_prefill_chunk_is_named(model):
    with pytest.raises(ValueError, match="`prefill_chunk` must be an int >= 1, got 0"):
        RolloutEngine(model, None, prefill_chunk=0)


def test_stop_strings_end_the_turn_where_the_text_first_contains_them(chat):
    """A stop string split over several tokens ends the turn at the token that completes it
    (tokens kept); the trajectory is otherwise what the free run wrote."""
    model, tok = chat
    prompt = tok("Say it: ")["input_ids"]
    script = tok("one two STOP three four")["input_ids"]
    kw = dict(group_size=2, max_new_tokens=len(script) + 5, temperature=0.0,
              stop_token_ids=[], logits_processor=_Forced(len(prompt), script))
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=64)
    free = eng.generate([prompt], **kw)
    got = eng.generate([prompt], stop_strings=["xyz", "STOP"], **kw)
    for f, t in zip(free, got):
        text = tok.decode(t.token_ids[len(prompt):])
        assert text.endswith("STOP") and text == "one two STOP"
        assert t.token_ids == f.token_ids[:len(t.token_ids)] and sum(t.loss_mask) < sum(f.loss_mask)
    assert eng.blocks.num_free == 64


def test_max_trajectory_tokens_caps_all_turns_together(chat):
    """With a 2-turn tool script, a trajectory cap of (first turn + 3) tokens lets the first
    turn and its observation through and ends the second turn after 3 tokens."""
    model, tok = chat
    prompt, script, kw = lookup_turn(tok)
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=128)
    full = eng.generate([prompt], **kw)
    capped = eng.generate([prompt], max_trajectory_tokens=len(script) + 3, **kw)
    for f, c in zip(full, capped):
        assert sum(c.loss_mask) == len(script) + 3 and c.stats["truncated"] == 1
        assert c.token_ids == f.token_ids[:len(c.token_ids)]
        assert len(c.spans.turns) == 1 and "truncated" not in f.stats
    # a cap inside the first turn ends it before its tool call is run
    short = eng.generate([prompt], max_trajectory_tokens=5, **kw)
    assert all(sum(t.loss_mask) == 5 and not t.spans.turns for t in short)
    assert eng.blocks.num_free == 128


def test_bad_stop_options_are_named(model):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    with pytest.raises(ValueError, match="`max_trajectory_tokens` must be an int >= 1 or None, "
                                         "got 0"):
        eng.generate(PROMPTS[:1], max_trajectory_tokens=0)
    with pytest.raises(ValueError, match="`stop_strings` must be a list of non-empty strings"):
        eng.generate(PROMPTS[:1], stop_strings=["x"])  # no tokenizer


def test_prompts_prefilled_together_equal_one_at_a_time(model):
    """Prompts of 39, 20, 16, 70 and 45 tokens (the last two sharing the first's leading
    blocks) prefilled in one forward pass: the same greedy tokens and log-probs (within 1e-5:
    rows are summed in another order) as each prompt alone, in one prefill pass instead of
    five; sampled at temperature 1 the draws are the same too."""
    prompts = PROMPTS + [list(range(1, 40)) + list(range(100, 131)), list(range(1, 46))]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        kw.update(group_size=2, max_new_tokens=9)
        eng = RolloutEngine(model, None, block_size=16, num_blocks=128)
        got = eng.generate(prompts, **kw)
        assert eng.stats["prefill_passes"] == 1
        for i, p in enumerate(prompts):
            alone = RolloutEngine(model, None, block_size=16, num_blocks=128)
            kw_i = dict(kw, seed=kw["seed"] + 2 * i) if "seed" in kw else kw
            want = alone.generate([p], **kw_i)
            for a, b in zip(got[2 * i:2 * i + 2], want):
                assert a.token_ids == b.token_ids
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                           atol=1e-5, rtol=0)
        assert eng.blocks.num_free == 128


@pytest.mark.parametrize("budget, chunk", [(24, 2048), (40, 7), (1, 1)])
def test_a_small_token_budget_gives_the_same_results(model, budget, chunk):
    """Forward passes of at most 24, 40 or 1 token(s) (prompts split across steps, decode
    tokens deferred when the budget is spent): the same greedy results as an unbounded step,
    each pass within its budget."""
    kw = dict(group_size=3, max_new_tokens=10, temperature=0.0)
    want = RolloutEngine(model, None, block_size=16, num_blocks=64).generate(PROMPTS, **kw)
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64, max_batch_tokens=budget,
                        prefill_chunk=chunk)
    sizes = []
    run = eng.runner.run
    eng.runner.run = lambda batch: (sizes.append(batch.num_tokens), run(batch))[1]
    got = eng.generate(PROMPTS, **kw)
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert max(sizes) <= budget
    assert eng.stats["prefill_tokens"] == sum(map(len, PROMPTS))
    with pytest.raises(ValueError, match="`max_batch_tokens` must be an int >= 1, got 0"):
        RolloutEngine(model, None, max_batch_tokens=0)


@pytest.mark.parametrize("block_size", [8, 24])
def test_triton_attention_path_equals_torch_path(model, block_size, monkeypatch):
    """The engine through the Triton paged-attention kernel (the interpreter here; the CUDA
    path when flash-attn does not apply): the same greedy tokens as the torch path, log-probs
    within 1e-4, with pages smaller and larger than the kernel's key tile (24: not a power of two); the block tables
    reach the device incrementally (entries copied: far fewer than steps x table entries)."""
    pytest.importorskip("triton")
    from mapo_fast.rollout.attention import choose_path
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAPO_FAST_BACKEND", backend)
        eng = RolloutEngine(model, None, block_size=block_size, num_blocks=64)
        trajs = eng.generate(PROMPTS[:2], group_size=2, max_new_tokens=6, temperature=0.0)
        out[backend] = trajs
        path = backend if backend == "triton" else choose_path(
            torch.device("cpu"), torch.float32, block_size, True, "torch")
        assert eng.stats.get(f"attention_{path}_passes", 0) == eng.stats["forward_passes"]
    for a, b in zip(out["triton"], out["torch"]):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   atol=1e-4, rtol=1e-4)
    entries = eng.stats["block_table_entries_copied"]
    max_table = (max(map(len, PROMPTS[:2])) + 6 + block_size - 1) // block_size
    assert entries <= 4 * max_table + 8, entries  # each sample's table about once


def test_generate_takes_parameter_objects_or_their_fields(model):
    """``generate(prompts, SamplingParams(...), ToolParams(...))`` equals the keyword form;
    a field given both ways, or an unknown keyword, is refused by name."""
    from mapo_fast import SamplingParams, ToolParams
    kw = dict(max_new_tokens=6, temperature=1.0, seed=4)
    a = RolloutEngine(model, None, block_size=16, num_blocks=64).generate(
        PROMPTS[:2], group_size=2, **kw)
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)  # no cached prefix
    b = eng.generate(PROMPTS[:2], SamplingParams(**kw), ToolParams(), group_size=2)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.logprobs for t in a] == [t.logprobs for t in b]
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['temprature'\]"):
        eng.generate(PROMPTS[:1], temprature=1.0)
    with pytest.raises(ValueError, match=r"its fields not given again as keywords; got "
                                         r"SamplingParams and \['seed'\]"):
        eng.generate(PROMPTS[:1], SamplingParams(), seed=1)
    with pytest.raises(ValueError, match=r"cannot be given again as keywords, got "
                                         r"\['max_turns'\]"):
        eng.generate(PROMPTS[:1], None, ToolParams(), max_turns=2)
    assert eng.blocks.num_free == 64


@pytest.mark.parametrize("key, value", [("stop_strings", "x"), ("stop_strings", 5),
                                        ("stop_token_ids", 7), ("stop_token_ids", "ab")])
def test_stop_options_of_the_wrong_kind_are_named(model, key, value):
    eng = RolloutEngine(model, None, block_size=16, num_blocks=64)
    with pytest.raises(ValueError, match=f"`{key}` must be a list of"):
        eng.generate(PROMPTS[:1], **{key: value})
