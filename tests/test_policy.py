"""PolicyNumerics and banned tokens: the loss and token_logprobs compute the distribution the
sampler draws from and records (softmax over the allowed vocabulary at the temperature), against
a float64 reference that drops the banned columns; the sampler's recorded log-probs equal
token_logprobs of the same hidden states; bad settings are refused by name."""

import pytest
import torch

import mapo_fast
from mapo_fast.policy import BANNED_GAP, PolicyNumerics
from mapo_fast.rollout.params import SamplingParams
from mapo_fast.rollout.sampler import Sampler
from mapo_fast.rollout.sequence import Sample

V, H, N = 37, 24, 29
BANNED = (0, 5, 36)


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    allowed = [v for v in range(V) if v not in BANNED]
    y = torch.tensor(allowed)[torch.randint(len(allowed), (N,), generator=g)]
    return h, w, y, allowed


def _reference(h, w, y, allowed, temperature):
    """log-probs and entropies over the allowed columns only, float64."""
    z = (h.double() @ w.double().T)[:, allowed] / temperature
    logp = torch.log_softmax(z, -1)
    col = torch.tensor([allowed.index(int(t)) for t in y])
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, col[:, None])[:, 0], ent


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_token_logprobs_drop_the_banned_columns(temperature, dtype, tol):
    # tolerance: float64 is exact up to summation order; float32 logits of |z| ~ 10 carry
    # ~1e-6 relative error each, a few 1e-6 after the log-sum-exp
    h, w, y, allowed = _inputs(dtype=dtype)
    h.requires_grad_(True)
    w.requires_grad_(True)
    logp, ent = mapo_fast.token_logprobs(h, w, y, temperature=temperature, banned_tokens=BANNED,
                                         return_entropy=True)
    want, want_ent = _reference(h.detach(), w.detach(), y, allowed, temperature)
    torch.testing.assert_close(logp.double(), want, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=tol, rtol=0)
    (logp.sum() + ent.sum()).backward()
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    lr, er = _reference(hr, wr, y, allowed, temperature)
    (lr.sum() + er.sum()).backward()
    scale = max(float(hr.grad.abs().max()), float(wr.grad.abs().max()))
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=tol * 10 * scale, rtol=0)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=tol * 10 * scale, rtol=0)
    assert float(w.grad[list(BANNED)].abs().max()) == 0.0  # probability exactly 0 there


def test_a_banned_target_stays_finite_and_the_loss_ignores_it_when_masked():
    h, w, y, allowed = _inputs(dtype=torch.float32)
    y = y.clone()
    y[3] = BANNED[1]  # e.g. an observation's image token: a target, masked out of the loss
    logp = mapo_fast.token_logprobs(h, w, y, banned_tokens=BANNED)
    assert torch.isfinite(logp).all() and float(logp[3]) < -BANNED_GAP / 2
    mask = torch.ones(1, N)
    mask[0, 3] = 0
    hh = h.clone().requires_grad_(True)
    loss, m = mapo_fast.mapo_loss(hh, w, y[None], torch.randn(1, N), mask,
                                  old_logprobs=logp.detach()[None], banned_tokens=BANNED)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hh.grad).all()
    assert abs(float(m["ratio_mean"]) - 1) < 1e-6 and float(m["pg_clipfrac"]) == 0


