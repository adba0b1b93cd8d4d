"""Triton kernels for the fused linear log-prob (the math is written out in
``linear_logprob_ref.py``, which is the reference these kernels are tested against).

forward:  grid (token tiles, vocabulary splits). Each program streams its vocabulary range in
          ``BLOCK_V`` tiles, computes the logits tile in registers (``BLOCK_D`` steps over the
          hidden size, fp32 accumulation) and keeps an online log-sum-exp ``(m, s)`` plus
          ``t = sum exp(z - m) z`` for the entropy, and the target logit. Partial statistics per
          split (``[SPLIT, N]``) are merged by the launcher. No ``[N, V]`` tensor is written.
backward: grid (token tiles, vocabulary tiles). Each program recomputes its logits tile, forms
          ``dz`` from the saved ``lse``/entropy and the upstream per-token gradients, and adds
          ``dz @ W`` into ``d_hidden`` and ``dz^T @ H`` into ``d_weight`` with fp32 atomics, one
          ``BLOCK_D`` slice at a time. Tiles whose tokens all have zero upstream gradient (masked
          or padded tokens) skip all matmul work.

Launchers check shapes and pick block sizes; validation of user input and autograd live in
``mapo_fast``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreting
from ._compile import TRITON_TYPES, CompileCase, Config, flag_grid, ptr, signature

Tensor = torch.Tensor


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. ``IEEE``: exact fp32 products (no TF32) for fp32
    inputs. ``UPCAST``: multiply in fp32 (only under the interpreter, whose bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    """tanh from exp (saturates to +-1 without overflow: exp(2x) = inf gives 1)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, n_ok, offs_v, v_ok, D, inv_temp, scale, cap,
                 stride_hn, stride_wv,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 SOFTCAP: tl.constexpr, ROUND: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(h, tl.trans(w), acc, IEEE, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if ROUND:  # the logits of a matmul in the inputs' dtype (autocast's)
        acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    if SOFTCAP:
        acc = cap * _tanh(acc * (scale / cap))
    return acc * inv_temp


@triton.jit
def _dz_tile(z, is_target, lse, ent, gl, ge, inv_temp, scale, cap, HAS_GE: tl.constexpr,
             SOFTCAP: tl.constexpr):
    """d(objective)/du for final logits ``z`` (see the reference's module doc): per-token
    ``lse``, ``ent``, ``gl`` (d/d logp) and ``ge`` (d/d entropy) broadcast against ``z``."""
    p = tl.exp(z - lse)
    dz = gl * (tl.where(is_target, 1.0, 0.0) - p)
    if HAS_GE:
        dz -= ge * p * (z - lse + ent)
    if SOFTCAP:  # through cap tanh(scale u / cap): scale (1 - tanh^2), tanh = z / (cap T^-1)
        t = z / (cap * inv_temp)
        dz = dz * (scale * (1.0 - t * t))
    return dz * inv_temp


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, rows_ptr,
                m_out, s_out, t_out, zt_out,
                N, V, D, v_per_split, inv_temp, scale, cap, stride_hn, stride_wv,
                HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, ROUND: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
    else:
        rows = offs_n.to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=n_ok, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, n_ok, offs_v, v_ok, D, inv_temp, scale, cap,
                         stride_hn, stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST,
                         SOFTCAP, ROUND)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        s_i = s_i * alpha + tl.sum(p, axis=1)
        t_i = t_i * alpha + tl.sum(p * tl.where(v_ok[None, :], z, 0.0), axis=1)
        m_i = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)

    out = pid_s * N + offs_n
    tl.store(m_out + out, m_i, mask=n_ok)
    tl.store(s_out + out, s_i, mask=n_ok)
    tl.store(t_out + out, t_i, mask=n_ok)
    tl.store(zt_out + out, zt, mask=n_ok)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, rows_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr,
                dh_ptr, dw_ptr, db_ptr,
                N, V, D, inv_temp, scale, cap, stride_hn, stride_wv,
                HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_GE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
                ROUND: tl.constexpr, SCALE_DZ: tl.constexpr, HAS_DW: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    gl = tl.load(gl_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    active = tl.max(tl.abs(gl), axis=0)
    if HAS_GE:
        ge = tl.load(ge_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        active = tl.maximum(active, tl.max(tl.abs(ge), axis=0))
    if active > 0.0:
        if HAS_ROWS:
            rows = tl.load(rows_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        y = tl.load(y_ptr + offs_n, mask=n_ok, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, n_ok, offs_v, v_ok, D, inv_temp, scale, cap,
                         stride_hn, stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST,
                         SOFTCAP, ROUND)
        ok = n_ok[:, None] & v_ok[None, :]
        if HAS_GE:
            ent_c = tl.load(ent_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
            ge_c = ge[:, None]
        else:
            ent_c = 0.0
            ge_c = 0.0
        dz = _dz_tile(z, offs_v[None, :] == y[:, None], lse[:, None], ent_c, gl[:, None], ge_c,
                      inv_temp, scale, cap, HAS_GE, SOFTCAP)
        dz = tl.where(ok, dz, 0.0)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok, sem="relaxed")
        if SCALE_DZ:  # fp16: dz / 2^k with max |dz / 2^k| in [0.5, 1) before the cast, 2^k after
            top = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
            unit = tl.exp2(tl.ceil(tl.log2(tl.where(top > 0.0, top, 1.0))))
            dz_in = (dz / unit).to(h_ptr.dtype.element_ty)
        else:
            unit = 1.0
            dz_in = dz.to(h_ptr.dtype.element_ty)
        w_rows = offs_v[:, None].to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            w = tl.load(w_ptr + w_rows * stride_wv + offs_d[None, :],
                        mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            dh = _mm(dz_in, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), IEEE, UPCAST)
            tl.atomic_add(dh_ptr + rows[:, None] * D + offs_d[None, :], dh * unit,
                          mask=n_ok[:, None] & d_ok[None, :], sem="relaxed")
            if HAS_DW:  # a frozen head (LoRA) needs no d_weight: no load of h, no dot
                h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                dw = _mm(tl.trans(dz_in), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
                         IEEE, UPCAST)
                tl.atomic_add(dw_ptr + w_rows * D + offs_d[None, :], dw * unit,
                              mask=v_ok[:, None] & d_ok[None, :], sem="relaxed")


def _rounds(round_to: Optional[torch.dtype], hidden: Tensor) -> bool:
    """Whether the kernels round the logits: only to the inputs' own dtype (what a matmul in
    it gives), which must then be bf16 or fp16."""
    if round_to is None:
        return False
    assert round_to == hidden.dtype and round_to in (torch.bfloat16, torch.float16), \
        "the kernels round logits to the inputs' half-precision dtype only"
    return True


#: Tile sizes per input dtype on a GPU, chosen with ``compile_check`` so that neither kernel
#: spills registers on sm_90 or sm_80 under Triton 3.6 or 3.9 (fp32 tiles are smaller: their
#: operands take twice the registers and shared memory; and one pipeline stage, as the
#: backward kernel spills with two under Triton 3.6); the interpreter runs small tiles.
HALF_CONFIG = Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32), num_warps=8, num_stages=3)
GPU_CONFIGS = {
    torch.bfloat16: HALF_CONFIG,
    torch.float16: HALF_CONFIG,
    torch.float32: Config(dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32), num_warps=8, num_stages=1),
}
INTERPRETER_CONFIG = Config(dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16), num_warps=1)
#: Input dtypes the kernels take; float64 runs the torch path (``mapo_fast.logprobs``).
DTYPES = tuple(GPU_CONFIGS)


