"""Token log-probs (and entropies) from hidden states and the LM head, without materialising
the ``[tokens x vocab]`` logits. Device dispatch for the fused linear log-prob happens here, once
(``_forward``/``_backward``): Triton kernels on CUDA, the chunked torch path
(``kernels/linear_logprob_ref.py``) elsewhere; see ``_dispatch.backend_for``."""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _checks as chk
from . import loss_path
from ._dispatch import backend_for, triton_module
from .kernels import linear_logprob_ref as ref_impl
from .policy import banned_bias

Tensor = torch.Tensor
KERNEL = "linear_logprob"
CHUNKED = "linear_logprob_chunked"


class LogitMap(NamedTuple):
    """How raw logits ``u = h W^T + b`` become the logits of the softmax: ``z = u * inv_temp``,
    or with a soft cap (``cap > 0``) ``z = cap * tanh(scale * u / cap) * inv_temp`` (a logit
    scale without a cap is folded into ``inv_temp``); ``round_to``: ``u`` rounded to this
    half-precision dtype first (autocast's matmul output), else kept in float32."""
    inv_temp: float = 1.0
    cap: float = 0.0
    scale: float = 1.0
    round_to: Optional[torch.dtype] = None


def _impl(path: str):
    """The module computing ``path`` (see ``loss_path``)."""
    if path == "torch":
        return ref_impl
    return triton_module(KERNEL if path == "fused" else CHUNKED)


def _forward(path: str, hidden, weight, bias, targets, lm: LogitMap, rows):
    return _impl(path).forward(hidden, weight, bias, targets, lm.inv_temp, rows=rows,
                               cap=lm.cap, scale=lm.scale, round_to=lm.round_to)


def _backward(path: str, hidden, weight, bias, targets, lm: LogitMap, lse, ent, g_logp,
              g_ent, rows, need_dw: bool = True):
    return _impl(path).backward(hidden, weight, bias, targets, lm.inv_temp, lse, ent, g_logp,
                                g_ent, rows=rows, cap=lm.cap, scale=lm.scale,
                                round_to=lm.round_to, need_dw=need_dw)


def select_path(hidden: Tensor, vocab: int, n: int, has_bias: bool, has_rows: bool,
                lm: LogitMap, need_grad: bool,
                runners: Callable[[], Dict[str, Callable[[], object]]]) -> str:
    """``"torch"``, ``"fused"`` or ``"chunked"`` for this call (see ``mapo_fast.loss_path``);
    ``runners()`` builds the call's work for each CUDA path, run only to measure."""
    if backend_for(hidden, KERNEL) == "torch" or hidden.dtype == torch.float64:
        return "torch"
    choice = loss_path.requested()
    if choice != "auto":
        return choice
    if not hidden.is_cuda or not need_grad:  # interpreter; inference: the fused forward
        return "fused"
    flags = "".join(c for c, on in (("b", has_bias), ("r", has_rows), ("c", lm.cap > 0),
                                    ("a", lm.round_to is not None)) if on) or "-"
    key = loss_path.make_key(hidden, vocab, n, flags)
    gemm = ref_impl.gemm_dtype(hidden)
    rows_per_chunk = min(n, ref_impl.default_chunk_rows(vocab, hidden.dtype, hidden.device,
                                                        gemm, probs=False))
    workspace = rows_per_chunk * ref_impl.workspace_bytes_per_row(vocab, hidden.dtype, gemm,
                                                                  probs=False)
    fits = loss_path.chunked_fits(hidden.device, workspace)
    with torch.no_grad():  # measuring runs record no autograd graph
        return loss_path.chooser().choose(key, runners() if fits else {}, chunked_fits=fits)


def _cast_grads(dtypes, dh, dw, db):
    """Gradients in the dtypes ``(hidden, weight, bias or None)`` of the inputs (``dw`` None
    for a frozen head)."""
    dt_h, dt_w, dt_b = dtypes
    return dh.to(dt_h), None if dw is None else dw.to(dt_w), None if db is None else db.to(dt_b)


