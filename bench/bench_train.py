"""The training study: MAPO vs GRPO over seeds on the built-in task, with the honest-expert
control, reported as means with 95% intervals and paired differences.

    python bench/bench_train.py [--seeds 5] [--control-seeds N] [--jobs N] [--out RUNS]
                                [--report DIR] [--warm-only] [--arms mapo grpo]
                                [--seed-list K ...] [-- extra mapo-train keys]
    mapo-bench --only train [--quick]

For each expert (``hallucinating``, the default task, and ``honest``, the control) and seed,
one warm start (``mapo-train --steps 0``) is run once, and its checkpoint starts both a MAPO
and a GRPO run (``--resume``): the two algorithms of a seed start from identical weights, RNG
states and data order, so their difference is paired. Runs go in parallel processes (``--jobs``,
default the core count, each with ``cores / jobs`` threads), each in its own folder under
``RUNS/runs/<expert>/seed<k>/<warm|mapo|grpo>`` (default ``runs/train-study``) with its log;
a rerun skips finished runs and resumes interrupted ones from their checkpoints. The report
(``DIR/train-study-<tag>.json``, ``.md`` and ``.png``, default ``bench/results``) holds, per
expert and algorithm, each metric's mean and 95% t-interval over seeds, the paired difference
MAPO - GRPO with its interval, and bands over steps. ``--arms mapo`` runs one arm only (e.g.
an ablation whose other arm is compared from another study, ``compare_studies.py``);
``--seed-list 7 5 0`` runs those seeds instead of ``0 .. seeds-1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

HERE = Path(__file__).resolve().parent
EXPERTS = ("hallucinating", "honest")
#: The study's arms (both by default; ``--arms`` picks).
ALGOS = ("mapo", "grpo")
#: Final-evaluation metrics of the report, and the step-record curve.
METRICS = ("accuracy", "action_accuracy", "faithfulness", "right_answer_wrong_action",
           "semantic_score")
CURVES = (("accuracy", "eval accuracy"), ("action_accuracy", "eval action accuracy"),
          ("faithfulness", "eval faithfulness"),
          ("grad_var", "relative gradient variance\n(groups resampled within a step)"))
#: Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
SCALES = {"quick": dict(seeds=2, args=["--warm_start.steps", "4", "--steps", "2",
                                       "--task.eval_size", "8", "--eval_every", "1",
                                       "--rollout.prompts_per_step", "4",
                                       "--rollout.group_size", "2",
                                       "--warm_start.batch_size", "4"]),
          "cpu": dict(seeds=5, args=[]), "gpu": dict(seeds=5, args=[])}


def interval(xs: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and the half-width of its two-sided 95% Student-t interval (None for n < 2)."""
    xs = [float(x) for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    t = T975[n - 2] if n - 1 <= len(T975) else 1.960
    return {"mean": mean, "ci95": t * statistics.stdev(xs) / math.sqrt(n), "n": n}


@dataclass
class Run:
    """One ``mapo-train`` process: ``kind`` is ``warm``, ``mapo`` or ``grpo``."""
    expert: str
    seed: int
    kind: str
    folder: Path
    args: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.expert}/seed{self.seed}/{self.kind}"

    def summary(self) -> Optional[Dict[str, Any]]:
        path = self.folder / "eval.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if "final" in data.get("evals", {}) else None

    def command(self, warm: Optional["Run"]) -> List[str]:
        cmd = [sys.executable, "-m", "mapo_fast.trainer", "--out", str(self.folder),
               "--seed", str(self.seed), "--task.expert", self.expert] + self.args
        if self.kind == "warm":
            return cmd + ["--steps", "0"]
        cmd += ["--algo", self.kind]
        ck = self.folder / "checkpoints"
        if not any(ck.glob("step_*.pt")):
            ck.mkdir(parents=True, exist_ok=True)
            for name in ("step_000000.pt", "step_000000.pt.sha256"):  # with its digest
                shutil.copy(warm.folder / "checkpoints" / name, ck / name)
        return cmd + ["--resume"]


