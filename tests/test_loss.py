import itertools
import zlib

import pytest
import torch

import mapo_fast
from cases import TOL, leaf, make_case
from reference import (k3, kl_estimate, logprobs_full, mapo_loss_reference, verl_agg_loss,
                       verl_policy_loss)

MODES = mapo_fast.LOSS_AGG_MODES
OPTION_SETS = {
    "plain": dict(),
    "old+ref+kl": dict(old=True, ref=True, kl_coef=0.1),
    "bias+dualclip+old": dict(bias=True, old=True, clip_ratio_c=3.0),
    "temp+is_weights+old": dict(old=True, is_weights=True, temperature=0.7),
    "per-seq-adv+all": dict(per_seq_adv=True, old=True, ref=True, kl_coef=0.05, bias=True,
                            clip_ratio_c=2.5, is_weights=True, temperature=1.3),
    "entropy+low_var_kl": dict(old=True, ref=True, kl_coef=0.1, kl_type="low_var_kl",
                               entropy_coef=0.01),
    "entropy-bonus+k2+temp": dict(old=True, ref=True, kl_coef=0.2, kl_type="k2",
                                  entropy_coef=0.05, temperature=0.8, bias=True),
    "k1+k3_ratio": dict(old=True, ref=True, kl_coef=0.3, kl_type="k3_ratio"),
    "softcap+scale+entropy": dict(old=True, bias=True, softcap=3.0, logit_scale=1.7,
                                  temperature=0.8, entropy_coef=0.02),
    "logit_scale": dict(old=True, logit_scale=0.6),
}
CASE_KEYS = ("bias", "per_seq_adv", "old", "ref", "is_weights")


def split(opts):
    case_kw = {k: v for k, v in opts.items() if k in CASE_KEYS}
    loss_kw = {k: v for k, v in opts.items() if k not in CASE_KEYS}
    return case_kw, loss_kw


def run_both(case, dtype, **loss_kw):
    """(ours, reference): loss and grads of hidden, weight, bias."""
    grads = {}
    out = {}
    for name, cast in (("ours", lambda x: x), ("ref", lambda x: x.double())):
        h, w = leaf(cast(case["hidden"])), leaf(cast(case["weight"]))
        b = leaf(cast(case["bias"])) if "bias" in case else None
        kw = dict(old_logprobs=case.get("old_logprobs"), ref_logprobs=case.get("ref_logprobs"),
                  rollout_is_weights=case.get("rollout_is_weights"), bias=b, **loss_kw)
        if name == "ours":
            loss, metrics = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"],
                                                case["mask"], **kw)
            out["metrics"] = metrics
        else:
            loss = mapo_loss_reference(h, w, case["targets"], case["advantages"], case["mask"],
                                       **kw)[0]
        loss.backward()
        out[name] = loss.detach()
        grads[name] = (h.grad, w.grad, None if b is None else b.grad)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_mapo_loss_matches_reference(dtype, mode, opts):
    case_kw, loss_kw = split(opts)
    case = make_case(dtype=dtype, seed=zlib.crc32(f"{mode}{sorted(opts)}".encode()) % 1000, **case_kw)
    out, grads = run_both(case, dtype, loss_agg=mode, **loss_kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out["ours"].double(), out["ref"], atol=atol, rtol=rtol)
    for g_ours, g_ref, name in zip(grads["ours"], grads["ref"], ("hidden", "weight", "bias")):
        if g_ref is None:
            continue
        assert g_ours.dtype == dtype, name
        torch.testing.assert_close(g_ours.double(), g_ref, atol=atol, rtol=rtol, msg=name)


def test_loss_scale_factor_and_globals_follow_verl():
    case = make_case(seed=21, old=True)
    for mode, kw in [("seq-mean-token-sum-norm", dict(loss_scale_factor=512.0)),
                     ("token-mean", dict(global_tokens=100)),
                     ("seq-mean-token-sum", dict(global_seqs=torch.tensor(8.0))),
                     ("seq-mean-token-mean", dict(global_seqs=5))]:
        out, grads = run_both(case, torch.float64, loss_agg=mode, **kw)
        torch.testing.assert_close(out["ours"], out["ref"], atol=1e-10, rtol=1e-9, msg=mode)
        torch.testing.assert_close(grads["ours"][0], grads["ref"][0], atol=1e-10, rtol=1e-9)


