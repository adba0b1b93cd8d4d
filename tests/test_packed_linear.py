"""oneDNN linear layers on packed weights (``mapo_fast/kernels/packed_linear_cpu.py``) against ``F.linear``
in float64, and ``PackedLinears`` through its interface: installed only inside ``active()``,
removed after an error, repacked after a weight changes, the module's own forward under grad or
for another dtype; the engine's ``cpu_linear`` choice (same tokens either way, a weight update
between calls seen, bad values named).

Tolerance: float32 products summed over K <= 70 inputs of magnitude ~1 in another order than
the reference: 1e-5 absolute on outputs of a few units (float32 epsilon 1.2e-7 times K times
the magnitude, with margin)."""

import pytest
import torch

from mapo_fast.kernels import packed_linear_cpu as P

pytestmark = [pytest.mark.skipif(not P.available(), reason="this torch has no oneDNN on CPU"),
              pytest.mark.usefixtures("pack_tiny_linears")]


@pytest.mark.parametrize("m,k,n,bias", [(1, 5, 3, True), (7, 17, 31, False), (33, 64, 70, True),
                                        (0, 8, 4, True)])
def test_linear_matches_float64_reference(m, k, n, bias):
    g = torch.Generator().manual_seed(m * 100 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(2, m, k, generator=g)
    got = P.linear(x, P.pack(w), b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (2, m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_non_contiguous_input():
    w, x = torch.randn(9, 6), torch.randn(6, 11).t()  # [11, 6], strided
    torch.testing.assert_close(P.linear(x, P.pack(w), None).double(),
                               x.double() @ w.double().t(), rtol=0, atol=1e-5)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Linear(20, 7, bias=False)))


def test_active_installs_the_packed_forward_and_removes_it():
    net, x = _net(), torch.randn(5, 12)
    stats = {}
    packed = P.PackedLinears([net, net[2]], stats)  # a module reached twice is taken once
    assert len(packed.linears) == 2
    with torch.no_grad():
        want = net(x)
        with packed.active():
            assert all("forward" in m.__dict__ for m in packed.linears)
            got = net(x)
        assert all("forward" not in m.__dict__ for m in packed.linears)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert stats["linear_weights_packed"] == 2
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), packed.active():
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in packed.linears)


def test_repacks_a_weight_changed_in_place_or_replaced():
    net, x = _net(), torch.randn(5, 12)
    stats = {}
    packed = P.PackedLinears([net], stats)
    with torch.no_grad():
        with packed.active():
            net(x)
            net(x)  # nothing changed: no repack
        assert stats["linear_weights_packed"] == 2
        net[0].weight.mul_(2.0)  # an optimizer step's kind of update
        net[2][0].weight = torch.nn.Parameter(torch.randn(7, 20))
        with packed.active():
            got = net(x)
        assert stats["linear_weights_packed"] == 4
        torch.testing.assert_close(got, net(x), rtol=0, atol=1e-5)


def test_small_layers_keep_their_own_forward_by_default(monkeypatch):
    monkeypatch.setattr(P, "MIN_PACKED_WEIGHT", 20 * 12)  # net[0]'s 240 elements, not net[2]'s
    net = _net()
    assert P.PackedLinears([net]).linears == [net[0]]
    assert P.PackedLinears([net], min_weight=241).linears == []
    monkeypatch.undo()
    assert P.MIN_PACKED_WEIGHT == 1 << 16


def test_own_forward_under_grad_and_for_other_dtypes():
    net = _net()
    packed = P.PackedLinears([net])
    x = torch.randn(5, 12)
    with packed.active():
        net(x).sum().backward()  # grad enabled: the module's own forward, differentiable
        assert net[0].weight.grad is not None
        with torch.no_grad():
            y = net.double()(x.double())
    assert y.dtype == torch.float64 and packed._packs == {}


