"""``bench/gpu_run.sh`` and ``bench/gpu_check`` end to end at toy sizes, on CPU under
Triton's interpreter (every section: the graph-safety probe, the loss paths, paged attention,
crops, the advantage kernel, a rollout through the Triton attention, decode steps on the static
path against eager; then the compile check), so that the first run on a GPU is not their first
run. They must write their JSON and markdown, find every check within tolerance, and keep what
was measured when a section is stopped by its time limit or the run is cut short."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


#: limits for the toy run on CPU under Triton's interpreter: the GPU run's are sized for a GPU's
#: time budget, and a busy CPU may take several times longer; this test checks what the run
#: writes, not how fast
GENEROUS = " ".join(f"{n}=600" for n in ("graph_safety", "loss", "paged_attention", "crops",
                                         "advantage", "rollout", "decode_graphs", "compile")) \
    + " deadline=5000"


def gpu_run(out, limits=GENEROUS):
    """``bash bench/gpu_run.sh --toy --out OUT`` as a user runs it (toy sizes on CPU)."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_RUN_LIMITS=limits)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--toy", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=5400)


FILES = ["compile-check.json", "compile-check.md", "gpu-check-cpu-toy.json",
         "gpu-check-cpu-toy.md", "gpu-run.log"]


def test_gpu_run_at_toy_sizes(tmp_path):
    """The one-command first run: every section in its own process, the graph-safety probe
    first, each report on standard output as it ends, then the compile check; five files in
    the folder; every check within tolerance."""
    proc = gpu_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check-cpu-toy.json").read_text())
    failed = {k: v.get("error", v) for k, v in result["sections"].items() if not v["ok"]}
    assert proc.returncode == 0 and result["ok"] and not failed, (failed, proc.stdout[-3000:])
    assert list(result["sections"]) == ["graph_safety", "loss", "paged_attention", "crops",
                                        "advantage", "rollout", "decode_graphs"]
    safety = result["sections"]["graph_safety"]  # without a GPU: the static path both ways
    assert safety["greedy_equal"] is True and safety["update_changed_tokens"] is True
    loss = result["sections"]["loss"]
    assert set(loss["ms"]) == {"fused", "chunked", "three_gemm_floor"}
    assert set(loss["errors"]) == {"fused", "chunked", "fused, bias_cap_temp_rows",
                                   "chunked, bias_cap_temp_rows"}
    assert "d_bias" in loss["errors"]["fused, bias_cap_temp_rows"]
    paged = result["sections"]["paged_attention"]
    assert {"split_kv", "prefill"} <= set(paged["errors"])
    assert {"triton_split_kv4", "triton_prefill"} <= set(paged["ms"])
    assert loss["auto_choice"] in ("fused", "chunked")
    rollout = result["sections"]["rollout"]
    assert rollout["new_tokens_per_s"] > 0
    assert rollout["attention_passes"].get("attention_triton_passes", 0) > 0
    assert rollout["greedy_equal"] is True and rollout["first_divergence"] is None
    graphs = result["sections"]["decode_graphs"]  # without a GPU: static, not captured
    assert graphs["modes"] == ["eager", "static"] and graphs["greedy_equal"] is True
    assert all(graphs["new_tokens_per_s"][m] > 0 for m in graphs["modes"])
    assert all(graphs["per_decode_step"][m]["operators"] > 0 for m in graphs["modes"])
    assert result["complete"] is True
    # each section's report reached standard output as it ended, in order
    heads = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert [h.split(":")[0][3:] for h in heads] == list(result["sections"])
    compiled = json.loads((tmp_path / "compile-check.json").read_text())
    assert compiled and not [r for r in compiled if r["problems"]]
    assert "[gpu-run] done" in (tmp_path / "gpu-run.log").read_text()


def test_gpu_run_keeps_what_it_measured_when_sections_hit_their_limits(tmp_path):
    """Every section but the first given a 1 s limit (each is stopped): the report holds the
    graph-safety probe's result and each stopped section marked as stopped, the compile check
    still runs, the exit status says something failed."""
    limited = ["loss", "paged_attention", "crops", "advantage", "rollout", "decode_graphs"]
    proc = gpu_run(tmp_path, GENEROUS + " " + " ".join(f"{n}=1" for n in limited))
    assert proc.returncode == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check-cpu-toy.json").read_text())
    assert result["sections"]["graph_safety"]["ok"] is True
    for name in limited:
        assert result["sections"][name]["error"] == "stopped by its time limit (1.0 s)"
        assert f"[gpu-run] {name}: stopped by its 1 s limit" in proc.stdout
    assert result["ok"] is False and result["complete"] is True
    assert "## graph_safety: ok" in (tmp_path / "gpu-check-cpu-toy.md").read_text()


def test_gpu_run_refuses_bad_arguments(tmp_path):
    for args, env, message in ((["--toy"], {}, "--out DIR is required"),
                               (["--fast", "--out", str(tmp_path)], {}, "unknown argument"),
                               (["--toy", "--out", str(tmp_path)],
                                {"GPU_RUN_LIMITS": "lose=3"}, "bad entry 'lose=3'"),
                               (["--toy", "--out", str(tmp_path)],
                                {"GPU_RUN_LIMITS": "deadline=soon"}, "bad entry 'deadline=soon'")):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), *args],
                              env=dict(os.environ, PYTHON=sys.executable, **env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_run_cut_short_keeps_what_it_measured(tmp_path):
    """The crops section is interrupted (as a killed run would be): the files written after
    the loss section hold it, marked incomplete."""
    env = dict(os.environ, TRITON_INTERPRET="1", MAPO_FAST_BACKEND="triton")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check as g\n"
            "def stop(*a): raise KeyboardInterrupt\n"
            "g.SECTIONS['crops'] = stop\n"
            "g.main(['--toy', '--repeats', '1', '--only', 'loss', '--only', 'crops', "
            "'--out', sys.argv[2]])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    result = json.loads((tmp_path / "gpu-check-cpu-toy.json").read_text())
    assert list(result["sections"]) == ["loss"] and result["complete"] is False
    assert "INCOMPLETE" in (tmp_path / "gpu-check-cpu-toy.md").read_text()
    assert "## loss: ok" in proc.stdout


def test_gpu_check_refuses_real_sizes_without_a_gpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    # as the docs run it: python -m gpu_check from bench/
    proc = subprocess.run([sys.executable, "-m", "gpu_check", "--out", str(tmp_path)],
                          cwd=ROOT / "bench", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--toy" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gpu_check", "--toy"], cwd=ROOT / "bench",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--out" in proc.stderr
