"""A peer agrees with us: Liger-Kernel's LigerFusedLinearGRPOLoss in the modes both have
(token-mean = its "dapo", seq-mean-token-mean = its "grpo" on batches without a fully masked
sequence, since Liger divides that mode by B). Liger computes in float32, hence 1e-5."""

import pytest
import torch

import mapo_fast
from cases import leaf, make_case

liger = pytest.importorskip("liger_kernel.chunked_loss")

PAIRS = [("token-mean", "dapo"), ("seq-mean-token-mean", "grpo")]


@pytest.mark.parametrize("ours, theirs", PAIRS)
@pytest.mark.parametrize("bias, temperature", [(False, 1.0), (True, 0.8)])
def test_matches_liger_grpo_loss(ours, theirs, bias, temperature):
    c = make_case(B=4, T=9, H=45, V=101, dtype=torch.float32, seed=12, bias=bias,
                  per_seq_adv=True, old=True, ref=True, empty_seq=False)
    old, ref = c["old_logprobs"].float(), c["ref_logprobs"].float()
    peer = liger.LigerFusedLinearGRPOLoss(
        beta=0.05, compiled=False, use_ref_model=True, chunk_size=2, epsilon_low=0.2,
        epsilon_high=0.28, loss_type=theirs, temperature=temperature)
    h1, w1 = leaf(c["hidden"]), leaf(c["weight"])
    b1 = leaf(c["bias"]) if bias else None
    loss1, (kl1, clipfrac1) = peer(h1, w1, c["targets"], c["mask"], c["advantages"], bias=b1,
                                   ref_per_token_logps=ref, old_per_token_logps=old)
    loss1.backward()
    h2, w2 = leaf(c["hidden"]), leaf(c["weight"])
    b2 = leaf(c["bias"]) if bias else None
    loss2, met = mapo_fast.mapo_loss(h2, w2, c["targets"], c["advantages"], c["mask"], bias=b2,
                                     old_logprobs=old, ref_logprobs=ref, kl_coef=0.05,
                                     loss_agg=ours, temperature=temperature)
    loss2.backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss2, loss1.detach(), **tol)
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    torch.testing.assert_close(w2.grad, w1.grad, **tol)
    if bias:
        torch.testing.assert_close(b2.grad, b1.grad, **tol)
    torch.testing.assert_close(met["kl"], kl1, **tol)
    torch.testing.assert_close(met["clipfrac_low"] + met["clipfrac_high"], clipfrac1, **tol)
    assert clipfrac1 > 0  # the clip is active in this batch, so the comparison means something
