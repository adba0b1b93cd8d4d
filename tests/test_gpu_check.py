"""``bench/gpu_check.py`` end to end at toy sizes, on CPU under Triton's interpreter (every
section: the loss paths, paged attention, crops, the advantage kernel, a rollout through the
Triton attention, decode steps on the static path against eager), so that its first run on a GPU is not its first run. It must write its JSON
and markdown and find every check within tolerance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_end_to_end_at_toy_sizes(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", MAPO_FAST_BACKEND="triton")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--toy",
                           "--repeats", "1", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu-check-cpu-toy.json", "gpu-check-cpu-toy.md"], proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check-cpu-toy.json").read_text())
    failed = {k: v.get("error", v) for k, v in result["sections"].items() if not v["ok"]}
    assert proc.returncode == 0 and result["ok"] and not failed, failed
    assert set(result["sections"]) == {"loss", "paged_attention", "crops", "advantage",
                                       "rollout", "decode_graphs"}
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
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--toy" in proc.stderr
