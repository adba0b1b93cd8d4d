"""Where a RolloutEngine step goes: time and torch operator count per part of the step, for
decode steps and prefill steps apart, on the text rollout workloads of ``bench_rollout.py``.

    python bench/profile_rollout.py [--scale cpu] [--workload single_turn|multi_turn|prefill]
                                    [--out DIR] [--tag cpu]

Parts: ``attention`` (the paged-attention call of each layer: gathers, scores, softmax),
``qkv/o projections`` (the attention module's own linear layers and reshapes), ``rotary``
(applying rotary embeddings to queries and keys, and computing the cos/sin tables), ``norms``
(RMSNorm), ``mlp``, ``lm head``, ``embedding``, ``sampling`` (the sampler: logits processor,
softmax, draw), ``scheduling`` (the scheduler's schedule and postprocess, block tables),
and ``other`` (the rest of the step: batch assembly, tool turns, Python). Each part's time is
exclusive (a part inside another counts once, for itself); operators are the ``aten`` calls
made while the part is innermost (on a GPU each is about one kernel launch: the step's launch
count). A step is a decode step when every chunk is one token, else a prefill step.
Writes ``DIR/rollout-profile-<tag>.json`` and ``.md`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rollout_workloads as W  # noqa: E402
from rollout_measure import text_rollout  # noqa: E402
from rollout_peers import vllm_specs  # noqa: E402
from harness import write_json_md  # noqa: E402

PARTS = ("attention", "qkv/o projections", "rotary", "norms", "mlp", "lm head", "embedding",
         "sampling", "scheduling", "other")
#: module class-name endings -> part (the first match wins)
MODULE_PARTS = (("RMSNorm", "norms"), ("RotaryEmbedding", "rotary"), ("MLP", "mlp"),
                ("Attention", "qkv/o projections"), ("Embedding", "embedding"))


class StepProfile(TorchDispatchMode):
    """Exclusive wall time and operator count per part, accumulated per step kind."""

    def __init__(self):
        super().__init__()
        self.stack: List[List[Any]] = []  # [part, start, time spent in inner parts]
        self.kind = "other"
        self.totals: Dict[str, Dict[str, Dict[str, float]]] = {}
        self.steps: Dict[str, Dict[str, float]] = {}
        self.patched: List[tuple] = []  # (owner, attribute, original): undone by restore()

    def _slot(self, part: str) -> Dict[str, float]:
        return self.totals.setdefault(self.kind, {}).setdefault(part, {"s": 0.0, "ops": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._slot(self.stack[-1][0] if self.stack else "other")["ops"] += 1
        return func(*args, **(kwargs or {}))

    def enter(self, part: str) -> None:
        self.stack.append([part, time.perf_counter(), 0.0])

    def exit(self) -> None:
        part, t0, inner = self.stack.pop()
        spent = time.perf_counter() - t0
        self._slot(part)["s"] += spent - inner
        if self.stack:
            self.stack[-1][2] += spent

    @contextmanager
    def part(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """``owner.attr`` (a function or method) timed as part ``name``."""
        inner = getattr(owner, attr)
        self.patched.append((owner, attr, owner.__dict__.get(attr, inner)))

        def timed(*args, **kwargs):
            with self.part(name):
                return inner(*args, **kwargs)
        setattr(owner, attr, timed)

    def restore(self) -> None:
        """Puts back every wrapped function (module-level and class attributes outlive the
        profiled run)."""
        for owner, attr, original in reversed(self.patched):
            setattr(owner, attr, original)
        self.patched = []

    def hook_modules(self, model: torch.nn.Module) -> None:
        for mod in model.modules():
            cls = type(mod).__name__
            part = next((p for end, p in MODULE_PARTS if cls.endswith(end)), None)
            if part is None:
                continue
            mod.register_forward_pre_hook(lambda m, a, p=part: self.enter(p))
            mod.register_forward_hook(lambda m, a, o: self.exit())


def instrument(prof: StepProfile, eng: Any, model: Any) -> None:
    """Hooks ``eng`` (engine, scheduler, runner, sampler) and ``model`` into ``prof``."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    from mapo_fast.rollout import model_runner
    from mapo_fast.rollout import sampler as sampler_mod
    prof.hook_modules(model)
    prof.wrap(model_runner, "run_paged_attention", "attention")
    prof.wrap(qwen2, "apply_rotary_pos_emb", "rotary")
    head = eng.runner.head
    head.register_forward_pre_hook(lambda m, a: prof.enter("lm head"))
    head.register_forward_hook(lambda m, a, o: prof.exit())
    prof.wrap(eng.scheduler, "schedule", "scheduling")
    prof.wrap(eng.scheduler, "postprocess", "scheduling")
    prof.wrap(sampler_mod.Sampler, "__call__", "sampling")  # every request's sampler
    step = eng.step
    schedule = eng.scheduler.schedule

    def kinded_schedule():
        batch = schedule()
        prof.kind = "decode" if all(b - a == 1 for _, a, b in batch.chunks) else "prefill"
        return batch
    eng.scheduler.schedule = kinded_schedule

    def timed_step():
        t0 = time.perf_counter()
        with prof.part("other"):
            step()
        rec = prof.steps.setdefault(prof.kind, {"steps": 0, "s": 0.0})
        rec["steps"] += 1
        rec["s"] += time.perf_counter() - t0
    eng.step = timed_step


