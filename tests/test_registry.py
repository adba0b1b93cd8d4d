"""``mapo_fast.registry``: variants by name, and the registries built on it (policy losses, KL
estimators, loss aggregations, advantage estimators) used through their own interfaces."""

import pytest
import torch

from mapo_fast import MAPOLoss, mapo_advantages, mapo_loss
from mapo_fast.advantage import ADVANTAGE_ESTIMATORS
from mapo_fast.loss import KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, PolicyLossConfig
from mapo_fast.registry import Registry


def test_register_as_decorator_returns_the_object_and_looks_it_up():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    reg.register("b", len)
    assert a() == 1 and reg.get("a") is a and reg.get("b") is len
    assert reg.names() == ("a", "b") and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and 3 not in reg


def test_a_name_is_registered_once():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match=r"widget registry: 'a' is already registered "
                                         r"\(names: \['a'\]\)"):
        reg.register("a", 2)
    assert reg.get("a") == 1  # the first registration is kept


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_name_must_be_a_non_empty_string(name):
    with pytest.raises(ValueError, match="a name must be a non-empty string"):
        Registry("widget").register(name, 1)


def test_an_unknown_name_lists_the_valid_ones():
    reg = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    for bad in ("c", None, ["a"]):
        with pytest.raises(ValueError, match=r"unknown widget .*; valid: \['a', 'b'\]"):
            reg.get(bad)


def test_the_package_registries_hold_their_variants():
    assert POLICY_LOSSES.names() == ("vanilla",)
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3", "low_var_kl", "k3_ratio")
    assert LOSS_AGG_MODES.names() == ("token-mean", "token-sum", "seq-mean-token-sum",
                                      "seq-mean-token-mean", "seq-mean-token-sum-norm")
    assert ADVANTAGE_ESTIMATORS.names() == ("mapo", "grpo")
    assert ADVANTAGE_ESTIMATORS.get("mapo").semantic and \
        not ADVANTAGE_ESTIMATORS.get("grpo").semantic


@pytest.mark.parametrize("arg, value, names", [
    ("policy_loss", "ppo", "['vanilla']"),
    ("kl_type", "k4", "['k1', 'k2', 'k3', 'low_var_kl', 'k3_ratio']"),
    ("loss_agg", "mean", "['token-mean', 'token-sum'"),
])
def test_the_loss_names_a_bad_variant_and_lists_the_valid_ones(arg, value, names):
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    y, adv, m = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match=rf"mapo_loss: `{arg}` .*{value}.*") as e:
        mapo_loss(h, w, y, adv, m, **{arg: value})
    assert names in str(e.value)


def test_a_registered_policy_loss_runs_through_the_fused_objective(monkeypatch):
    """A variant is a per-token function and nothing else: REINFORCE (``-A logp``) registered
    under a new name gives the float64 reference's loss and gradients."""
    monkeypatch.setattr(POLICY_LOSSES, "_items", dict(POLICY_LOSSES._items))

    @POLICY_LOSSES.register("reinforce")
    def reinforce(logp, adv, old, ref, isw, cfg, ent=None):
        pg = -adv * logp
        zero = torch.zeros_like(logp)
        return {"log_ratio": zero, "ratio": torch.ones_like(logp),
                "pg_clipped": zero.bool(), "pg": pg, "loss": pg}

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 8, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    loss, metrics = mapo_loss(hidden, weight, y, adv, mask, policy_loss="reinforce",
                              loss_agg="seq-mean-token-mean")
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, y[..., None])[..., 0]
    per_seq = (-adv * logp * mask).sum(-1) / mask.sum(-1)
    want = per_seq[mask.sum(-1) > 0].mean()
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], weight.grad, rtol=1e-10, atol=1e-12)
    assert float(metrics["ratio_mean"]) == 1.0


def test_maploss_takes_one_settings_object_or_its_fields():
    a = MAPOLoss(clip_low=0.1, kl_type="k2")
    b = MAPOLoss(PolicyLossConfig(clip_low=0.1, kl_type="k2"))
    assert a.config == b.config
    with pytest.raises(ValueError, match=r"MAPOLoss: unknown knob\(s\) \['clip'\]; valid: "
                                         r"\['clip_low'"):
        MAPOLoss(clip=0.1)
    with pytest.raises(ValueError, match="pass `config` or its fields as keywords, not both"):
        MAPOLoss(PolicyLossConfig(), clip_low=0.1)
    with pytest.raises(ValueError, match="MAPOLoss: `kl_type` must be one of"):
        MAPOLoss(kl_type="k9")


def test_the_advantage_names_an_unknown_estimator():
    r, gid = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"mapo_advantages: `algo` must be one of "
                                         r"\['mapo', 'grpo'\], got 'ppo'"):
        mapo_advantages(r, gid, algo="ppo")
