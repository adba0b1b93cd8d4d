"""The rollout benchmark's other engines, each in its own process (``bench_rollout.py``):
vLLM's CPU build in its own environment (``rollout_vllm.py``), run as vLLM's CPU
documentation advises, and RolloutEngine of another revision (``--before``). Their rows are
added to the workloads measured here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

try:
    from harness import CaseResult, run_with_package
    from rollout_measure import ENGINE, engine_notes
    from rollout_workloads import observation_ids, prefill_inputs, workload
except ImportError:  # imported as bench.rollout_peers
    from .harness import CaseResult, run_with_package
    from .rollout_measure import ENGINE, engine_notes
    from .rollout_workloads import observation_ids, prefill_inputs, workload

VLLM_SCRIPT = Path(__file__).resolve().with_name("rollout_vllm.py")
#: TCMalloc, as vLLM's CPU documentation names it (Debian/Ubuntu: libtcmalloc-minimal4)
TCMALLOC = "libtcmalloc_minimal.so.4"
#: Intel's OpenMP, which vLLM's CPU worker looks for in LD_PRELOAD on x86 (its environment
#: has it: the intel-openmp wheel puts it in the environment's lib/)
IOMP = "libiomp5.so"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")


def vllm_specs(cfg, tok) -> list:
    """The three text workloads (multi-turn, single turn, prefill) as ``rollout_vllm.py``
    takes them: RolloutEngine's prompt ids, groups, turn lengths and observation ids."""
    def obs_ids(o):
        return observation_ids(tok, tok.decode(o))
    prompts, obs = workload(cfg)
    G, T, N = cfg["group"], cfg["turns"], cfg["new"]
    c = cfg["prefill"]
    p_prompts, p_obs = prefill_inputs(cfg)
    return [{"name": "multi_turn", "prompts": prompts, "group": G,
             "rounds": [{"new": N, "obs": obs_ids(obs[k])} for k in range(T)] + [{"new": N}]},
            {"name": "single_turn", "prompts": prompts, "group": G, "rounds": [{"new": N}]},
            {"name": "prefill", "prompts": p_prompts, "group": c["group"],
             "rounds": [{"new": c["new"], "obs": obs_ids(p_obs[0])}, {"new": c["new"]}]}]


def find_tcmalloc(dirs=LIBRARY_DIRS) -> Optional[str]:
    """The path of ``TCMALLOC`` in the first of ``dirs`` that has it, or None."""
    return next((str(Path(d) / TCMALLOC) for d in dirs if (Path(d) / TCMALLOC).exists()), None)


def cpu_list(cores: List[int]) -> str:
    """Cores as ``VLLM_CPU_OMP_THREADS_BIND`` lists them: ranges joined by commas
    (``[0, 1, 2, 5]`` -> ``"0-2,5"``)."""
    cores = sorted(cores)
    parts, start = [], 0
    for i, c in enumerate(cores):
        if i + 1 == len(cores) or cores[i + 1] != c + 1:  # a range ends at c
            first = cores[start]
            parts.append(str(c) if first == c else f"{first}-{c}")
            start = i + 1
    return ",".join(parts)


def preload_libraries(python: str, dirs=LIBRARY_DIRS) -> List[str]:
    """What vLLM's process preloads: TCMalloc where the machine has it (``dirs``), then Intel
    OpenMP where vLLM's environment (that of interpreter ``python``) has it."""
    iomp = Path(python).parent.parent / "lib" / IOMP  # the venv's, not the resolved binary's
    return [p for p in (find_tcmalloc(dirs), str(iomp) if iomp.exists() else None) if p]


def vllm_environment(threads: int, preload: List[str]) -> Dict[str, str]:
    """vLLM's process settings as its CPU documentation advises: its OpenMP threads bound one
    per core (the first ``threads`` cores this process may run on) and ``preload`` (from
    ``preload_libraries``) ahead of any ``LD_PRELOAD`` already set; without TCMalloc among
    them, glibc with the settings RolloutEngine gave this process
    (``cpu_malloc.environment``)."""
    from mapo_fast.rollout import cpu_malloc  # here: a --before package may not have it
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env = {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": cpu_list(cores)}
    if preload:
        env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [os.environ.get("LD_PRELOAD")])])
    if not any(Path(p).name == TCMALLOC for p in preload):
        env.update(cpu_malloc.environment())
    return env


