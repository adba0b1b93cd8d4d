"""The engine's sampler: draws follow the (temperature, top-k, top-p) distribution, never land
on excluded tokens, report the log-probs of the untruncated tempered softmax (the policy that
mapo_loss recomputes, mapo_fast.policy), and do not depend on the batch."""

import math

import torch

import pytest

from mapo_fast.rollout.sampler import DRAW_CHUNK, draw as inverse_cdf, sample

LOGITS = torch.tensor([2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0, -3.0])


def draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return sample(logits.expand(n, -1).clone(), gens, temperature, top_k, top_p)


def test_frequencies_match_the_distribution_within_five_sigma():
    n = 20000
    toks, lps = draw(LOGITS, n, temperature=0.8)
    p = torch.softmax(LOGITS / 0.8, -1)
    counts = torch.bincount(torch.tensor(toks), minlength=len(LOGITS)).double()
    sigma = (n * p * (1 - p)).sqrt()
    assert counts[4] == 0  # probability 0 is never drawn
    assert bool(((counts - n * p).abs() <= 5 * sigma + 1).all()), (counts, n * p)
    for t, lp in zip(toks[:50], lps[:50]):
        assert math.isclose(lp, math.log(float(p[t])), rel_tol=1e-5, abs_tol=1e-6)


def test_top_k_and_top_p_exclude_tokens_and_report_the_untruncated_log_prob():
    toks, lps = draw(LOGITS, 3000, top_k=2, temperature=0.7)
    assert set(toks) == {0, 3}
    full = torch.log_softmax(LOGITS / 0.7, -1)   # not renormalised over the kept two
    for t in (0, 3):
        assert math.isclose(lps[toks.index(t)], float(full[t]), rel_tol=1e-5)
    p = torch.softmax(LOGITS, -1)  # sorted: 0 (.56), 3 (.21), 1 (.13), ...: top_p 0.7 keeps 0, 3
    assert float(p[0]) < 0.7 < float(p[0] + p[3])
    toks, _ = draw(LOGITS, 3000, top_p=0.7)
    assert set(toks) == {0, 3}


def test_a_sample_draws_the_same_alone_or_in_a_batch():
    batch = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    together, lp_together = sample(batch, gens, 1.0, 0, 0.95)
    for i in range(6):
        alone, lp_alone = sample(batch[i:i + 1],
                                                [torch.Generator().manual_seed(100 + i)],
                                                1.0, 0, 0.95)
        assert alone[0] == together[i] and lp_alone[0] == lp_together[i]


def test_greedy_takes_the_argmax_with_its_log_prob():
    toks, lps = draw(LOGITS, 3, temperature=0.0)
    assert toks == [0, 0, 0]
    assert math.isclose(lps[0], float(torch.log_softmax(LOGITS, -1)[0]), rel_tol=1e-6)


def _reference_draw(logp, u):
    """One float64 running sum over the row's float32 probabilities."""
    cdf = logp.exp().double().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]


@pytest.mark.parametrize("V", [7, DRAW_CHUNK - 1, DRAW_CHUNK, DRAW_CHUNK + 1, 5 * DRAW_CHUNK + 3])
def test_two_level_draw_matches_one_float64_running_sum(V):
    g = torch.Generator().manual_seed(V)
    logits = 3 * torch.randn(64, V, generator=g)
    logits[:, ::5] = float("-inf")                       # scattered zeros
    if V > 3 * DRAW_CHUNK:
        logits[:, 2 * DRAW_CHUNK:4 * DRAW_CHUNK] = float("-inf")  # whole chunks of zeros
        logits[:, -DRAW_CHUNK // 2:] = float("-inf")           # and a zero tail
    logp = torch.log_softmax(logits, -1)
    for trial in range(30):
        u = torch.rand(64, generator=g, dtype=torch.float64)
        got = inverse_cdf(logp, u)
        assert got.dtype == torch.int64
        assert torch.equal(got, _reference_draw(logp, u)), trial
        assert bool(logits.gather(1, got[:, None]).isfinite().all())
    # the ends of [0, 1): the first and the last token of nonzero probability
    finite = logits[0].isfinite().nonzero()[:, 0]
    ends = inverse_cdf(logp[:2], torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64))
    assert ends.tolist() == [int(finite[0]), int(finite[-1])]
    # unnormalised log-probabilities (the logits themselves) are normalised by the total
    u = torch.rand(64, generator=g, dtype=torch.float64)
    assert torch.equal(inverse_cdf(logits, u), _reference_draw(logits, u))