def test_per_token_semantics_equal_verl_definitions():
    """The per-token terms (clip, dual-clip, IS weights, k3) against verl's definitions on the
    same log-probs, with ratios spread over every branch."""
    from mapo_fast.loss import PolicyLossConfig, token_terms
    g = torch.Generator().manual_seed(4)
    n = 4000
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    old = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.6
    old[:5] = logp[:5] + torch.tensor([30.0, -30.0, 25.0, -25.0, 0.0], dtype=torch.float64)
    ref = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=g, dtype=torch.float64) * 2
    isw = torch.rand(n, generator=g, dtype=torch.float64) * 2
    for clip_c, kl_coef in itertools.product([None, 3.0], [0.0, 0.2]):
        cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_c,
                               kl_coef=kl_coef)
        t = token_terms(logp, adv, old, ref, isw, cfg)
        pg, ratio, clipped = verl_policy_loss(logp, old, adv, 0.2, 0.28, clip_c, isw)
        expect = pg + (kl_coef * k3(ref, logp) if kl_coef else 0)
        torch.testing.assert_close(t["loss"], expect, atol=0, rtol=0)
        assert torch.equal(t["pg_clipped"], clipped)
        assert ratio.max() <= torch.exp(torch.tensor(20.0, dtype=torch.float64))
    # the dual clip is active somewhere and bounded by clip_ratio_c
    cfg = PolicyLossConfig(clip_ratio_c=3.0)
    t = token_terms(logp, adv, old, None, None, cfg)
    assert t["dual_clipped"].any()
    assert (t["pg"][adv < 0] <= -adv[adv < 0] * 3.0 + 1e-12).all()


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_full_batch(mode):
    """Splitting the batch into micro-batches with global_tokens / global_seqs from the whole
    batch: the micro-batch losses and gradients add up to the full-batch ones."""
    case = make_case(B=6, T=5, seed=31, old=True, ref=True)
    kw = dict(loss_agg=mode, kl_coef=0.1, clip_ratio_c=3.0)
    full, full_grads = run_both(case, torch.float64, **kw)
    m = case["mask"]
    glob = dict(global_tokens=m.sum(), global_seqs=(m.sum(-1) > 0).sum())
    h, w = leaf(case["hidden"]), leaf(case["weight"])
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        loss, _ = mapo_fast.mapo_loss(
            h[rows], w, case["targets"][rows], case["advantages"][rows], m[rows],
            old_logprobs=case["old_logprobs"][rows], ref_logprobs=case["ref_logprobs"][rows],
            loss_scale_factor=case["mask"].shape[1], **glob, **kw)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full["ref"], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(h.grad, full_grads["ref"][0], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(w.grad, full_grads["ref"][1], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_batch_gives_zero_loss_and_zero_grads(mode):
    case = make_case(seed=41, old=True, ref=True)
    h, w = leaf(case["hidden"]), leaf(case["weight"])
    loss, metrics = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"],
                                        torch.zeros_like(case["mask"]), loss_agg=mode,
                                        old_logprobs=case["old_logprobs"],
                                        ref_logprobs=case["ref_logprobs"], kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["tokens"].item() == 0


@pytest.mark.parametrize("B, T", [(0, 5), (3, 0), (0, 0)])
def test_empty_batch_gives_zero_loss_and_zero_grads(B, T):
    """No sequence (B = 0) is handled like no token (T = 0): loss 0, zero gradients."""
    h = torch.randn(B, T, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(B, T, dtype=torch.float64)
    loss, metrics = mapo_fast.mapo_loss(h, w, torch.zeros(B, T, dtype=torch.long), z, z,
                                        old_logprobs=z)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(w.grad) == 0
    assert metrics["tokens"].item() == 0


def test_fully_masked_sequence_contributes_nothing():
    """A fully masked sequence (and its garbage advantages) changes neither loss nor grads."""
    case = make_case(B=4, seed=51, empty_seq=True)
    base, base_grads = run_both(case, torch.float64, loss_agg="seq-mean-token-mean")
    case2 = dict(case)
    case2["advantages"] = case["advantages"].clone()
    case2["advantages"][1] = 1e6
    other, other_grads = run_both(case2, torch.float64, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(base["ours"], other["ours"], atol=0, rtol=0)
    torch.testing.assert_close(base_grads["ours"][0], other_grads["ours"][0], atol=0, rtol=0)
    assert torch.count_nonzero(base_grads["ours"][0][1]) == 0


def test_metrics_match_definitions():
    case = make_case(seed=61, old=True, ref=True)
    loss, met = mapo_fast.mapo_loss(case["hidden"], case["weight"], case["targets"],
                                    case["advantages"], case["mask"],
                                    old_logprobs=case["old_logprobs"],
                                    ref_logprobs=case["ref_logprobs"], kl_coef=0.1,
                                    clip_ratio_c=3.0, clip_low=0.1, clip_high=0.1)
    logp, ent = logprobs_full(case["hidden"], case["weight"], case["targets"])
    m = case["mask"].double().bool()
    adv, old, ref = case["advantages"], case["old_logprobs"], case["ref_logprobs"]
    ratio = torch.exp(logp - old)
    pg, _, clipped = verl_policy_loss(logp, old, adv, 0.1, 0.1, 3.0)
    expect = {
        "entropy": ent[m].mean(), "kl": k3(ref, logp)[m].mean(), "ppo_kl": (old - logp)[m].mean(),
        "ratio_mean": ratio[m].mean(), "ratio_max": ratio[m].max(),
        "pg_clipfrac": clipped[m].double().mean(),
        "clipfrac_low": ((ratio < 0.9) & (adv < 0))[m].double().mean(),
        "clipfrac_high": ((ratio > 1.1) & (adv > 0))[m].double().mean(),
        "pg_loss": verl_agg_loss(pg, case["mask"].double(), "token-mean"),
        "kl_loss": verl_agg_loss(k3(ref, logp), case["mask"].double(), "token-mean"),
        "tokens": m.sum().double(),
    }
    for k, v in expect.items():
        torch.testing.assert_close(met[k], v.double(), atol=1e-10, rtol=1e-9, msg=k)
    assert 0 < met["clipfrac_low"] < 1 and 0 < met["clipfrac_high"] < 1
    assert all(not v.requires_grad for v in met.values())
    torch.testing.assert_close(loss, met["pg_loss"] + 0.1 * met["kl_loss"], atol=1e-12, rtol=0)


def test_module_form_and_bf16_inputs():
    case = make_case(dtype=torch.bfloat16, seed=71, old=True)
    mod = mapo_fast.MAPOLoss(clip_ratio_c=3.0, loss_agg="seq-mean-token-mean")
    assert "clip_ratio_c=3.0" in repr(mod)
    h, w = leaf(case["hidden"]), leaf(case["weight"])
    loss, _ = mod(h, w, case["targets"], case["advantages"], case["mask"],
                  old_logprobs=case["old_logprobs"])
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref, _, _, _ = mapo_loss_reference(case["hidden"].double(), case["weight"].double(),
                                       case["targets"], case["advantages"], case["mask"],
                                       old_logprobs=case["old_logprobs"], clip_ratio_c=3.0,
                                       loss_agg="seq-mean-token-mean")
    # same bf16 input values on both sides; fp32 accumulation is all that separates them
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)


def test_flat_hidden_with_bt_targets():
    case = make_case(seed=81)
    B, T, H = case["hidden"].shape
    a, _ = mapo_fast.mapo_loss(case["hidden"].reshape(B * T, H), case["weight"],
                               case["targets"], case["advantages"], case["mask"])
    b, _ = mapo_fast.mapo_loss(case["hidden"], case["weight"], case["targets"],
                               case["advantages"], case["mask"])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_grad_forward_gives_the_same_loss():
    case = make_case(seed=91, old=True)
    with torch.no_grad():
        a, _ = mapo_fast.mapo_loss(case["hidden"], case["weight"], case["targets"],
                                   case["advantages"], case["mask"],
                                   old_logprobs=case["old_logprobs"])
    b, _ = mapo_fast.mapo_loss(leaf(case["hidden"]), case["weight"], case["targets"],
                               case["advantages"], case["mask"], old_logprobs=case["old_logprobs"])
    torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=0)


def test_upstream_gradient_scales_the_fused_grads():
    """The gradient is computed in the forward pass; the backward scales it by the upstream
    gradient (here 2.5, and 1.0 which takes the no-copy branch)."""
    case = make_case(seed=95, old=True, bias=True)
    grads = {}
    for scale in (1.0, 2.5):
        h, w, b = leaf(case["hidden"]), leaf(case["weight"]), leaf(case["bias"])
        loss, _ = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"], case["mask"],
                                      bias=b, old_logprobs=case["old_logprobs"])
        (scale * loss).backward()
        grads[scale] = (h.grad, w.grad, b.grad)
    for a, e in zip(grads[2.5], grads[1.0]):
        torch.testing.assert_close(a, 2.5 * e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kl_type", sorted(mapo_fast.loss.KL_ESTIMATORS))
def test_kl_estimators_equal_their_definitions(kl_type):
    """Each KL estimator on log-probs spread wide enough to hit verl's clamps, against the
    reference's definitions, exactly; an unknown name lists the valid ones."""
    from mapo_fast.loss import PolicyLossConfig, token_terms
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(3000, generator=g, dtype=torch.float64) * 5
    ref = logp + torch.randn(3000, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(3000, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(3000, generator=g, dtype=torch.float64)
    t = token_terms(logp, adv, old, ref, None, PolicyLossConfig(kl_coef=1.0, kl_type=kl_type))
    torch.testing.assert_close(t["kl"], kl_estimate(kl_type, logp, ref, t["ratio"]), atol=0,
                               rtol=0)
    with pytest.raises(ValueError, match=r"`kl_type` must be one of \['k1', 'k2', 'k3', "
                                         r"'low_var_kl', 'k3_ratio'\], got 'k4'"):
        mapo_fast.MAPOLoss(kl_type="k4")


@pytest.mark.parametrize("mode", MODES)
def test_global_counts_of_zero_mean_an_empty_batch(mode):
    """``global_tokens = 0`` / ``global_seqs = 0`` (a rank whose micro-batch, and whole batch,
    holds no token): loss 0, gradients 0, finite metrics, instead of an error."""
    case = make_case(seed=43, old=True)
    h, w = leaf(case["hidden"]), leaf(case["weight"])
    loss, metrics = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"],
                                        torch.zeros_like(case["mask"]), loss_agg=mode,
                                        old_logprobs=case["old_logprobs"], global_tokens=0,
                                        global_seqs=0, entropy_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    with pytest.raises(ValueError, match=r"`global_tokens` must be a finite number in \[0.0, "
                                         r"inf\), got -1.0"):
        mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"], case["mask"],
                            global_tokens=-1)
