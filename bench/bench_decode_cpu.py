"""The CPU decode kernel (``csrc/paged_attention_cpu.cpp``) at each instruction set level this
CPU runs, side by side on one decode layer of the rollout workload: 32 sequences in 4 groups
of 8 (the samples of a prompt after the fork), each group sharing a 1024-token prompt and each
sequence with 516 tokens of its own, 14 query heads on 2 KV heads, blocks of 16, float32; head
sizes 64 and 128. Also the torch path the engine takes without the extension (the reference's
gathers and decode cascade). The module is built once for the architecture's baseline; the
ratios say what the run-time choice of AVX2 or AVX-512 buys over it."""

from __future__ import annotations

from pathlib import Path

import torch

from mapo_fast.kernels import paged_attention_cpu as C
from mapo_fast.kernels import paged_attention_ref as R

try:
    from harness import device_info, main as bench_main, measure, write_report
except ImportError:  # imported as bench.bench_decode_cpu
    from .harness import device_info, main as bench_main, measure, write_report

SCALES = {"quick": dict(groups=2, group=4, shared=256, own=128, head_dims=(64,)),
          "cpu": dict(groups=4, group=8, shared=1024, own=516, head_dims=(64, 128)),
          "gpu": dict(groups=4, group=8, shared=1024, own=516, head_dims=(64, 128))}
HEADS, KV_HEADS, BLOCK = 14, 2, 16


def layer(groups: int, group: int, shared: int, own: int, head_dim: int):
    """One decode layer's inputs: ``q [S, H, D]``, the caches, block tables whose first
    ``shared / BLOCK`` blocks are the group's, context lengths."""
    g = torch.Generator().manual_seed(0)
    shared_blocks, own_blocks = shared // BLOCK, (own + BLOCK - 1) // BLOCK
    S = groups * group
    num_blocks = groups * shared_blocks + S * own_blocks
    kc = torch.randn(num_blocks, BLOCK, KV_HEADS, head_dim, generator=g)
    vc = torch.randn(num_blocks, BLOCK, KV_HEADS, head_dim, generator=g)
    q = torch.randn(S, HEADS, head_dim, generator=g)
    tables, nxt = [], groups * shared_blocks
    for s in range(S):
        first = (s // group) * shared_blocks
        tables.append(list(range(first, first + shared_blocks)) +
                      list(range(nxt, nxt + own_blocks)))
        nxt += own_blocks
    return q, kc, vc, torch.tensor(tables), torch.full((S,), shared + own)


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str):
    if C.extension() is None:
        raise SystemExit("the C++ decode kernel is not built (pip install -e .)")
    cfg = dict(SCALES[scale])
    head_dims = cfg.pop("head_dims")
    info = device_info(torch.device("cpu"))
    results = []
    for head_dim in head_dims:
        q, kc, vc, tables, lens = layer(head_dim=head_dim, **cfg)
        scale_ = head_dim ** -0.5
        cu = torch.arange(q.shape[0] + 1)
        attend = C.attend if C.available() else None  # what the engine runs without the kernel
        want = R.paged_attention(q, kc, vc, tables, lens, cu, scale_, attend=attend)
        rows = []
        for isa in C.supported_isas():
            print(f"  decode D={head_dim}: {isa} ...", flush=True)
            out = torch.empty_like(q)
            r = measure(isa, lambda isa=isa, out=out: C.decode(q, kc, vc, tables, lens, scale_,
                                                               out=out, isa=isa),
                        torch.device("cpu"), repeats=repeats)
            err = float((out - want).abs().max())
            r.notes = f"max |error| vs the torch path {err:.1e}"
            rows.append(r)
        print(f"  decode D={head_dim}: torch path ...", flush=True)
        r = measure("torch path (no extension)",
                    lambda: R.paged_attention(q, kc, vc, tables, lens, cu, scale_, attend=attend),
                    torch.device("cpu"), repeats=repeats)
        r.notes = "gathers each sequence's blocks, then attends"
        rows.append(r)
        S = q.shape[0]
        results.append({"workload": f"D={head_dim}: {S} sequences in {cfg['groups']} groups, "
                                    f"{cfg['shared']} shared + {cfg['own']} own tokens, "
                                    f"{HEADS} heads on {KV_HEADS}, float32",
                        "cases": rows})
    desc = ("One decode layer on CPU (torch's intra-op threads). Levels: `generic` is the "
            "architecture's baseline (SSE2 on x86-64), `avx2` the row loops compiled for AVX2 "
            "+ FMA, `avx512` the three-pass AVX-512 path for heads of 64 and 128; the default "
            "is the highest the CPU runs. Ratios are against `generic`.")
    return write_report(f"decode-cpu-{tag}", "CPU decode kernel by instruction set level",
                        results, info, out_dir, baseline="generic", description=desc)


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv)


if __name__ == "__main__":
    main()
