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
``[N, V]`` matrix is never formed. Everything is computed in float32 (float64 for float64 inputs).
These are pure functions on tensors: no autograd, no validation (that lives in ``mapo_fast``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor

#: Bytes of logits one chunk may hold (a few buffers of this size live at once).
CHUNK_BYTES = 32 * 1024 * 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    return max(1, CHUNK_BYTES // (vocab * itemsize))


def _chunks(n: int, chunk_rows: int):
    for start in range(0, n, chunk_rows):
        yield slice(start, min(n, start + chunk_rows))


def _gather_rows(hidden: Tensor, rows: Optional[Tensor], sl: slice, dtype: torch.dtype) -> Tensor:
    h = hidden[sl] if rows is None else hidden.index_select(0, rows[sl])
    return h.to(dtype)


class _Workspace:
    """Two ``[chunk_rows, V]`` buffers reused by every chunk of one call (logits, probs)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.z = torch.empty((rows, vocab), dtype=dtype, device=device)
        self.p = torch.empty((rows, vocab), dtype=dtype, device=device)

    def logits(self, h: Tensor, w: Tensor, b: Optional[Tensor], inv_temp: float,
               cap: float = 0.0, scale: float = 1.0,
               round_to: Optional[torch.dtype] = None) -> Tensor:
        z = torch.matmul(h, w.t(), out=self.z[: h.shape[0]])
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


def _prepare(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_rows: Optional[int]):
    cd = compute_dtype(hidden.dtype)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype)
    return cd, w, b, chunk_rows


@_no_autocast
def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
            inv_temp: float, rows: Optional[Tensor] = None,
            chunk_rows: Optional[int] = None, cap: float = 0.0,
            scale: float = 1.0, round_to: Optional[torch.dtype] = None
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp, entropy, lse)``, each ``[N]`` in the compute dtype.

    ``hidden [M, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [N]`` int64 (already
    aligned with ``rows``), ``rows [N]`` int64 indices into ``hidden`` or None (then N = M);
    ``cap`` > 0: the soft cap, with ``scale`` inside it (see the module doc).
    """
    n = targets.shape[0]
    cd, w, b, chunk_rows = _prepare(hidden, weight, bias, chunk_rows)
    logp = torch.empty(n, dtype=cd, device=hidden.device)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    ws = _Workspace(min(n, chunk_rows), weight.shape[0], cd, hidden.device)
    for sl in _chunks(n, chunk_rows):
        z = ws.logits(_gather_rows(hidden, rows, sl, cd), w, b, inv_temp, cap, scale, round_to)
        logp[sl], ent[sl], lse[sl], _ = _softmax_stats(z, targets[sl], ws.p)
    return logp, ent, lse


def _accumulate_grads(dz: Tensor, h: Tensor, w: Tensor, sl: slice, rows: Optional[Tensor],
                      dh: Tensor, dw: Tensor, db: Optional[Tensor]) -> None:
    dh_c = dz @ w
    if rows is None:
        dh[sl] = dh_c
    else:
        dh.index_add_(0, rows[sl], dh_c)
    dw.addmm_(dz.t(), h)
    if db is not None:
        db.add_(dz.sum(0))


def _grad_buffers(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], cd: torch.dtype):
    dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=cd, device=weight.device)
    db = None if bias is None else torch.zeros(bias.shape, dtype=cd, device=bias.device)
    return dh, dw, db


@_no_autocast
def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
             inv_temp: float, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], rows: Optional[Tensor] = None,
             chunk_rows: Optional[int] = None, cap: float = 0.0,
             scale: float = 1.0, round_to: Optional[torch.dtype] = None
             ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Recomputes the logits chunk by chunk and returns ``(d_hidden, d_weight, d_bias)`` in the
    compute dtype, for upstream gradients ``g_logp [N]`` and ``g_ent [N]`` (or None)."""
    n = targets.shape[0]
    cd, w, b, chunk_rows = _prepare(hidden, weight, bias, chunk_rows)
    dh, dw, db = _grad_buffers(hidden, weight, bias, cd)
    g_logp = g_logp.to(cd)
    g_ent = None if g_ent is None else g_ent.to(cd)
    ws = _Workspace(min(n, chunk_rows), weight.shape[0], cd, hidden.device)
    for sl in _chunks(n, chunk_rows):
        h = _gather_rows(hidden, rows, sl, cd)
        z = ws.logits(h, w, b, inv_temp, cap, scale, round_to).sub_(lse[sl, None])
        p = torch.exp(z, out=ws.p[: z.shape[0]])
        dz = _dz(p, z, targets[sl], ent[sl], g_logp[sl],
                 None if g_ent is None else g_ent[sl], inv_temp, lse[sl], cap, scale)
        _accumulate_grads(dz, h, w, sl, rows, dh, dw, db)
    return dh, dw, db


GradFn = Callable[[slice, Tensor, Tensor], Tuple[Tensor, Tensor, Optional[Tensor]]]


@_no_autocast
def fused_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, inv_temp: float, grad_fn: GradFn,
                           rows: Optional[Tensor] = None, chunk_rows: Optional[int] = None,
                           cap: float = 0.0, scale: float = 1.0,
                           round_to: Optional[torch.dtype] = None):
    """Forward and backward in one pass over the vocabulary: each chunk's logits are computed
    once and give both the statistics and the gradient (three matmuls in all).

    ``grad_fn(sl, logp_chunk, ent_chunk) -> (value_chunk, g_logp_chunk, g_ent_chunk)`` is the
    per-token objective of rows ``sl``: its summed value and its derivatives w.r.t. ``logp``
    and the entropy (None when it does not depend on it).
    Returns ``(logp, ent, value, d_hidden, d_weight, d_bias)``.
    """
    n = targets.shape[0]
    cd, w, b, chunk_rows = _prepare(hidden, weight, bias, chunk_rows)
    dh, dw, db = _grad_buffers(hidden, weight, bias, cd)
    logp = torch.empty(n, dtype=cd, device=hidden.device)
    ent = torch.empty_like(logp)
    value = torch.zeros((), dtype=cd, device=hidden.device)
    ws = _Workspace(min(n, chunk_rows), weight.shape[0], cd, hidden.device)
    for sl in _chunks(n, chunk_rows):
        h = _gather_rows(hidden, rows, sl, cd)
        z = ws.logits(h, w, b, inv_temp, cap, scale, round_to)
        lp, en, lse, p = _softmax_stats(z, targets[sl], ws.p)
        logp[sl], ent[sl] = lp, en
        val, g, g_ent = grad_fn(sl, lp, en)
        value += val
        dz = _dz(p, z, targets[sl], en, g.to(cd), None if g_ent is None else g_ent.to(cd),
                 inv_temp, lse, cap, scale)
        _accumulate_grads(dz, h, w, sl, rows, dh, dw, db)
    return logp, ent, value, dh, dw, db
