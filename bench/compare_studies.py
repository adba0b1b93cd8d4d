"""Paired differences between the arms of two training studies run on the same seeds
(``bench/bench_train.py`` reports), e.g. the description ablation: the study with the
description turn against the same recipe with ``--task.describe false``.

    python bench/compare_studies.py A.json B.json --name describe [--report DIR]

For every algorithm both studies ran and every final metric, the difference A - B per seed
(seeds both ran), its mean and 95% t-interval; also A's MAPO against B's GRPO; and, when the
reports hold each seed's warm start, the warm starts' difference and each algorithm's change
during RL (final - warm start) compared: what the RL phase itself did, apart from what the
warm starts brought. Writes
``DIR/compare-<name>.json`` and ``.md`` (default ``bench/results``). The seeds' warm starts
differ between the studies (each study's expert is its own), so each pair shares the seed:
the task's data, the vision pretraining and the RL sampling seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import METRICS, interval  # noqa: E402
from harness import write_json_md  # noqa: E402


def _by_seed(per: Dict[str, List[Optional[float]]], seeds: List[int]
             ) -> Dict[int, Dict[str, Optional[float]]]:
    """``{seed: {metric: value}}`` from ``{metric: [value per seed]}``."""
    return {s: {m: per[m][i] for m in METRICS if m in per} for i, s in enumerate(seeds)}


def _per_seed(study: Dict[str, Any], algo: str) -> Dict[int, Dict[str, Optional[float]]]:
    exp = study["experts"]["hallucinating"]
    return _by_seed(exp["algos"][algo]["per_seed"], exp["seeds"])


def _warm(study: Dict[str, Any]) -> Optional[Dict[int, Dict[str, Optional[float]]]]:
    exp = study["experts"]["hallucinating"]
    per = exp.get("warm_start_per_seed")
    return None if per is None else _by_seed(per, exp["seeds"])


def _row(ra: Dict[int, Dict[str, Any]], rb: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Per seed both hold, ``ra - rb`` of every metric: mean and 95% interval."""
    seeds = sorted(set(ra) & set(rb))
    row: Dict[str, Any] = {"seeds": seeds}
    for m in METRICS:
        diffs: List[float] = [ra[s][m] - rb[s][m] for s in seeds
                              if ra[s].get(m) is not None and rb[s].get(m) is not None]
        row[m] = interval(diffs)
    return row


def _change(final: Dict[int, Dict[str, Any]], warm: Dict[int, Dict[str, Any]]
            ) -> Dict[int, Dict[str, Optional[float]]]:
    """Per seed, final - warm start of every metric."""
    return {s: {m: None if final[s].get(m) is None or warm[s].get(m) is None
                else final[s][m] - warm[s][m] for m in METRICS}
            for s in final if s in warm}


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """``{"A algo - B algo": {metric: interval, "seeds": [...]}}`` over the seeds both ran,
    and with the warm starts known, ``"A warm start - B warm start"`` and ``"A algo (final -
    warm) - B algo (final - warm)"``."""
    pairs = [(x, x) for x in ("mapo", "grpo")] + [("mapo", "grpo")]
    out: Dict[str, Any] = {}
    for pa, pb in pairs:
        if pa not in a["experts"]["hallucinating"]["algos"] or \
                pb not in b["experts"]["hallucinating"]["algos"]:
            continue  # an arm one study did not run
        out[f"A {pa} - B {pb}"] = _row(_per_seed(a, pa), _per_seed(b, pb))
    wa, wb = _warm(a), _warm(b)
    if wa is None or wb is None:
        return out
    out["A warm start - B warm start"] = _row(wa, wb)
    for algo in ("mapo", "grpo"):
        if algo in a["experts"]["hallucinating"]["algos"] and \
                algo in b["experts"]["hallucinating"]["algos"]:
            out[f"A {algo} (final - warm) - B {algo} (final - warm)"] = _row(
                _change(_per_seed(a, algo), wa), _change(_per_seed(b, algo), wb))
    return out


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Paired comparison: {result['name']}", "",
             f"A: `{result['a_command']}`", "", f"B: `{result['b_command']}`", "",
             "Per seed A - B of the final greedy evaluation; mean ± half-width of the 95% "
             "t-interval over seeds.", "",
             "| pair | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name, row in result["pairs"].items():
        cells = []
        for m in METRICS:
            iv = row[m]
            cells.append("n/a" if iv["mean"] is None else f"{iv['mean']:+.3f}" + (
                "" if iv["ci95"] is None else f" ± {iv['ci95']:.3f}"))
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="compare_studies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--report", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    a, b = (json.loads(x.read_text()) for x in (args.a, args.b))
    result = {"name": args.name, "a": args.a.name, "b": args.b.name,
              "a_command": a.get("command"), "b_command": b.get("command"),
              "pairs": compare(a, b)}
    write_json_md(args.report / f"compare-{args.name}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