def run_vllm(python: str, model, tok, cfg, repeats: int) -> dict:
    """``rollout_vllm.py`` in vLLM's environment (``python``) on ``model`` saved to a
    temporary folder, each workload ``repeats`` times, with this process's thread count and
    ``vllm_environment``. Returns its result, with the settings given (``env``)."""
    import copy
    import json
    import subprocess
    import tempfile

    threads = torch.get_num_threads()
    env = vllm_environment(threads, preload_libraries(python))
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to("cpu", torch.float32).save_pretrained(f"{tmp}/model")
        dtype = "float32" if next(model.parameters()).device.type == "cpu" else "bfloat16"
        spec = {"model": f"{tmp}/model", "threads": threads, "kv_cache_gib": 4, "dtype": dtype,
                "repeats": repeats, "workloads": vllm_specs(cfg, tok)}
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        print(f"  vLLM ({python}; {' '.join(f'{k}={v}' for k, v in env.items())}): start-up "
              "and the text workloads ...", flush=True)
        subprocess.run([python, str(VLLM_SCRIPT), f"{tmp}/spec.json", f"{tmp}/out.json"],
                       check=True, env=dict(os.environ, **env))
        return {**json.loads(Path(f"{tmp}/out.json").read_text()), "env": env}


def add_vllm(results, python: str, model, tok, cfg, repeats: int = 1) -> dict:
    """Adds vLLM's rows to the text workloads (multi-turn, single turn, prefill: ``results``
    entries 0, 1 and 3), each checked against RolloutEngine's output tokens. Returns what the
    report's description needs (vLLM's version, start-up, threads and process settings)."""
    out = run_vllm(python, model, tok, cfg, repeats)
    name = f"vLLM {out['vllm']} (CPU build)"
    for wl, key in zip((results[0], results[1], results[3]),
                       ("multi_turn", "single_turn", "prefill")):
        v = out["workloads"][key]
        ours = next(c for c in wl["cases"] if c.name == ENGINE).extra
        same = v["output_tokens"] == ours["output_tokens"]
        walls = ", ".join(f"{s:.1f}" for s in v["wall_s"])
        print(f"    {key}: vLLM {walls} s; output tokens vLLM {v['output_tokens']}, "
              f"RolloutEngine {ours['output_tokens']}{'' if same else ' (DIFFER)'}", flush=True)
        wl["cases"].append(CaseResult(
            name, [1e3 * s for s in v["wall_s"]], None,
            f"prefix caching (reset before each run); re-submits each turn's history; "
            f"{v['output_tokens']} output tokens; prompt tokens computed "
            f"{v['computed_tokens']}, cached {v['cached_tokens']}",
            {**v, "same_output_tokens": same}))
    return {"vllm": out["vllm"], "vllm_startup_s": out["startup_s"],
            "vllm_threads": out["threads"], "vllm_env": portable(out["env"])}


def portable(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` as a report shows it: preloaded libraries by name, not by this machine's path."""
    if "LD_PRELOAD" not in env:
        return dict(env)
    return {**env, "LD_PRELOAD": ":".join(Path(p).name for p in env["LD_PRELOAD"].split(":"))}


def add_before(results, before: str, scale: str, device: torch.device, repeats: int) -> None:
    """Runs the engine cases with the package in ``before`` (a subprocess) and adds its rows
    to each workload as ``RolloutEngine before``."""
    print(f"  the engine cases again with the package in {before} ...", flush=True)
    old = run_with_package(before, Path(__file__).with_name("bench_rollout.py"),
                           ["--scale", scale, "--device", str(device), "--engine-only",
                            "--repeats", str(repeats)], "before")
    for wl, old_wl in zip(results, old["workloads"]):
        for c in old_wl["cases"]:
            if c["name"] == ENGINE:
                r = CaseResult(f"{ENGINE} before", c["times_ms"], c["peak_extra_mib"],
                               "the package in --before; " + engine_notes(c["extra"]),
                               c["extra"])
                wl["cases"].append(r)
