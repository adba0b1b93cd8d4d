"""bench/bench_stability.py: collapse as defined, curves with bands, the report, on made-up
runs (their eval.json and metrics.jsonl)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import bench_stability as bs  # noqa: E402


def make_run(folder, accs, steps=120, n=512):
    """A finished run whose evaluations at 0, 40, 80 and the end have accuracies ``accs``."""
    folder.mkdir(parents=True)
    keys = ["warm_start", "step_40", "step_80", "final"]
    evals = {k: {"accuracy": a, "action_accuracy": a / 2, "eval_size": n}
             for k, a in zip(keys, accs)}
    (folder / "eval.json").write_text(json.dumps({"evals": evals, "steps": steps}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": 1.0, "accuracy": 0.5, "action_accuracy": 0.4,
                    "entropy": 0.1 * s, "grad_norm": 1.0}) + "\n" for s in range(1, steps + 1)))


def test_collapse_is_a_fall_from_the_best_beyond_two_standard_errors():
    pts = {0: {"accuracy": 0.5}, 40: {"accuracy": 0.9, "eval_size": 512},
           120: {"accuracy": 0.8, "eval_size": 512}}
    c = bs.collapse(pts)
    assert c["best"] == 0.9 and c["best_step"] == 40 and c["collapsed"]
    assert c["margin"] == pytest.approx(2 * (0.09 / 512) ** 0.5)
    pts[120]["accuracy"] = 0.89  # within the margin
    assert not bs.collapse(pts)["collapsed"]
    pts[0]["accuracy"] = 1.0  # the warm start is not a peak the run fell from
    assert not bs.collapse(pts)["collapsed"]


def test_report_of_two_arms_over_seeds(tmp_path):
    for seed, (m, g) in enumerate([((0.5, 0.7, 0.8, 0.8), (0.5, 0.8, 0.7, 0.6)),
                                   ((0.6, 0.7, 0.7, 0.75), (0.6, 0.7, 0.72, 0.7))]):
        make_run(tmp_path / "runs" / "hallucinating" / f"seed{seed}" / "mapo", m)
        make_run(tmp_path / "runs" / "hallucinating" / f"seed{seed}" / "grpo", g)
    res = bs.main([str(tmp_path), "--tag", "t", "--report", str(tmp_path / "out")])
    assert res["seeds"] == [0, 1]
    assert res["arms"]["mapo"]["collapsed"] == 0 and res["arms"]["grpo"]["collapsed"] == 1
    assert res["paired_final_accuracy"]["mean"] == pytest.approx(((0.8 - 0.6) + (0.75 - 0.7)) / 2)
    ent = res["arms"]["mapo"]["curves"]["entropy"]
    assert ent["steps"][:2] == [1, 2] and ent["stats"][1]["mean"] == pytest.approx(0.15)
    assert res["arms"]["grpo"]["curves"]["eval_accuracy"]["steps"] == [0, 40, 80, 120]
    md = (tmp_path / "out" / "stability-t.md").read_text()
    assert "| grpo | 1 of 2 |" in md and "0.800 @ 40 / 0.600 *" in md
    assert (tmp_path / "out" / "stability-t.png").stat().st_size > 0


def test_too_few_finished_seeds_is_one_line(tmp_path):
    make_run(tmp_path / "runs" / "hallucinating" / "seed0" / "mapo", (0.5, 0.6, 0.6, 0.6))
    with pytest.raises(SystemExit, match="at least 2 are needed"):
        bs.analyse(tmp_path)
