"""Plain-torch path of the fused linear log-prob: the reference, and the CPU implementation.

Math shared with the Triton kernels in ``linear_logprob.py`` (same arguments, same outputs):

    u[n, v]   = hidden[rows[n]] . weight[v] + bias[v]   (rounded to ``round_to`` when given: the
                logits a bf16/fp16 matmul under autocast would produce)
    z[n, v]   = u * inv_temp, or with a soft cap (cap > 0): cap * tanh(scale * u / cap) * inv_temp
    lse[n]    = log sum_v exp(z[n, v])
    logp[n]   = z[n, targets[n]] - lse[n]
    ent[n]    = lse[n] - sum_v p[n, v] z[n, v],            p = exp(z - lse)
    dz[n, v]  = g_logp[n] (1[v == targets[n]] - p[n, v]) - g_ent[n] p[n, v] (z[n, v] - lse[n] + ent[n])
    du        = inv_temp * dz, times scale * (1 - (z / (cap inv_temp))^2) with a soft cap
    d_hidden[rows[n]] = du @ weight,   d_weight = du^T @ hidden[rows],   d_bias = sum_n du

(A logit scale without a soft cap is a factor of ``inv_temp``: callers fold it in.)

The work is chunked over tokens so that at most ``chunk_rows x V`` logits exist at a time; the
``[N, V]`` matrix is never formed. The logits and every elementwise step are float32 (float64 for
float64 inputs). The three matmuls per chunk run in ``gemm`` dtype: on CPU the compute dtype (the
weight converted once per call); on CUDA, for bf16/fp16 inputs, the inputs' own dtype with fp32
accumulation and fp32 outputs (cuBLAS through ``out_dtype``), ``dz`` rounded to that dtype
before the gradient matmuls (fp16: each row of ``dz`` divided by a power of two that brings its
largest entry into [0.5, 1), so that small probabilities times 1/N weights do not flush to
zero; the same power multiplies that row's contributions back, exactly).

The elementwise passes of a chunk (softmax statistics, ``dz``) are ``RowOps``: ``TORCH_ROWS``
here (the reference and the CPU path); the chunked CUDA path (``linear_logprob_chunked.py``)
runs the same loops with Triton row kernels. These are pure functions on tensors: no autograd,
no validation (that lives in ``mapo_fast``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from ._common import torch_at_least

Tensor = torch.Tensor

#: Bytes of logits one chunk may hold on CPU (a few buffers of this size live at once).
CHUNK_BYTES = 32 * 1024 * 1024
#: Bytes of one chunk's workspace on CUDA (fp32 logits plus ``dz`` in the GEMM dtype, and the
#: fp32 probabilities on the torch path); large chunks keep the three GEMMs efficient.
CUDA_WORKSPACE_BYTES = 1024 * 1024 * 1024
#: Chunks on CUDA hold a multiple of this many tokens (GEMM tile alignment), at least one.
CUDA_CHUNK_ALIGN = 128
HALF = (torch.bfloat16, torch.float16)
#: the first torch whose CUDA ``mm`` / ``addmm`` take half-precision operands with fp32 outputs
#: (``out_dtype``): 2.8 and 2.9 have the overloads but refuse the mixed dtypes on CUDA ("self
#: and mat2 must have the same dtype")
HALF_GEMMS_TORCH = (2, 10)
#: cuBLAS half-precision GEMMs with fp32 outputs: by version, then by the overloads' names;
#: without them half-precision inputs on CUDA are computed in fp32 (``gemm_dtype``)
HALF_GEMMS = torch_at_least(HALF_GEMMS_TORCH) and "dtype" in torch.ops.aten.mm.overloads() and \
    "dtype" in torch.ops.aten.addmm.overloads()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemm_dtype(hidden: Tensor) -> torch.dtype:
    """The chunk GEMMs' operand dtype: the inputs' own half-precision dtype on CUDA, else the
    compute dtype."""
    if hidden.is_cuda and hidden.dtype in HALF and HALF_GEMMS:
        return hidden.dtype
    return compute_dtype(hidden.dtype)


def workspace_bytes_per_row(vocab: int, dtype: torch.dtype, gemm: torch.dtype,
                            probs: bool = True) -> int:
    """Bytes one token of a chunk takes in the workspace: logits (+ probabilities) in the
    compute dtype, ``dz`` in the GEMM dtype when that differs."""
    cd = compute_dtype(dtype).itemsize
    return vocab * (cd * (2 if probs else 1) + (gemm.itemsize if gemm != compute_dtype(dtype)
                                                  else 0))


def default_chunk_rows(vocab: int, dtype: torch.dtype, device: Optional[torch.device] = None,
                       gemm: Optional[torch.dtype] = None, probs: bool = True) -> int:
    """Tokens per chunk: ``CHUNK_BYTES`` of logits on CPU; on CUDA ``CUDA_WORKSPACE_BYTES`` of
    workspace, in multiples of ``CUDA_CHUNK_ALIGN``."""
    if device is None or device.type != "cuda":
        return max(1, CHUNK_BYTES // (vocab * compute_dtype(dtype).itemsize))
    per_row = workspace_bytes_per_row(vocab, dtype, gemm or dtype, probs)
    rows = CUDA_WORKSPACE_BYTES // per_row // CUDA_CHUNK_ALIGN * CUDA_CHUNK_ALIGN
    return max(CUDA_CHUNK_ALIGN, rows)


def _chunks(n: int, chunk_rows: int):
    for start in range(0, n, chunk_rows):
        yield slice(start, min(n, start + chunk_rows))


def _gather_rows(hidden: Tensor, rows: Optional[Tensor], sl: slice, dtype: torch.dtype) -> Tensor:
    h = hidden[sl] if rows is None else hidden.index_select(0, rows[sl])
    return h.to(dtype)


def mm32(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` with a float32 result (float64 for float64 operands): half-precision operands
    go to cuBLAS with fp32 accumulation and output; on CPU (tests) the same exact products are
    summed in fp32."""
    if a.dtype not in HALF:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out) if out is not None else \
            torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float(), out=out)


