"""What a warm-started policy answers from the overview alone and after a perfect zoom, before
any RL run: the check of a task option (e.g. ``--task.detail checker``, the zoom-only task)
that the overview cannot answer and the zoom can.

    python bench/bench_task_check.py [--seeds 5] [--runs WARM_DIR ...] [--report DIR]
                                     [--tag cpu-checker] [-- extra mapo-train keys]
    python bench/bench_task_check.py --from-json bench/results/task-check-cpu-checker.json
    python bench/bench_task_check.py --merge A.json B.json --tag TAG   # checks run in parallel

At each point (a warm start of seeds ``0 .. seeds-1``, or the checkpoint of each ``--runs``
folder, e.g. the training study's ``.../seed<k>/warm``, copied, never changed) the held-out
split is evaluated greedily four ways (``Trainer.evaluate(opening)``): ``free`` (the policy
as is), ``no_zoom`` (its first turn opens the answer: the overview and its tint are all it
has, in a turn the expert never writes), ``wrong_zoom`` (its first turn is the call above or
below the target, the expert's kind of miss: the crop shows a distractor) and ``right_zoom``
(the call on the target's quadrant); the policy describes and answers. Next to them:
``hint_reliability``, the share of those samples whose tint is the answer (the ceiling of
answering from the overview when the overview hides the colour).
Writes ``DIR/task-check-<tag>.json`` and ``.md`` (default ``bench/results``): per point, and
means with 95% t-intervals over points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import interval  # noqa: E402
from bench_variance import points, trainer_at  # noqa: E402
from harness import split_passthrough, write_json_md  # noqa: E402

WAYS = ("free", "no_zoom", "wrong_zoom", "right_zoom")
SHOWN = ("accuracy", "action_accuracy", "tool_use")
#: The gate before an accuracy study: a perfect zoom answers at least this often ...
GATE_PERFECT = 0.95
#: ... the policy's own first turn leaves room for RL to act on: at least this share of its
#: answers come after a missed zoom (right or wrong), i.e. action accuracy at most 1 minus it
GATE_ROOM = 0.05


def gate(p: Dict[str, Any]) -> Dict[str, Any]:
    """The gate of one point (written down before any RL run): ``perfect_zoom`` (a forced
    right zoom answers >= ``GATE_PERFECT``), ``missed_zoom`` (a forced miss answers at the
    overview's shortcut or below: at most the tint's reliability on these samples plus two
    binomial standard errors), ``room`` (the free policy misses the target on >= ``GATE_ROOM``
    of the samples, or answers right after a miss that often) and ``holds`` (all three)."""
    n = p["free"]["eval_size"]
    tint = p["hint_reliability"]
    margin = 2 * (tint * (1 - tint) / n) ** 0.5
    free = p["free"]
    room = (1 - (free.get("action_accuracy") or 0.0)) >= GATE_ROOM or \
        (free.get("right_answer_wrong_action") or 0.0) >= GATE_ROOM
    out = {"perfect_zoom": p["right_zoom"]["accuracy"] >= GATE_PERFECT,
           "missed_zoom": p["wrong_zoom"]["accuracy"] <= tint + margin, "room": bool(room)}
    out["holds"] = all(out.values())
    return out


def measure(args: List[str], resume_from: Optional[Path] = None) -> Dict[str, Any]:
    """One point (``bench_variance.trainer_at``), evaluated each of the ``WAYS``."""
    with trainer_at(args, resume_from) as trainer:
        if not hasattr(trainer.task, "opening"):
            raise SystemExit("bench_task_check: needs the built-in task (task.name "
                             "'visual_search')")
        start = time.perf_counter()
        out: Dict[str, Any] = {w: trainer.evaluate(None if w == "free" else w) for w in WAYS}
        samples = trainer.task.batch("eval", 0, out["free"]["eval_size"])
        out["hint_reliability"] = sum(s.hint == s.answer for s in samples) / len(samples)
        out["wall_s"] = trainer.warm_s + time.perf_counter() - start
    return out


def summarise(points: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Means with 95% t-intervals over points of each way's shown metrics and the hint's
    reliability."""
    ps = list(points.values())
    out: Dict[str, Any] = {w: {m: interval([p[w].get(m) for p in ps]) for m in SHOWN}
                           for w in WAYS}
    out["hint_reliability"] = interval([p["hint_reliability"] for p in ps])
    return out


