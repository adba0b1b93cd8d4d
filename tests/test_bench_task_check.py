"""bench/bench_task_check.py at toy size: each point evaluated the four ways, the tint's
reliability counted on the same samples, the JSON and markdown written, a run's checkpoint
copied and left unchanged."""

import json
import os
import sys

import pytest

pytest.importorskip("mapo_fast.kernels._block_manager")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import bench_task_check as tc  # noqa: E402
from test_trainer import TOY, run  # noqa: E402

SMALL = [*TOY, "--warm_start.steps", "2", "--task.eval_size", "4", "--task.detail", "checker",
         "--rollout.max_new_tokens", "64"]


def test_points_are_evaluated_four_ways(tmp_path):
    folder = tmp_path / "runs" / "hallucinating" / "seed1" / "warm"
    run(folder, 0, "--seed", "1", "--task.detail", "checker")
    before = sorted(os.listdir(folder / "checkpoints"))
    tc.main(["--runs", str(folder), "--report", str(tmp_path), "--tag", "toy", "--", *SMALL])
    res = json.loads((tmp_path / "task-check-toy.json").read_text())
    point = res["points"]["hallucinating/seed1/warm"]  # named without the machine's path
    assert set(tc.WAYS) <= set(point)
    assert point["no_zoom"]["tool_use"] == 0.0 and point["right_zoom"]["action_accuracy"] == 1.0
    assert point["wrong_zoom"]["action_accuracy"] == 0.0
    from mapo_fast.tasks.visual_search import VisualSearchTask
    task = VisualSearchTask(1, detail="checker")
    want = sum(s.hint == s.answer for s in task.batch("eval", 0, 4)) / 4
    assert point["hint_reliability"] == want
    assert res["summary"]["right_zoom"]["accuracy"]["mean"] == point["right_zoom"]["accuracy"]
    md = (tmp_path / "task-check-toy.md").read_text()
    assert "| a perfect zoom (forced call on the target's quadrant) |" in md
    assert sorted(os.listdir(folder / "checkpoints")) == before


def test_the_gate_checks_each_condition():
    def point(right, wrong, tint, action, gap=0.0, n=256):
        return {"free": {"eval_size": n, "action_accuracy": action,
                         "right_answer_wrong_action": gap},
                "right_zoom": {"accuracy": right}, "wrong_zoom": {"accuracy": wrong},
                "hint_reliability": tint}
    assert tc.gate(point(0.97, 0.74, 0.75, 0.5))["holds"]
    assert tc.gate(point(0.97, 0.79, 0.75, 0.5))["holds"]  # within 2 standard errors (0.054)
    g = tc.gate(point(0.94, 0.81, 0.75, 1.0))
    assert g == {"perfect_zoom": False, "missed_zoom": False, "room": False, "holds": False}
    assert tc.gate(point(0.97, 0.7, 0.75, 1.0, gap=0.1))["room"]  # right after a miss counts


def test_results_of_parallel_checks_merge_into_one_report(tmp_path):
    def result(names, keys=("--a", "1")):
        pts = {n: {"free": {"accuracy": 0.5, "action_accuracy": 0.5, "tool_use": 1.0,
                            "eval_size": 4, "right_answer_wrong_action": 0.25},
                   "no_zoom": {"accuracy": 0.0, "action_accuracy": None, "tool_use": 0.0},
                   "wrong_zoom": {"accuracy": 0.25, "action_accuracy": 0.0, "tool_use": 1.0},
                   "right_zoom": {"accuracy": 1.0, "action_accuracy": 1.0, "tool_use": 1.0},
                   "hint_reliability": 0.75} for n in names}
        return {"tag": "x", "extra_args": list(keys), "points": pts,
                "summary": tc.summarise(pts), "wall_s": 10.0}
    for i, names in enumerate((["e/seed0/warm"], ["e/seed1/warm", "e/seed2/warm"])):
        (tmp_path / f"r{i}.json").write_text(json.dumps(result(names)))
    tc.main(["--merge", str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "--tag", "all",
             "--report", str(tmp_path)])
    merged = json.loads((tmp_path / "task-check-all.json").read_text())
    assert list(merged["points"]) == ["e/seed0/warm", "e/seed1/warm", "e/seed2/warm"]
    assert merged["wall_s"] == 20.0 and merged["summary"]["right_zoom"]["accuracy"]["n"] == 3
    assert "The gate holds on 3 of 3 points." in (tmp_path / "task-check-all.md").read_text()
    (tmp_path / "r2.json").write_text(json.dumps(result(["e/seed3/warm"], keys=("--b",))))
    with pytest.raises(SystemExit, match="made with different keys"):
        tc.main(["--merge", str(tmp_path / "r0.json"), str(tmp_path / "r2.json"), "--tag", "y",
                 "--report", str(tmp_path)])
