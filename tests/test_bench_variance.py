"""bench/bench_variance.py at toy size: a point measured from a warm start and one resumed from
a run's checkpoint (copied, the run unchanged), the JSON and markdown written, the summary's
geometric mean and interval computed from the points, bad arguments named."""

import json
import math
import os
import sys

import pytest

pytest.importorskip("mapo_fast.kernels._block_manager")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import bench_variance as bv  # noqa: E402
from test_trainer import TOY, run  # noqa: E402

SMALL = [*TOY, "--warm_start.steps", "4", "--rollout.prompts_per_step", "3"]


def test_points_from_warm_starts_and_runs(tmp_path, capsys):
    bv.main(["--seeds", "2", "--batches", "3", "--report", str(tmp_path), "--tag", "toy",
             "--", *SMALL])
    res = json.loads((tmp_path / "estimator-variance-toy.json").read_text())
    assert list(res["points"]) == ["warm start, seed 0", "warm start, seed 1"]
    logs = [math.log(p["mapo"]["var_ratio"]) for p in res["points"].values()]
    got = res["summary"]["all points"]["var_ratio"]["geo_mean"]
    assert abs(got - math.exp(sum(logs) / 2)) < 1e-9
    md = (tmp_path / "estimator-variance-toy.md").read_text()
    assert "| warm start, seed 1 | 0 |" in md and "var ratio MAPO/GRPO" in md
    # a run's newest checkpoint, its seed from bench_train's layout
    folder = tmp_path / "runs" / "hallucinating" / "seed3" / "mapo"
    run(folder, 1, "--seed", "3")
    before = sorted(os.listdir(folder / "checkpoints"))
    assert bv.run_args(folder)[-2:] == ["--seed", "3"]
    bv.main(["--runs", str(folder), "--batches", "3", "--report", str(tmp_path), "--tag",
             "run", "--", *SMALL])
    res = json.loads((tmp_path / "estimator-variance-run.json").read_text())
    assert res["points"]["hallucinating/seed3/mapo"]["step"] == 1  # no machine path
    assert sorted(os.listdir(folder / "checkpoints")) == before
    assert bv.kind(str(folder)) == "mapo" and bv.kind("warm start, seed 1") == "warm start"
    # the report of a saved result, rewritten without measuring
    bv.main(["--from-json", str(tmp_path / "estimator-variance-toy.json")])
    assert "| all points |" in (tmp_path / "estimator-variance-toy.md").read_text()
    with pytest.raises(SystemExit):
        bv.main(["--batches", "2"])
    assert "--batches >= 3, got 3 and 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bv.main(["--runs", str(tmp_path)])
    assert "has no checkpoints folder" in capsys.readouterr().err
