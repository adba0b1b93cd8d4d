"""The built-in task's reasoning-action gap: the hallucinating expert's gap share matches its
documented value, the oracle scores a description of an absent target below one of a present
target, the honest control writes the expert turns of earlier versions, and the gap metrics
count what they name."""

import json

import pytest
import torch

from mapo_fast.rewards import FAITHFUL_SCORE, OracleVerifier
from mapo_fast.tasks.visual_search import EXPERTS, VisualSearchTask
from mapo_fast.trainer.metrics import gap_metrics

# The honest expert's turns for seed 0, train samples 0..11, as written before the task had the
# hallucinating expert (the bottom-right samples 2, 4, 8, 10 are missed and described honestly).
CONTROL = {
    0: ([0, 28, 28, 56], "red circle", "red"), 1: ([0, 28, 28, 56], "red circle", "red"),
    2: ([0, 0, 28, 28], "yellow square", "yellow"), 3: ([0, 28, 28, 56], "blue circle", "blue"),
    4: ([0, 0, 28, 28], "green circle", "green"), 5: ([28, 0, 56, 28], "green circle", "green"),
    6: ([28, 0, 56, 28], "yellow square", "yellow"), 7: ([0, 0, 28, 28], "yellow circle",
                                                         "yellow"),
    8: ([0, 0, 28, 28], "yellow circle", "yellow"), 9: ([28, 0, 56, 28], "blue square", "blue"),
    10: ([0, 0, 28, 28], "green circle", "green"), 11: ([0, 0, 28, 28], "green square", "green"),
}


def turns(task, s):
    call, rest = task.expert_turns(s)
    box = json.loads(call[len("<tool_call>"):-len("</tool_call>")])["arguments"]["bbox_2d"]
    desc = rest.split("<description>")[1].split("</description>")[0]
    answer = rest.split("<answer>")[1].split("</answer>")[0]
    return box, desc, answer


def crop_box(task, s, quadrant):
    half = task.image_size // 2
    r, c = quadrant
    return (0, c * half, r * half, c * half + half, r * half + half)


def test_control_restores_the_honest_expert():
    task = VisualSearchTask(0, expert="honest", blind_spot="bottom_right")
    for i, want in CONTROL.items():
        assert turns(task, task.sample("train", i)) == want


