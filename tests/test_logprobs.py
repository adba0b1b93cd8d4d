import pytest
import torch

import mapo_fast
from mapo_fast.kernels import linear_logprob_ref
from cases import TOL, leaf, make_case
from reference import logprobs_full


@pytest.fixture(params=[None, 7], ids=["one-chunk", "7-row-chunks"])
def chunking(request, monkeypatch):
    """Run the torch path with its default chunking and with tiny chunks of 7 rows."""
    if request.param is not None:
        v_bytes = 101 * 8
        monkeypatch.setattr(linear_logprob_ref, "CHUNK_BYTES", request.param * v_bytes)
    return request.param


LOGIT_MAPS = {"plain": {}, "scale": dict(logit_scale=1.6),
              "softcap": dict(softcap=2.0, logit_scale=1.4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logit_map", LOGIT_MAPS.values(), ids=LOGIT_MAPS.keys())
def test_token_logprobs_matches_full_logits(dtype, temperature, bias, logit_map, chunking):
    """Log-probs, entropies and their gradients (both upstream) against full float64 logits,
    a logit scale and a soft cap (tanh, saturating on these logits) included."""
    c = make_case(dtype=dtype, bias=bias, seed=3)
    h, w = leaf(c["hidden"]), leaf(c["weight"])
    b = leaf(c["bias"]) if bias else None
    logp, ent = mapo_fast.token_logprobs(h, w, c["targets"], bias=b, temperature=temperature,
                                         return_entropy=True, **logit_map)
    assert logp.shape == c["targets"].shape and ent.shape == c["targets"].shape
    g = torch.Generator().manual_seed(11)
    gl = torch.randn(logp.shape, dtype=torch.float64, generator=g)
    ge = torch.randn(logp.shape, dtype=torch.float64, generator=g)
    ((logp * gl.to(logp.dtype)).sum() + (ent * ge.to(ent.dtype)).sum()).backward()

    h64, w64 = leaf(c["hidden"].double()), leaf(c["weight"].double())
    b64 = leaf(c["bias"].double()) if bias else None
    rlogp, rent = logprobs_full(h64, w64, c["targets"], b64, temperature, **logit_map)
    ((rlogp * gl).sum() + (rent * ge).sum()).backward()

    atol, rtol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=atol, rtol=rtol)
    if bias:
        torch.testing.assert_close(b.grad.double(), b64.grad, atol=atol, rtol=rtol)


def test_token_logprobs_flat_hidden_and_no_entropy():
    c = make_case(seed=5)
    flat = c["hidden"].reshape(-1, c["hidden"].shape[-1])
    logp = mapo_fast.token_logprobs(flat, c["weight"], c["targets"].reshape(-1))
    ref, _ = logprobs_full(c["hidden"], c["weight"], c["targets"])
    assert logp.shape == (flat.shape[0],)
    torch.testing.assert_close(logp, ref.reshape(-1), atol=1e-10, rtol=1e-9)


def test_token_logprobs_bf16_computes_in_fp32():
    c = make_case(dtype=torch.bfloat16, seed=6)
    logp = mapo_fast.token_logprobs(c["hidden"], c["weight"], c["targets"])
    assert logp.dtype == torch.float32
    ref, _ = logprobs_full(c["hidden"].double(), c["weight"].double(), c["targets"])
    # inputs are the same bf16 values; only fp32 accumulation separates the two
    torch.testing.assert_close(logp.double(), ref, atol=2e-5, rtol=2e-5)


def test_token_logprobs_torch_path_never_forms_full_logits(monkeypatch):
    """With a chunk budget of 5 rows, the logits buffers hold 5 x V and every chunk fits."""
    c = make_case(B=4, T=9, seed=8)
    V = c["weight"].shape[0]
    monkeypatch.setattr(linear_logprob_ref, "CHUNK_BYTES", 5 * V * 8)
    seen, buffers = [], []
    Workspace = linear_logprob_ref._Workspace
    real_init, real_logits = Workspace.__init__, Workspace.logits

    def init(self, rows, vocab, dtype, device):
        buffers.append(rows * vocab)
        real_init(self, rows, vocab, dtype, device)

    def logits(self, h, *args):
        seen.append(h.shape[0])
        return real_logits(self, h, *args)

    monkeypatch.setattr(Workspace, "__init__", init)
    monkeypatch.setattr(Workspace, "logits", logits)
    h = leaf(c["hidden"])
    mapo_fast.token_logprobs(h, c["weight"], c["targets"]).sum().backward()
    assert max(buffers) == 5 * V and max(seen) == 5
    assert sum(seen) == 2 * 36  # every token in the forward and again in the backward


def test_logits_dtype_autocast_rounds_the_logits_like_an_autocast_matmul():
    """Under a bf16 autocast, ``logits_dtype="autocast"`` gives the log-probs of logits rounded
    to bf16 (as ``F.linear`` under autocast computes them), from bf16 inputs and from float32
    inputs cast as autocast casts them, gradients included; the default keeps float32 logits;
    without autocast both are float32. An unknown value is named."""
    c = make_case(dtype=torch.bfloat16, seed=5)
    h, w, y = c["hidden"], c["weight"], c["targets"]
    z = (h.float() @ w.float().t()).to(torch.bfloat16).float()
    rounded = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    exact = torch.log_softmax(h.float() @ w.float().t(), -1).gather(-1, y[..., None])[..., 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mapo_fast.token_logprobs(h, w, y, logits_dtype="autocast")
        fp32 = mapo_fast.token_logprobs(h, w, y)
    torch.testing.assert_close(auto, rounded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fp32, exact, atol=1e-5, rtol=1e-5)
    assert (auto - fp32).abs().max() > 1e-4  # the rounding shows
    torch.testing.assert_close(mapo_fast.token_logprobs(h, w, y, logits_dtype="autocast"),
                               exact, atol=1e-5, rtol=1e-5)
    h32, w32 = leaf(h.float()), leaf(w.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto32 = mapo_fast.token_logprobs(h32, w32, y, logits_dtype="autocast")
        want = torch.log_softmax(torch.nn.functional.linear(h32, w32).float(), -1)
        want = want.gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(auto32, want, atol=1e-5, rtol=1e-5)
    auto32.sum().backward()
    assert h32.grad.dtype == torch.float32 and torch.isfinite(w32.grad).all()
    with pytest.raises(ValueError, match=r"`logits_dtype` must be one of \['float32', "
                                         r"'autocast'\], got 'bf16'"):
        mapo_fast.token_logprobs(h, w, y, logits_dtype="bf16")
