"""Console scripts. ``mapo-bench``: run the benchmarks of bench/ and write their reports."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional


def _bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def bench_main(argv: Optional[List[str]] = None) -> None:
    """``mapo-bench [--quick | --scale quick|cpu|gpu] [--only NAME] [--out DIR]``, or
    ``mapo-bench --gpu-check`` (``bench/gpu_check``)."""
    script = _bench_dir() / "run.py"
    if not script.is_file():
        sys.exit("mapo-bench: the benchmarks live in the source tree (bench/run.py), which this "
                 f"installation does not have ({script} is missing); install with "
                 "`pip install -e .` from a checkout.")
    sys.argv = [str(script)] + list(sys.argv[1:] if argv is None else argv)
    runpy.run_path(str(script), run_name="__main__")


#: ``mapo-train --help``'s text above the keys (plain text: it is read in a terminal)
TRAIN_USAGE = """usage: mapo-train [--config FILE.yaml] [--KEY VALUE ...]

Trains a vision-language agent with MAPO end to end: rollouts with the zoom tool, outcome
rewards and the semantic verifier, the MAPO advantage, the fused loss. With no arguments: a
tiny Qwen2.5-VL on the built-in visual-search task (warm start, then MAPO), written to
runs/mapo. Keys are dotted (--rollout.group_size 8); a YAML file given with --config sets
them too, and the command line wins.

keys, their defaults and what they do:"""


def train_help() -> str:
    """``mapo-train --help``: the usage, then every key with its default and its help."""
    from .trainer.config import reference
    lines = [TRAIN_USAGE]
    for key, _, default, text in reference():
        lines.append(f"  --{key} {default!r}\n      {text}")
    return "\n".join(lines)


def train_main(argv: Optional[List[str]] = None) -> None:
    """``mapo-train [--config FILE.yaml] [--key value ...]``: the MAPO loop end to end. With no
    arguments: a tiny Qwen2.5-VL on the built-in visual-search task, warm start then MAPO,
    writing ``runs/mapo``. Keys are dotted (``--rollout.group_size 8``); see
    ``mapo_fast.trainer.config``."""
    from .trainer import ConfigError, Trainer, parse_args
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(train_help())
        return
    try:
        cfg = parse_args(args)
        trainer = Trainer(cfg)
    except ConfigError as e:
        sys.exit(f"mapo-train: {e}")
    try:
        summary = trainer.run()
    except ConfigError as e:  # the data turned out unusable while training (records)
        sys.exit(f"mapo-train: {e}")
    trainer.dist.close()
    if trainer.dist.main:
        print(f"mapo-train: wrote {cfg.out}/metrics.jsonl, eval.json, curves.png and "
              f"checkpoints/ ({summary['wall_s']:.0f} s)")


def eval_parser() -> "argparse.ArgumentParser":
    """``mapo-eval``'s arguments (``mapo_fast.evaluation``)."""
    import argparse
    p = argparse.ArgumentParser(
        prog="mapo-eval", description="Evaluate a policy on a multiple-choice benchmark file "
        "(V* Bench or HR-Bench layout, JSONL or parquet) with the zoom tool: accuracy overall "
        "and per category with 95%% intervals, pass@k, tool calls, action accuracy where the "
        "file gives boxes. Writes OUT/report.json and OUT/report.md; a stopped run resumes.")
    p.add_argument("--model", required=True, help="a mapo-train checkpoint (.pt file or run "
                   "folder) or a Hugging Face Qwen2-VL / Qwen2.5-VL folder")
    p.add_argument("--data", required=True, help="the benchmark file (.jsonl or .parquet)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--image-root", default=None,
                   help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--samples", type=int, default=1,
                   help="draws per question; pass@k up to it (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per turn (default: the checkpoint's training value, or 512)")
    p.add_argument("--max-turns", type=int, default=None,
                   help="turns per question (default: the checkpoint's, or 4)")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="questions per rollout call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default="records", help="the system prompt: records (the "
                   "real-data protocol: zoom tool, descriptions, <answer>; default) or none "
                   "(as the built-in task trains)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--max-image-pixels", type=int, default=8192 * 8192,
                   help="larger images are skipped (from the header, before decoding)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:i]")
    return p


def eval_main(argv: Optional[List[str]] = None) -> None:
    """``mapo-eval --model PATH --data FILE [--out DIR] ...`` (``mapo-eval --help``)."""
    import torch

    from .evaluation import Benchmark, EvalSettings, Evaluation, load_policy
    a = eval_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(a.device if a.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.limit is not None and a.limit < 1:
        sys.exit(f"mapo-eval: `--limit` must be an int >= 1, got {a.limit}")
    try:
        settings = EvalSettings(samples=a.samples, temperature=a.temperature, top_p=a.top_p,
                                max_new_tokens=a.max_new_tokens, max_turns=a.max_turns,
                                min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                                batch_size=a.batch_size, seed=a.seed,
                                system=a.system).validate()
        bench = Benchmark(a.data, image_root=a.image_root, max_image_pixels=a.max_image_pixels,
                          limit=a.limit)
        run = Evaluation(load_policy(a.model, device), bench, a.out, settings)
    except (ValueError, OSError) as e:
        sys.exit(f"mapo-eval: {str(e).removeprefix('mapo-eval: ')}")
    report = run.run()
    o = report["overall"]
    if not o.get("questions"):
        sys.exit(f"mapo-eval: no question could be evaluated (skipped: "
                 f"{report['skipped_records']}); wrote {a.out}/report.md")
    lo, hi = o["accuracy_ci95"]
    print(f"mapo-eval: accuracy {o['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {o['questions']} "
          f"questions; wrote {a.out}/report.md, report.json, samples.jsonl")
