import pytest
import torch

from mapo_fast.rewards import (AccuracyReward, CompositeReward, FormatReward, OracleVerifier,
                               ToolUseReward, choice_letter, extract_answer, parse_number)
from mapo_fast.trajectory import Span, ToolTurn, Trajectory, TrajectorySpans


@pytest.mark.parametrize("text, truth, mode, expected", [
    ("<answer>Paris</answer>", "Paris", "exact", 1.0),
    ("<answer>paris</answer>", "Paris", "exact", 0.0),
    ("<answer>The Eiffel tower!</answer>", "eiffel Tower", "normalized", 1.0),
    ("<answer>1,234.0</answer>", "1234", "numeric", 1.0),
    ("<answer>about 7 apples</answer>", "7", "numeric", 1.0),
    ("<answer>1/2</answer>", "0.5", "numeric", 1.0),
    ("<answer>50%</answer>", "0.5", "numeric", 1.0),
    ("<answer>7.1</answer>", "7", "numeric", 0.0),
    ("<answer>(B)</answer>", "B", "choice", 1.0),
    ("<answer>b. a red circle</answer>", "B", "choice", 1.0),
    ("<answer>The answer is C</answer>", "B", "choice", 0.0),
    ("<answer>C</answer>", "(c)", "auto", 1.0),
    ("<answer>42</answer>", "42.0", "auto", 1.0),
    ("<answer>a Red square</answer>", "red square", "auto", 1.0),
    ("no tags, \\boxed{12}", "12", "auto", 1.0),
    ("no answer at all", "12", "auto", 0.0),
    ("<answer>first</answer> then <answer>second</answer>", "second", "exact", 1.0),
])
def test_accuracy_modes(text, truth, mode, expected):
    assert AccuracyReward(mode=mode)(text, truth) == expected


def test_answer_helpers():
    assert extract_answer("x <answer> 5 </answer>") == "5"
    assert extract_answer("nothing") is None
    assert parse_number("no digits") is None and parse_number("-3.5e2 m") == -350.0
    assert choice_letter("option d") == "D" and choice_letter("42") is None


def test_format_reward_checks():
    spans = TrajectorySpans(turns=[ToolTurn(call=Span(0, 2), observation=Span(2, 4))])
    good = "<tool_call>{}</tool_call> <description>x</description> <answer>1</answer>"
    assert FormatReward()(good) == 1.0
    assert FormatReward().checks(good, spans) == {"answer": True, "tags_closed": True,
                                                  "described": False}
    assert FormatReward()("<answer>1</answer><answer>2</answer>") == 0.5
    assert FormatReward()("<description>open") == 0.0


def test_tool_use_and_composite():
    ok = TrajectorySpans(turns=[ToolTurn(call=Span(0, 1), observation=Span(1, 2), crop_index=0)])
    failed = TrajectorySpans(turns=[ToolTurn(call=Span(0, 1), error="bad box")])
    assert ToolUseReward(0.3)("", None, ok) == 0.3 and ToolUseReward(0.3)("", None, failed) == 0.0
    reward = CompositeReward([("accuracy", AccuracyReward(), 1.0), ("format", FormatReward(), 0.5),
                              ("tool", ToolUseReward(0.1), 1.0)])
    total, parts = reward.batch(["<answer>3</answer>", "<answer>4"], ["3", "4"], [ok, failed])
    assert parts["accuracy"].tolist() == [1.0, 0.0]
    # format: the first trajectory's observation has no description (2 of 3 checks pass), the
    # second's answer is not closed (only "described", vacuously, passes)
    torch.testing.assert_close(parts["format"], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(total, torch.tensor([1.0 + 0.5 * 2 / 3 + 0.1, 0.5 / 3]))
    with pytest.raises(ValueError, match="2 texts, 1 truths"):
        reward.batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="`mode`.*'fuzzy'"):
        AccuracyReward(mode="fuzzy")


VOCAB = ["red", "blue", "green", "circle", "square", "dark red", "7", "3"]


def test_oracle_verifier_scores_mentions_against_truth():
    v = OracleVerifier(VOCAB)
    crops = [torch.zeros(3, 4, 4, dtype=torch.uint8)] * 6
    descriptions = ["A red circle and the digit 7.", "a blue square", "Two dark red circles",
                    None, "", "nothing of note"]
    regions = [{"red", "circle", "7"}, {"red", "circle"}, {"dark red", "circle"},
               {"red"}, {"red"}, set()]
    s = v.score(descriptions, crops, regions)
    # exact; all wrong (0 of 4 terms); "dark red" does not also count as "red"; missing
    # descriptions get the minimum; empty truth and nothing claimed is truthful
    torch.testing.assert_close(s, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    assert v.stats["missing"] == 2 and v.stats["scored"] == 4
    assert v.mentioned("a RED Circles") == {"red", "circle"}
    with pytest.raises(ValueError, match="`regions\\[0\\]` is None"):
        v.score(["red"], crops[:1], [None])
    with pytest.raises(ValueError, match="2 descriptions, 1 crops"):
        v.score(["a", "b"], crops[:1])


def test_score_trajectories_batches_every_turn_once():
    v = OracleVerifier(VOCAB)
    crop = torch.zeros(3, 2, 2, dtype=torch.uint8)

    def traj(turns):
        return Trajectory(token_ids=[0] * 10, logprobs=[0.0] * 10, loss_mask=[1] * 10,
                          spans=TrajectorySpans(turns=turns), crops=[crop, crop])

    def turn(desc, region, crop_index=0, error=None):
        return ToolTurn(call=Span(0, 1), observation=Span(1, 2), description_text=desc,
                        crop_index=crop_index, error=error, region=region)

    batch = [traj([turn("red circle", {"red", "circle"}), turn("blue", {"red"}, 1)]),
             traj([turn("x", {"red"}, None, error="bad box")]),
             traj([turn(None, {"red"})])]
    calls = []
    real = v._score
    v._score = lambda *a: (calls.append(len(a[0])), real(*a))[1]
    scores, mask = v.score_trajectories(batch)
    assert calls == [2]  # one model call for all described turns of all trajectories
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
