"""The policy-gradient estimator's variance, MAPO against GRPO on the same rollouts, at fixed
weights (``mapo_fast.trainer.estimator``): at each measured point, K independent rollout
batches are drawn with the policy, and on each the training loss's gradient (the LM head and
the last decoder layer) is taken with GRPO's and with MAPO's advantages on the same
trajectories. Reported per point: each estimator's variance over batches (trace of the
covariance), the squared norm of its mean, their ratio, and the paired ratios MAPO / GRPO with
95% bootstrap intervals over batches; over all points and over each kind of point (warm
start, MAPO's and GRPO's final weights), the mean of the log ratio with its 95% t-interval.

    python bench/bench_variance.py [--seeds 3] [--batches 16] [--runs RUN_DIR ...]
                                   [--report DIR] [--tag cpu] [-- extra mapo-train keys]
    python bench/bench_variance.py --from-json bench/results/estimator-variance-cpu.json

Without ``--runs`` the points are the warm starts of seeds ``0 .. seeds-1`` (the default
configuration, or it changed by the extra keys); with ``--runs`` they are the newest checkpoints
of those ``mapo-train`` output folders (e.g. the training study's runs, whose seed and expert
are read from bench_train's folder layout; each is copied, never changed). Writes ``DIR/estimator-variance-<tag>.json`` and ``.md`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import interval  # noqa: E402
from harness import split_passthrough, write_json_md  # noqa: E402


@contextlib.contextmanager
def trainer_at(args: List[str], resume_from: Optional[Path] = None) -> Iterator[Any]:
    """A trainer built from ``args`` in a temporary folder, warm-started, or resumed from a
    copy of ``resume_from``'s checkpoints (the run itself is never changed); the point of a
    measurement. Its warm start's seconds are ``trainer.warm_s``."""
    from mapo_fast.trainer import Trainer, parse_args
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if resume_from is not None:
            shutil.copytree(resume_from / "checkpoints", Path(tmp) / "checkpoints")
            extra = ["--resume"]
        trainer = Trainer(parse_args(["--out", tmp, *args, *extra]), progress=False)
        start = time.perf_counter()
        if resume_from is None:
            trainer.warm_start()
        trainer.warm_s = time.perf_counter() - start
        yield trainer


def points(p: argparse.ArgumentParser, runs: List[Path], seeds: int
           ) -> List[Tuple[str, List[str], Optional[Path]]]:
    """``(name, keys, run)`` of each point: every ``--runs`` folder (checked to hold
    checkpoints; its keys from ``run_args``), else the warm starts of seeds ``0 ..
    seeds-1``."""
    for run in runs:
        if not (run / "checkpoints").is_dir():
            p.error(f"--runs: {run} has no checkpoints folder")
    if runs:
        # named by the run's last three parts (<expert>/seed<k>/<kind>): no machine's paths
        return [("/".join(r.resolve().parts[-3:]), run_args(r), r) for r in runs]
    return [(f"warm start, seed {s}", ["--seed", str(s)], None) for s in range(seeds)]


def measure(args: List[str], batches: int, resume_from: Optional[Path] = None,
            n_boot: int = 2000) -> Dict[str, Any]:
    """One point (``trainer_at``), then ``estimator_variance`` over ``batches`` batches."""
    from mapo_fast.trainer.estimator import estimator_variance
    with trainer_at(args, resume_from) as trainer:
        start = time.perf_counter()
        out = estimator_variance(trainer, batches, n_boot=n_boot)
        out["wall_s"] = {"warm_start": trainer.warm_s, "measure": time.perf_counter() - start}
        out["step"] = trainer.step
    return out


def run_args(run: Path) -> List[str]:
    """The keys of a training-study run that its folder names (``.../seed<k>/...``,
    ``.../honest/...``: bench_train's layout); others go after ``--``."""
    args = []
    for part in run.parts:
        if re.fullmatch(r"seed\d+", part):
            args += ["--seed", part[4:]]
        if part == "honest":
            args += ["--task.expert", "honest"]
    return args


def kind(name: str) -> str:
    """A point's group in the summary: a run folder's last part (``warm``, ``mapo``,
    ``grpo``: bench_train's layout), or ``warm start`` for a seed's warm start."""
    return "warm start" if name.startswith("warm start") else Path(name).name


