"""Every Triton kernel compiles for sm_90 and sm_80 at the configurations its launchers use
(``mapo_fast/kernels/compile_check.py``, in a subprocess: the suite runs Triton's interpreter, the check
needs the real compiler), within shared memory, without register spills, with wgmma for the
half-precision dots of >= 64 rows on sm_90; and the launchers can only choose configurations
the check compiles. The full matrix (every flag, head size and block) runs with
``--compile-full`` (``make compile-check``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from mapo_fast.kernels import advantage as A  # noqa: E402
from mapo_fast.kernels import crop_zoom as CZ  # noqa: E402
from mapo_fast.kernels import linear_logprob as LL  # noqa: E402
from mapo_fast.kernels import linear_logprob_chunked as LC  # noqa: E402
from mapo_fast.kernels import paged_attention as PA  # noqa: E402


def run_check(tmp_path, *args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "mapo_fast.kernels.compile_check", "--json",
                           str(out), *args], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_default_configurations_compile_without_spills(tmp_path):
    proc, results = run_check(tmp_path)
    bad = [(r["kernel"], r["config"], r["target"], r["problems"]) for r in results
           if r["problems"]]
    assert not bad and proc.returncode == 0, bad
    assert {r["target"] for r in results} == {90, 80}
    assert {r["ints"] for r in results} == {"unaligned", "aligned"}  # both specialisations
    kernels = {r["kernel"] for r in results}
    assert kernels == {"linear_logprob._fwd_kernel", "linear_logprob._bwd_kernel",
                       "linear_logprob_chunked._row_stats_kernel",
                       "linear_logprob_chunked._row_grad_kernel",
                       "paged_attention._paged_attention_kernel", "advantage._advantage_kernel",
                       "crop_zoom._crop_zoom_kernel"}
    assert all(r["local_bytes"] == 0 for r in results)
    assert any(r["wgmma"] for r in results if r["target"] == 90)


@pytest.mark.compile_full
def test_every_configuration_compiles(tmp_path):
    proc, results = run_check(tmp_path, "--full")
    bad = [(r["kernel"], r["config"], r["target"], r["problems"]) for r in results
           if r["problems"]]
    assert not bad and proc.returncode == 0, bad


def checked(module, kernel):
    return [c.constexprs for c in module.compile_cases() if c.kernel is kernel]


@pytest.fixture
def gpu_launch(monkeypatch):
    """The launchers' choices as on a GPU (not the interpreter's small tiles)."""
    for mod in (LL, LC, PA, A, CZ):
        monkeypatch.setattr(mod, "interpreting", lambda: False)


def test_loss_launchers_choose_checked_configurations(gpu_launch):
    fwd, bwd = checked(LL, LL._fwd_kernel), checked(LL, LL._bwd_kernel)
    cuda = torch.device("cuda")
    for dtype in LL.DTYPES:
        blocks = LL.config(dtype, cuda).blocks
        for fl in LL.flag_grid(has_bias=(0, 1), has_rows=(0, 1), softcap=(0, 1),
                               round_logits=(0, 1) if dtype != torch.float32 else (0,)):
            fl = {k: bool(v) for k, v in fl.items()}
            assert dict(LL._flags(dtype, **fl), **blocks) in fwd
            for ge in (False, True):
                for dw in (False, True):  # a frozen head launches without d_weight
                    assert dict(LL._bwd_flags(dtype, ge, dw, **fl), **blocks) in bwd
    grad = checked(LC, LC._row_grad_kernel)
    for gemm in (torch.bfloat16, torch.float16, torch.float32):
        for ge in (False, True):
            for cap in (False, True):
                assert dict(LC._grad_flags(ge, cap, gemm), **LC.config(cuda).blocks) in grad


@pytest.mark.parametrize("capability", PA.CAPABILITIES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_paged_attention_plans_choose_checked_configurations(gpu_launch, head_dim, capability,
                                                             monkeypatch):
    # tiles, warps and stages as compiled for that target
    cases = [(c.constexprs, c.num_warps, c.num_stages) for c in PA.compile_cases()
             if c.kernel is PA._paged_attention_kernel and
             (not c.targets or capability in c.targets)]
    monkeypatch.setattr(PA, "_capability", lambda dev: capability)
    for dtype in PA.DTYPES:
        for heads, kv_heads in ((8, 8), (28, 4), (16, 1), (64, 1), (128, 1)):
            for total_q, S in ((4, 4), (300, 4)):  # decode, prefill
                cu_q = torch.linspace(0, total_q, S + 1).long()
                tables = torch.zeros(S, 600, dtype=torch.long)
                plan = PA.plan(torch.Size((total_q, heads, head_dim)), dtype, kv_heads, 16,
                               tables, torch.full((S,), 9000), cu_q)
                used = (dict(plan.cfg.blocks, **PA._flags(dtype, plan.splits > 1)),
                        plan.cfg.num_warps, plan.cfg.num_stages)
                assert used in cases, used


def test_advantage_and_crop_launchers_choose_checked_configurations(gpu_launch):
    cases = checked(A, A._advantage_kernel)
    for g in range(1, 65):
        for k in (1, 5, 16, 17, 32):
            assert A.supports(g, k)
            for fl in A.flag_grid(norm_std=(False, True), loo=(False, True),
                                  has_sem=(False, True), discount=(False, True)):
                used = dict(A._flags(**fl), BLOCK_G=A._block(g, A.GROUP_BLOCKS),
                            BLOCK_K=A._block(k, A.TURN_BLOCKS), BLOCK_T=A.GPU_BLOCK_T)
                assert used in cases
    crop = [{k: v for k, v in c.items() if k not in ("MODE", "SUPPORT", "ANTIALIAS")}
            for c in checked(CZ, CZ._crop_zoom_kernel)]
    assert CZ._meta(False, 14, 2, 2) in crop
    for geom in CZ.PATCH_GEOMETRIES:
        assert CZ._meta(True, *geom) in crop


@pytest.mark.parametrize("capability", PA.CAPABILITIES)
@pytest.mark.parametrize("model", sorted(PA.MODEL_SHAPES))
def test_the_default_check_covers_what_the_models_launch(gpu_launch, model, capability,
                                                         monkeypatch):
    """Every configuration ``plan`` launches for the attention of Qwen2-0.5B and
    Qwen2.5-VL-3B/7B (decode and prefill, with and without a KV split, bf16 and fp32) is a
    default case, the set the suite holds to "no spills" (under the Triton it runs)."""
    defaults = [(c.constexprs, c.num_warps, c.num_stages) for c in PA.compile_cases()
                if c.kernel is PA._paged_attention_kernel and c.default and
                (not c.targets or capability in c.targets)]
    monkeypatch.setattr(PA, "_capability", lambda dev: capability)
    heads, kv_heads, head_dim = PA.MODEL_SHAPES[model]
    for dtype in (torch.bfloat16, torch.float32):
        for total_q, S in ((4, 4), (300, 4)):  # decode, prefill
            for splits in (1, 4):
                cu_q = torch.linspace(0, total_q, S + 1).long()
                plan = PA.plan(torch.Size((total_q, heads, head_dim)), dtype, kv_heads, 16,
                               torch.zeros(S, 600, dtype=torch.long), torch.full((S,), 9000),
                               cu_q, splits=splits)
                used = (dict(plan.cfg.blocks, **PA._flags(dtype, plan.splits > 1)),
                        plan.cfg.num_warps, plan.cfg.num_stages)
                assert used in defaults, (model, dtype, total_q, splits, used)