def config(dtype: torch.dtype, device: torch.device) -> Config:
    assert dtype in DTYPES, f"the Triton kernels take {DTYPES}, got {dtype}"
    return GPU_CONFIGS[dtype] if device.type == "cuda" and not interpreting() \
        else INTERPRETER_CONFIG


def _flags(dtype: torch.dtype, has_bias: bool, has_rows: bool, softcap: bool,
           round_logits: bool) -> dict:
    """Constexpr flags shared by both kernels."""
    return dict(HAS_BIAS=has_bias, HAS_ROWS=has_rows, IEEE=dtype == torch.float32,
                UPCAST=interpreting() and dtype == torch.bfloat16, SOFTCAP=softcap,
                ROUND=round_logits)


def _bwd_flags(dtype: torch.dtype, has_ge: bool, has_dw: bool = True, **shared) -> dict:
    return dict(_flags(dtype, **shared), HAS_GE=has_ge, SCALE_DZ=dtype == torch.float16,
                HAS_DW=has_dw)


def compile_cases() -> List[CompileCase]:
    """Every configuration the launchers can choose on a GPU (dtype x flags)."""
    cases = []
    for dtype, cfg in GPU_CONFIGS.items():
        p, f32, half = ptr(dtype), ptr(torch.float32), dtype != torch.float32
        rounds = (False, True) if dtype != torch.float32 else (False,)
        for fl in flag_grid(has_bias=(False, True), has_rows=(False, True),
                            softcap=(False, True), round_logits=rounds):
            # the default check: every flag off / on for bf16 and fp32; fp16 (which differs
            # from bf16 only in the backward's dz scaling) with every flag on
            corner = all(fl.values()) or (not any(fl.values()) and dtype != torch.float16)
            types = dict(h_ptr=p, w_ptr=p, b_ptr=p, y_ptr="*i64", rows_ptr="*i64",
                         inv_temp="fp32", scale="fp32", cap="fp32")
            fwd_t = dict(types, m_out=f32, s_out=f32, t_out=f32, zt_out=f32)
            cases.append(CompileCase(
                _fwd_kernel, f"{TRITON_TYPES[dtype]} {_label(fl)}",
                signature(_fwd_kernel, fwd_t), dict(_flags(dtype, **fl), **cfg.blocks),
                cfg.num_warps, cfg.num_stages, default=corner and dtype != torch.float16,
                wgmma=half))
            for has_ge, has_dw in ((False, True), (True, True), (False, False), (True, False)):
                bwd_t = dict(types, lse_ptr=f32, ent_ptr=f32, gl_ptr=f32, ge_ptr=f32,
                             dh_ptr=f32, dw_ptr=f32, db_ptr=f32)
                label = _label(dict(fl, entropy=has_ge, frozen_head=not has_dw))
                cases.append(CompileCase(
                    _bwd_kernel, f"{TRITON_TYPES[dtype]} {label}",
                    signature(_bwd_kernel, bwd_t),
                    dict(_bwd_flags(dtype, has_ge, has_dw, **fl), **cfg.blocks), cfg.num_warps,
                    cfg.num_stages, wgmma=half,
                    default=corner and has_ge == fl["has_bias"] and has_dw and
                    (dtype != torch.float16 or has_ge)))
    return cases


