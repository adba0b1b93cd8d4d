"""The chunked CUDA path of the fused linear log-prob: per token chunk, the logits as one cuBLAS
GEMM (bf16/fp16 operands, fp32 accumulation and output), one Triton pass over each row for the
softmax statistics, one for ``dz`` (written in the GEMM dtype, fp16 rows scaled by a power of
two), then ``dz @ W`` and ``dz^T @ H`` as cuBLAS GEMMs, ``d_weight`` accumulated in fp32. The
chunk loops, the GEMMs and the math are those of ``linear_logprob_ref.py`` (its ``RowOps``
protocol); this module supplies the Triton row kernels (``TRITON_ROWS``).

No atomics anywhere: the result is deterministic, which is why it is also the deterministic
mode's path. Workspace per chunk: fp32 logits plus ``dz`` in the GEMM dtype, bounded by
``linear_logprob_ref.CUDA_WORKSPACE_BYTES``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import linear_logprob_ref as ref
from ._common import interpreting
from ._compile import TRITON_TYPES, CompileCase, Config, flag_grid, ptr, signature
from .linear_logprob import _dz_tile

Tensor = torch.Tensor

GPU_CONFIG = Config(dict(BLOCK=2048), num_warps=8)
INTERPRETER_CONFIG = Config(dict(BLOCK=64), num_warps=1)


def config(device: torch.device) -> Config:
    return GPU_CONFIG if device.type == "cuda" and not interpreting() else INTERPRETER_CONFIG


@triton.jit
def _row_stats_kernel(z_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr, V, stride_z,
                      BLOCK: tl.constexpr):
    """One row of fp32 logits -> log-sum-exp, target log-prob, entropy (per-lane online
    softmax, lanes merged at the end)."""
    r = tl.program_id(0)
    row = z_ptr + r.to(tl.int64) * stride_z
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        ok = offs < V
        z = tl.load(row + offs, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(z - m_safe)
        s = s * alpha + p
        t = t * alpha + p * tl.where(ok, z, 0.0)
        m = m_new
    top = tl.max(m, axis=0)
    w = tl.exp(m - top)
    s_all = tl.sum(s * w, axis=0)
    lse = top + tl.log(s_all)
    zt = tl.load(row + tl.load(y_ptr + r))
    tl.store(lse_ptr + r, lse)
    tl.store(logp_ptr + r, zt - lse)
    tl.store(ent_ptr + r, lse - tl.sum(t * w, axis=0) / s_all)


@triton.jit
def _row_grad_kernel(z_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr, unit_ptr, V,
                     stride_z, stride_dz, inv_temp, scale, cap, HAS_GE: tl.constexpr,
                     SOFTCAP: tl.constexpr, SCALE_DZ: tl.constexpr, BLOCK: tl.constexpr):
    """One row of fp32 logits -> ``dz`` in ``dz_ptr``'s dtype; with ``SCALE_DZ`` (fp16) the
    row is divided by ``unit``, the power of two putting its largest magnitude in [0.5, 1)
    (a first pass finds it; ``unit`` is stored for the GEMMs to multiply back)."""
    r = tl.program_id(0)
    row = z_ptr + r.to(tl.int64) * stride_z
    out = dz_ptr + r.to(tl.int64) * stride_dz
    y = tl.load(y_ptr + r)
    lse = tl.load(lse_ptr + r)
    gl = tl.load(gl_ptr + r)
    if HAS_GE:
        ent = tl.load(ent_ptr + r)
        ge = tl.load(ge_ptr + r)
    else:
        ent = 0.0
        ge = 0.0
    unit = 1.0
    if SCALE_DZ:
        top = tl.zeros((BLOCK,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            ok = offs < V
            z = tl.load(row + offs, mask=ok, other=0.0)
            dz = _dz_tile(z, offs == y, lse, ent, gl, ge, inv_temp, scale, cap, HAS_GE, SOFTCAP)
            top = tl.maximum(top, tl.where(ok, tl.abs(dz), 0.0))
        big = tl.max(top, axis=0)
        unit = tl.exp2(tl.ceil(tl.log2(tl.where(big > 0.0, big, 1.0))))
        tl.store(unit_ptr + r, unit)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        ok = offs < V
        z = tl.load(row + offs, mask=ok, other=0.0)
        dz = _dz_tile(z, offs == y, lse, ent, gl, ge, inv_temp, scale, cap, HAS_GE, SOFTCAP)
        tl.store(out + offs, (dz / unit).to(dz_ptr.dtype.element_ty), mask=ok)


class TritonRows:
    """``RowOps`` (see ``linear_logprob_ref.TorchRows``) with the Triton row kernels: the
    logits ``z`` stay untouched, no probability buffer."""

    name = "triton"
    probs = False

    def stats(self, z: Tensor, y: Tensor, ws) -> Tuple[Tensor, Tensor, Tensor]:
        c, v = z.shape
        logp, ent, lse = (torch.empty(c, dtype=torch.float32, device=z.device)
                          for _ in range(3))
        if c:
            cfg = config(z.device)
            _row_stats_kernel[(c,)](z, y, logp, ent, lse, v, z.stride(0), **cfg.blocks,
                                    num_warps=cfg.num_warps)
        return logp, ent, lse

    def grad(self, z: Tensor, y: Tensor, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], inv_temp: float, cap: float, scale: float, ws,
             gemm: torch.dtype, after_stats: bool) -> Tuple[Tensor, Optional[Tensor]]:
        c, v = z.shape
        dz = ws.dz(gemm)[:c] if gemm != z.dtype else z  # fp32 GEMMs: dz over the logits
        unit = torch.empty(c, dtype=torch.float32, device=z.device) \
            if gemm == torch.float16 else None
        if c:
            cfg = config(z.device)
            _row_grad_kernel[(c,)](
                z, y, lse.contiguous(), ent.contiguous(), g_logp.contiguous(),
                g_logp if g_ent is None else g_ent.contiguous(), dz,
                lse if unit is None else unit, v, z.stride(0), dz.stride(0), float(inv_temp),
                float(scale), float(cap), **_grad_flags(g_ent is not None, cap > 0, gemm),
                **cfg.blocks, num_warps=cfg.num_warps)
        return dz, unit


def _grad_flags(has_ge: bool, softcap: bool, gemm: torch.dtype) -> dict:
    return dict(HAS_GE=has_ge, SOFTCAP=softcap, SCALE_DZ=gemm == torch.float16)


TRITON_ROWS = TritonRows()


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
            inv_temp: float, rows: Optional[Tensor] = None, cap: float = 0.0,
            scale: float = 1.0, round_to: Optional[torch.dtype] = None,
            chunk_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``linear_logprob_ref.forward`` with the Triton row kernels."""
    return ref.forward(hidden, weight, bias, targets, inv_temp, rows=rows, chunk_rows=chunk_rows,
                       cap=cap, scale=scale, round_to=round_to, ops=TRITON_ROWS,
                       gemm=_gemm(hidden))


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
             inv_temp: float, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], rows: Optional[Tensor] = None, cap: float = 0.0,
             scale: float = 1.0, round_to: Optional[torch.dtype] = None,
             chunk_rows: Optional[int] = None, need_dw: bool = True
             ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``linear_logprob_ref.backward`` with the Triton row kernels."""
    return ref.backward(hidden, weight, bias, targets, inv_temp, lse, ent, g_logp, g_ent,
                        rows=rows, chunk_rows=chunk_rows, cap=cap, scale=scale,
                        round_to=round_to, ops=TRITON_ROWS, gemm=_gemm(hidden),
                        need_dw=need_dw)


def fused_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           targets: Tensor, inv_temp: float, grad_fn, rows=None,
                           cap: float = 0.0, scale: float = 1.0,
                           round_to: Optional[torch.dtype] = None,
                           chunk_rows: Optional[int] = None, need_dw: bool = True):
    """``linear_logprob_ref.fused_forward_backward`` with the Triton row kernels."""
    return ref.fused_forward_backward(hidden, weight, bias, targets, inv_temp, grad_fn,
                                      rows=rows, chunk_rows=chunk_rows, cap=cap, scale=scale,
                                      round_to=round_to, ops=TRITON_ROWS, gemm=_gemm(hidden),
                                      need_dw=need_dw)


def _gemm(hidden: Tensor) -> torch.dtype:
    """The inputs' own dtype for the GEMMs (on CPU under the interpreter too: ``mm32``
    emulates cuBLAS's fp32 accumulation there), the compute dtype for fp32 and on a torch
    without half-precision GEMMs with fp32 outputs (``ref.HALF_GEMMS``, torch >= 2.10)."""
    if hidden.dtype in ref.HALF and (ref.HALF_GEMMS or not hidden.is_cuda):
        return hidden.dtype
    return ref.compute_dtype(hidden.dtype)


def compile_cases() -> List[CompileCase]:
    f32 = ptr(torch.float32)
    cases = [CompileCase(_row_stats_kernel, "fp32 logits",
                         signature(_row_stats_kernel, dict(z_ptr=f32, y_ptr="*i64", logp_ptr=f32,
                                                           ent_ptr=f32, lse_ptr=f32)),
                         dict(GPU_CONFIG.blocks), GPU_CONFIG.num_warps, GPU_CONFIG.num_stages)]
    for gemm in (torch.bfloat16, torch.float16, torch.float32):
        for fl in flag_grid(has_ge=(False, True), softcap=(False, True)):
            sig = signature(_row_grad_kernel, dict(
                z_ptr=f32, y_ptr="*i64", lse_ptr=f32, ent_ptr=f32, gl_ptr=f32, ge_ptr=f32,
                dz_ptr=ptr(gemm), unit_ptr=f32, inv_temp="fp32", scale="fp32", cap="fp32"))
            label = f"dz {TRITON_TYPES[gemm]}" + "".join(f" +{k}" for k, v in fl.items() if v)
            cases.append(CompileCase(_row_grad_kernel, label, sig,
                                     dict(_grad_flags(fl["has_ge"], fl["softcap"], gemm),
                                          **GPU_CONFIG.blocks), GPU_CONFIG.num_warps,
                                     GPU_CONFIG.num_stages,
                                     default=fl["has_ge"] and fl["softcap"]))
    return cases
