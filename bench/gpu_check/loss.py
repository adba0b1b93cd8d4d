"""The fused loss section."""

from __future__ import annotations

import math
from typing import Dict

import torch

from .common import Sizes, rel_err, time_once

#: the loss's variants checked besides the plain one: a bias, a soft cap with a logit scale, a
#: temperature, and a row subset (targets for every other hidden row, as packed sequences give)
LOSS_VARIANTS = {"plain": {}, "bias_cap_temp_rows": dict(bias=True, cap=30.0, scale=0.8,
                                                         inv_temp=1 / 0.7, rows=True)}


def loss_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Fused and chunked paths against the torch path with fp32 GEMMs (bf16 inputs), plain and
    with bias / soft cap / temperature / rows (``LOSS_VARIANTS``); the plain one's times and the
    three-GEMM floor (logits, d_hidden, d_weight as bf16 cuBLAS GEMMs)."""
    from mapo_fast import loss_path as LP
    from mapo_fast.logprobs import objective_pass
    N, H, V = sz.loss
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, H, generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=g, device=dev) / math.sqrt(H)).to(torch.bfloat16)
    out = {"sizes": dict(N=N, H=H, V=V, dtype="bfloat16"), "errors": {}, "ms": {}}
    for name, var in LOSS_VARIANTS.items():
        args = _loss_args(var, h, V, dev, g)
        for path, errs in _loss_errors(h, w, args).items():
            out["errors"][path if name == "plain" else f"{path}, {name}"] = errs
    b, y, rows, lm, objective = _loss_args({}, h, V, dev, g)
    for path in ("fused", "chunked"):
        out["ms"][path] = measure(lambda p=path: objective_pass(p, h, w, None, y, None, lm,
                                                              objective, True))
    chooser = LP.PathChooser(timer=lambda fn: time_once(dev, fn))
    key = LP.make_key(h, V, N, "-")
    out["auto_choice"] = chooser.choose(key, {p: (lambda p=p: objective_pass(
        p, h, w, None, y, None, lm, objective, True)) for p in ("fused", "chunked")})
    dz = torch.randn(N, V, device=dev, dtype=torch.bfloat16) if N * V <= 4e9 else None
    if dz is not None:
        out["ms"]["three_gemm_floor"] = measure(
            lambda: (h @ w.t(), dz @ w, dz.t() @ h))
    # bf16 rounding of dz (8 bits) bounds the gradients; values and log-probs are fp32 sums
    out["tolerance"] = dict(value=1e-3, logp=1e-3, entropy=1e-3, d_hidden=3e-2, d_weight=3e-2,
                            d_bias=3e-2)
    out["ok"] = all(e[k] <= out["tolerance"][k] for e in out["errors"].values() for k in e)
    return out


def _loss_args(var: Dict, h, V: int, dev: torch.device, g):
    """``(bias, targets, rows, LogitMap, objective)`` of a ``LOSS_VARIANTS`` entry."""
    from mapo_fast.logprobs import LogitMap
    N = h.shape[0]
    rows = torch.arange(0, N, 2, device=dev) if var.get("rows") else None
    n = N if rows is None else rows.numel()
    b = torch.randn(V, generator=g, device=dev).to(h.dtype) if var.get("bias") else None
    y = torch.randint(0, V, (n,), generator=g, device=dev)
    adv = torch.randn(n, generator=g, device=dev)

    def objective(sl, logp, ent):  # token-mean policy-gradient surrogate plus an entropy term
        return (-adv[sl] * logp - 0.01 * ent) / n
    lm = LogitMap(inv_temp=var.get("inv_temp", 1.0), cap=var.get("cap", 0.0),
                  scale=var.get("scale", 1.0))
    return b, y, rows, lm, objective


def _loss_errors(h, w, args) -> Dict[str, Dict[str, float]]:
    """Each path's relative errors against the torch path with fp32 GEMMs."""
    from mapo_fast.kernels import linear_logprob_ref as ref
    from mapo_fast.logprobs import _value_and_grad, objective_pass
    b, y, rows, lm, objective = args
    want = ref.fused_forward_backward(h, w, b, y, lm.inv_temp, _value_and_grad(objective),
                                      rows=rows, cap=lm.cap, scale=lm.scale, gemm=torch.float32)
    out = {}
    for path in ("fused", "chunked"):
        value, logp, ent, grads = objective_pass(path, h, w, b, y, rows, lm, objective, True)
        out[path] = dict(value=rel_err(value, want[2]), logp=rel_err(logp, want[0]),
                         entropy=rel_err(ent, want[1]), d_hidden=rel_err(grads[0], want[3]),
                         d_weight=rel_err(grads[1], want[4]))
        if b is not None:
            out[path]["d_bias"] = rel_err(grads[2], want[5])
        del grads
    return out