def profile(scale: str, workload: str) -> Dict[str, Any]:
    """Runs ``workload`` once unprofiled (warm-up) and once profiled; returns the tables."""
    cfg = W.SCALES[scale]
    model, tok = W.make_model(cfg, torch.device("cpu")), W.make_tokenizer()
    spec = next(w for w in vllm_specs(cfg, tok) if w["name"] == workload)
    obs = [r["obs"][1:-1] for r in spec["rounds"] if r.get("obs")]  # between the tags

    def run(prof: Optional[StepProfile]) -> float:
        eng, kw = text_rollout(model, tok, torch.device("cpu"), spec["prompts"],
                               spec["group"], spec["rounds"][0]["new"],
                               [tok.decode(o) for o in obs], max(map(len, obs), default=0))
        if prof is not None:
            instrument(prof, eng, model)
        t0 = time.perf_counter()
        try:
            with prof if prof is not None else nullcontext():
                eng.generate(spec["prompts"], **kw)
        finally:
            if prof is not None:
                prof.restore()
        return time.perf_counter() - t0
    plain = run(None)
    prof = StepProfile()
    profiled = run(prof)
    out: Dict[str, Any] = {"workload": workload, "scale": scale, "wall_s": plain,
                           "wall_s_profiled": profiled, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "kinds": {}}
    for kind, rec in prof.steps.items():
        parts = prof.totals.get(kind, {})
        n = rec["steps"]
        out["kinds"][kind] = {
            "steps": n, "ms_per_step": 1e3 * rec["s"] / n,
            "ops_per_step": sum(p["ops"] for p in parts.values()) / n,
            "parts": {p: {"ms_per_step": 1e3 * parts[p]["s"] / n,
                          "share": parts[p]["s"] / rec["s"],
                          "ops_per_step": parts[p]["ops"] / n}
                      for p in PARTS if p in parts}}
    return out


def markdown(results: List[Dict[str, Any]]) -> str:
    lines = ["# Where a RolloutEngine step goes", "",
             "Exclusive wall time and torch operators per step and part (profiled run; its "
             "hooks add their own overhead, see the plain run's wall time). Generated by "
             "`bench/profile_rollout.py`.", ""]
    for r in results:
        lines += [f"## {r['workload']} ({r['scale']} scale, {r['threads']} threads, torch "
                  f"{r['torch']})", "",
                  f"Wall time {r['wall_s']:.2f} s plain, {r['wall_s_profiled']:.2f} s "
                  "profiled.", ""]
        for kind, k in r["kinds"].items():
            lines += [f"**{kind}**: {k['steps']} steps, {k['ms_per_step']:.1f} ms and "
                      f"{k['ops_per_step']:.0f} operators per step", "",
                      "| part | ms / step | share | operators / step |", "|---|---|---|---|"]
            for p, v in k["parts"].items():
                lines.append(f"| {p} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% | "
                             f"{v['ops_per_step']:.0f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="profile_rollout.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="cpu", choices=list(W.SCALES))
    p.add_argument("--workload", nargs="+", default=["single_turn", "multi_turn", "prefill"],
                   choices=["single_turn", "multi_turn", "prefill"])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="cpu")
    a = p.parse_args(argv)
    results = []
    for w in a.workload:
        print(f"profiling {w} ({a.scale}) ...", flush=True)
        results.append(profile(a.scale, w))
    write_json_md(a.out / f"rollout-profile-{a.tag}", results, markdown(results))


if __name__ == "__main__":
    main()
