"""The paged-KV block allocator and prefix index, C++ against its Python model, on the block
bookkeeping of the rollout workload: 4 prompts x G=8 samples, a 1024-token prompt (prefilled
once per group, then forked), 3 tool turns each appending 256 observation tokens and decoding 64
tokens, full blocks registered in the prefix index as they fill, block size 16; then everything
freed. Same operations on both; the ratio is what C++ buys per rollout step."""

from __future__ import annotations

from pathlib import Path

import torch

from mapo_fast.kernels import block_manager_ref

try:
    from harness import device_info, main as bench_main, measure, write_report
except ImportError:  # imported as bench.bench_allocator
    from .harness import device_info, main as bench_main, measure, write_report

SCALES = {"quick": dict(prompts=2, group=4, prompt_len=256, turns=1),
          "cpu": dict(prompts=4, group=8, prompt_len=1024, turns=3),
          "gpu": dict(prompts=4, group=8, prompt_len=1024, turns=3)}
BLOCK, OBS, DECODE = 16, 256, 64


def rollout_bookkeeping(mod, prompts: int, group: int, prompt_len: int, turns: int) -> int:
    """Runs the workload's allocator calls, one batched call per step as the engine does;
    returns how many sequence-token updates it made."""
    m = mod.BlockManager(4096, BLOCK)
    seqs, updates = [], 0
    for p in range(prompts):
        head, _ = m.add([(p * 7919 + i) % 50000 for i in range(prompt_len)])
        seqs += [m.fork_seq(head) for _ in range(group)]
        m.free_seq(head)
    for _ in range(turns):
        for n_new in (OBS, DECODE):
            for step in range(n_new):
                m.append_tokens(seqs, [step % 50000] * len(seqs))
                updates += len(seqs)
    for s in seqs:
        m.free_seq(s)
    return updates


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str):
    from mapo_fast.kernels import _block_manager
    cfg = SCALES[scale]
    info = device_info(torch.device("cpu"))
    calls = rollout_bookkeeping(block_manager_ref, **cfg)
    rows = []
    for name, mod in (("Python model", block_manager_ref), ("mapo_fast C++", _block_manager)):
        print(f"  allocator: {name} ...", flush=True)
        r = measure(name, lambda mod=mod: rollout_bookkeeping(mod, **cfg), torch.device("cpu"),
                    repeats=repeats)
        r.notes = f"{calls} token updates, {calls / (r.median_ms / 1e3) / 1e6:.2f} M/s"
        print(f"    {r.median_ms:.1f} ms", flush=True)
        rows.append(r)
    workload = (f"{cfg['prompts']} prompts x G={cfg['group']}, {cfg['prompt_len']}-token prompt, "
                f"{cfg['turns']} turns of {OBS} + {DECODE} tokens, block size {BLOCK}")
    desc = ("Block bookkeeping of one rollout (prompt allocation with prefix lookup, fork, "
            "one batched append per step with copy-on-write and prefix-index registration of "
            "filled blocks, free); the KV tensors themselves are not touched. Ratios are "
            "against the C++ implementation.")
    return write_report(f"allocator-{tag}", "KV block allocator: C++ vs Python", [
        {"workload": workload, "cases": rows}], info, out_dir, baseline="mapo_fast C++",
        description=desc)


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv)


if __name__ == "__main__":
    main()
