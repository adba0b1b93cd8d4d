"""Console scripts. ``mapo-bench``: run the benchmarks of bench/ and write their reports."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional


def _bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def bench_main(argv: Optional[List[str]] = None) -> None:
    """``mapo-bench [--quick | --scale quick|cpu|gpu] [--only NAME] [--out DIR]``."""
    script = _bench_dir() / "run.py"
    if not script.is_file():
        sys.exit("mapo-bench: the benchmarks live in the source tree (bench/run.py), which this "
                 f"installation does not have ({script} is missing); install with "
                 "`pip install -e .` from a checkout.")
    sys.argv = [str(script)] + list(sys.argv[1:] if argv is None else argv)
    runpy.run_path(str(script), run_name="__main__")