def plan(out: Path, seeds: Union[int, Sequence[int]], experts: Sequence[str],
         args: List[str], control_seeds: Optional[int] = None,
         arms: Sequence[str] = ALGOS) -> List[Run]:
    """Every run of the study, in the order they start: the default task's seeds first.
    ``seeds``: a count (seeds ``0 .. seeds-1``) or the seeds themselves."""
    runs = []
    for expert in experts:
        n = seeds if expert != "honest" or control_seeds is None else control_seeds
        for seed in (range(n) if isinstance(n, int) else n):
            base = out / "runs" / expert / f"seed{seed}"
            runs += [Run(expert, seed, kind, base / kind, args)
                     for kind in ("warm",) + tuple(arms)]
    return runs


def execute(runs: List[Run], jobs: int, progress: bool = True) -> Dict[str, str]:
    """Runs what is not finished, ``jobs`` at a time, each RL run after its warm start.
    Returns ``{run name: error}`` for the runs that failed (their logs say why)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    warm = {(r.expert, r.seed): r for r in runs if r.kind == "warm"}
    todo = [r for r in runs if r.summary() is None]
    failed: Dict[str, str] = {}
    running: Dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="training study")
    try:
        while todo or running:
            for r in list(todo):
                if len(running) >= jobs:
                    break
                w = warm[(r.expert, r.seed)]
                if r.kind != "warm":
                    if w.name in failed:
                        failed[r.name] = f"its warm start failed ({w.name})"
                        todo.remove(r)
                        continue
                    if w.summary() is None:
                        continue
                r.folder.mkdir(parents=True, exist_ok=True)
                log = open(r.folder / "log.txt", "a")
                running[r.name] = (r, subprocess.Popen(r.command(w), stdout=log,
                                                       stderr=subprocess.STDOUT, env=env), log)
                todo.remove(r)
            time.sleep(0.5)
            for name, (r, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0 or r.summary() is None:
                    failed[name] = f"exit {proc.returncode}; see {r.folder / 'log.txt'}"
                if bar is not None:
                    bar.update(1)
    except BaseException:  # interrupted: stop the runs (they resume from their
        for _, proc, log in running.values():  # checkpoints on the next call)
            proc.terminate()
            proc.wait()
            log.close()
        raise
    if bar is not None:
        bar.close()
    return failed


def eval_curve(summary: Dict[str, Any], steps: int) -> Dict[int, Dict[str, float]]:
    """``{step: evaluation}`` from a run's evaluations (warm start at 0, final at ``steps``)."""
    out = {}
    for key, ev in summary["evals"].items():
        step = 0 if key == "warm_start" else steps if key == "final" else int(key[5:])
        out[step] = ev
    return out


def trailing(records: List[Dict[str, Any]], key: str, window: int) -> Dict[int, float]:
    """``{step: mean of key over the last window steps}`` of a run's step records (one
    step's value is noisy); steps without a value are skipped."""
    vals = [(r["step"], r.get(key)) for r in records]
    out = {}
    for i, (step, _) in enumerate(vals):
        xs = [v for _, v in vals[max(0, i - window + 1):i + 1] if v is not None]
        if xs:
            out[step] = sum(xs) / len(xs)
    return out


def grad_var_curve(folder: Path, window: int = 10) -> Dict[int, float]:
    """The step records' relative gradient variance, as a trailing mean over ``window``
    steps."""
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return trailing(recs, "grad_var", window)