class _LookAlike(torch.nn.Module):
    """A gated MLP's parts with other arithmetic: the probe must refuse to fuse it."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=True)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_gated_silu_mlp_runs_fused_where_the_probe_agrees():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    torch.manual_seed(1)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=40, intermediate_size=72))
    other = _LookAlike(40, 72)
    assert P.gated_silu(mlp) and P.gated_silu(other) and not P.gated_silu(torch.nn.Linear(2, 2))
    stats = {}
    packed = P.PackedLinears([mlp, other], stats)
    assert packed.mlps == [mlp, other] and len(packed.linears) == 6
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        want = mlp.double()(x.double())
        want_other = other(x)
        mlp.float()
        with packed.active():
            got, got_other = mlp(x), other(x)
    assert stats["gated_mlps_fused"] == 1  # Qwen2's, not the look-alike
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_other, want_other, rtol=0, atol=1e-5)


def test_resolve_names_the_argument():
    cpu = torch.device("cpu")
    assert P.resolve("auto", cpu, torch.float32) == "onednn"
    assert P.resolve("auto", cpu, torch.float64) == "torch"
    assert P.resolve("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match=r"`cpu_linear` must be one of auto, onednn, torch; "
                                         r"got 'mkl'"):
        P.resolve("mkl", cpu, torch.float32)
    with pytest.raises(ValueError, match=r"`cpu_linear` 'onednn' needs a float32 model on CPU"):
        P.resolve("onednn", cpu, torch.bfloat16)


pytest.importorskip("mapo_fast.kernels._block_manager")
from test_rollout_engine import PROMPTS, model  # noqa: E402,F401  (the tiny Qwen2 fixture)

from mapo_fast.rollout.engine import RolloutEngine  # noqa: E402


def _generate(model, cpu_linear, **kw):
    eng = RolloutEngine(model, None, num_blocks=64, cpu_linear=cpu_linear)
    return eng, eng.generate(PROMPTS, group_size=2, max_new_tokens=12, seed=3, **kw)


def test_engine_same_tokens_either_way(model):
    plain, want = _generate(model, "torch", temperature=0.0)
    packed, got = _generate(model, "onednn", temperature=0.0)
    assert plain.runner.packed is None and "linear_weights_packed" not in plain.stats
    n_linear = 7 * model.config.num_hidden_layers + 1  # q k v o gate up down per layer, head
    assert packed.stats["linear_weights_packed"] == n_linear
    assert packed.stats["gated_mlps_fused"] == model.config.num_hidden_layers
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    for a, b in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    with pytest.raises(ValueError, match="`cpu_linear` must be one of"):
        RolloutEngine(model, None, num_blocks=8, cpu_linear="fast")


def test_engine_sees_a_weight_update_between_calls(model):
    eng = RolloutEngine(model, None, num_blocks=64, cpu_linear="onednn")
    kw = dict(group_size=2, max_new_tokens=12, temperature=0.0)
    before = eng.generate(PROMPTS, **kw)
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # in place, as an optimizer step updates it
        after = eng.generate(PROMPTS, **kw)
        fresh = RolloutEngine(model, None, num_blocks=64, cpu_linear="torch").generate(
            PROMPTS, **kw)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert [t.token_ids for t in after] == [t.token_ids for t in fresh]
    assert [t.token_ids for t in after] != [t.token_ids for t in before]


def test_clear_prefix_cache_drops_the_packs_for_updates_the_version_misses(model):
    """A fused optimizer step, like a write through ``.data``, leaves the version counter
    alone: ``clear_prefix_cache`` (to be called after every weight update) repacks."""
    eng = RolloutEngine(model, None, num_blocks=64, cpu_linear="onednn")
    kw = dict(group_size=2, max_new_tokens=12, temperature=0.0)
    eng.generate(PROMPTS, **kw)
    packs = eng.stats["linear_weights_packed"]
    w = model.lm_head.weight
    version = w._version
    try:
        w.data.mul_(-1.0)
        assert w._version == version
        eng.clear_prefix_cache()
        after = eng.generate(PROMPTS, **kw)
        fresh = RolloutEngine(model, None, num_blocks=64, cpu_linear="torch").generate(
            PROMPTS, **kw)
    finally:
        w.data.mul_(-1.0)
    assert eng.stats["linear_weights_packed"] == 2 * packs
    assert [t.token_ids for t in after] == [t.token_ids for t in fresh]