def addmm32(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha a @ b`` in place, ``acc`` in the compute dtype (see ``mm32``)."""
    if a.dtype not in HALF:
        acc.addmm_(a, b, alpha=alpha)
    elif a.is_cuda:
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


class _Workspace:
    """Per-call buffers reused by every chunk: logits ``z`` (compute dtype), and on demand the
    probabilities ``p`` (compute dtype) and ``dz`` in the GEMM dtype."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.z = torch.empty(self.shape, dtype=dtype, device=device)
        self._p = self._dz = None

    @property
    def p(self) -> Tensor:
        if self._p is None:
            self._p = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._p

    def dz(self, dtype: torch.dtype) -> Tensor:
        if self._dz is None or self._dz.dtype != dtype:
            self._dz = torch.empty(self.shape, dtype=dtype, device=self.device)
        return self._dz

    def logits(self, h: Tensor, w: Tensor, b: Optional[Tensor], inv_temp: float,
               cap: float = 0.0, scale: float = 1.0,
               round_to: Optional[torch.dtype] = None) -> Tensor:
        z = mm32(h, w.t(), out=self.z[: h.shape[0]])
        if b is not None:
            z.add_(b)
        if round_to is not None:
            z.copy_(z.to(round_to))
        if cap > 0:
            z.mul_(scale / cap).tanh_().mul_(cap)
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        return z


def _softmax_stats(z: Tensor, y: Tensor, p_out: Tensor):
    """From logits ``z`` (overwritten with ``z - lse``, i.e. log-probs): returns
    ``(logp, ent, lse, p)`` with ``p`` the softmax written into ``p_out``."""
    m = z.amax(1, keepdim=True)
    z.sub_(m)
    p = torch.exp(z, out=p_out[: z.shape[0]])
    log_s = p.sum(1).log_()
    p.mul_(torch.exp(-log_s)[:, None])
    z.sub_(log_s[:, None])
    ent = -torch.bmm(p[:, None, :], z[:, :, None]).view(-1)
    logp = z.gather(1, y[:, None]).squeeze(1)
    return logp, ent, m.squeeze(1) + log_s, p


def _dz(p: Tensor, logp_all: Tensor, y: Tensor, ent: Tensor, g_logp: Tensor,
        g_ent: Optional[Tensor], inv_temp: float, lse: Optional[Tensor] = None,
        cap: float = 0.0, scale: float = 1.0) -> Tensor:
    """Gradient w.r.t. the raw logits ``u`` (before the soft cap and the temperature), in place
    over ``p``; ``logp_all = z - lse`` (read for the entropy term and, with a cap, to recover
    ``z`` from ``lse``)."""
    if g_ent is None:
        dz = p.mul_(-g_logp[:, None])
    else:
        dz = p.mul_(-(g_logp[:, None]) - g_ent[:, None] * (logp_all + ent[:, None]))
    dz.scatter_add_(1, y[:, None], g_logp[:, None])
    if cap > 0:  # d(cap tanh(scale u / cap))/du = scale (1 - tanh^2), tanh = z / (cap inv_temp)
        t = (logp_all + lse[:, None]).div_(cap * inv_temp)
        dz.mul_(t.square_().neg_().add_(1.0).mul_(scale))
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    return dz


def _no_autocast(fn):
    """Runs ``fn`` with autocast off on the inputs' device: the math is float32 (float64) by
    design (``round_to`` is how a caller asks for autocast's half-precision logits)."""
    @functools.wraps(fn)
    def wrapper(hidden: Tensor, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args, **kwargs)
    return wrapper


def _to_gemm(dz: Tensor, gemm: torch.dtype, ws: "_Workspace") -> Tuple[Tensor, Optional[Tensor]]:
    """``dz`` (compute dtype) as the gradient GEMMs take it: ``(dz, None)`` when the GEMMs run
    in the compute dtype; bf16: rounded; fp16: row ``r`` divided by ``unit[r]``, a power of two
    (returned) putting its largest magnitude in [0.5, 1), in place in ``dz`` (the chunk's
    scratch buffer) before the cast, so no ``[chunk, V]`` temporary is made."""
    if gemm == dz.dtype:
        return dz, None
    out = ws.dz(gemm)[: dz.shape[0]]
    if gemm != torch.float16:
        return out.copy_(dz), None
    top = dz.abs().amax(1)
    unit = torch.exp2(torch.ceil(torch.log2(torch.where(top > 0, top, torch.ones_like(top)))))
    return out.copy_(dz.div_(unit[:, None])), unit


class TorchRows:
    """The elementwise passes of a chunk in torch (``RowOps``): ``stats`` overwrites the logits
    ``z`` with ``z - lse`` and keeps the probabilities in the workspace, which ``grad`` then
    reuses (``after_stats``); without a preceding ``stats`` it recomputes them from ``lse``."""

    name = "torch"
    probs = True  # uses the workspace's probability buffer

    def stats(self, z: Tensor, y: Tensor, ws: _Workspace) -> Tuple[Tensor, Tensor, Tensor]:
        logp, ent, lse, _ = _softmax_stats(z, y, ws.p)
        return logp, ent, lse

    def grad(self, z: Tensor, y: Tensor, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], inv_temp: float, cap: float, scale: float,
             ws: _Workspace, gemm: torch.dtype, after_stats: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(dz, unit)`` of the chunk, ``dz`` in ``gemm`` dtype (see ``_to_gemm``)."""
        c = z.shape[0]
        if after_stats:
            p = ws.p[:c]
        else:
            p = torch.exp(z.sub_(lse[:, None]), out=ws.p[:c])
        dz = _dz(p, z, y, ent, g_logp, g_ent, inv_temp, lse, cap, scale)
        return _to_gemm(dz, gemm, ws)


TORCH_ROWS = TorchRows()


class _Call:
    """One call's dtypes, operands in the GEMM dtype, chunking and workspace."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], n: int,
                 chunk_rows: Optional[int], gemm: Optional[torch.dtype], ops):
        self.cd = compute_dtype(hidden.dtype)
        self.gemm = gemm or gemm_dtype(hidden)
        self.w = weight.to(self.gemm)
        self.b = None if bias is None else bias.to(self.cd)
        self.chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype,
                                                           hidden.device, self.gemm, ops.probs)
        self.ws = _Workspace(min(n, self.chunk_rows), weight.shape[0], self.cd, hidden.device)

    def chunks(self, n: int):
        return _chunks(n, self.chunk_rows)