def aggregate(runs: List[Run]) -> Dict[str, Any]:
    """Per expert: per algorithm each final metric over seeds (mean, 95% interval), the
    warm-start evaluation, the paired difference MAPO - GRPO, and the bands over steps."""
    out: Dict[str, Any] = {}
    for expert in sorted({r.expert for r in runs}, key=EXPERTS.index):
        mine = [r for r in runs if r.expert == expert]
        seeds = sorted({r.seed for r in mine
                        if all(x.summary() is not None for x in mine if x.seed == r.seed)})
        by = {(r.kind, r.seed): r for r in mine}
        res: Dict[str, Any] = {"seeds": seeds, "algos": {}, "paired_difference": {}}
        arms = [a for a in ALGOS if any(r.kind == a for r in mine)]
        warm = [by[("warm", s)].summary()["evals"]["warm_start"] for s in seeds]
        res["warm_start"] = {m: interval([w.get(m) for w in warm]) for m in METRICS}
        res["warm_start_per_seed"] = {m: [w.get(m) for w in warm] for m in METRICS}
        per: Dict[str, Dict[str, List[Optional[float]]]] = {}
        for algo in arms:
            sums = [by[(algo, s)].summary() for s in seeds]
            vals = {m: [x["evals"]["final"].get(m) for x in sums] for m in METRICS}
            vals["mean_grad_var"] = [x.get("mean_grad_var") for x in sums]
            vals["wall_s"] = [x["wall_s"] for x in sums]
            per[algo] = vals
            res["algos"][algo] = {"per_seed": vals,
                                  **{m: interval(v) for m, v in vals.items()},
                                  "bands": bands([by[(algo, s)] for s in seeds], sums)}
        for m in list(METRICS) + ["mean_grad_var"] if len(arms) == 2 else []:
            diffs = [a - b for a, b in zip(per["mapo"][m], per["grpo"][m])
                     if a is not None and b is not None]
            res["paired_difference"][m] = dict(interval(diffs), per_seed=diffs)
        out[expert] = res
    return out


