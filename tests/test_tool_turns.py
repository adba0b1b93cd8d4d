"""Turn rules, observations and description spans (``rollout.tool_turns``) and the sampler
(``rollout.sampler``), each through its own interface, without a model."""

import pytest
import torch

from mapo_fast.rollout.params import SamplingParams, ToolParams
from mapo_fast.rollout.sampler import Sampler
from mapo_fast.rollout.sequence import PromptSeq, Sample, Status, TurnEvent
from mapo_fast.rollout.tool_turns import ToolTurns, find_marker, observation_tokens
from mapo_fast.tools import ToolRunner
from mapo_fast.trajectory import OBSERVATION_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    from tokenizer_util import byte_level_tokenizer
    return byte_level_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def sample(tok, text="Q:", **kw):
    prompt = PromptSeq(tokens=ids(tok, text))
    return Sample.fork(prompt, 0, **kw)


def write(turns, s, tok, lp=-0.5):
    """Appends ``tok`` as the scheduler does and returns what the tool turns decide of it;
    the tool turns never write the sample (checked: the same before and after)."""
    s.append_sampled(tok, lp)
    before = (list(s.tokens), list(s.turns), dict(s.stats), s.turn_start, s.generated)
    out = turns.decide(s, tok)
    assert (list(s.tokens), list(s.turns), dict(s.stats), s.turn_start, s.generated) == before
    return out


def feed(turns, s, text):
    """Writes the tokens of ``text`` one by one until one ends the turn; returns the last
    token's ``(TurnEvent, call text)``."""
    out = (TurnEvent.CONTINUE, None)
    for t in ids(turns.tokenizer, text):
        out = write(turns, s, t)
        if out[0] is not TurnEvent.CONTINUE:
            break
    assert s.status is Status.WAITING and s.num_computed == s.prompt_len  # untouched
    return out


def test_find_marker_spans_tokens(tok):
    text = "abc <tool_call>{\"name\": 1}</tool_call> then <description>x</description>"
    toks = ids(tok, text)
    for marker in ("<tool_call>", "</tool_call>", "<description>", "name"):
        k = find_marker(tok, toks, 0, marker)
        assert marker in tok.decode(toks[k:]) and marker not in tok.decode(toks[k + 1:])
    assert find_marker(tok, toks, 3, "absent") == 3


def test_observation_tokens_text_is_cut_and_templated(tok):
    obs, at = observation_tokens(tok, OBSERVATION_TEMPLATE, text="error: box outside the image")
    assert tok.decode(obs) == OBSERVATION_TEMPLATE.format("error: box outside the image")
    assert at == -1
    cut, _ = observation_tokens(tok, OBSERVATION_TEMPLATE, text="error: box outside the image",
                                max_tokens=3)
    assert cut == obs[:3]


def test_turn_ends_on_stop_token_limit_string_and_tool_call(tok):
    turns = ToolTurns(tok, None, SamplingParams(max_new_tokens=50), ToolParams(), {})
    s = sample(tok)
    assert feed(turns, s, "The answer")[0] is TurnEvent.CONTINUE
    assert write(turns, s, tok.eos_token_id, -0.1) == (TurnEvent.FINISHED, None)  # the EOS
    assert s.loss_mask == [1] * len(s.logprobs) and s.logprobs[-1] == -0.1

    short = ToolTurns(tok, None, SamplingParams(max_new_tokens=3), ToolParams(), {})
    s = sample(tok)
    assert feed(short, s, "a long answer that goes on")[0] is TurnEvent.FINISHED
    assert s.turn_tokens == 3

    strings = ToolTurns(tok, None, SamplingParams(stop_strings=("says",)), ToolParams(), {})
    s = sample(tok)
    assert feed(strings, s, "The sign says 42 and more")[0] is TurnEvent.FINISHED
    assert tok.decode(s.tokens[s.prompt_len:]).endswith("says")

    tools = ToolTurns(tok, None, SamplingParams(), ToolParams(runner=ToolRunner(), max_turns=2),
                      {})
    s = sample(tok, session=tools.new_session())
    event, call = feed(tools, s, "<tool_call>{\"name\": \"x\"}</tool_call> never reached")
    assert event is TurnEvent.TOOL_CALL and call.endswith("</tool_call>")

    capped = ToolTurns(tok, None, SamplingParams(max_trajectory_tokens=2), ToolParams(), {})
    s = sample(tok)
    assert feed(capped, s, "a long answer")[0] is TurnEvent.TRUNCATED
    assert s.generated == 2


