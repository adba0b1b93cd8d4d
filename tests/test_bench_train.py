"""The training study harness at toy size: it runs every arm, writes JSON + markdown + figure,
skips finished runs on a rerun, and its interval arithmetic matches a hand-computed case."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mapo_fast.kernels._block_manager")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_train  # noqa: E402

TOY = ["--warm_start.steps", "2", "--warm_start.batch_size", "2", "--steps", "2",
       "--eval_every", "1", "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
       "--rollout.max_new_tokens", "20", "--rollout.max_turns", "2", "--task.eval_size", "2",
       "--model.hidden_size", "64", "--model.intermediate_size", "64",
       "--model.vision_hidden_size", "32", "--model.vocab_size", "320",
       "--grad_var_resamples", "2", "--checkpoint_every", "1"]


def test_interval_against_a_hand_computed_case():
    # mean 2, sample sd 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7320508
    iv = bench_train.interval([1.0, 2.0, 3.0])
    assert iv["mean"] == pytest.approx(2.0) and iv["n"] == 3
    assert iv["ci95"] == pytest.approx(2.48434, abs=1e-4)
    assert bench_train.interval([5.0])["ci95"] is None
    assert bench_train.interval([None, 1.0, 1.0])["ci95"] == 0.0
    assert bench_train.interval([])["mean"] is None


def test_study_at_toy_size_reports_and_skips_finished_runs(tmp_path):
    paths = bench_train.study(tmp_path, 2, 2, TOY, "toy", experts=("hallucinating",),
                              progress=False)
    data = json.loads(paths["json"].read_text())
    assert data["failed"] == {}
    res = data["experts"]["hallucinating"]
    assert res["seeds"] == [0, 1]
    for algo in ("mapo", "grpo"):
        a = res["algos"][algo]
        assert a["accuracy"]["n"] == 2 and len(a["per_seed"]["accuracy"]) == 2
        assert a["bands"]["accuracy"]["steps"] == [0, 1, 2]
        assert set(a["bands"]["grad_var"]["steps"]) <= {1, 2}  # steps with an estimate
    # the paired difference is the per-seed difference of the two arms
    d = res["paired_difference"]["accuracy"]["per_seed"]
    pm, pg = res["algos"]["mapo"]["per_seed"]["accuracy"], res["algos"]["grpo"]["per_seed"][
        "accuracy"]
    assert d == pytest.approx([a - b for a, b in zip(pm, pg)])
    # both arms of a seed start from the same warm start
    for seed in (0, 1):
        base = tmp_path / "runs" / "hallucinating" / f"seed{seed}"
        w = json.loads((base / "warm" / "eval.json").read_text())["evals"]["warm_start"]
        for algo in ("mapo", "grpo"):
            got = json.loads((base / algo / "eval.json").read_text())["evals"]["warm_start"]
            assert got == w
    assert "MAPO - GRPO" in paths["md"].read_text() and paths["png"].stat().st_size > 0

    # a report of what is finished starts nothing: remove a run and report only
    gone = tmp_path / "runs" / "hallucinating" / "seed1" / "grpo"
    saved = gone.with_name("grpo.bak")
    gone.rename(saved)
    only = bench_train.study(tmp_path, 2, 2, TOY, "toy", experts=("hallucinating",),
                             progress=False, launch=False)
    assert json.loads(only["json"].read_text())["experts"]["hallucinating"]["seeds"] == [0]
    assert not gone.exists()
    saved.rename(gone)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/*/eval.json")}
    assert len(stamps) == 6
    bench_train.study(tmp_path, 2, 2, TOY, "toy", experts=("hallucinating",), progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was run again


def test_study_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`seeds` must be an int >= 2"):
        bench_train.study(tmp_path, 1, 1, TOY, "toy")
    with pytest.raises(ValueError, match="unknown experts"):
        bench_train.study(tmp_path, 2, 1, TOY, "toy", experts=("liar",))
    for arms in ((), ("ppo",), ("mapo", "mapo")):
        with pytest.raises(ValueError, match=r"`arms` must be distinct names from \['mapo', "
                                             r"'grpo'\]"):
            bench_train.study(tmp_path, 2, 1, TOY, "toy", arms=arms)


def test_one_arm_plans_its_warm_starts_and_that_arm_only(tmp_path):
    runs = bench_train.plan(tmp_path, 3, ("hallucinating",), [], arms=("mapo",))
    assert [r.kind for r in runs] == ["warm", "mapo"] * 3


def test_control_seeds_plan_fewer_control_runs(tmp_path):
    runs = bench_train.plan(tmp_path, 5, bench_train.EXPERTS, [], control_seeds=3)
    count = {e: sum(r.expert == e for r in runs) for e in bench_train.EXPERTS}
    assert count == {"hallucinating": 15, "honest": 9}
    assert [r.expert for r in runs[:15]] == ["hallucinating"] * 15  # the default task first


def test_an_interrupted_study_stops_its_runs(tmp_path, monkeypatch):
    started = []
    real_popen = bench_train.subprocess.Popen

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    def interrupt(_):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_train.subprocess, "Popen", popen)
    monkeypatch.setattr(bench_train.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bench_train.study(tmp_path, 2, 2, TOY, "toy", experts=("hallucinating",),
                          progress=False)
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def test_a_one_arm_study_reports_without_a_paired_difference(tmp_path):
    """Finished runs of one arm (made up here: their eval.json and metrics.jsonl) are
    aggregated, written and plotted; there is no MAPO - GRPO row."""
    import json
    runs = bench_train.plan(tmp_path, 2, ("hallucinating",), [], arms=("mapo",))
    for r in runs:
        r.folder.mkdir(parents=True)
        ev = {m: 0.5 + 0.1 * r.seed for m in bench_train.METRICS}
        evals = {"warm_start": ev, "final": ev} if r.kind == "warm" else \
            {"warm_start": ev, "step_2": ev, "final": ev}
        (r.folder / "eval.json").write_text(json.dumps(
            {"evals": evals, "steps": 0 if r.kind == "warm" else 4, "wall_s": 1.0}))
        (r.folder / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "grad_var": 1.0 + s}) + "\n" for s in (1, 2, 3, 4)))
    res = bench_train.aggregate(runs)["hallucinating"]
    assert list(res["algos"]) == ["mapo"] and res["paired_difference"] == {}
    assert res["algos"]["mapo"]["accuracy"]["mean"] == pytest.approx(0.55)
    paths = bench_train.study(tmp_path, 2, 1, [], "one", experts=("hallucinating",),
                              launch=False, arms=("mapo",), progress=False)
    md = paths["md"].read_text()
    assert "| mapo |" in md and "MAPO - GRPO" not in md and "--arms mapo" in md
    assert paths["png"].stat().st_size > 0


def test_a_seed_list_plans_those_seeds_and_bad_lists_are_refused(tmp_path):
    runs = bench_train.plan(tmp_path, [7, 5], ("hallucinating",), [])
    assert [(r.seed, r.kind) for r in runs] == [(7, "warm"), (7, "mapo"), (7, "grpo"),
                                                (5, "warm"), (5, "mapo"), (5, "grpo")]
    for bad in ([3], [1, 1], [-1, 2]):
        with pytest.raises(ValueError, match="`seeds` as a list must hold two or more"):
            bench_train.study(tmp_path, bad, 1, TOY, "toy")
