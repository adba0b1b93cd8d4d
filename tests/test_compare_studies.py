"""bench/compare_studies.py: paired differences per seed between two study reports."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import compare_studies as cs  # noqa: E402


def study(seeds, acc):
    """A report with ``acc[algo]`` (one value per seed) as every metric, for the arms in
    ``acc``."""
    return {"command": "x", "experts": {"hallucinating": {"seeds": seeds, "algos": {
        algo: {"per_seed": {m: list(acc[algo]) for m in cs.METRICS}} for algo in acc}}}}


def test_pairs_are_matched_by_seed(tmp_path):
    a = study([0, 1, 2], {"mapo": [0.9, 0.8, 0.7], "grpo": [0.5, 0.5, 0.5]})
    b = study([2, 0, 5], {"mapo": [0.6, 0.85, 0.0], "grpo": [0.4, 0.3, 0.0]})
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    res = cs.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "t",
                   "--report", str(tmp_path)])
    row = res["pairs"]["A mapo - B mapo"]
    assert row["seeds"] == [0, 2]  # seed 1 only in A, seed 5 only in B
    assert abs(row["accuracy"]["mean"] - ((0.9 - 0.85) + (0.7 - 0.6)) / 2) < 1e-12
    cross = res["pairs"]["A mapo - B grpo"]["accuracy"]["mean"]
    assert abs(cross - ((0.9 - 0.3) + (0.7 - 0.4)) / 2) < 1e-12
    assert (tmp_path / "compare-t.md").read_text().startswith("# Paired comparison: t")


def test_a_one_arm_study_is_compared_on_the_arm_it_ran(tmp_path):
    """An ablation run with ``--arms mapo`` against a full study: the pairs with its MAPO."""
    a = study([0, 1], {"mapo": [0.9, 0.8], "grpo": [0.5, 0.6]})
    b = study([0, 1], {"mapo": [0.7, 0.7]})
    for name, x in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(x))
    res = cs.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "t",
                   "--report", str(tmp_path)])
    assert list(res["pairs"]) == ["A mapo - B mapo"]
    assert abs(res["pairs"]["A mapo - B mapo"]["accuracy"]["mean"] - 0.15) < 1e-12


def test_warm_starts_and_the_change_during_rl_are_compared_when_known(tmp_path):
    a = study([0, 1], {"mapo": [0.9, 0.8]})
    b = study([0, 1], {"mapo": [0.7, 0.7]})
    for x, warm in ((a, [0.8, 0.7]), (b, [0.5, 0.6])):
        x["experts"]["hallucinating"]["warm_start_per_seed"] = {m: warm for m in cs.METRICS}
    res = cs.compare(a, b)
    assert abs(res["A warm start - B warm start"]["accuracy"]["mean"] - 0.2) < 1e-12
    # A gained 0.1 and 0.1 in RL, B 0.2 and 0.1: A's change minus B's is -0.1 and 0
    row = res["A mapo (final - warm) - B mapo (final - warm)"]
    assert abs(row["accuracy"]["mean"] + 0.05) < 1e-12 and row["seeds"] == [0, 1]
