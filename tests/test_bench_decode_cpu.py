"""The CPU decode kernel's benchmark at its quick scale: a case per level this CPU runs and the
torch path, each level's output equal to the torch path's (the report's notes), JSON + markdown
+ figure."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mapo_fast.kernels import paged_attention_cpu as C

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_decode_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(C.extension() is None, reason="the C++ decode kernel is not built")


def test_quick_scale_report(tmp_path):
    paths = bench_decode_cpu.run("quick", torch.device("cpu"), 1, tmp_path, "test")
    data = json.loads(paths["json"].read_text())
    (workload,) = data["workloads"]
    names = [c["name"] for c in workload["cases"]]
    assert names == [*C.supported_isas(), "torch path (no extension)"]
    for case in workload["cases"][:-1]:
        err = float(case["notes"].rsplit(" ", 1)[-1])
        assert err < 1e-5, case
    assert data["baseline"] == "generic" and paths["png"].stat().st_size > 0
