"""The chunked CUDA path (cuBLAS-style GEMMs in the inputs' dtype + Triton row kernels), here
under TRITON_INTERPRET=1 with the GEMMs emulated in fp32 (``mm32``), against the float64
reference, at awkward sizes (N=37 tokens in chunks of 16, V=101 in row blocks of 64, H=45).
Through ``mapo_loss`` and ``token_logprobs``: ``test_kernels_triton.py`` (both CUDA paths).

Tolerances: the forward is fp32 accumulation throughout (3e-5, as the fused kernels). The
backward rounds ``dz`` to the GEMM dtype: bf16 keeps 8 bits (2e-2 relative to the largest
gradient entry); fp16 keeps 11 bits once each row is scaled into [0.5, 1) (3e-3; the rows of
``h`` times the row scale can land in fp16's subnormals, which costs a few more bits on the
smallest products); fp32 GEMMs are exact products (3e-5)."""

import pytest
import torch

pytest.importorskip("triton")

from mapo_fast.kernels import linear_logprob as K  # noqa: E402
from mapo_fast.kernels import linear_logprob_chunked as C  # noqa: E402
from mapo_fast.kernels import linear_logprob_ref as R  # noqa: E402

BWD_TOL = {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(dtype, n=37, m=42, v=101, d=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype)
    rows = torch.randperm(m, generator=g)[:n]
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, b, rows, y


def upstream(n, seed, scale=1.0 / 37):
    """Per-token gradients of a mean over tokens: weights ~1/N, as a real loss has."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, generator=g, dtype=torch.float64) * scale)


def double(*xs):
    return [None if x is None else x.double() for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("use_rows", [False, True])
def test_forward_matches_reference(dtype, softcap, use_rows):
    h, w, b, rows, y = inputs(dtype, seed=3)
    rows = rows if use_rows else None
    if rows is None:
        h = h[:37]
    kw = dict(cap=softcap, scale=1.3)
    got = C.forward(h, w, b, y, 1 / 0.7, rows=rows, chunk_rows=16, **kw)
    want = R.forward(*double(h, w, b), y, 1 / 0.7, rows=rows, **kw)
    for name, a, e in zip(("logp", "entropy", "lse"), got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, atol=3e-5, rtol=3e-5, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_backward_matches_reference(dtype, entropy_grad, softcap):
    h, w, b, rows, y = inputs(dtype, seed=5)
    kw = dict(cap=softcap, scale=1.3)
    _, ent, lse = R.forward(*double(h, w, b), y, 1 / 0.7, rows=rows, **kw)
    gl, ge = upstream(y.shape[0], seed=1)
    gl[:5] = 0.0  # tokens without gradient
    ge = ge if entropy_grad else None
    got = C.backward(h, w, b, y, 1 / 0.7, lse.float(), ent.float(), gl.float(),
                     None if ge is None else ge.float(), rows=rows, chunk_rows=16, **kw)
    want = R.backward(*double(h, w, b), y, 1 / 0.7, lse, ent, gl, ge, rows=rows, **kw)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), got, want):
        top = e.abs().max()
        err = float((a.double() - e).abs().max() / top)
        assert err < BWD_TOL[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_fp16_backward_keeps_small_gradients(path):
    """Per-token weights 1e-6 (a mean over a million tokens): dz = 1e-6 x p sits below fp16's
    smallest normal; both paths scale it by a power of two before the cast."""
    h, w, b, rows, y = inputs(torch.float16, seed=7)
    _, ent, lse = R.forward(*double(h, w, b), y, 1.0, rows=rows)
    gl, _ = upstream(y.shape[0], seed=2, scale=1e-6)
    impl = K if path == "fused" else C
    got = impl.backward(h, w, b, y, 1.0, lse.float(), ent.float(), gl.float(), None, rows=rows)
    want = R.backward(*double(h, w, b), y, 1.0, lse, ent, gl, None, rows=rows)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), got, want):
        err = float((a.double() - e).abs().max() / e.abs().max())
        assert err < 3e-3, f"{path} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float16])
def test_torch_path_with_half_gemms_matches_reference(gemm):
    """The torch path with half-precision GEMMs (what it runs on CUDA, emulated here): the
    same loops with torch's elementwise passes."""
    h, w, b, rows, y = inputs(gemm, seed=13)
    gl, ge = upstream(y.shape[0], seed=4)
    value_and_grad = lambda sl, lp, en: (lp.sum(), gl[sl].float(), ge[sl].float())  # noqa
    out = R.fused_forward_backward(h, w, b, y, 1 / 0.7, value_and_grad, rows=rows,
                                   chunk_rows=16, gemm=gemm)
    _, ent, lse = R.forward(*double(h, w, b), y, 1 / 0.7, rows=rows)
    want = R.backward(*double(h, w, b), y, 1 / 0.7, lse, ent, gl, ge, rows=rows)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), out[3:], want):
        err = float((a.double() - e).abs().max() / e.abs().max())
        assert err < BWD_TOL[gemm], f"{name}: relative error {err:.2e}"


def test_chunk_rows_follow_the_workspace_budget():
    cuda = torch.device("cuda")
    rows = R.default_chunk_rows(152064, torch.bfloat16, cuda, torch.bfloat16, probs=False)
    assert rows % R.CUDA_CHUNK_ALIGN == 0
    assert rows * R.workspace_bytes_per_row(152064, torch.bfloat16, torch.bfloat16,
                                            probs=False) <= R.CUDA_WORKSPACE_BYTES
    assert R.default_chunk_rows(101, torch.float32) == R.CHUNK_BYTES // (101 * 4)  # CPU