def test_mapo_loss_module_and_function_take_the_numerics():
    h, w, y, allowed = _inputs(dtype=torch.float32)
    num = PolicyNumerics(temperature=0.7, top_p=0.9, banned_tokens=BANNED)
    adv, mask = torch.randn(1, N), torch.ones(1, N)
    old = mapo_fast.token_logprobs(h, w, y, **num.loss_kwargs())[None]
    a, ma = mapo_fast.mapo_loss(h, w, y[None], adv, mask, old_logprobs=old, **num.loss_kwargs())
    b, mb = mapo_fast.MAPOLoss(**num.loss_kwargs())(h, w, y[None], adv, mask, old_logprobs=old)
    assert float(a) == float(b) and float(ma["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    # without the banned tokens the ratio is off by the banned mass: the bug this prevents
    _, off = mapo_fast.mapo_loss(h, w, y[None], adv, mask, old_logprobs=old, temperature=0.7)
    assert float(off["ratio_mean"]) < 1 - 1e-3


def test_the_sampler_records_what_token_logprobs_computes():
    """Sampled at temperature 0.7 with top-p 0.8 and banned tokens: each recorded log-prob
    equals token_logprobs of the same hidden state under the same PolicyNumerics."""
    h, w, _, _ = _inputs(dtype=torch.float32)
    num = PolicyNumerics(temperature=0.7, top_p=0.8, banned_tokens=BANNED)
    logits = (h @ w.T).float()
    sampler = Sampler(SamplingParams(**num.sampling_kwargs()), num.banned_tokens)
    seqs = [Sample(tokens=[1], generator=torch.Generator().manual_seed(i)) for i in range(N)]
    toks, lps = sampler(seqs, logits)
    assert not set(toks) & set(BANNED)
    want = mapo_fast.token_logprobs(h, w, torch.tensor(toks), **num.loss_kwargs())
    torch.testing.assert_close(torch.tensor(lps), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0), "`temperature` must be"),
    (dict(top_p=0), "`top_p` must be"),
    (dict(top_k=-1), "`top_k` must be"),
    (dict(top_k=2.0), "`top_k` must be an int >= 0, got 2.0"),
    (dict(banned_tokens=[-1]), "`banned_tokens` must hold non-negative int"),
    (dict(banned_tokens="ab"), "`banned_tokens` must be a sequence"),
    (dict(softcap=0.0), "`softcap` must be"),
])
def test_bad_numerics_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyNumerics(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(banned_tokens=[V]), f"holds token id {V}, outside the vocabulary"),
    (dict(banned_tokens=list(range(V))), "bans all"),
    (dict(banned_tokens=[1], softcap=30.0), "cannot be combined with `softcap`"),
])
def test_bad_banned_tokens_are_refused_before_any_work(kwargs, message):
    h, w, y, _ = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="token_logprobs: .*" + message):
        mapo_fast.token_logprobs(h, w, y, **kwargs)
    with pytest.raises(ValueError, match="mapo_loss: .*" + message):
        mapo_fast.mapo_loss(h, w, y[None], torch.zeros(1, N), torch.ones(1, N), **kwargs)


def test_half_precision_that_cannot_hold_the_gap_is_refused():
    h, w, y, _ = _inputs(dtype=torch.float16)
    with pytest.raises(ValueError, match="cannot be pushed"):
        mapo_fast.token_logprobs(h, w, y, banned_tokens=[1], temperature=50.0)


def test_logit_map_of_reads_the_model_config():
    from types import SimpleNamespace
    model = SimpleNamespace(config=SimpleNamespace(logit_scale=0.5,
                                                   final_logit_softcapping=30))
    assert PolicyNumerics.logit_map_of(model) == dict(logit_scale=0.5, softcap=30.0)
    plain = SimpleNamespace(config=SimpleNamespace())
    assert PolicyNumerics.logit_map_of(plain) == dict(logit_scale=1.0, softcap=None)


@pytest.mark.parametrize("logit_map", [dict(final_logit_softcapping=3.0, logit_scale=1.7),
                                       dict(logit_scale=0.6)])
def test_rollout_records_the_log_probs_of_the_loss_on_a_logit_mapped_model(logit_map):
    """A model whose config declares a logit map (Gemma-style ``final_logit_softcapping``, a
    ``logit_scale``): the engine samples from the mapped logits, and every recorded log-prob
    equals ``token_logprobs`` of the model's hidden states under the PolicyNumerics that
    ``logit_map_of`` reads from the same model (temperature 0.8). float32 forward passes
    that batch rows differently: 1e-4."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=128, **logit_map)
    model = Qwen2ForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits of several units: the cap bends them
    num = PolicyNumerics(temperature=0.8, **PolicyNumerics.logit_map_of(model))
    assert num.softcap == logit_map.get("final_logit_softcapping")
    eng = mapo_fast.RolloutEngine(model, None, block_size=8, num_blocks=32)
    prompt = list(range(1, 12))
    trajs = eng.generate([prompt], group_size=3, max_new_tokens=10, seed=2,
                         **num.sampling_kwargs())
    for t in trajs:
        ids = torch.tensor([t.token_ids])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]
        want = mapo_fast.token_logprobs(h, model.lm_head.weight, ids[0, len(prompt):],
                                        **num.loss_kwargs())
        torch.testing.assert_close(torch.tensor(t.logprobs[len(prompt):]), want, atol=1e-4,
                                   rtol=0)


def test_apply_logit_map_is_the_loss_map():
    """``apply_logit_map`` against the float64 formula (cap * tanh(scale * u / cap))."""
    from mapo_fast.policy import apply_logit_map
    u = torch.linspace(-40, 40, 101, dtype=torch.float64)
    torch.testing.assert_close(apply_logit_map(u, 1.5, 10.0), 10.0 * torch.tanh(1.5 * u / 10.0))
    torch.testing.assert_close(apply_logit_map(u, 0.5), 0.5 * u)
    assert apply_logit_map(u) is u
