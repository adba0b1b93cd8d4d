"""Every bad input raises ValueError naming the argument and the bad value, before any kernel."""

import pytest
import torch

import mapo_fast
from mapo_fast import loss as loss_mod
from mapo_fast import logprobs as logprobs_mod
from cases import make_case


@pytest.fixture
def case():
    return make_case(B=2, T=5, H=8, V=11, seed=1, old=True, ref=True)


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the arguments were validated")
    monkeypatch.setattr(loss_mod, "fused_linear_objective", boom)
    monkeypatch.setattr(logprobs_mod._LinearLogprob, "apply", boom)


def call(case, **over):
    args = dict(hidden=case["hidden"], weight=case["weight"], targets=case["targets"],
                advantages=case["advantages"], mask=case["mask"],
                old_logprobs=case["old_logprobs"], ref_logprobs=case["ref_logprobs"])
    args.update(over)
    return mapo_fast.mapo_loss(**args)


def nan_at(x, idx=(0, 1), value=float("nan")):
    x = x.clone()
    x[idx] = value
    return x


BAD = {
    "hidden-1d": (lambda c: dict(hidden=c["hidden"].reshape(-1)), "hidden", "dimensions"),
    "hidden-int": (lambda c: dict(hidden=c["hidden"].long()), "hidden", "torch.int64"),
    "weight-hidden-size": (lambda c: dict(weight=c["weight"][:, :5]), "weight", "(11, 5)"),
    "weight-dtype": (lambda c: dict(weight=c["weight"].float()), "weight", "torch.float32"),
    "targets-shape": (lambda c: dict(targets=c["targets"][:, :4]), "targets", "(2, 4)"),
    "targets-float": (lambda c: dict(targets=c["targets"].double()), "targets", "torch.float64"),
    "targets-negative": (lambda c: dict(targets=nan_at(c["targets"], value=-3)), "targets", "-3"),
    "targets-too-large": (lambda c: dict(targets=nan_at(c["targets"], value=11)), "targets", "11"),
    "mask-shape": (lambda c: dict(mask=c["mask"][:1]), "mask", "(1, 5)"),
    "mask-negative": (lambda c: dict(mask=nan_at(c["mask"], value=-1.0)), "mask", "non-negative"),
    "advantages-shape": (lambda c: dict(advantages=c["advantages"][:, :2]), "advantages", "(2, 2)"),
    "advantages-batch": (lambda c: dict(advantages=torch.zeros(3)), "advantages", "(3,)"),
    "advantages-nan": (lambda c: dict(advantages=nan_at(c["advantages"])), "advantages", "nan"),
    "advantages-inf": (lambda c: dict(advantages=nan_at(c["advantages"], value=float("inf"))),
                       "advantages", "inf"),
    "old-shape": (lambda c: dict(old_logprobs=c["old_logprobs"][:, 1:]), "old_logprobs", "(2, 4)"),
    "old-nan": (lambda c: dict(old_logprobs=nan_at(c["old_logprobs"])), "old_logprobs", "nan"),
    "old-inf": (lambda c: dict(old_logprobs=nan_at(c["old_logprobs"], value=float("-inf"))),
                "old_logprobs", "-inf"),
    "ref-nan": (lambda c: dict(ref_logprobs=nan_at(c["ref_logprobs"])), "ref_logprobs", "nan"),
    "old-not-tensor": (lambda c: dict(old_logprobs=[0.0] * 10), "old_logprobs", "list"),
    "ref-shape": (lambda c: dict(ref_logprobs=c["ref_logprobs"].T), "ref_logprobs", "(5, 2)"),
    "is-weights-shape": (lambda c: dict(rollout_is_weights=torch.ones(2, 6, dtype=torch.float64)),
                         "rollout_is_weights", "(2, 6)"),
    "bias-shape": (lambda c: dict(bias=torch.zeros(10, dtype=torch.float64)), "bias", "(10,)"),
    "loss-agg": (lambda c: dict(loss_agg="seq-mean"), "loss_agg", "'seq-mean'"),
    "clip-low-1": (lambda c: dict(clip_low=1.0), "clip_low", "1.0"),
    "clip-low-neg": (lambda c: dict(clip_low=-0.1), "clip_low", "-0.1"),
    "clip-high-neg": (lambda c: dict(clip_high=-0.5), "clip_high", "-0.5"),
    "clip-ratio-c-1": (lambda c: dict(clip_ratio_c=1.0), "clip_ratio_c", "1.0"),
    "clip-ratio-c-small": (lambda c: dict(clip_ratio_c=0.5), "clip_ratio_c", "0.5"),
    "loss-scale-zero": (lambda c: dict(loss_scale_factor=0), "loss_scale_factor", "0"),
    "loss-scale-neg": (lambda c: dict(loss_scale_factor=-4.0), "loss_scale_factor", "-4.0"),
    "global-tokens-negative": (lambda c: dict(global_tokens=-1), "global_tokens", "-1"),
    "global-tokens-tensor": (lambda c: dict(global_tokens=torch.tensor(-2.0)), "global_tokens", "-2.0"),
    "global-seqs-neg": (lambda c: dict(global_seqs=-1), "global_seqs", "-1"),
    "temperature-zero": (lambda c: dict(temperature=0.0), "temperature", "0.0"),
    "kl-coef-neg": (lambda c: dict(kl_coef=-0.1), "kl_coef", "-0.1"),
    "kl-without-ref": (lambda c: dict(kl_coef=0.1, ref_logprobs=None), "ref_logprobs", "kl_coef=0.1"),
    "is-weights-negative": (lambda c: dict(rollout_is_weights=nan_at(
        torch.ones(2, 5, dtype=torch.float64), value=-0.5)), "rollout_is_weights", "-0.5"),
    "banned-out-of-range": (lambda c: dict(banned_tokens=[11]), "banned_tokens", "11"),
}


