"""The first thing to run on any GPU: CUDA-graph decode inside training (graph safety), every
kernel against its torch reference at real sizes, the timings that decide the design (fused vs
chunked loss vs the three-GEMM floor, paged decode vs its KV-read bandwidth floor and vs SDPA on
gathered KV, crops vs torch ``interpolate``, the advantage kernel vs its torch path, a rollout
of a random-weight ~0.5B Qwen2, its decode steps as CUDA graphs vs eager), written to
``<out>/gpu-check-<device>.json`` and ``.md``. ``bench/gpu_run.sh`` runs each section in its
own process with its own time limit (``--append``), then the compile check.

    python -m gpu_check --out DIR          (from bench/; or: mapo-bench --gpu-check)
    python -m gpu_check --toy --out DIR    toy sizes; on CPU under TRITON_INTERPRET=1

Runs from a source checkout with the machine's own torch and Triton (no install, no download):
the checkout's ``mapo_fast`` is put on the path when the package is not installed, and the
rollout uses the C++ block manager when it is built, else its Python model. Each section is
independent: a failure is recorded (with its traceback) and the next section runs; the exit
status is 1 when any check failed. Each section's report goes to standard output as it ends,
and both files are rewritten after every section (``complete`` says whether every section
has a result), so a run cut short keeps what it measured. The rollout section also checks
greedy tokens against the eager torch path (Hugging Face's ``generate``) on a float32 copy
of the same model; the decode-graph section checks graph-replayed greedy tokens against the
engine's eager steps and counts launches and kernels per decode step both ways. A file per
section (``loss``, ``paged``, ``crops``, ``advantage``, ``rollout``), the report
(``report``) and the command line (``cli``); every timing through ``harness.measure``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # bench/
ROOT = HERE.parent


def bootstrap() -> None:
    """Makes the checkout's ``mapo_fast`` importable when the package is not installed, and
    ``bench/`` (the report harness) importable."""
    if importlib.util.find_spec("mapo_fast") is None:
        sys.path.insert(0, str(ROOT))
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


bootstrap()

from .cli import SECTIONS, main, run  # noqa: E402

__all__ = ["SECTIONS", "main", "run"]
