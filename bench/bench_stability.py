"""Training stability of MAPO and GRPO over a long run: the curves of a study's runs
(``bench/bench_train.py``, run with ``--steps`` several times the default) with bands over
seeds, and whether a run collapsed.

    python bench/bench_stability.py RUNS --tag TAG [--report DIR] [--window 10]

``RUNS`` is a study's ``--out`` folder (``RUNS/runs/hallucinating/seed<k>/{mapo,grpo}``).

Collapse, as defined before the runs: a run collapses when its final greedy evaluation's
accuracy lies below the best of its evaluations (after the warm start) by more than two
binomial standard errors of that best value at the evaluation's size (``2 sqrt(p (1 - p) /
n)``: about 0.035 at p = 0.8, n = 512). Reported per arm: the runs that collapsed, each run's
drawdown (best - final), and the per-seed paired difference of the final accuracy.

Curves (mean and 95% t-interval over seeds at every step all seeds have): the step records'
reward, accuracy, action accuracy, entropy and gradient norm (trailing means over
``--window`` steps), and the evaluations' accuracy and action accuracy. Writes
``DIR/stability-<tag>.json``, ``.md`` and ``.png`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import (ALGOS, band_points, eval_curve, fmt_interval, interval,  # noqa: E402
                         trailing)
from harness import write_json_md  # noqa: E402

#: Step-record curves (trailing means) and evaluation curves, with their labels.
STEP_CURVES = (("reward_mean", "reward"), ("accuracy", "accuracy (rollouts)"),
               ("action_accuracy", "action accuracy (rollouts)"), ("entropy", "entropy"),
               ("grad_norm", "gradient norm"))
EVAL_CURVES = (("accuracy", "eval accuracy"), ("action_accuracy", "eval action accuracy"))


def eval_points(summary: Dict[str, Any]) -> Dict[int, Dict[str, float]]:
    """``{step: evaluation}`` of a finished run (the warm start at 0, the final at its last
    step)."""
    return eval_curve(summary, summary["steps"])


def collapse(points: Dict[int, Dict[str, float]]) -> Dict[str, Any]:
    """The run's best evaluated accuracy after the warm start, its final one, the drawdown and
    whether it collapsed (see the module doc)."""
    after = {s: ev for s, ev in points.items() if s > 0}
    best_step = max(after, key=lambda s: after[s]["accuracy"])
    best = after[best_step]["accuracy"]
    final = after[max(after)]["accuracy"]
    n = after[max(after)].get("eval_size") or 1
    margin = 2 * math.sqrt(max(best * (1 - best), 0.0) / n)
    return {"best": best, "best_step": best_step, "final": final, "drawdown": best - final,
            "margin": margin, "collapsed": best - final > margin}


def load(runs: Path) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """``{arm: {seed: {"summary", "records"}}}`` of every finished run under ``runs``."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {a: {} for a in ALGOS}
    for folder in sorted((runs / "runs" / "hallucinating").glob("seed*")):
        seed = int(folder.name[4:])
        for arm in ALGOS:
            ev = folder / arm / "eval.json"
            if not ev.is_file():
                continue
            summary = json.loads(ev.read_text())
            if "final" not in summary.get("evals", {}):
                continue
            recs = [json.loads(line) for line in
                    (folder / arm / "metrics.jsonl").read_text().splitlines() if line.strip()]
            out[arm][seed] = {"summary": summary, "records": recs}
    return out


def bands(per_seed: List[Dict[int, float]]) -> Dict[str, Any]:
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    return {"steps": steps, "stats": [interval([c[s] for c in per_seed]) for s in steps]}