def test_failed_call_gets_a_text_observation_and_a_description_span(tok):
    runner = ToolRunner()
    turns = ToolTurns(tok, None, SamplingParams(), ToolParams(runner=runner, max_turns=3), {})
    s = sample(tok, session=turns.new_session())
    event, call = feed(turns, s, "zoom <tool_call>{\"name\": \"nope\", \"arguments\": {}}"
                                 "</tool_call>")
    assert event is TurnEvent.TOOL_CALL
    (obs,) = turns.run([(s, call)])
    assert s.turns == [] and obs.error  # built, not applied
    s.observe(obs)
    turn = s.turns[0]
    assert turn.error and "unknown tool" in turn.error
    assert tok.decode(s.tokens[turn.call.start:turn.call.end]).lstrip().startswith("<tool_call>")
    obs = s.tokens[turn.observation.start:turn.observation.end]
    assert tok.decode(obs).startswith("<tool_response>") and s.loss_mask[-len(obs):] == \
        [0] * len(obs)
    assert turn.observation.end == len(s.tokens)               # appended, to be prefilled
    assert s.turn_start == len(s.tokens) and s.turn_tokens == 0  # the next turn starts
    feed(turns, s, "<description>a red circle</description><answer>B</answer>")
    write(turns, s, tok.eos_token_id, 0.0)
    (turn,) = turns.described(s)
    assert s.turns[0].description is None  # described copies; the sample is unchanged
    assert turn.description_text == "a red circle"
    assert "<description>" in tok.decode(s.tokens[turn.description.start:turn.description.end])
    assert s.stats["tool_calls"] == 1 and s.stats["tool_errors"] == 1
    assert runner.stats["error:unknown_tool"] == 1


def test_sampler_bans_tokens_and_applies_the_processor():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 2)
    seqs = [Sample(tokens=[1, 2], generator=None), Sample(tokens=[3], generator=None)]
    greedy = Sampler(SamplingParams(temperature=0.0), banned=[1])
    toks, lps = greedy(seqs, logits)
    assert toks == [3, 3]
    seen = []

    def only_two(tokens, row):
        seen.append(list(tokens))
        out = torch.full_like(row, float("-inf"))
        out[2] = 0.0
        return out
    toks, lps = Sampler(SamplingParams(temperature=0.0, logits_processor=only_two))(seqs, logits)
    # the processor shapes the draw; the recorded log-prob is the model's (mapo_fast.policy)
    want = float(torch.log_softmax(logits[0], -1)[2])
    assert toks == [2, 2] and lps == pytest.approx([want, want]) and seen == [[1, 2], [3]]

    class OnlyTwoBatched:  # the same, one call per step for all rows
        calls = []

        def batch(self, token_lists, rows):
            self.calls.append(token_lists)
            out = torch.full_like(rows, float("-inf"))
            out[:, 2] = 0.0
            return out
    proc = OnlyTwoBatched()
    toks2, lps2 = Sampler(SamplingParams(temperature=0.0, logits_processor=proc))(seqs, logits)
    assert (toks2, lps2) == (toks, lps) and proc.calls == [[[1, 2], [3]]]
    proc.batch = lambda token_lists, rows: rows[:1]
    with pytest.raises(ValueError, match=r"must return float logits of shape \(2, 4\), got \(1, 4\)"):
        Sampler(SamplingParams(temperature=0.0, logits_processor=proc))(seqs, logits)
    # banned tokens leave the recorded distribution too, and a processor cannot revive one
    revive = Sampler(SamplingParams(temperature=0.5, seed=0, logits_processor=lambda t, r: torch.zeros_like(r)),
                     banned=[1])
    toks, lps = revive([Sample(tokens=[1], generator=torch.Generator().manual_seed(i))
                        for i in range(64)], logits[:1].expand(64, -1).clone())
    assert 1 not in toks
    allowed = torch.log_softmax(logits[0, [0, 2, 3]] / 0.5, -1)
    for t, lp in zip(toks, lps):
        assert lp == pytest.approx(float(allowed[[0, 2, 3].index(t)]), rel=1e-6)
    with pytest.raises(ValueError, match="`temperature` must be a finite number"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(ValueError, match="`max_observation_tokens` must be an int >= 1, got 0"):
        ToolParams(max_observation_tokens=0)
    with pytest.raises(ValueError, match="`tools` must be a ToolRunner"):
        ToolParams(runner=3)