def test_gap_share_matches_its_documented_value():
    task = VisualSearchTask(0)
    n = 1200
    gap = missed = 0
    for i in range(n):
        s = task.sample("train", i)
        box, desc, answer = turns(task, s)
        hit = task.target_in(s, crop_box(task, s, task.expert_quadrant(s)))
        missed += not hit
        gap += (not hit) and answer == s.answer
        if not hit:  # speaks of the target as the overview suggests
            assert desc == f"{s.hint} {s.objects[0][1]}" and answer == s.hint
    p = task.expected_gap_share
    assert p == pytest.approx(0.25)  # half the rings x 2/3 missed x hint_reliability 0.75
    assert abs(gap / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert abs(missed / n - 1 / 3) < 4 * (1 / 3 * 2 / 3 / n) ** 0.5
    assert VisualSearchTask(0, expert="honest").expected_gap_share == 0.0
    assert VisualSearchTask(0, blind_spot="bottom_right").expected_gap_share == \
        pytest.approx(0.125)


def test_hint_is_right_at_its_reliability_and_leaves_the_layout():
    a, b = VisualSearchTask(3, hint_reliability=1.0), VisualSearchTask(3, hint_reliability=0.0)
    for i in range(40):
        sa, sb = a.sample("eval", i), b.sample("eval", i)
        assert sa.hint == sa.answer and sb.hint != sb.answer
        assert sa.objects == sb.objects
        ys, xs = torch.nonzero((sa.image != sb.image).any(0), as_tuple=True)
        _, _, cx, cy = sa.objects[0]
        d = ((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).sqrt()
        assert len(d) > 0 and bool((d < a.ring_radius).all())  # only the tinted disc differs


def test_oracle_scores_an_absent_target_below_a_present_one():
    task = VisualSearchTask(0)
    oracle = OracleVerifier(task.vocabulary)
    target, hallucinated = [], []
    for i in range(90):
        s = task.sample("train", i)
        if task.expert_quadrant(s) == s.quadrant:
            continue
        wrong = task.region_terms(s, crop_box(task, s, task.expert_quadrant(s)))
        right = task.region_terms(s, crop_box(task, s, s.quadrant))
        described = f"{s.answer} {s.objects[0][1]}"  # the target, as it is
        target.append(oracle.score([described, described], [None, None], [wrong, right]))
        hallucinated.append(oracle.score([turns(task, s)[1]], [None], [wrong])[0])
    assert len(target) >= 10
    # the target's colour is never a distractor's: absent, it scores below the bar; present, 1
    assert all(a < FAITHFUL_SCORE and b == 1.0 for a, b in target)
    # the expert's hallucinations match their crop only by chance (the tint and the shape of
    # a distractor there): most fall below the bar
    assert sum(float(h) < FAITHFUL_SCORE for h in hallucinated) >= 0.8 * len(hallucinated)


@pytest.mark.parametrize("kwargs, match", [
    ({"expert": "liar"}, "`expert` must be one of"),
    ({"hint_reliability": 1.5}, "`hint_reliability` must be a number in"),
    ({"blind_spot": "left"}, "`blind_spot` must be one of"),
    ({"detail": "stripes"}, r"`detail` must be one of \['solid', 'checker'\], got 'stripes'"),
    ({"detail": "checker", "image_size": 168, "target_size": 14},
     r"`detail` 'checker' needs `image_size` \(168\) to be an even multiple of `view_size` "
     r"\(56\)"),
])
def test_bad_task_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisualSearchTask(0, **kwargs)
    assert "liar" not in EXPERTS


def test_gap_metrics_count_what_they_name():
    correct = torch.tensor([1.0, 1.0, 0.0, 1.0])
    scores = torch.tensor([[1.0, 0.0], [0.2, 0.0], [0.9, 0.5], [0.0, 0.0]])
    mask = torch.tensor([[True, False], [True, False], [True, True], [False, False]])
    hits = [[True], [False], [False, True], []]
    m = gap_metrics(correct, scores, mask, hits)
    assert m["faithfulness"] == pytest.approx(3 / 4)      # 1.0, 0.9 and 0.5 reach 0.5
    assert m["action_accuracy"] == pytest.approx(2 / 4)   # 2 of 4 turns on the target
    assert m["right_answer_wrong_action"] == pytest.approx(2 / 4)  # rows 1 and 3
    none = gap_metrics(correct, scores, torch.zeros_like(mask))
    assert none["faithfulness"] is None and none["action_accuracy"] is None
    with pytest.raises(ValueError, match="rows of `hits`"):
        gap_metrics(correct, scores, mask, hits[:2])



def _overview_and_crop(task, s, image):
    from mapo_fast.tools.ops import crop_and_zoom
    S, v = task.image_size, task.view_size
    ov = crop_and_zoom([image], [[0, 0, 0, S, S]], size=(v, v))[0].float()
    crop = crop_and_zoom([image], [crop_box(task, s, s.quadrant)], size=(v, v))[0].float()
    return ov, crop


def _recoloured(task, s, colour, monkeypatch):
    """``s`` drawn again with every shape in ``colour`` (layout, noise and tint unchanged)."""
    objects = [(colour, shape, cx, cy) for _, shape, cx, cy in s.objects]
    monkeypatch.setattr(task, "_hint", lambda c, g: s.hint)
    image, _ = task._render(objects, torch.Generator().manual_seed(0))
    return image


@pytest.mark.parametrize("detail", ["checker", "solid"])
def test_only_the_checker_detail_hides_the_colour_from_the_overview(detail, monkeypatch):
    # one sample with its shapes in each palette colour in turn. Checker: the overviews differ
    # by at most 6 of 255 anywhere (the pattern's residue, about 2 per colour, and uint8
    # rounding; the background's noise is +-18), the quadrant crops by more than 100 on the
    # target. Solid: the overviews already differ by more than 100.
    task = VisualSearchTask(2, detail=detail)
    s = task.sample("train", 5)
    views = [_overview_and_crop(task, s, _recoloured(task, s, c, monkeypatch))
             for c in task.colours]
    ov_gap = max(float((a[0] - b[0]).abs().max()) for a in views for b in views)
    crop_gap = max(float((a[1] - b[1]).abs().max()) for a in views for b in views)
    assert crop_gap > 100
    if detail == "checker":
        assert ov_gap <= 6.0
        assert list(task.colours) == ["red", "green", "blue", "white"]
        assert task.vocabulary[:4] == list(task.colours)
    else:
        assert ov_gap > 100


def test_checker_samples_are_deterministic_and_use_their_palette():
    task = VisualSearchTask(1, detail="checker")
    a, b = task.sample("eval", 7), task.sample("eval", 7)
    assert torch.equal(a.image, b.image) and a.answer == b.answer
    answers = {task.sample("train", i).answer for i in range(40)}
    assert answers == {"red", "green", "blue", "white"}


def test_openings_force_an_answer_a_missed_or_the_right_call():
    task = VisualSearchTask(0)
    s = task.sample("train", 3)
    assert task.opening(s, "no_zoom") == "<answer>"
    r, c = s.quadrant
    for name, quadrant in (("right_zoom", (r, c)), ("wrong_zoom", (1 - r, c))):
        call = task.opening(s, name)
        box = json.loads(call[len("<tool_call>"):-len("</tool_call>")])["arguments"]["bbox_2d"]
        assert box == task.quadrant_box(quadrant)
        assert task.target_in(s, crop_box(task, s, quadrant)) == (name == "right_zoom")
    with pytest.raises(ValueError, match=r"`name` must be one of \['no_zoom', 'wrong_zoom', "
                                         r"'right_zoom'\], got 'peek'"):
        task.opening(s, "peek")


def test_an_expert_that_does_not_describe_answers_the_same():
    with_d, without = VisualSearchTask(5), VisualSearchTask(5, describe=False)
    for i in range(12):
        s = with_d.sample("train", i)
        call, after = with_d.expert_turns(s)
        call2, after2 = without.expert_turns(without.sample("train", i))
        assert call == call2 and "<description>" in after and "<description>" not in after2
        assert after.split("</description>")[1] == after2  # the same answer
    with pytest.raises(ValueError, match="`describe` must be a bool, got 'no'"):
        VisualSearchTask(describe="no")


class _WholeImageChecker(VisualSearchTask):
    """The reference: the checker pattern and its fade computed over the whole image."""

    def _checker(self, img, inside, rgb, xs, ys):
        cell = self.image_size // self.view_size
        k = 3 * cell + 1
        alpha = torch.nn.functional.avg_pool2d(inside[None, None].float(), k, 1, k // 2,
                                               count_include_pad=False)[0, 0]
        off = cell // 2
        sign = ((torch.div(xs.long() + off, cell, rounding_mode="floor")
                 + torch.div(ys.long() + off, cell, rounding_mode="floor")) % 2) * 2 - 1
        return img * (1 - alpha) + alpha * (127.5 + sign * (rgb - 127.5))


@pytest.mark.parametrize("kwargs", [dict(), dict(image_size=448), dict(target_size=12,
                                                                        distractors=7)])
def test_checker_shapes_drawn_in_a_window_equal_the_whole_image_computation(kwargs):
    """Shapes at the image's edges included (their window is clipped there)."""
    fast = VisualSearchTask(11, detail="checker", **kwargs)
    ref = _WholeImageChecker(11, detail="checker", **kwargs)
    for i in range(24):
        assert torch.equal(fast.sample("train", i).image, ref.sample("train", i).image), i