def bands(runs: List[Run], sums: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and 95% interval over seeds at every step each curve has in all seeds."""
    out = {}
    curves = [eval_curve(s, s["steps"]) for s in sums]
    for key, _ in CURVES:
        if key == "grad_var":
            per_seed = [grad_var_curve(r.folder) for r in runs]
        else:
            per_seed = [{k: v.get(key) for k, v in c.items()} for c in curves]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        out[key] = {"steps": steps,
                    "stats": [interval([c[s] for c in per_seed]) for s in steps]}
    return out


def fmt_interval(iv: Dict[str, Optional[float]], digits: int = 3) -> str:
    """``mean ± half-width`` of an ``interval`` (the mean alone without one, ``-`` without
    a mean)."""
    if iv["mean"] is None:
        return "-"
    if iv["ci95"] is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} ± {iv['ci95']:.{digits}f}"


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Training study: MAPO vs GRPO ({result['info']['device_name']})", "",
             f"Command: `{result['command']}`; {result['jobs']} runs in parallel; "
             f"{result['span_s'] / 60:.0f} min from the first run's start to the last one's end "
             f"({result['run_s_total'] / 60:.0f} min of runs in all). Values: mean "
             "± half-width of the 95% t-interval over seeds; differences are paired (same seed, "
             "same warm start).", ""]
    names = {"hallucinating": "Default task (hallucinating expert: the reasoning-action gap)",
             "honest": "Control (honest expert: no gap)"}
    task_keys = " ".join(result.get("args", []))
    if "--task." in task_keys:  # another task than the default: say which
        names = {e: f"{e.capitalize()} expert, task keys `{task_keys}`" for e in EXPERTS}
    cols = list(METRICS) + ["mean_grad_var"]
    for expert, res in result["experts"].items():
        lines += [f"## {names.get(expert, expert)}", "",
                  f"Seeds: {res['seeds']}. Warm start (shared by both arms): "
                  + ", ".join(f"{m} {fmt_interval(res['warm_start'][m])}" for m in METRICS), "",
                  "| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for algo, a in res["algos"].items():
            lines.append(f"| {algo} | " + " | ".join(fmt_interval(a[m]) for m in cols) + " |")
        if res["paired_difference"]:
            lines.append("| MAPO - GRPO | " + " | ".join(
                fmt_interval(res["paired_difference"][m]) for m in cols) + " |")
        lines += ["", "Per seed (final evaluation; accuracy / action accuracy / faithfulness):",
                  "", "| seed | " + " | ".join(res["algos"]) + " |",
                  "|---:|" + "---|" * len(res["algos"])]
        for k, seed in enumerate(res["seeds"]):
            cells = []
            for a in res["algos"].values():
                v = [a["per_seed"][m][k] for m in ("accuracy", "action_accuracy",
                                                   "faithfulness")]
                cells.append(" / ".join("-" if x is None else f"{x:.3f}" for x in v))
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("failed"):
        lines += ["Failed runs (excluded):", ""] + [f"- {k}: {v}"
                                                     for k, v in result["failed"].items()]
    return "\n".join(lines) + "\n"


def band_points(band: Dict[str, Any]) -> Tuple[List[int], List[float], List[float]]:
    """``(steps, means, half-widths)`` of a band's points that have a mean (a half-width of 0
    where there is no interval)."""
    pts = [(s, st) for s, st in zip(band["steps"], band["stats"]) if st["mean"] is not None]
    return ([p[0] for p in pts], [p[1]["mean"] for p in pts],
            [p[1]["ci95"] or 0.0 for p in pts])


def plot(result: Dict[str, Any], path: Path) -> None:
    """One figure: a row per expert, a panel per curve, MAPO and GRPO bands on the same axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    experts = list(result["experts"])
    fig, axes = plt.subplots(len(experts), len(CURVES), figsize=(4 * len(CURVES),
                                                                 3.2 * len(experts)),
                             squeeze=False)
    for row, expert in zip(axes, experts):
        for ax, (key, label) in zip(row, CURVES):
            for algo, colour in zip(ALGOS, ("tab:red", "tab:blue")):
                if algo not in result["experts"][expert]["algos"]:
                    continue
                xs, ms, hw = band_points(result["experts"][expert]["algos"][algo]["bands"][key])
                if not xs:
                    continue
                ax.plot(xs, ms, color=colour, label=algo, marker="." if len(xs) < 20 else None)
                # shares stay in [0, 1]; a variance band stays above a tenth of its mean
                lo = [max(m - h, 0.0 if key != "grad_var" else m / 10) for m, h in zip(ms, hw)]
                hi = [min(m + h, 1.0) if key != "grad_var" else m + h for m, h in zip(ms, hw)]
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.2)
            ax.set_title(f"{label}\n({expert} expert)", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if key == "grad_var":
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.02, 1.02)
        if row[0].get_legend_handles_labels()[0]:
            row[0].legend(fontsize=8)
    fig.suptitle("MAPO vs GRPO: mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def study(out: Path, seeds: Union[int, Sequence[int]], jobs: int, args: List[str], tag: str,
          experts: Sequence[str] = EXPERTS, progress: bool = True,
          control_seeds: Optional[int] = None, report: Optional[Path] = None,
          launch: bool = True, arms: Sequence[str] = ALGOS) -> Dict[str, Path]:
    """Runs (or completes) the study's runs under ``out`` and writes its report to ``report``
    (default ``out``); returns the report's paths. ``seeds``: a count or the seeds
    themselves; ``control_seeds``: seeds of the honest-expert control (default ``seeds``);
    ``launch=False`` reports what is finished without starting any run; ``arms``: the arms
    run (both by default)."""
    from harness import device_info
    import torch
    if not isinstance(seeds, int):
        seeds = list(seeds)
        if len(seeds) < 2 or len(set(seeds)) != len(seeds) or not all(
                isinstance(s, int) and 0 <= s < 2 ** 32 for s in seeds):
            raise ValueError(f"bench_train: `seeds` as a list must hold two or more distinct "
                             f"seeds in [0, 2**32), got {seeds!r}")
    for name, n in (("seeds", seeds), ("control_seeds", control_seeds)):
        if n is not None and not isinstance(n, list) and (not isinstance(n, int) or n < 2):
            raise ValueError(f"bench_train: `{name}` must be an int >= 2 for an interval, got "
                             f"{n!r}")
    if jobs < 1:
        raise ValueError(f"bench_train: `jobs` must be >= 1, got {jobs}")
    bad = [e for e in experts if e not in EXPERTS]
    if bad:
        raise ValueError(f"bench_train: unknown experts {bad}; valid: {list(EXPERTS)}")
    if not arms or any(a not in ALGOS for a in arms) or len(set(arms)) != len(arms):
        raise ValueError(f"bench_train: `arms` must be distinct names from {list(ALGOS)}, got "
                         f"{list(arms)}")
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(out, seeds, experts, args, control_seeds, arms)
    t0 = time.perf_counter()
    failed = execute(runs, jobs, progress) if launch else {}
    flags = (["--seeds", str(seeds)] if isinstance(seeds, int) else
             ["--seed-list", *map(str, seeds)]) + ([] if control_seeds is None else
                                        ["--control-seeds", str(control_seeds)]) \
        + ([] if tuple(experts) == EXPERTS else ["--experts", *experts]) \
        + ([] if tuple(arms) == ALGOS else ["--arms", *arms])
    result = {"study": "train", "seeds": seeds, "control_seeds": control_seeds or seeds,
              "jobs": jobs, "args": args,
              "command": " ".join(["python bench/bench_train.py", *flags]
                                  + (["--", *args] if args else [])),
              "wall_s": time.perf_counter() - t0, "failed": failed,
              "info": device_info(torch.device("cpu")), "experts": aggregate(runs)}
    done = [(r.folder / "eval.json", r.summary()) for r in runs if r.summary() is not None]
    ends = [p.stat().st_mtime for p, _ in done]
    result["span_s"] = max(ends) - min(e - x["wall_s"] for e, (_, x) in zip(ends, done)) \
        if done else 0.0  # from the first run's start to the last run's end, over invocations
    result["run_s_total"] = sum(x["wall_s"] for _, x in done)
    report = out if report is None else report
    report.mkdir(parents=True, exist_ok=True)
    stem = report / f"train-study-{tag}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"),
             "png": stem.with_suffix(".png")}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def run(scale: str, device, repeats: int, out: Path, tag: str) -> Dict[str, Path]:
    """``mapo-bench --only train``: the study at ``scale`` (``quick``: 2 seeds, toy sizes),
    its runs under ``runs/``, its report in ``out``."""
    s = SCALES[scale]
    runs = HERE.parent / "runs" / ("train-study" if scale != "quick" else "train-study-quick")
    return study(runs, s["seeds"], max(1, os.cpu_count() or 1), list(s["args"]), tag,
                 report=out)


