"""vLLM's side of ``bench_rollout.py --vllm``: run in vLLM's own environment (``make
vllm-env``), never imported by the package or its tests' environment.

    python bench/rollout_vllm.py SPEC.json OUT.json

``SPEC.json``: ``{"model": dir, "threads": n, "kv_cache_gib": g, "dtype": d, "repeats": r,
"workloads": [{"name", "prompts": [[ids]], "group": G, "rounds": [{"new": N, "obs": [ids] |
null}, ...]}]}``. The process settings vLLM's CPU documentation advises (its OpenMP threads
bound to cores, ``VLLM_CPU_OMP_THREADS_BIND``; TCMalloc in ``LD_PRELOAD``) come from the
caller's environment (``rollout_peers.vllm_environment``) and are reported back.
One ``LLM`` (``dtype``, default float32; prefix caching on; no tokenizer: token ids in and
out) is built once, its start-up timed apart; then each workload runs ``repeats`` times, the
prefix cache emptied before each run (a run finds only its own history there): round 1
samples ``n = G`` continuations of each prompt, and every later round re-submits each
sample's whole history (prompt, its tokens so far, the previous round's observation) for
``new`` more tokens, as a client of vLLM does for a multi-turn tool loop (its prefix cache
finds the history). Every round's length is fixed (``min_tokens = max_tokens``, EOS
ignored), temperature 1, drawn from the ``LLM``'s seed (a per-request seed fails in vLLM
0.32's CPU worker: "CPU Generator does not use offset"). ``OUT.json``: start-up seconds, the
process settings, and per workload each run's wall seconds and the last run's output tokens,
prompt tokens submitted and those its prefix cache served (so computed = submitted -
cached).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

#: the process settings reported back (vLLM's CPU documentation's, and the thread count)
SETTINGS = ("VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD", "OMP_NUM_THREADS",
            "VLLM_CPU_KVCACHE_SPACE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def counters(llm: Any) -> Dict[str, float]:
    """vLLM's prompt, generation and prefix-cache counters, summed over engines."""
    want = {"vllm:prompt_tokens": "prompt", "vllm:generation_tokens": "output",
            "vllm:prefix_cache_hits": "cached", "vllm:prefix_cache_queries": "queried"}
    out = dict.fromkeys(want.values(), 0.0)
    for m in llm.get_metrics():
        if m.name in want and hasattr(m, "value"):
            out[want[m.name]] += float(m.value)
    return out


def run_workload(llm: Any, w: Dict[str, Any]) -> Dict[str, Any]:
    """One run of workload ``w`` on an emptied prefix cache: its wall seconds and counters."""
    from vllm import SamplingParams
    G = w["group"]
    llm.reset_prefix_cache()
    before = counters(llm)
    t0 = time.perf_counter()
    histories: List[List[int]] = []
    for k, rnd in enumerate(w["rounds"]):
        N = rnd["new"]
        if k == 0:
            params = SamplingParams(n=G, temperature=1.0, max_tokens=N, min_tokens=N,
                                    ignore_eos=True, detokenize=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in w["prompts"]], params,
                                use_tqdm=False)
            histories = [list(o.prompt_token_ids) + list(c.token_ids)
                         for o in outs for c in o.outputs]
        else:
            params = SamplingParams(n=1, temperature=1.0, max_tokens=N, min_tokens=N,
                                    ignore_eos=True, detokenize=False)
            outs = llm.generate([{"prompt_token_ids": h} for h in histories], params,
                                use_tqdm=False)
            histories = [h + list(o.outputs[0].token_ids) for h, o in zip(histories, outs)]
        if rnd.get("obs"):
            histories = [h + list(rnd["obs"]) for h in histories]
    wall = time.perf_counter() - t0
    after = counters(llm)
    d = {k: after[k] - before[k] for k in after}
    return {"wall_s": wall, "output_tokens": int(d["output"]), "prompt_tokens": int(d["prompt"]),
            "cached_tokens": int(d["cached"]), "computed_tokens": int(d["prompt"] - d["cached"]),
            "sequences": len(histories)}


def main(spec_path: str, out_path: str) -> None:
    """Runs ``SPEC.json``'s workloads and writes ``OUT.json`` (see the module doc)."""
    spec = json.loads(open(spec_path).read())
    threads = int(spec.get("threads", 1))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 4)))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    settings = {k: os.environ.get(k) for k in SETTINGS}
    import torch
    torch.set_num_threads(threads)
    import vllm
    from vllm import LLM
    longest = max(len(p) + sum(r["new"] + len(r.get("obs") or []) for r in w["rounds"])
                  for w in spec["workloads"] for p in w["prompts"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype=spec.get("dtype", "float32"),
              seed=0,
              enable_prefix_caching=True, max_model_len=max(2048, longest + 16),
              disable_log_stats=False)
    startup = time.perf_counter() - t0
    result = {"vllm": vllm.__version__, "torch": torch.__version__, "threads": threads,
              "settings": settings, "startup_s": startup, "workloads": {}}
    for w in spec["workloads"]:
        runs = []
        for k in range(int(spec.get("repeats", 1))):
            print(f"  vLLM: {w['name']}, run {k + 1} ...", flush=True)
            runs.append(r := run_workload(llm, w))
            print(f"    {r['wall_s']:.1f} s, {r['output_tokens']} output tokens, "
                  f"{r['computed_tokens']} prompt tokens computed ({r['cached_tokens']} "
                  "cached)", flush=True)
        result["workloads"][w["name"]] = {**runs[-1], "wall_s": [r["wall_s"] for r in runs]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