@pytest.mark.parametrize("name", BAD)
def test_mapo_loss_rejects(case, name):
    make, arg, value = BAD[name]
    with pytest.raises(ValueError) as err:
        call(case, **make(case))
    msg = str(err.value)
    assert f"`{arg}`" in msg and value in msg, msg


@pytest.mark.parametrize("over, arg, value", [
    (dict(targets=torch.full((2, 5), 99)), "targets", "99"),
    (dict(temperature=-1.0), "temperature", "-1.0"),
    (dict(weight=torch.zeros(11, 7, dtype=torch.float64)), "weight", "(11, 7)"),
    (dict(bias=torch.zeros(11, 2, dtype=torch.float64)), "bias", "(11, 2)"),
])
def test_token_logprobs_rejects(case, over, arg, value):
    args = dict(hidden=case["hidden"], weight=case["weight"], targets=case["targets"])
    args.update(over)
    with pytest.raises(ValueError) as err:
        mapo_fast.token_logprobs(**args)
    assert f"`{arg}`" in str(err.value) and value in str(err.value), str(err.value)


def test_module_rejects_bad_knobs_at_construction():
    with pytest.raises(ValueError, match="`loss_agg`.*'mean'"):
        mapo_fast.MAPOLoss(loss_agg="mean")
    with pytest.raises(ValueError, match="`clip_ratio_c`.*1.0"):
        mapo_fast.MAPOLoss(clip_ratio_c=1.0)


def test_unknown_backend_is_named(case, monkeypatch):
    monkeypatch.setenv("MAPO_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="MAPO_FAST_BACKEND.*cuda-please"):
        mapo_fast.token_logprobs(case["hidden"], case["weight"], case["targets"])


@pytest.mark.parametrize("over, arg, value", [
    (dict(turn_mask=torch.tensor([[0.5, 1.0], [1.0, 0.0]])), "turn_mask", "0.5"),
    (dict(turn_mask=torch.tensor([[float("nan"), 1.0], [1.0, 0.0]])), "turn_mask", "nan"),
    (dict(norm_std="no"), "norm_std", "'no'"),
    (dict(norm_std=1), "norm_std", "int"),
])
def test_mapo_advantages_rejects(over, arg, value):
    """A turn mask that is not 0/1 (0.5 and NaN would read as true) and a truthy string or
    number for a bool are refused, naming the argument and the value."""
    args = dict(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
                semantic_scores=torch.tensor([[0.5, 0.2], [0.1, 0.0]]),
                turn_mask=torch.tensor([[True, True], [True, False]]),
                token_turn=torch.tensor([[0, 1, -1], [0, -1, -1]]))
    args.update(over)
    with pytest.raises(ValueError, match=f"mapo_advantages: `{arg}` .*{value}"):
        mapo_fast.mapo_advantages(**args)


def test_crop_sizes_beyond_any_encoder_are_refused_before_allocating():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"crop_and_zoom: `size` \(200000, 200000\) is too "
                                         "large"):
        mapo_fast.crop_and_zoom([image], [(0, 0, 0, 16, 16)], size=(200000, 200000))
