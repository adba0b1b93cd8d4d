"""Loss forward + backward, side by side in one run: naive torch (full logits), Liger's
``LigerFusedLinearGRPOLoss`` (eager and compiled), mapo_fast, and the floor (the three matmuls
a fused loss cannot avoid: logits, d_hidden, d_weight, chunked like the torch path).

Every case computes the same objective: token-mean clipped policy loss with per-sequence
advantages and old log-probs (Liger's ``dapo``), no KL. On CUDA mapo_fast runs three ways: its
automatic choice, and each of its two paths forced (``MAPO_FAST_LOSS_PATH``).

``--before DIR`` runs the mapo_fast case again in a subprocess with the ``mapo_fast`` package in
DIR (another revision) and adds it as "mapo_fast before"; ``--ours-only`` runs only mapo_fast
and the floor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import mapo_fast
from mapo_fast.loss import PolicyLossConfig, aggregation_weights, token_terms

try:
    from harness import (CaseResult, device_info, main as bench_main, measure,
                         memory_in_subprocess, report_memory, run_with_package, write_report)
except ImportError:  # imported as bench.bench_loss
    from .harness import (CaseResult, device_info, main as bench_main, measure,
                          memory_in_subprocess, report_memory, run_with_package, write_report)

# (B, T, H, V, dtype) per scale. "cpu" is the CPU workload of record; "gpu" the H100 ones.
SCALES: Dict[str, List[Tuple[int, int, int, int, torch.dtype]]] = {
    "quick": [(4, 256, 128, 4096, torch.float32)],
    "cpu": [(8, 1024, 512, 32000, torch.float32)],
    "gpu": [(4, 1024, 3584, 152064, torch.bfloat16), (16, 1024, 3584, 152064, torch.bfloat16)],
}


def make_inputs(B, T, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(device).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(dtype).to(device).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    adv = torch.randn(B, generator=g).to(device)
    with torch.no_grad():
        old = (mapo_fast.token_logprobs(hidden, weight, targets)
               + 0.2 * torch.randn(B, T, generator=g).to(device))
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, adv=adv, old=old)


def naive_loss(x):
    """Materialises the [B, T, V] logits, then the same objective as mapo_fast."""
    logits = (x["hidden"] @ x["weight"].t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, x["targets"][..., None]).squeeze(-1)
    cfg = PolicyLossConfig()
    adv = x["adv"][:, None].expand_as(logp)
    terms = token_terms(logp, adv, x["old"], None, None, cfg)
    c = aggregation_weights(x["mask"], "token-mean", None, None, None)
    return (c * terms["loss"]).sum()


def cases(x, device, ours_only: bool = False) -> List[Tuple[str, Callable[[], None], str]]:
    out = [] if ours_only else [("naive torch", lambda: naive_loss(x).backward(),
                                 "full [N,V] logits")] + _liger_cases(x)

    def ours(path=None):  # path: forced through the environment (restored after)
        env = "MAPO_FAST_LOSS_PATH"
        saved = os.environ.get(env)
        if path:
            os.environ[env] = path
        try:
            loss, _ = mapo_fast.mapo_loss(x["hidden"], x["weight"], x["targets"], x["adv"],
                                          x["mask"], old_logprobs=x["old"])
            loss.backward()
        finally:
            if path and saved is None:
                del os.environ[env]
            elif path:
                os.environ[env] = saved
    out.append(("mapo_fast", ours, "automatic path (fused or chunked, measured)"
                if device.type == "cuda" else "chunked torch"))
    if device.type == "cuda":
        out += [(f"mapo_fast ({p})", lambda p=p: ours(p), f"MAPO_FAST_LOSS_PATH={p}")
                for p in ("fused", "chunked")]
    out.append(("matmul floor", _floor(x), "logits + d_hidden + d_weight matmuls only"))
    return out


def _liger_cases(x) -> List[Tuple[str, Callable[[], None], str]]:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return []
    out = []
    for compiled in (False, True):
        peer = LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False,
                                        chunk_size=1, epsilon_low=0.2, epsilon_high=0.28,
                                        loss_type="dapo")

        def run(peer=peer):
            loss, _ = peer(x["hidden"], x["weight"], x["targets"], x["mask"], x["adv"],
                           old_per_token_logps=x["old"])
            loss.backward()
        out.append((f"liger{' (compiled)' if compiled else ' (eager)'}", run,
                    "LigerFusedLinearGRPOLoss, chunk of 1 sequence"))
    return out


def _floor(x) -> Callable[[], None]:
    h = x["hidden"].detach().reshape(-1, x["hidden"].shape[-1])
    w = x["weight"].detach()
    from mapo_fast.kernels.linear_logprob_ref import default_chunk_rows
    chunk = h.shape[0] if h.is_cuda else default_chunk_rows(w.shape[0], h.dtype)

    def run():
        dw = torch.zeros_like(w)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            z = hc @ w.t()
            z @ w
            dw.addmm_(z.t(), hc)
    return run


def _workload(scale: str, index: int, device: torch.device):
    B, T, H, V, dtype = SCALES[scale][index]
    x = make_inputs(B, T, H, V, dtype, device)

    def reset():
        x["hidden"].grad = None
        x["weight"].grad = None

    name = f"N={B * T} (B={B}, T={T}), H={H}, V={V}, {str(dtype).replace('torch.', '')}"
    return x, reset, name


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str,
        ours_only: bool = False, before: Optional[str] = None):
    info = device_info(device)
    results = []
    for i in range(len(SCALES[scale])):
        x, reset, workload = _workload(scale, i, device)
        rows = []
        for name, fn, notes in cases(x, device, ours_only):
            print(f"  {workload}: {name} ...", flush=True)
            args = ["--scale", scale, "--device", str(device), "--workload", str(i),
                    "--case", name]
            r = measure(name, fn, device, repeats=repeats, reset=reset, notes=notes,
                        memory=lambda args=args: memory_in_subprocess(Path(__file__), args))
            print(f"    {r.median_ms:.1f} ms, peak extra "
                  f"{'-' if r.peak_extra_mib is None else f'{r.peak_extra_mib:.0f} MiB'}",
                  flush=True)
            rows.append(r)
        results.append({"workload": workload, "cases": rows})
        del x
    if before:
        add_before(results, before, scale, device, repeats)
    desc = ("Forward + backward of the token-mean clipped policy loss from hidden states and "
            "the LM head. Peak extra memory: beyond the inputs (the gradients of hidden and "
            "weight are included). Lower is better; ratios are against mapo_fast.")
    title = "Fused policy loss: forward + backward" + \
        (" (and the revision in --before)" if before else "")
    return write_report(f"loss-{tag}", title, results, info, out_dir, baseline="mapo_fast",
                        description=desc)


def add_before(results, before: str, scale: str, device: torch.device, repeats: int) -> None:
    """The mapo_fast case with the package in ``before`` (a subprocess), added to each
    workload as "mapo_fast before"."""
    print(f"  mapo_fast again with the package in {before} ...", flush=True)
    old = run_with_package(before, Path(__file__), ["--scale", scale, "--device", str(device),
                                                    "--repeats", str(repeats), "--ours-only"],
                           "before")
    for wl, old_wl in zip(results, old["workloads"]):
        c = next(c for c in old_wl["cases"] if c["name"] == "mapo_fast")
        wl["cases"].append(CaseResult("mapo_fast before", c["times_ms"], c["peak_extra_mib"],
                                      "the package in --before", c.get("extra", {})))


def _memory_case(a) -> None:
    x, reset, _ = _workload(a.scale, a.workload, a.device)
    report_memory(dict((n, f) for n, f, _ in cases(x, a.device))[a.case], a.device, reset)


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv, memory_case=_memory_case, options={
        "--ours-only": dict(action="store_true", help="only mapo_fast and the floor"),
        "--before": dict(default=None, metavar="DIR",
                         help="also run mapo_fast with the mapo_fast package in DIR")})


if __name__ == "__main__":
    main()
