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
    ``mapo-bench --gpu-check`` (``bench/gpu_check.py``)."""
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