@_no_autocast
def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
            inv_temp: float, rows: Optional[Tensor] = None,
            chunk_rows: Optional[int] = None, cap: float = 0.0,
            scale: float = 1.0, round_to: Optional[torch.dtype] = None,
            ops: TorchRows = TORCH_ROWS, gemm: Optional[torch.dtype] = None
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp, entropy, lse)``, each ``[N]`` in the compute dtype.

    ``hidden [M, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [N]`` int64 (already
    aligned with ``rows``), ``rows [N]`` int64 indices into ``hidden`` or None (then N = M);
    ``cap`` > 0: the soft cap, with ``scale`` inside it (see the module doc); ``ops``: the
    elementwise passes; ``gemm``: the GEMM operand dtype (default ``gemm_dtype(hidden)``).
    """
    n = targets.shape[0]
    call = _Call(hidden, weight, bias, n, chunk_rows, gemm, ops)
    logp = torch.empty(n, dtype=call.cd, device=hidden.device)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    for sl in call.chunks(n):
        z = call.ws.logits(_gather_rows(hidden, rows, sl, call.gemm), call.w, call.b, inv_temp,
                           cap, scale, round_to)
        logp[sl], ent[sl], lse[sl] = ops.stats(z, targets[sl], call.ws)
    return logp, ent, lse


def _accumulate_grads(dz: Tensor, unit: Optional[Tensor], h: Tensor, w: Tensor, sl: slice,
                      rows: Optional[Tensor], dh: Tensor, dw: Optional[Tensor],
                      db: Optional[Tensor]) -> None:
    """``dh[rows] += (unit dz) @ w``, ``dw += (unit dz)^T @ h`` (skipped when ``dw`` is None: a
    frozen head), ``db += sum (unit dz)``; ``dz``
    and ``h`` in the GEMM dtype. Row scales ``unit`` (powers of two, or None) are applied
    exactly: to the rows of ``dz @ w``, and for ``d_weight`` as ``top * (dz^T @ (h unit /
    top))`` with ``top`` the chunk's largest (one host read), so that ``h``'s rows are scaled
    by at most 1 and the rows that matter most keep their precision in fp16."""
    dh_c = mm32(dz, w)
    if unit is not None:
        dh_c.mul_(unit[:, None])
    if rows is None:
        dh[sl] = dh_c
    else:
        dh.index_add_(0, rows[sl], dh_c)
    if dw is not None:
        alpha = 1.0
        if unit is not None:
            top = unit.max()
            h = h * (unit / top)[:, None].to(h.dtype)
            alpha = float(top)
        addmm32(dw, dz.t(), h, alpha)
    if db is not None:
        db.add_((dz.to(db.dtype) * (1.0 if unit is None else unit[:, None])).sum(0))


def _grad_buffers(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], cd: torch.dtype,
                  need_dw: bool = True):
    """Zeroed gradient accumulators; no ``d_weight`` buffer for a frozen head."""
    dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_dw else None
    db = None if bias is None else torch.zeros(bias.shape, dtype=cd, device=bias.device)
    return dh, dw, db


@_no_autocast
def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
             inv_temp: float, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], rows: Optional[Tensor] = None,
             chunk_rows: Optional[int] = None, cap: float = 0.0,
             scale: float = 1.0, round_to: Optional[torch.dtype] = None,
             ops: TorchRows = TORCH_ROWS, gemm: Optional[torch.dtype] = None,
             need_dw: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Recomputes the logits chunk by chunk and returns ``(d_hidden, d_weight, d_bias)`` in the
    compute dtype, for upstream gradients ``g_logp [N]`` and ``g_ent [N]`` (or None);
    ``d_weight`` is None, and costs nothing, without ``need_dw``."""
    n = targets.shape[0]
    call = _Call(hidden, weight, bias, n, chunk_rows, gemm, ops)
    dh, dw, db = _grad_buffers(hidden, weight, bias, call.cd, need_dw)
    g_logp = g_logp.to(call.cd)
    g_ent = None if g_ent is None else g_ent.to(call.cd)
    for sl in call.chunks(n):
        h = _gather_rows(hidden, rows, sl, call.gemm)
        z = call.ws.logits(h, call.w, call.b, inv_temp, cap, scale, round_to)
        dz, unit = ops.grad(z, targets[sl], lse[sl], ent[sl], g_logp[sl],
                            None if g_ent is None else g_ent[sl], inv_temp, cap, scale,
                            call.ws, call.gemm, after_stats=False)
        _accumulate_grads(dz, unit, h, call.w, sl, rows, dh, dw, db)
    return dh, dw, db


GradFn = Callable[[slice, Tensor, Tensor], Tuple[Tensor, Tensor, Optional[Tensor]]]


@_no_autocast
def fused_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, inv_temp: float, grad_fn: GradFn,
                           rows: Optional[Tensor] = None, chunk_rows: Optional[int] = None,
                           cap: float = 0.0, scale: float = 1.0,
                           round_to: Optional[torch.dtype] = None,
                           ops: TorchRows = TORCH_ROWS, gemm: Optional[torch.dtype] = None,
                           need_dw: bool = True):
    """Forward and backward in one pass over the vocabulary: each chunk's logits are computed
    once and give both the statistics and the gradient (three matmuls in all).

    ``grad_fn(sl, logp_chunk, ent_chunk) -> (value_chunk, g_logp_chunk, g_ent_chunk)`` is the
    per-token objective of rows ``sl``: its summed value and its derivatives w.r.t. ``logp``
    and the entropy (None when it does not depend on it).
    Returns ``(logp, ent, value, d_hidden, d_weight, d_bias)`` (``d_weight`` None without
    ``need_dw``: no buffer and no GEMM for a frozen head).
    """
    n = targets.shape[0]
    call = _Call(hidden, weight, bias, n, chunk_rows, gemm, ops)
    dh, dw, db = _grad_buffers(hidden, weight, bias, call.cd, need_dw)
    logp = torch.empty(n, dtype=call.cd, device=hidden.device)
    ent = torch.empty_like(logp)
    value = torch.zeros((), dtype=call.cd, device=hidden.device)
    for sl in call.chunks(n):
        h = _gather_rows(hidden, rows, sl, call.gemm)
        z = call.ws.logits(h, call.w, call.b, inv_temp, cap, scale, round_to)
        lp, en, lse = ops.stats(z, targets[sl], call.ws)
        logp[sl], ent[sl] = lp, en
        val, g, g_ent = grad_fn(sl, lp, en)
        value += val
        dz, unit = ops.grad(z, targets[sl], lse, en, g.to(call.cd),
                            None if g_ent is None else g_ent.to(call.cd), inv_temp, cap, scale,
                            call.ws, call.gemm, after_stats=True)
        _accumulate_grads(dz, unit, h, call.w, sl, rows, dh, dw, db)
    return logp, ent, value, dh, dw, db