def _dtypes(hidden, weight, bias):
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


class _LinearLogprob(torch.autograd.Function):
    """logp, entropy = f(hidden, weight, bias); backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, lm, path):
        logp, ent, lse = _forward(path, hidden, weight, bias, targets, lm, rows)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, ent)
        ctx.lm, ctx.path = lm, path
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, rows, lse, ent = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        dh, dw, db = _backward(ctx.path, hidden, weight, bias, targets, ctx.lm, lse,
                               ent, g_logp, g_ent, rows, need_dw=ctx.needs_input_grad[1])
        dh, dw, db = _cast_grads(_dtypes(hidden, weight, bias), dh, dw, db)
        return dh, dw, db, None, None, None, None


TokenObjective = Callable[[slice, Tensor, Tensor], Tensor]


def _value_and_grad(objective: "TokenObjective"):
    def value_and_grad(sl, logp, ent):
        """The summed value and its gradients w.r.t. ``logp`` and ``ent`` (None when the
        objective does not use the entropy)."""
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            en = ent.detach().requires_grad_(True)
            val = objective(sl, lp, en).sum()
            g, g_ent = torch.autograd.grad(val, (lp, en), allow_unused=True)
        return val.detach(), torch.zeros_like(lp) if g is None else g, g_ent
    return value_and_grad


def objective_pass(path: str, hidden, weight, bias, targets, rows, lm: LogitMap,
                   objective: "TokenObjective", need_grad: bool, need_dw: bool = True):
    """``(value, logp, ent, grads)`` of the objective through ``path``; ``grads`` is
    ``(d_hidden, d_weight, d_bias)`` (float32 accumulators; ``d_weight`` None without
    ``need_dw``, a frozen head: no buffer and no GEMM) or None without ``need_grad``.

    torch and chunked paths: one pass over the vocabulary per token chunk (logits once per
    chunk, 3 matmuls); fused path: the forward kernel, the per-token gradient in torch, the
    backward kernel."""
    value_and_grad = _value_and_grad(objective)
    if path != "fused" and need_grad:
        logp, ent, value, *grads = _impl(path).fused_forward_backward(
            hidden, weight, bias, targets, lm.inv_temp, value_and_grad, rows=rows,
            cap=lm.cap, scale=lm.scale, round_to=lm.round_to, need_dw=need_dw)
        return value, logp, ent, tuple(grads)
    logp, ent, lse = _forward(path, hidden, weight, bias, targets, lm, rows)
    if not need_grad:
        return objective(slice(None), logp, ent).sum(), logp, ent, None
    value, g, g_ent = value_and_grad(slice(None), logp, ent)
    grads = _backward(path, hidden, weight, bias, targets, lm, lse, ent, g, g_ent, rows, need_dw)
    return value, logp, ent, grads


class _FusedLinearObjective(torch.autograd.Function):
    """``value = sum_n objective(logp_n, entropy_n)`` with the gradient computed during the
    forward pass (the backward only scales it by the upstream scalar gradient), through
    ``objective_pass``. ``objective(sl, logp, ent)`` returns the per-token values of rows
    ``sl``; it must be a differentiable torch function of ``logp`` and may use ``ent`` (their
    gradients come from autograd on ``[N]`` vectors, so a loss variant only writes the
    per-token formula; an entropy term's gradient reaches the logits through ``dH/dz``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, lm, path, objective):
        need_grad = any(ctx.needs_input_grad[:3])
        value, logp, ent, grads = objective_pass(path, hidden, weight, bias, targets, rows, lm,
                                                 objective, need_grad, ctx.needs_input_grad[1])
        if need_grad:
            ctx.save_for_backward(*grads)
            ctx.dtypes = _dtypes(hidden, weight, bias)
        ctx.mark_non_differentiable(logp, ent)
        return value, logp, ent

    @staticmethod
    def backward(ctx, g_value, _g_logp, _g_ent):
        dh, dw, db = ctx.saved_tensors
        if not torch.equal(g_value, torch.ones_like(g_value)):  # else no copy of the grads
            dh = dh * g_value
            dw = None if dw is None else dw * g_value
            db = None if db is None else db * g_value
        return (*_cast_grads(ctx.dtypes, dh, dw, db), None, None, None, None, None)


LOGITS_DTYPES = ("float32", "autocast")


def _round_to(fn: str, logits_dtype: str, hidden: Tensor) -> Optional[torch.dtype]:
    """``logits_dtype`` as the dtype of autocast's matmul, when one is active for these inputs
    (None: float32 logits)."""
    chk.choice(fn, "logits_dtype", logits_dtype, LOGITS_DTYPES)
    dev = hidden.device.type
    if logits_dtype == "float32" or hidden.dtype == torch.float64 or \
            not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def check_linear_inputs(fn: str, hidden: Tensor, weight: Tensor, targets: Tensor,
                        bias: Optional[Tensor], temperature: float, logit_scale: float = 1.0,
                        softcap: Optional[float] = None,
                        logits_dtype: str = "float32") -> LogitMap:
    """Validates the arguments common to the fused linear ops; returns their ``LogitMap``."""
    chk.tensor(fn, "hidden", hidden, dims=(2, 3), floating=True)
    chk.tensor(fn, "weight", weight, dims=(2,), floating=True)
    chk.tensor(fn, "targets", targets, integer=True)
    if weight.shape[1] != hidden.shape[-1]:
        chk.fail(fn, "weight", f"must have shape [V, {hidden.shape[-1]}] to match `hidden`'s "
                               f"hidden size, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        chk.fail(fn, "weight", f"must have at least one row (vocabulary), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        chk.fail(fn, "weight", f"must have the dtype of `hidden` ({hidden.dtype}), got {weight.dtype}")
    tokens = hidden.shape[:-1].numel()
    if targets.numel() != tokens or (hidden.dim() == 3 and tuple(targets.shape) != tuple(hidden.shape[:2])):
        want = tuple(hidden.shape[:2]) if hidden.dim() == 3 else f"[{tokens}] or [B, T] with B*T={tokens}"
        chk.fail(fn, "targets", f"must have shape {want} to match `hidden` "
                                f"{tuple(hidden.shape)}, got {tuple(targets.shape)}")
    if bias is not None:
        chk.tensor(fn, "bias", bias, dims=(1,), floating=True)
        chk.shape(fn, "bias", bias, (weight.shape[0],), "one entry per row of `weight`")
    chk.same_device(fn, "hidden", hidden, weight=weight, targets=targets, bias=bias)
    chk.targets_in_range(fn, targets, weight.shape[0])
    inv_temp = 1.0 / chk.number(fn, "temperature", temperature, lo=0.0, lo_open=True)
    scale = chk.number(fn, "logit_scale", logit_scale, lo=0.0, lo_open=True)
    round_to = _round_to(fn, logits_dtype, hidden)
    if softcap is None:
        return LogitMap(inv_temp * scale, round_to=round_to)
    return LogitMap(inv_temp, chk.number(fn, "softcap", softcap, lo=0.0, lo_open=True), scale,
                    round_to)


def _autocast_inputs(h: Tensor, w: Tensor, b: Optional[Tensor], lm: LogitMap):
    """The inputs as autocast's matmul takes them, in ``lm.round_to`` (a differentiable cast:
    their gradients come back in the inputs' dtypes), when the logits follow autocast."""
    if lm.round_to is None or h.dtype == lm.round_to:
        return h, w, b
    return h.to(lm.round_to), w.to(lm.round_to), None if b is None else b.to(lm.round_to)


def _needs_grad(*xs: Optional[Tensor]) -> bool:
    """Whether autograd will want gradients of any of ``xs`` from this call."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _flat(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return h, w, b


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                   bias: Optional[Tensor] = None, temperature: float = 1.0,
                   return_entropy: bool = False, logit_scale: float = 1.0,
                   softcap: Optional[float] = None, logits_dtype: str = "float32",
                   banned_tokens: Optional[Sequence[int]] = None
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Log-probability of each target token under ``softmax((hidden @ weight.T + bias) / T)``
    (with ``logit_scale`` and ``softcap``: ``softmax(softcap * tanh(logit_scale * u / softcap)
    / T)``, the final logit soft-capping of Gemma-style models; ``logit_scale`` alone
    multiplies the logits).

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` float (fp32, bf16, fp16 or fp64).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: integer tensor with one entry per token (``[N]``, or ``[B, T]``), in ``[0, V)``.
        bias: optional ``[V]``.
        temperature: positive; the logits are divided by it.
        return_entropy: also return the entropy of each token's distribution.
        logit_scale: positive; multiplies the logits (before the soft cap).
        softcap: positive, or None (no cap).
        logits_dtype: ``"float32"`` (default: logits accumulated and kept in float32, the
            closest to float64) or ``"autocast"``: under an active autocast, the head computed
            as autocast's matmul computes it (inputs cast to its bf16/fp16 dtype, the logits
            rounded to it), what frameworks running the LM head under autocast get (about 3
            significant digits of each logit in bf16). The softmax statistics are float32
            either way; the speed is the same.
        banned_tokens: token ids removed from the softmax (the ids the sampler never draws,
            see ``mapo_fast.policy``): their probability is exactly 0 and their own log-probs
            are finite, about ``-BANNED_GAP``. Not with ``softcap``.

    Returns:
        ``logp`` shaped like ``targets`` (float32; float64 for float64 inputs), and with
        ``return_entropy`` the entropies, same shape. Both are differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``; the backward recomputes logits tile by tile, so no
        ``[N, V]`` tensor exists in either direction.
    """
    fn = "token_logprobs"
    lm = check_linear_inputs(fn, hidden, weight, targets, bias, temperature, logit_scale, softcap,
                             logits_dtype)
    bias = banned_bias(fn, bias, weight, banned_tokens, lm.inv_temp, softcap)
    h, w, b = _autocast_inputs(*_flat(hidden, weight, bias), lm)
    y = targets.reshape(-1).to(torch.int64)
    need_grad = _needs_grad(hidden, weight, bias)

    def runners():
        def run(path):
            logp, ent, lse = _forward(path, h, w, b, y, lm, None)
            return _backward(path, h, w, b, y, lm, lse, ent, torch.ones_like(logp), None, None,
                             need_dw=_needs_grad(w))
        return {p: (lambda p=p: run(p)) for p in ("fused", "chunked")}

    path = select_path(h, w.shape[0], y.shape[0], b is not None, False, lm, need_grad, runners)
    logp, ent = _LinearLogprob.apply(h, w, b, y, None, lm, path)
    logp, ent = logp.view(targets.shape), ent.view(targets.shape)
    return (logp, ent) if return_entropy else logp


def fused_linear_objective(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, rows: Optional[Tensor], lm: LogitMap,
                           objective: TokenObjective
                           ) -> Tuple[Tensor, Tensor, Tensor, str]:
    """``(value, logp, entropy, path)`` for the tokens ``rows`` of ``hidden2d`` (all when
    None): ``value = sum over chunks of objective(sl, logp[sl], entropy[sl]).sum()``, where
    ``sl`` is the slice of the selected tokens a chunk covers; differentiable w.r.t. hidden,
    weight and bias; ``path`` is the implementation that ran (``mapo_fast.loss_path``).
    Inputs are already validated; this is the building block of every fused loss."""
    h, w, b = _autocast_inputs(*_flat(hidden2d, weight, bias), lm)
    need_grad = _needs_grad(h, w, b)

    def runners():
        return {p: (lambda p=p: objective_pass(p, h, w, b, targets, rows, lm, objective, True,
                                               _needs_grad(w)))
                for p in ("fused", "chunked")}

    path = select_path(h, w.shape[0], targets.shape[0], b is not None, rows is not None, lm,
                       need_grad, runners)
    value, logp, ent = _FusedLinearObjective.apply(h, w, b, targets, rows, lm, path, objective)
    return value, logp, ent, path
