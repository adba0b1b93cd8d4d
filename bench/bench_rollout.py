"""Multi-turn rollouts, side by side in one run: the naive Hugging Face loop (``generate`` re-run
on the whole history every turn), HF ``generate`` continuing each sample's own KV cache (no
sharing between samples), and ``mapo_fast.RolloutEngine`` (paged KV, one prefill per group,
observations prefilled alone, all samples decoded together). A text-only single-turn variant
adds transformers' continuous-batching ``generate_batch``.

Workload: 4 prompts x G=8 samples, a 1024-token prompt, 3 tool turns (64 generated tokens, then
a 256-token observation) and a final 64-token turn, a ~27M-parameter Qwen2 built from a config
(random weights; sampled at temperature 1). Turn ends are forced at 64 tokens in every case, so
all do the same amount of generation. Reported: wall time, prompt/observation tokens pushed
through the model (prefill), and the peak KV-cache memory.

The image workload (``rollout_image``) is the same shape with a Qwen2.5-VL: a 1024-image-token
prompt, 3 zoom-in calls each answered with a 256-token crop, the naive loop re-running the HF
processor and ``generate`` on the whole history each turn. HF ``generate`` on its own cache is
measured on the text workload only.

The prefill workload: 16 prompts of 200 to 2000 tokens x G=8, one tool turn (32 tokens,
a 64-token observation) and a final 32-token turn, RolloutEngine only: it is where packing the
prompts of a batch into shared forward passes (batched prefill) shows. Every RolloutEngine case
reports its forward passes, the passes that prefilled prompts, and the share of its wall time
spent inside block-allocator calls (each call timed).

``--before DIR`` runs the RolloutEngine cases again, in a subprocess, with the ``mapo_fast``
package installed in ``DIR`` (an older revision: ``git worktree add /tmp/rev <rev>`` and
``pip install --no-deps --target DIR /tmp/rev``), and adds them to the same tables as
"RolloutEngine before"; ``--engine-only`` skips the Hugging Face cases. For an A/B of two
revisions use both (``--engine-only --before DIR``): each revision's engine then runs in a fresh
process (after the Hugging Face cases, the same engine measured 25% slower on CPU: a process
that has run them is not a clean one).

``--vllm PYTHON`` adds vLLM to the three text workloads (multi-turn, single turn, prefill), run
by ``rollout_vllm.py`` with the interpreter of vLLM's own environment (``make vllm-env``: its
CPU build, pinned in ``bench/requirements-vllm.txt``): the same model saved to disk, the same
prompt ids, groups (``n = G``), turn lengths and observation ids, temperature 1, prefix
caching on (emptied before each run), the same thread count, and the process settings vLLM's
CPU documentation advises (``rollout_peers.vllm_environment``: threads bound to cores,
TCMalloc preloaded); each multi-turn round re-submits the history, as a vLLM client does.
Each row reports output tokens (checked equal to RolloutEngine's) and prompt tokens computed
and cached; vLLM's start-up is reported apart, not in its rows.

``--repeats N``: every engine row (RolloutEngine, ``--before``, vLLM) is the median of N runs,
a fresh engine each (vLLM: one engine, its prefix cache emptied); Hugging Face rows run once.
The pieces: ``rollout_workloads`` (sizes, model, prompts), ``rollout_measure`` (the engine's
rows), ``rollout_hf`` and ``rollout_image`` (the baselines), ``rollout_peers`` (the processes
of vLLM and ``--before``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

try:
    import rollout_image
    from harness import device_info, main as bench_main, write_report
    from rollout_hf import generate_batch_row, hf_rows
    from rollout_measure import (ENGINE, attention_paths, engine_block_size, engine_case,
                                 instrument, text_engine)
    from rollout_peers import add_before, add_vllm
    from rollout_workloads import (SCALES, kv_bytes, make_model, make_tokenizer,
                                   observation_ids, prefill_inputs, workload)
except ImportError:  # imported as bench.bench_rollout
    from . import rollout_image
    from .harness import device_info, main as bench_main, write_report
    from .rollout_hf import generate_batch_row, hf_rows
    from .rollout_measure import (ENGINE, attention_paths, engine_block_size, engine_case,
                                  instrument, text_engine)
    from .rollout_peers import add_before, add_vllm
    from .rollout_workloads import (SCALES, kv_bytes, make_model, make_tokenizer,
                                    observation_ids, prefill_inputs, workload)


def multi_turn(model, tok, device, cfg, paths, engine_only, repeats):
    """The text multi-turn workload: the naive HF loop, HF generate on its own cache, and
    RolloutEngine (``repeats`` runs)."""
    prompts, obs = workload(cfg)
    obs_texts = [tok.decode(o) for o in obs]
    rows = [] if engine_only else hf_rows(model, device, prompts,
                                          [observation_ids(tok, t) for t in obs_texts], cfg)
    print("  rollout: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts,
                                                        cfg["group"], cfg["new"], obs_texts,
                                                        cfg["obs"], paths),
                            device, "paged KV, shared prompts", repeats))
    return {"workload": f"{len(prompts)} prompts x G={cfg['group']}, {cfg['prompt_len']}-token "
                        f"prompt, {cfg['turns']} tool turns of {cfg['new']} + {cfg['obs']} "
                        f"tokens, final {cfg['new']}", "cases": rows}


def single_turn(model, tok, device, cfg, paths, engine_only, repeats):
    """Text single turn: transformers' continuous batching (``generate_batch``) and
    RolloutEngine (``repeats`` runs)."""
    prompts, _ = workload(cfg)
    G, N = cfg["group"], cfg["new"]
    rows = [] if engine_only else generate_batch_row(model, device, prompts, G, N)
    print("  single turn: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts, G, N, (),
                                                        0, paths), device, "shared prompts",
                            repeats))
    return {"workload": f"text single turn: {len(prompts)} x G={G}, {cfg['prompt_len']}-token "
                        f"prompt, {N} new tokens", "cases": rows}


def prefill_heavy(model, tok, device, cfg, paths, repeats):
    """The prefill workload: prompts of many lengths, one tool turn, RolloutEngine only."""
    c = cfg["prefill"]
    prompts, obs = prefill_inputs(cfg)
    print("  prefill: mapo_fast RolloutEngine ...", flush=True)
    row = engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts, c["group"],
                                                  c["new"], [tok.decode(obs[0])], c["obs"],
                                                  paths),
                      device, "batched prefill", repeats)
    return {"workload": f"prefill: {c['prompts']} prompts of {c['min_len']}-{c['max_len']} "
                        f"tokens x G={c['group']}, 1 tool turn of {c['new']} + {c['obs']} "
                        f"tokens, final {c['new']}", "cases": [row]}


def run_image(cfg, device, paths, engine_only, repeats):
    """The image workload (``rollout_image``): the naive HF loop and mapo_fast (``repeats``
    runs), side by side. Adds the engine's attention paths to ``paths``."""
    R = rollout_image
    tok = R.make_tokenizer(cfg)
    model = R.make_model(cfg, tok, device)
    images = R.make_images(cfg)
    rows = [] if engine_only else [R.naive_row(model, tok, images, cfg, device,
                                               kv_bytes(model.model.language_model, 1))]

    def ours():
        box = {}
        trajs, eng = R.ours(model, tok, images, cfg, temperature=1.0,
                            block_size=engine_block_size(device),
                            instrument=lambda e: box.setdefault("rec", instrument(e)))
        attention_paths(eng, paths)
        assert all(len(t.spans.turns) == cfg["turns"] and t.stats["tool_errors"] == 0
                   for t in trajs), "every sample makes its scripted calls"
        return eng, box["rec"], {}
    print("  image rollout: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, ours, device, "paged KV, shared prompts", repeats))
    return {"workload": R.describe(cfg, model), "cases": rows}


def describe(model, paths: dict, repeats: int, extra: dict) -> str:
    """The report's description: the model, the runs, the attention paths and how each
    engine ran (threads, process settings)."""
    from mapo_fast.rollout import cpu_malloc
    params = sum(p.numel() for p in model.parameters()) / 1e6
    desc = (f"Qwen2 of {params:.0f}M parameters from a config, random weights, "
            f"{next(model.parameters()).dtype}. Each engine row: the median of {repeats} "
            f"run(s), a fresh engine each, in one process; Hugging Face rows: one run. "
            f"Ratios are against mapo_fast.")
    if next(model.parameters()).device.type == "cpu":
        # what cpu_malloc='auto' did to this process (left alone: another allocator or the
        # user's own settings)
        tuned = " ".join(f"{k}={v}" for k, v in cpu_malloc.environment().items())
        malloc = f"glibc with raised mmap and trim thresholds ({tuned})" if tuned else \
            "its allocator as it found it"
        desc += (f" RolloutEngine ran in this process with {torch.get_num_threads()} threads "
                 f"(torch's own, unbound) and cpu_malloc='auto': {malloc}.")
    desc += (" RolloutEngine forward passes per attention path: "
             + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) + ".")
    if "vllm" in extra:
        env = " ".join(f"{k}={v}" for k, v in extra["vllm_env"].items())
        desc += (f" vLLM {extra['vllm']} (its CPU build, in its own environment, "
                 f"{extra['vllm_threads']} threads, the model saved to disk) ran as its CPU "
                 f"documentation advises ({env}); it started in {extra['vllm_startup_s']:.0f} "
                 "s, not counted in its rows.")
    return desc


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str,
        engine_only: bool = False, before: Optional[str] = None, vllm: Optional[str] = None):
    """Every workload at ``scale`` (engine rows the median of ``repeats`` runs), then the
    ``--before`` package's and vLLM's rows; writes ``rollout-<tag>`` (JSON, markdown, PNG)
    in ``out_dir`` and returns the paths."""
    cfg = SCALES[scale]
    info = device_info(device)
    model = make_model(cfg, device)
    tok = make_tokenizer()
    paths = {}  # RolloutEngine forward passes per attention path
    results = [multi_turn(model, tok, device, cfg, paths, engine_only, repeats),
               single_turn(model, tok, device, cfg, paths, engine_only, repeats),
               run_image(cfg["image"], device, paths, engine_only, repeats),
               prefill_heavy(model, tok, device, cfg, paths, repeats)]
    if before:
        add_before(results, before, scale, device, repeats)
    extra = {"attention_paths": paths, "repeats": repeats}
    if vllm:
        extra.update(add_vllm(results, vllm, model, tok, cfg, repeats))
    title = "Multi-turn rollouts" if not before else \
        "Multi-turn rollouts: RolloutEngine and the revision in --before"
    return write_report(f"rollout-{tag}", title, results, info, out_dir, baseline=ENGINE,
                        description=describe(model, paths, repeats, extra), extra=extra)


def main(argv=None):
    """The command line (``harness.main`` with this benchmark's options)."""
    bench_main(__doc__, SCALES, run, argv, options={
        "--engine-only": dict(action="store_true", help="skip the Hugging Face cases"),
        "--before": dict(default=None, metavar="DIR",
                         help="also run the engine cases with the mapo_fast package in DIR"),
        "--vllm": dict(default=None, metavar="PYTHON",
                       help="also run vLLM on the text workloads with this interpreter (its "
                            "own environment: make vllm-env)")})


if __name__ == "__main__":
    main()
