import pytest
import torch

from mapo_fast.trajectory import Span, Trajectory, spans_from_text, token_turns, turn_batch
from tokenizer_util import bpe_tokenizer

PROMPT = "What colour is the small square? "
CALL = ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 220]}}'
        '</tool_call>')
TEXT = (PROMPT + "Let me zoom in. " + CALL + " <|vision_start|><|image_pad|><|image_pad|>"
        "<|vision_end|> <description>a red circle next to the digit 7</description> "
        "Now the top left corner. " + CALL + " <|vision_start|><|image_pad|><|vision_end|> "
        "The sign says 42. " + CALL + " <tool_response>error: box outside the image"
        "</tool_response> " + CALL + " <answer>B</answer>")


def decode(ids, span):
    return bpe_tokenizer().decode(ids[span.start:span.end], skip_special_tokens=False)


@pytest.fixture(params=["tokenizers", "transformers"])
def tokenizer(request):
    tok = bpe_tokenizer()
    if request.param == "transformers":
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    return tok


def test_spans_from_text(tokenizer):
    ids, spans = spans_from_text(TEXT, tokenizer, prompt_chars=len(PROMPT))
    assert spans.prompt_len > 0 and len(spans.turns) == 4
    t0, t1, t2, t3 = spans.turns
    assert "image_zoom_in_tool" in decode(ids, t0.call)
    assert "vision_start" in decode(ids, t0.observation)
    assert t0.description_text == "a red circle next to the digit 7"
    assert "red circle" in decode(ids, t0.description)
    assert t0.ok and t0.crop_index == 0
    assert t1.ok and t1.description is None and t1.crop_index == 1  # no description written
    assert "tool_response" in decode(ids, t2.observation)          # a text response: an error
    assert t2.error == "error: box outside the image" and not t2.ok and t2.crop_index is None
    assert t3.observation is None and t3.error and not t3.ok       # no observation followed
    assert spans.answer_text == "B" and "answer" in decode(ids, spans.answer)
    for t in spans.turns[:3]:
        assert t.call.end <= t.observation.start


def test_token_turn_covers_call_and_description():
    ids, spans = spans_from_text(TEXT, bpe_tokenizer(), prompt_chars=len(PROMPT))
    tt = spans.token_turn(len(ids))
    t0, t1 = spans.turns[:2]
    assert (tt[:spans.prompt_len] == -1).all()
    assert (tt[t0.call.start:t0.description.end] == 0).all()
    assert (tt[t0.description.end:t1.observation.end] == 1).all()  # turn 1 ends with its observation
    assert (tt[t1.observation.end:] == -1).all()   # failed calls and the answer: no turn
    assert spans.n_scored_turns == 2


def test_turn_batch_pads_for_mapo_advantages():
    ids, spans = spans_from_text(TEXT, bpe_tokenizer(), prompt_chars=len(PROMPT))
    _, empty = spans_from_text("no tools here <answer>4</answer>", bpe_tokenizer())
    sem, mask, tt = turn_batch([spans, empty], [len(ids), 9], [[0.9, 0.1], []])
    assert sem.shape == (2, 2) and mask.tolist() == [[True] * 2, [False] * 2]
    assert tt.shape == (2, len(ids)) and (tt[1] == -1).all()
    assert torch.equal(token_turns([spans, empty], [len(ids), 9]), tt)
    with pytest.raises(ValueError, match="2 scored turns but 1 scores"):
        turn_batch([spans], [len(ids)], [[0.5]])
    with pytest.raises(ValueError, match="2 spans and 1 lengths"):
        token_turns([spans, empty], [3])


def test_trajectory_checks_alignment():
    with pytest.raises(ValueError, match="`logprobs` has 2 entries, `token_ids` has 3"):
        Trajectory(token_ids=[1, 2, 3], logprobs=[0.0, 0.0], loss_mask=[0, 1, 1],
                   spans=spans_from_text("x", bpe_tokenizer())[1])
    with pytest.raises(ValueError, match="start=3, end=2"):
        Span(3, 2)


def test_tokenizer_without_offsets_is_named():
    class Plain:
        def __call__(self, text, **kw):
            raise NotImplementedError("no offsets")
    with pytest.raises(ValueError, match="`tokenizer`.*Plain"):
        spans_from_text(TEXT, Plain())