def analyse(runs: Path, window: int = 10) -> Dict[str, Any]:
    data = load(runs)
    seeds = sorted(set.intersection(*(set(d) for d in data.values()))) if data else []
    if len(seeds) < 2:
        raise SystemExit(f"bench_stability: {runs} has finished runs of both arms for "
                         f"{len(seeds)} seed(s); at least 2 are needed")
    res: Dict[str, Any] = {"seeds": seeds, "window": window, "arms": {}}
    for arm in ALGOS:
        runs_ = [data[arm][s] for s in seeds]
        per = {s: collapse(eval_points(r["summary"])) for s, r in zip(seeds, runs_)}
        curves = {key: bands([trailing(r["records"], key, window) for r in runs_])
                  for key, _ in STEP_CURVES}
        curves.update({f"eval_{key}": bands([{s: ev[key] for s, ev in
                                              eval_points(r["summary"]).items()}
                                             for r in runs_]) for key, _ in EVAL_CURVES})
        res["arms"][arm] = {"per_seed": per,
                            "collapsed": sum(p["collapsed"] for p in per.values()),
                            "drawdown": interval([p["drawdown"] for p in per.values()]),
                            "final_accuracy": interval([p["final"] for p in per.values()]),
                            "best_accuracy": interval([p["best"] for p in per.values()]),
                            "steps": runs_[0]["summary"]["steps"], "curves": curves}
    finals = {a: [res["arms"][a]["per_seed"][s]["final"] for s in seeds] for a in ALGOS}
    res["paired_final_accuracy"] = interval([m - g for m, g in zip(finals["mapo"],
                                                                   finals["grpo"])])
    return res


def markdown(res: Dict[str, Any], command: str) -> str:
    lines = [f"# Training stability: {res['tag']}", "", f"Command: `{command}`. Seeds "
             f"{res['seeds']}; {res['arms']['mapo']['steps']} RL steps per run. A run collapses "
             "when its final evaluated accuracy lies below its best evaluation by more than two "
             "binomial standard errors of the best (decided before the runs). Mean ± half-width "
             "of the 95% t-interval over seeds.", "",
             "| arm | runs collapsed | best eval accuracy | final eval accuracy | drawdown "
             "(best - final) |", "|---|---:|---:|---:|---:|"]
    for arm, a in res["arms"].items():
        lines.append(f"| {arm} | {a['collapsed']} of {len(res['seeds'])} | "
                     + " | ".join(fmt_interval(a[k]) for k in ("best_accuracy", "final_accuracy",
                                                               "drawdown")) + " |")
    paired = fmt_interval(res["paired_final_accuracy"])
    lines += ["", f"Paired final accuracy, MAPO - GRPO: {paired}.",
              "", "Per seed (best at step / final; collapsed marked *):", "",
              "| seed | " + " | ".join(res["arms"]) + " |", "|---:|" + "---|" * len(res["arms"])]
    for s in res["seeds"]:
        cells = []
        for a in res["arms"].values():
            p = a["per_seed"][s]
            cells.append(f"{p['best']:.3f} @ {p['best_step']} / {p['final']:.3f}"
                         + (" *" if p["collapsed"] else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Curves that are shares (their bands are clipped to [0, 1]; every band is clipped at 0).
SHARES = ("accuracy", "action_accuracy", "eval_accuracy", "eval_action_accuracy")


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(STEP_CURVES) + [(f"eval_{k}", label) for k, label in EVAL_CURVES]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(flat, panels):
        for arm, colour in zip(ALGOS, ("tab:red", "tab:blue")):
            xs, ms, hw = band_points(res["arms"][arm]["curves"][key])
            if not xs:
                continue
            top = 1.0 if key in SHARES else float("inf")
            ax.plot(xs, ms, color=colour, label=arm, marker="." if len(xs) < 20 else None)
            ax.fill_between(xs, [max(m - h, 0.0) for m, h in zip(ms, hw)],
                            [min(m + h, top) for m, h in zip(ms, hw)], color=colour, alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in SHARES:
            ax.set_ylim(-0.02, 1.02)
    flat[0].legend(fontsize=8)
    fig.suptitle(f"Stability over {res['arms']['mapo']['steps']} steps: mean and 95% interval "
                 f"over seeds {res['seeds']} (trailing means over {res['window']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench_stability.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path)
    p.add_argument("--tag", required=True)
    p.add_argument("--report", type=Path, default=HERE / "results")
    p.add_argument("--window", type=int, default=10)
    a = p.parse_args(argv)
    if a.window < 1:
        p.error(f"--window must be >= 1, got {a.window}")
    res = analyse(a.runs, a.window)
    res["tag"] = a.tag
    command = "python bench/bench_stability.py RUNS --tag " + a.tag
    stem = a.report / f"stability-{a.tag}"
    write_json_md(stem, res, markdown(res, command))
    plot(res, stem.with_suffix(".png"))
    return res


if __name__ == "__main__":
    main()