def summarise(points: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Over all points and over each ``kind`` of point: the geometric means of the paired
    ratios with their 95% t-intervals (from the logs)."""
    groups: Dict[str, Dict[str, Dict[str, Any]]] = {"all points": points}
    for name, p in points.items():
        groups.setdefault(kind(name), {})[name] = p
    if len(groups) == 2:  # one kind: its group is the whole
        groups = {"all points": points}
    return {g: _summary(ps) for g, ps in groups.items()}


def _summary(points: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out = {}
    for key in ("var_ratio", "relative_var_ratio"):
        logs = [math.log(p["mapo"][key]) for p in points.values()
                if 0 < p["mapo"][key] < math.inf]
        iv = interval(logs)
        if iv["mean"] is None:
            out[key] = {"geo_mean": None, "lo": None, "hi": None, "n": 0}
            continue
        half = iv["ci95"] or 0.0
        out[key] = {"geo_mean": math.exp(iv["mean"]), "lo": math.exp(iv["mean"] - half)
                    if iv["ci95"] is not None else None,
                    "hi": math.exp(iv["mean"] + half) if iv["ci95"] is not None else None,
                    "n": iv["n"]}
    return out


def markdown(result: Dict[str, Any]) -> str:
    def ratio(m: Dict[str, float], key: str) -> str:
        return f"{m[key]:.3f} [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]"
    lines = [f"# Estimator variance, MAPO vs GRPO on the same rollouts ({result['tag']})", "",
             f"{result['batches']} rollout batches per point; gradient of the LM head and the "
             "last decoder layer; 95% bootstrap intervals over batches.", "",
             "| point | step | GRPO trace var | MAPO trace var | GRPO rel. var | MAPO rel. var "
             "| var ratio MAPO/GRPO | rel. var ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, p in result["points"].items():
        g, m = p["grpo"], p["mapo"]
        short = "/".join(Path(name).parts[-3:]) if "/" in name else name  # the run's layout
        lines.append(f"| {short} | {p['step']} | {g['trace_var']:.4g} | {m['trace_var']:.4g} | "
                     f"{g['relative_var']:.4g} | {m['relative_var']:.4g} | "
                     f"{ratio(m, 'var_ratio')} | {ratio(m, 'relative_var_ratio')} |")
    lines += ["", "Over points (geometric mean of the paired ratio MAPO/GRPO, 95% t-interval):",
              "", "| points | variance ratio | relative variance ratio |", "|---|---|---|"]
    for group, summary in result["summary"].items():
        cells = []
        for key in ("var_ratio", "relative_var_ratio"):
            s = summary[key]
            cells.append("n/a" if s["geo_mean"] is None else (
                f"{s['geo_mean']:.3f}" + ("" if s["lo"] is None else
                                          f" [{s['lo']:.3f}, {s['hi']:.3f}]")
                + f" (n={s['n']})"))
        lines.append(f"| {group} | {cells[0]} | {cells[1]} |")
    extra = " ".join(result.get("extra_args", []))
    lines += ["", f"Wall time: {result['wall_s']:.0f} s." + (f" Keys: `{extra}`." if extra
                                                              else "")]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bench_variance.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--runs", type=Path, nargs="*", default=[])
    p.add_argument("--report", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--from-json", type=Path, default=None,
                   help="rewrite the report of a saved result (no measurement)")
    a = p.parse_args(argv)
    if a.from_json is not None:
        result = json.loads(a.from_json.read_text())
        result["summary"] = summarise(result["points"])
        a.from_json.write_text(json.dumps(result, indent=1) + "\n")
        a.from_json.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    if a.seeds < 1 or a.batches < 3:
        p.error(f"--seeds must be >= 1 and --batches >= 3, got {a.seeds} and {a.batches}")
    todo = points(p, a.runs, a.seeds)
    start = time.perf_counter()
    measured: Dict[str, Dict[str, Any]] = {}
    for i, (name, args, run) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {name} ...", flush=True)
        measured[name] = measure(args + extra, a.batches, run)
        m = measured[name]["mapo"]
        print(f"    var ratio MAPO/GRPO {m['var_ratio']:.3f} [{m['var_ratio_lo']:.3f}, "
              f"{m['var_ratio_hi']:.3f}]", flush=True)
    result = {"tag": a.tag, "batches": a.batches, "extra_args": extra, "points": measured,
              "summary": summarise(measured), "wall_s": time.perf_counter() - start}
    write_json_md(a.report / f"estimator-variance-{a.tag}", result, markdown(result))


if __name__ == "__main__":
    main()
