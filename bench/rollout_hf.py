"""The rollout benchmark's Hugging Face baselines (``bench_rollout.py``): ``generate`` per
sample and turn, either re-run on the whole history (the naive loop) or continuing the
sample's own cache, and transformers' continuous batching (``generate_batch``) on the single
turn. One run each (minutes on a CPU)."""

from __future__ import annotations

from typing import List

import torch

try:
    from harness import CaseResult, measure
    from rollout_workloads import VOCAB, kv_bytes
except ImportError:  # imported as bench.rollout_hf
    from .harness import CaseResult, measure
    from .rollout_workloads import VOCAB, kv_bytes


def naive_hf(model, device, prompts, obs_ids, cfg, own_cache: bool):
    """HF ``generate`` per sample and turn, on the whole history (``own_cache``: continuing
    the sample's own cache). Returns (prefill tokens, peak KV bytes)."""
    from transformers import DynamicCache
    G, T, N = cfg["group"], cfg["turns"], cfg["new"]
    prefill, peak = 0, 0
    for i, p in enumerate(prompts):
        for g in range(G):
            torch.manual_seed(1000 * i + g)
            hist = list(p)
            cache = DynamicCache() if own_cache else None
            cached = 0
            for k in range(T + 1):
                prefill += len(hist) - cached
                out = model.generate(torch.tensor([hist], device=device), do_sample=True,
                                     top_k=0, max_new_tokens=N, min_new_tokens=N,
                                     pad_token_id=VOCAB, cache=cache,
                                     return_dict_in_generate=True)
                hist = out.sequences[0].tolist()
                if own_cache:  # transformers 5 names it `cache`, earlier `past_key_values`
                    returned = getattr(out, "cache", None) if hasattr(out, "cache") \
                        else out.past_key_values
                    cache = returned if returned is not None else cache
                    cached = len(hist) - 1
                if k < T:
                    hist += obs_ids[k]
            peak = max(peak, len(hist))
    live = G * len(prompts) if own_cache else 1  # own caches all live to the end
    return prefill, kv_bytes(model, peak) * live


def hf_rows(model, device, prompts, obs_ids, cfg) -> List[CaseResult]:
    """The multi-turn workload's two Hugging Face rows: the naive loop and ``generate`` on
    each sample's own cache."""
    rows = []
    for name, own, notes in [("naive HF loop", False, "re-prefills history"),
                             ("HF generate, own cache", True, "no sharing")]:
        print(f"  rollout: {name} ...", flush=True)
        box = {}
        r = measure(name, lambda own=own: box.setdefault("x", naive_hf(
            model, device, prompts, obs_ids, cfg, own)), device, repeats=1, warmup=0)
        prefill, kv = box["x"]
        r.extra = {"prefill_tokens": prefill, "peak_kv_mib": kv / 2 ** 20}
        r.notes = f"{notes}; prefill {prefill} tokens; peak KV {kv / 2 ** 20:.0f} MiB"
        print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
        rows.append(r)
    return rows


def generate_batch_row(model, device, prompts, G: int, N: int) -> List[CaseResult]:
    """transformers' continuous batching on the single turn (``G`` samples of each prompt,
    ``N`` tokens each): one row, or none where this transformers' ``generate_batch`` fails."""
    def gen_batch():
        from transformers import GenerationConfig
        gc = GenerationConfig(max_new_tokens=N, do_sample=True, top_k=0, eos_token_id=-1,
                              pad_token_id=VOCAB)
        model.generate_batch(inputs=[p for p in prompts for _ in range(G)],
                             generation_config=gc, progress_bar=False)
    print("  single turn: transformers generate_batch ...", flush=True)
    try:
        r = measure("transformers generate_batch", gen_batch, device, repeats=1, warmup=1,
                    notes="continuous batching")
    except Exception as e:  # generate_batch is young and version-dependent
        print(f"    skipped: {type(e).__name__}: {e}", flush=True)
        return []
    print(f"    {r.median_ms / 1e3:.1f} s", flush=True)
    return [r]