def merge(results: List[Dict[str, Any]], tag: str) -> Dict[str, Any]:
    """One result of the points of ``results`` (made with the same keys), summarised again;
    ``wall_s`` is the sum of theirs (CPU time, when they ran in parallel)."""
    keys = {tuple(r["extra_args"]) for r in results}
    if len(keys) != 1:
        raise SystemExit(f"bench_task_check --merge: the results were made with different "
                         f"keys: {sorted(keys)}")
    points: Dict[str, Dict[str, Any]] = {}
    for r in results:
        points.update(r["points"])
    return {"tag": tag, "extra_args": results[0]["extra_args"], "points": points,
            "summary": summarise(points), "wall_s": sum(r["wall_s"] for r in results)}


def _fmt(iv: Dict[str, Any]) -> str:
    if iv["mean"] is None:
        return "n/a"
    return f"{iv['mean']:.3f}" + ("" if iv["ci95"] is None else f" ± {iv['ci95']:.3f}")


def markdown(result: Dict[str, Any]) -> str:
    s = result["summary"]
    extra = " ".join(result["extra_args"])
    lines = [f"# Task check ({result['tag']})", "",
             f"Keys: `{extra or '(defaults)'}`; {len(result['points'])} points; "
             f"{result['wall_s']:.0f} s. Greedy evaluation on the held-out split; "
             "mean ± half-width of the 95% t-interval over points.", "",
             "| evaluation | accuracy | action accuracy | tool use |", "|---|---|---|---|"]
    names = {"free": "the policy as is", "no_zoom": "no zoom (forced to answer at once)",
             "wrong_zoom": "a missed zoom (forced call above / below the target)",
             "right_zoom": "a perfect zoom (forced call on the target's quadrant)"}
    for w in WAYS:
        lines.append(f"| {names[w]} | " + " | ".join(_fmt(s[w][m]) for m in SHOWN) + " |")
    lines += ["", f"The tint names the answer on {_fmt(s['hint_reliability'])} of these "
                  "samples (the ceiling of answering from the overview alone, when it hides "
                  "the colour).", "",
              f"The gate (per point): a perfect zoom answers >= {GATE_PERFECT}; a missed zoom "
              "answers at most the tint's reliability (+ 2 binomial standard errors); the free "
              f"policy misses the target on >= {GATE_ROOM} of samples (room for RL). Accuracy "
              "per point:", "",
              "| point | free | no zoom | missed zoom | right zoom | tint right | free action "
              "accuracy | gate |", "|---|---|---|---|---|---|---|---|"]
    for name, p in result["points"].items():
        short = "/".join(Path(name).parts[-3:]) if "/" in name else name
        g = gate(p)
        failed = [k for k in ("perfect_zoom", "missed_zoom", "room") if not g[k]]
        act = p["free"].get("action_accuracy")
        lines.append(f"| {short} | " + " | ".join(f"{p[w]['accuracy']:.3f}" for w in WAYS)
                     + f" | {p['hint_reliability']:.3f} | "
                     + ("n/a" if act is None else f"{act:.3f}")
                     + f" | {'holds' if g['holds'] else 'fails: ' + ', '.join(failed)} |")
    held = sum(gate(p)["holds"] for p in result["points"].values())
    lines += ["", f"The gate holds on {held} of {len(result['points'])} points."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bench_task_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--runs", type=Path, nargs="*", default=[])
    p.add_argument("--report", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="cpu-checker")
    p.add_argument("--from-json", type=Path, default=None,
                   help="rewrite the report of a saved result (no measurement)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="one report of the points of several saved results (checks run in "
                        "parallel processes), written with --tag (no measurement)")
    a = p.parse_args(argv)
    if a.merge is not None:
        merged = merge([json.loads(path.read_text()) for path in a.merge], a.tag)
        write_json_md(a.report / f"task-check-{a.tag}", merged, markdown(merged))
        return
    if a.from_json is not None:
        result = json.loads(a.from_json.read_text())
        a.from_json.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    todo = points(p, a.runs, a.seeds)
    start = time.perf_counter()
    measured: Dict[str, Dict[str, Any]] = {}
    for i, (name, args, run) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {name} ...", flush=True)
        measured[name] = m = measure(args + extra, run)
        print("    accuracy " + ", ".join(f"{w} {m[w]['accuracy']:.3f}" for w in WAYS)
              + f"; tint right {m['hint_reliability']:.3f}", flush=True)
    result = {"tag": a.tag, "extra_args": extra, "points": measured,
              "summary": summarise(measured), "wall_s": time.perf_counter() - start}
    write_json_md(a.report / f"task-check-{a.tag}", result, markdown(result))


if __name__ == "__main__":
    main()
