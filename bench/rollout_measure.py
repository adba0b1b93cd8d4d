"""How the rollout benchmark measures RolloutEngine (``bench_rollout.py``): a text workload's
engine and ``generate`` keywords, the block allocator's calls clocked, the engine's counters
(prefill tokens, forward passes, attention paths, peak KV) read into each row."""

from __future__ import annotations

import time

import torch

try:
    from harness import measure
    from rollout_workloads import OBS_TEMPLATE, VOCAB, EndTurnAt, FixedObservation, kv_bytes
except ImportError:  # imported as bench.rollout_measure
    from .harness import measure
    from .rollout_workloads import OBS_TEMPLATE, VOCAB, EndTurnAt, FixedObservation, kv_bytes

#: the engine's row name in every workload (ratios are against it)
ENGINE = "mapo_fast RolloutEngine"


def engine_block_size(device: torch.device) -> int:
    """256-token blocks where flash-attn's paged decode can run (CUDA, flash-attn importable),
    else 16."""
    from mapo_fast.rollout.attention import FLASH_PAGE_MULTIPLE, flash_kvcache_fn
    return FLASH_PAGE_MULTIPLE if device.type == "cuda" and flash_kvcache_fn() else 16


def attention_paths(eng, into: dict) -> None:
    """Adds the engine's forward passes per attention path to ``into``."""
    for k, v in eng.stats.items():
        if k.startswith("attention_"):
            key = k[len("attention_"):-len("_passes")]
            into[key] = into.get(key, 0) + v


class AllocatorClock:
    """Wraps an engine's block allocator: each method call's wall time is added up."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def instrument(eng) -> dict:
    """Clocks ``eng``'s allocator and counts its prompt-prefill passes (this revision's
    ``prefill_passes``, or, for engines before it, the passes with a prompt chunk). Returns
    the live record; ``finish(record, eng, wall_s)`` completes it."""
    holder = getattr(eng, "scheduler", eng)  # the scheduler owns the allocator since it exists
    rec = {"clock": AllocatorClock(holder.blocks), "prompt_passes": 0}
    holder.blocks = rec["clock"]
    if "prefill_passes" not in eng.stats and hasattr(eng, "_forward"):
        forward = eng._forward

        def counted(chunks):
            rec["prompt_passes"] += any(type(c[1]).__name__ == "_Prompt" for c in chunks)
            return forward(chunks)
        eng._forward = counted
    return rec


def finish(rec: dict, eng, wall_s: float) -> dict:
    """An engine row's counters: prefill tokens and passes, the allocator's calls and share
    of ``wall_s``, the peak KV, the vision patches (``rec``: from ``instrument``)."""
    return {"prefill_tokens": eng.stats["prefill_tokens"],
            "cached_prompt_tokens": eng.stats.get("cached_prompt_tokens", 0),
            "forward_passes": eng.stats["forward_passes"],
            "prefill_passes": eng.stats.get("prefill_passes", rec["prompt_passes"]),
            "allocator_s": rec["clock"].seconds, "allocator_calls": rec["clock"].calls,
            "allocator_share": rec["clock"].seconds / wall_s,
            "peak_kv_mib": eng.stats["peak_blocks"] * eng.block_bytes / 2 ** 20,
            "vision_patches": eng.stats.get("vision_patches", 0)}


def output_tokens(trajs) -> int:
    """Model-written tokens of ``trajs`` (forced turn ends included, observations not)."""
    return sum(sum(t.loss_mask) for t in trajs)


def engine_notes(x: dict) -> str:
    """An engine row's notes from its counters (``finish``)."""
    return (f"prefill {x['prefill_tokens']} tokens in {x['forward_passes']} passes "
            f"({x['prefill_passes']} with prompts); allocator {100 * x['allocator_share']:.1f}% "
            f"of wall time ({x['allocator_calls']} calls); peak KV {x['peak_kv_mib']:.0f} MiB")


def engine_case(name: str, fn, device, notes: str = "", repeats: int = 1):
    """Times ``fn() -> (engine, instrument record, extra)`` ``repeats`` times (a fresh engine
    each, no warm-up); the row carries the last run's engine counters."""
    box = {}

    def timed():
        t0 = time.perf_counter()
        eng, rec, extra = fn()
        box["x"] = {**finish(rec, eng, time.perf_counter() - t0), **extra}
    r = measure(name, timed, device, repeats=repeats, warmup=0)
    r.extra = box["x"]
    r.notes = "; ".join(x for x in (notes, engine_notes(r.extra)) if x)
    runs = ", ".join(f"{t / 1e3:.1f}" for t in r.times_ms)
    print(f"    {runs} s (median {r.median_ms / 1e3:.1f}), {r.notes}", flush=True)
    return r


def text_rollout(model, tok, device, prompts, G, N, obs_texts=(), obs_len=0):
    """A RolloutEngine and the ``generate`` keywords of a text workload: one turn of ``N``
    tokens per text of ``obs_texts`` (ended by a forced `</tool_call>`, answered with that
    text, at most ``obs_len`` tokens between the template's tags), then a final turn of ``N``;
    without texts, one turn. The pool holds every sample at its longest."""
    from mapo_fast.rollout import RolloutEngine
    T = len(obs_texts)
    longest = max(map(len, prompts)) + T * (N + obs_len + 2) + N
    eng = RolloutEngine(model, tok, block_size=engine_block_size(device),
                        memory_budget_mb=max(64, 2 * kv_bytes(model, 1) * (len(prompts) * G + 1)
                                             * longest / 2 ** 20))
    kw = dict(group_size=G, max_new_tokens=N, temperature=1.0, seed=0, stop_token_ids=[])
    if T:
        kw.update(tools=FixedObservation(list(obs_texts)), max_turns=T + 1,
                  max_observation_tokens=obs_len + 2, observation_template=OBS_TEMPLATE,
                  logits_processor=EndTurnAt(N, VOCAB + 2, VOCAB + 4, prompts))
    return eng, kw


def text_engine(model, tok, device, prompts, G, N, obs_texts, obs_len, paths):
    """RolloutEngine on a text workload (``text_rollout``), instrumented; every turn checked
    to be ``N`` tokens."""
    eng, kw = text_rollout(model, tok, device, prompts, G, N, obs_texts, obs_len)
    rec = instrument(eng)
    trajs = eng.generate(prompts, **kw)
    attention_paths(eng, paths)
    written = output_tokens(trajs)
    want = len(prompts) * G * (len(obs_texts) + 1) * N
    assert written == want, f"turns of other than {N} tokens: {written} tokens, not {want}"
    return eng, rec, {"output_tokens": written}