def _label(flags: dict) -> str:
    on = [k.replace("has_", "").replace("round_logits", "round") for k, v in flags.items() if v]
    return "+".join(on) or "plain"


def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
           rows: Optional[Tensor]) -> None:
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert hidden.stride(1) == 1 and weight.stride(1) == 1, "last dimension must be contiguous"
    assert targets.dim() == 1 and hidden.dtype == weight.dtype
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous())
    assert rows is None or (rows.shape == targets.shape and rows.is_contiguous())
    assert rows is not None or targets.shape[0] == hidden.shape[0]


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
            inv_temp: float, rows: Optional[Tensor] = None, splits: Optional[int] = None,
            out: Optional[Tuple[Tensor, Tensor, Tensor]] = None, cap: float = 0.0,
            scale: float = 1.0, round_to: Optional[torch.dtype] = None
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp, entropy, lse)``, each ``[N]`` float32. Same arguments as
    ``linear_logprob_ref.forward``; ``splits`` overrides the number of vocabulary splits and
    ``out`` supplies the three output buffers."""
    _check(hidden, weight, bias, targets, rows)
    n, (v, d) = targets.shape[0], weight.shape
    logp, ent, lse = out if out is not None else (
        torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if n == 0:
        return logp, ent, lse
    cfg = config(hidden.dtype, hidden.device)
    bv = cfg.blocks["BLOCK_V"]
    n_tiles, v_tiles = triton.cdiv(n, cfg.blocks["BLOCK_N"]), triton.cdiv(v, bv)
    if splits is None:
        sms = (torch.cuda.get_device_properties(hidden.device).multi_processor_count
               if hidden.is_cuda else 2)
        splits = max(1, min(v_tiles, triton.cdiv(2 * sms, n_tiles)))
    v_per_split = triton.cdiv(v_tiles, splits) * bv
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    _fwd_kernel[(n_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, targets,
        rows if rows is not None else targets,
        part[0], part[1], part[2], part[3],
        n, v, d, v_per_split, float(inv_temp), float(scale), float(cap), hidden.stride(0),
        weight.stride(0),
        **_flags(hidden.dtype, bias is not None, rows is not None, cap > 0,
                 _rounds(round_to, hidden)),
        **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    m, s, t, zt = part
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(0)
    torch.add(m_all, torch.log(s_all), out=lse)
    torch.sub(zt.sum(0), lse, out=logp)
    torch.sub(lse, (t * scale).sum(0) / s_all, out=ent)
    return logp, ent, lse


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
             inv_temp: float, lse: Tensor, ent: Tensor, g_logp: Tensor,
             g_ent: Optional[Tensor], rows: Optional[Tensor] = None,
             out: Optional[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = None,
             cap: float = 0.0, scale: float = 1.0, round_to: Optional[torch.dtype] = None,
             need_dw: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Returns ``(d_hidden, d_weight, d_bias)`` as float32 accumulators (zero-initialised here,
    or the buffers given in ``out``, which are added into); without ``need_dw`` (a frozen head)
    ``d_weight`` is None: no buffer, no dot, no atomics for it."""
    _check(hidden, weight, bias, targets, rows)
    n, (v, d) = targets.shape[0], weight.shape
    if out is None:
        out = (torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device),
               torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
               if need_dw else None,
               None if bias is None else
               torch.zeros(bias.shape, dtype=torch.float32, device=bias.device))
    dh, dw, db = out
    assert dh.is_contiguous() and dh.dtype == torch.float32
    assert (dw is None) == (not need_dw) and (dw is None or (dw.is_contiguous() and
                                                             dw.dtype == torch.float32))
    if n == 0:
        return dh, dw, db
    cfg = config(hidden.dtype, hidden.device)
    g_logp = g_logp.to(torch.float32).contiguous()
    g_ent = None if g_ent is None else g_ent.to(torch.float32).contiguous()
    grid = (triton.cdiv(n, cfg.blocks["BLOCK_N"]), triton.cdiv(v, cfg.blocks["BLOCK_V"]))
    _bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        rows if rows is not None else targets, lse, ent, g_logp,
        g_ent if g_ent is not None else g_logp, dh, dw if dw is not None else dh,
        db if db is not None else dh,
        n, v, d, float(inv_temp), float(scale), float(cap), hidden.stride(0), weight.stride(0),
        **_bwd_flags(hidden.dtype, g_ent is not None, need_dw, has_bias=bias is not None,
                     has_rows=rows is not None, softcap=cap > 0,
                     round_logits=_rounds(round_to, hidden)),
        **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dh, dw, db