def main(argv: Optional[List[str]] = None) -> None:
    from harness import split_passthrough
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--control-seeds", type=int, default=None,
                   help="seeds of the honest-expert control (default: --seeds)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--experts", nargs="+", default=list(EXPERTS), choices=EXPERTS)
    p.add_argument("--out", type=Path, default=HERE.parent / "runs" / "train-study",
                   help="folder of the runs (checkpoints, logs)")
    p.add_argument("--report", type=Path, default=HERE / "results",
                   help="folder of the report (JSON, markdown, figure)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--report-only", action="store_true",
                   help="report the seeds whose runs are finished; start no run")
    p.add_argument("--seed-list", type=int, nargs="+", default=None,
                   help="these seeds instead of 0 .. --seeds - 1")
    p.add_argument("--arms", nargs="+", default=list(ALGOS), choices=ALGOS,
                   help="the arms to run (default both)")
    p.add_argument("--warm-only", action="store_true",
                   help="run the warm starts only (e.g. to check them before any RL run)")
    a = p.parse_args(argv)
    seeds = a.seeds if a.seed_list is None else a.seed_list
    if a.warm_only:
        warm = [r for r in plan(a.out, seeds, a.experts, extra, a.control_seeds)
                if r.kind == "warm"]
        failed = execute(warm, a.jobs)
        sys.exit(f"failed: {failed}" if failed else None)
    try:
        paths = study(a.out, seeds, a.jobs, extra, a.tag, a.experts,
                      control_seeds=a.control_seeds, report=a.report,
                      launch=not a.report_only, arms=a.arms)
    except ValueError as e:
        sys.exit(str(e))
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
