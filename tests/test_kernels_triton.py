"""The Triton kernels themselves, under TRITON_INTERPRET=1 on CPU (compiled on a GPU machine),
against the plain-torch reference, at small awkward shapes (N, V, D not multiples of the
16/32/16 interpreter blocks). Forward outputs are poisoned with NaN to catch unwritten elements;
backward accumulators sit inside larger buffers whose extra rows hold a sentinel, to catch
writes out of bounds."""

import pytest
import torch

pytest.importorskip("triton")

import mapo_fast  # noqa: E402
from mapo_fast.kernels import linear_logprob as K  # noqa: E402
from mapo_fast.kernels import linear_logprob_ref as R  # noqa: E402
from cases import leaf, make_case  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 12345.0
# fp32 kernels vs the float64 reference: fp32 accumulation over D=45 products and V=101 terms
# (errors ~1e-6 seen); bf16: dz is rounded to bf16 (8 bits) before the gradient matmuls.
TOL = {torch.float32: (3e-5, 3e-5), torch.bfloat16: (2e-2, 2e-2)}


def inputs(dtype, n=37, m=42, v=101, d=45, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    rows = torch.randperm(m, generator=g)[:n]
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, b, rows, y


def to(dev, *xs):
    return [None if x is None else x.to(dev) for x in xs]


def guarded_zeros(shape):
    """(view, backing): a zeroed accumulator of `shape` followed by 3 sentinel rows."""
    backing = torch.zeros((shape[0] + 3,) + tuple(shape[1:]), dtype=torch.float32, device=DEV)
    backing[shape[0]:] = SENTINEL
    return backing[: shape[0]], backing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rows", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_forward_kernel_matches_reference(dtype, use_rows, bias, splits):
    h, w, b, rows, y = inputs(dtype, bias=bias, seed=splits)
    if not use_rows:
        h, rows = h[rows].contiguous(), None
    out = tuple(torch.full((y.shape[0],), float("nan"), device=DEV) for _ in range(3))
    got = K.forward(*to(DEV, h, w, b, y), 1 / 0.7, rows=None if rows is None else rows.to(DEV),
                    splits=splits, out=out)
    assert all(x is o for x, o in zip(got, out))
    want = R.forward(h.double(), w.double(), None if b is None else b.double(), y, 1 / 0.7,
                     rows=rows)
    atol, rtol = TOL[torch.float32]  # forward accumulates in fp32 for every input dtype
    for name, a, e in zip(("logp", "entropy", "lse"), got, want):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        torch.testing.assert_close(a.cpu().double(), e, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rows", [False, True])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_backward_kernel_matches_reference(dtype, use_rows, entropy_grad):
    h, w, b, rows, y = inputs(dtype, seed=7)
    if not use_rows:
        h, rows = h[rows].contiguous(), None
    ref_args = (h.double(), w.double(), b.double(), y, 1 / 0.7)
    _, ent, lse = R.forward(*ref_args, rows=rows)
    g = torch.Generator().manual_seed(1)
    gl = torch.randn(y.shape[0], generator=g, dtype=torch.float64)
    gl[:16] = 0.0  # a whole token tile with zero upstream gradient takes the skip branch
    ge = torch.randn(y.shape[0], generator=g, dtype=torch.float64) if entropy_grad else None
    if ge is not None:
        ge[:16] = 0.0
    dh, dh_back = guarded_zeros(h.shape)
    dw, dw_back = guarded_zeros(w.shape)
    db, db_back = guarded_zeros(b.shape)
    K.backward(*to(DEV, h, w, b, y), 1 / 0.7, lse.float().to(DEV), ent.float().to(DEV),
               gl.float().to(DEV), None if ge is None else ge.float().to(DEV),
               rows=None if rows is None else rows.to(DEV), out=(dh, dw, db))
    want = R.backward(*ref_args, lse, ent, gl, ge, rows=rows)
    atol, rtol = TOL[dtype]
    for name, a, back, e in zip(("d_hidden", "d_weight", "d_bias"), (dh, dw, db),
                                (dh_back, dw_back, db_back), want):
        assert (back[a.shape[0]:] == SENTINEL).all(), f"{name}: written out of bounds"
        scale = e.abs().max()
        torch.testing.assert_close(a.cpu().double() / scale, e / scale, atol=atol, rtol=rtol,
                                   msg=name)
    if rows is not None:  # rows of hidden that no token selects receive exactly nothing
        unused = torch.ones(h.shape[0], dtype=torch.bool)
        unused[rows] = False
        assert torch.count_nonzero(dh.cpu()[unused]) == 0


def test_kernels_handle_no_tokens():
    h, w, b, _, _ = inputs(torch.float32)
    y = torch.empty(0, dtype=torch.int64)
    logp, ent, lse = K.forward(*to(DEV, h[:0], w, b, y), 1.0)
    assert logp.numel() == 0
    dh, dw, db = K.backward(*to(DEV, h[:0], w, b, y), 1.0, lse, ent, logp, None)
    assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("mode, extra", [(m, {}) for m in mapo_fast.LOSS_AGG_MODES] + [
    ("token-mean", dict(entropy_coef=0.05, kl_type="low_var_kl")),
    ("seq-mean-token-mean", dict(entropy_coef=-0.02, kl_type="k3_ratio")),
    ("token-sum", dict(softcap=2.5, logit_scale=1.3, entropy_coef=0.05))])
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_mapo_loss_triton_path_equals_torch_path(mode, extra, path, monkeypatch):
    """The whole public loss through each CUDA path (the fused kernels; the chunked path's
    row kernels) equals the torch path (fp32), an entropy bonus (its gradient through the
    kernels' entropy term) and a soft cap included, and reports the path that ran."""
    case = make_case(dtype=torch.float32, seed=5, bias=True, old=True, ref=True,
                     device=DEV)
    results = {}
    monkeypatch.setenv("MAPO_FAST_LOSS_PATH", path)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAPO_FAST_BACKEND", backend)
        h, w, b = leaf(case["hidden"]), leaf(case["weight"]), leaf(case["bias"])
        loss, met = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"], case["mask"],
                                        bias=b, old_logprobs=case["old_logprobs"].float(),
                                        ref_logprobs=case["ref_logprobs"].float(), kl_coef=0.1,
                                        clip_ratio_c=3.0, loss_agg=mode, temperature=0.9,
                                        **extra)
        loss.backward()
        assert met.path == (path if backend == "triton" else "torch")
        results[backend] = (loss.detach(), met["entropy"], h.grad, w.grad, b.grad)
    for name, a, e in zip(("loss", "entropy", "d_hidden", "d_weight", "d_bias"),
                          results["triton"], results["torch"]):
        torch.testing.assert_close(a, e, atol=3e-5, rtol=3e-5, msg=name)


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_token_logprobs_triton_path_with_entropy_grad(path, monkeypatch):
    case = make_case(dtype=torch.float32, seed=9, device=DEV)
    results = {}
    monkeypatch.setenv("MAPO_FAST_LOSS_PATH", path)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAPO_FAST_BACKEND", backend)
        h, w = leaf(case["hidden"]), leaf(case["weight"])
        logp, ent = mapo_fast.token_logprobs(h, w, case["targets"], return_entropy=True)
        (logp.sum() - 0.3 * ent.sum()).backward()
        results[backend] = (logp.detach(), ent.detach(), h.grad, w.grad)
    for a, e in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, e, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_kernels_round_logits_and_soft_cap_as_the_reference(softcap):
    """bf16 inputs with the logits rounded to bf16 (``logits_dtype="autocast"``) and a soft
    cap: forward and backward kernels against the torch path given the same rounded logits
    (float32 reference: rounding is the same operation on the same float32 accumulations, up
    to their summation order, so a logit may land one bf16 step away: bf16 tolerance)."""
    h, w, b, rows, y = inputs(torch.bfloat16, seed=11)
    kw = dict(cap=softcap, scale=1.3, round_to=torch.bfloat16)
    got = K.forward(*to(DEV, h, w, b, y), 1 / 0.7, rows=rows.to(DEV), **kw)
    want = R.forward(h, w, b, y, 1 / 0.7, rows=rows, **kw)
    for name, a, e in zip(("logp", "entropy", "lse"), got, want):
        torch.testing.assert_close(a.cpu(), e, atol=2e-2, rtol=2e-2, msg=name)
    lse, ent = want[2], want[1]
    gl = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(2))
    dk = K.backward(*to(DEV, h, w, b, y), 1 / 0.7, lse.to(DEV), ent.to(DEV), gl.to(DEV), None,
                    rows=rows.to(DEV), **kw)
    dr = R.backward(h, w, b, y, 1 / 0.7, lse, ent, gl, None, rows=rows, **kw)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), dk, dr):
        scale = e.abs().max()
        torch.testing.assert_close(a.cpu() / scale, e / scale, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("backend, path", [("torch", "fused"), ("triton", "fused"),
                                           ("triton", "chunked")])
def test_a_frozen_head_gets_no_weight_gradient_work(backend, path, monkeypatch):
    """weight.requires_grad False (a LoRA-frozen LM head): d_hidden and d_bias equal the ones
    computed with a trainable head, weight.grad stays None, and no path runs the d_weight
    GEMM (torch and chunked paths: no accumulation into a tensor of the head's shape; fused
    path: the backward kernel launched with HAS_DW off)."""
    monkeypatch.setenv("MAPO_FAST_BACKEND", backend)
    monkeypatch.setenv("MAPO_FAST_LOSS_PATH", path)
    case = make_case(dtype=torch.float32, seed=3, bias=True, old=True, device=DEV)
    head = tuple(case["weight"].shape)
    gemms, launches = [], []
    real_addmm, real_bwd = R.addmm32, K.backward

    def addmm_spy(acc, a, b, alpha=1.0):
        gemms.append(tuple(acc.shape))
        return real_addmm(acc, a, b, alpha)

    def bwd_spy(*args, **kwargs):
        launches.append(kwargs.get("need_dw", True))
        return real_bwd(*args, **kwargs)
    monkeypatch.setattr(R, "addmm32", addmm_spy)
    monkeypatch.setattr(K, "backward", bwd_spy)
    grads = {}
    for frozen in (False, True):
        gemms.clear()
        launches.clear()
        h, b = leaf(case["hidden"]), leaf(case["bias"])
        w = case["weight"].clone().requires_grad_(not frozen)
        loss, _ = mapo_fast.mapo_loss(h, w, case["targets"], case["advantages"], case["mask"],
                                      bias=b, old_logprobs=case["old_logprobs"].float())
        loss.backward()
        grads[frozen] = (h.grad, b.grad)
        assert (w.grad is None) == frozen
        if backend == "triton" and path == "fused":
            assert launches == [not frozen]
        else:
            assert (head in gemms) == (not frozen)
    for a, e in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_a_frozen_head_allocates_no_weight_sized_buffer():
    """The torch path with a frozen head: no allocation of d_weight's size (float32 [V, H])
    anywhere in the forward and backward (profiled)."""
    g = torch.Generator().manual_seed(0)
    v, hd, n = 4096, 256, 64   # d_weight would be 4 MiB; a chunk's logits are 1 MiB
    h = torch.randn(1, n, hd, generator=g, requires_grad=True)
    w = torch.randn(v, hd, generator=g) * 0.05
    y = torch.randint(0, v, (1, n), generator=g)

    def biggest(weight):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            loss, _ = mapo_fast.mapo_loss(h, weight, y, torch.randn(1, n, generator=g),
                                          torch.ones(1, n))
            loss.backward()
        return max(e.cpu_memory_usage for e in prof.events())
    size = v * hd * 4
    assert biggest(w.clone().requires_grad_(True)) >= size  # the trainable head's d_weight
    assert biggest(w) < size
