"""The rollout, graph-safety and decode-graph sections: RolloutEngine on a random-weight
Qwen2, its CUDA-graph decode inside training, and its decode steps graphed vs eager."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from typing import Callable, Dict, List

import torch

from .common import Sizes, rollout_setup, prompt_workload, first_divergence, greedy_check

def rollout_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """A random-weight Qwen2 (bf16 on GPU) through ``RolloutEngine`` (its default decode
    mode: CUDA graphs on a GPU): tokens per second, and greedy tokens against Hugging Face."""
    from mapo_fast.rollout.engine import RolloutEngine
    model, prompts, kw, sizes = rollout_setup(sz, dev)
    eng = RolloutEngine(model, None, **kw)
    group, new = sizes["group"], sizes["new_tokens"]

    def run():
        return eng.generate(prompts, group_size=group, max_new_tokens=new, temperature=1.0,
                            seed=0)
    ms = measure(run)
    generated = len(prompts) * group * new
    check = greedy_check(model, prompts[:2], min(new, 16), kw["allocator"])
    return {"sizes": sizes, "allocator": kw["allocator"], "decode_mode": eng.runner.decode_mode,
            "ms": {"generate": ms}, "new_tokens_per_s": generated / (ms / 1e3),
            "attention_passes": {k: v for k, v in eng.stats.items() if k.startswith("attention")},
            "greedy_equal": check["equal"], "first_divergence": check["first_divergence"],
            "ok": check["equal"]}


def graph_safety_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """CUDA-graph decode inside training, as the trainer runs it: a float32, trainable policy
    rolled out under ``torch.autocast(bfloat16)`` with ``decode_mode="graph"``, then its
    weights changed in place (an optimizer step), then rolled out again. The graph's greedy
    tokens must equal the static path's (the same padded forward, uncaptured) after the
    update, and again outside autocast (graphs of another autocast setting are recaptured); a
    graph that replayed autocast's cached bf16 weights would give the tokens of the weights
    before the update. Without a GPU both engines run the static path (the bookkeeping only).
    The rollout section's model at toy size or Qwen2-0.5B's width with 4 layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mapo_fast.rollout.engine import RolloutEngine
    torch.manual_seed(5)
    shape = dict(sz.rollout, num_hidden_layers=min(4, sz.rollout["num_hidden_layers"]))
    model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=2048, **shape)).to(dev)
    model.train()  # trainable float32 weights: what autocast caches casts of
    fast = "graph" if dev.type == "cuda" else "static"
    n_prompts, plen, group, new = sz.prompts
    prompts, blocks = prompt_workload(sz, shape["vocab_size"], stride=5)
    engines = {m: RolloutEngine(model, None, decode_mode=m, block_size=16, num_blocks=blocks)
               for m in (fast, "static")}

    def greedy(mode: str) -> List[List[int]]:
        return [t.token_ids for t in engines[mode].generate(
            prompts, group_size=group, max_new_tokens=new, temperature=0.0)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    with autocast:
        before = greedy(fast)
    with torch.no_grad():  # an optimizer step: every weight changed in place
        g = torch.Generator(device="cpu").manual_seed(6)
        for prm in model.parameters():
            prm.add_(0.5 * prm.std() * torch.randn(prm.shape, generator=g).to(dev))
    with autocast:
        after = {m: greedy(m) for m in engines}
    plain = {m: greedy(m) for m in engines}
    diverge = first_divergence(after[fast], after["static"])
    diverge_plain = first_divergence(plain[fast], plain["static"])
    return {"sizes": dict(shape, prompts=n_prompts, prompt_tokens=plen, group=group,
                          new_tokens=new),
            "decode_mode": fast, "greedy_equal": diverge is None and diverge_plain is None,
            "first_divergence": diverge or diverge_plain,
            "update_changed_tokens": before != after["static"],
            "graphs_captured": engines[fast].stats.get("decode_graphs_captured", 0),
            "ok": diverge is None and diverge_plain is None}


#: runtime calls that launch work on the GPU (a replayed CUDA graph is one)
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch")


def decode_graph_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Decode steps captured as CUDA graphs (``decode_mode="graph"``; without a GPU the same
    padded static-buffer path uncaptured, ``"static"``) against eager, on the rollout
    section's model and workload: greedy tokens equal (a float32 copy, TF32 off), new tokens
    per second both ways, and per decode step the torch operators dispatched from Python and,
    on a GPU, the launches (runtime calls) and the kernels run."""
    import copy

    from mapo_fast.rollout.engine import RolloutEngine
    model, prompts, kw, sizes = rollout_setup(sz, dev)
    group, new = sizes["group"], sizes["new_tokens"]
    fast = "graph" if dev.type == "cuda" else "static"
    ms, per_step = {}, {}
    for mode in ("eager", fast):
        eng = RolloutEngine(model, None, decode_mode=mode, **kw)

        def run(e=eng):
            return e.generate(prompts, group_size=group, max_new_tokens=new, temperature=1.0,
                              seed=0)
        ms[mode] = measure(run)
        per_step[mode] = decode_step_counts(eng, run, dev)
    model32 = copy.deepcopy(model).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        greedy = {m: [t.token_ids for t in RolloutEngine(model32, None, decode_mode=m, **kw)
                      .generate(prompts, group_size=group, max_new_tokens=min(new, 32),
                                temperature=0.0)]
                  for m in ("eager", fast)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diverge = first_divergence(greedy[fast], greedy["eager"])
    generated = len(prompts) * group * new
    return {"sizes": sizes, "modes": ["eager", fast],
            "ms": {f"generate, {m}": v for m, v in ms.items()},
            "new_tokens_per_s": {m: round(generated / (v / 1e3), 1) for m, v in ms.items()},
            "per_decode_step": per_step, "greedy_equal": diverge is None,
            "first_divergence": diverge, "ok": diverge is None}


def decode_step_counts(eng, run: Callable[[], object], dev: torch.device,
                       steps: range = range(3, 6)) -> Dict[str, float]:
    """Median counts over decode steps ``steps`` (1-based) of one ``run()``: ``operators``
    (torch operators dispatched from Python) and, on CUDA, ``launches`` (``LAUNCH_CALLS``)
    and ``kernels`` (GPU kernels run). A step that captured a graph is left out."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operators(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))
    cuda = dev.type == "cuda"
    inner, seen, rows = eng.runner.run, [0], []

    def counted(batch):
        if any(b - a != 1 for _, a, b in batch.chunks):
            return inner(batch)
        seen[0] += 1
        if seen[0] not in steps:
            return inner(batch)
        captured = eng.stats.get("decode_graphs_captured", 0)
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if cuda \
            else nullcontext()
        with prof, Operators() as ops:
            out = inner(batch)
            if cuda:
                torch.cuda.synchronize()
        if eng.stats.get("decode_graphs_captured", 0) == captured:
            row = {"operators": ops.n}
            if cuda:
                events = prof.events()
                row["launches"] = sum(e.name in LAUNCH_CALLS for e in events)
                row["kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA
                                     for e in events)
            rows.append(row)
        return out
    eng.runner.run = counted
    try:
        run()
    finally:
        del eng.runner.run  # the class's method again
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}
