"""Evaluation on multiple-choice benchmarks of high-resolution images (V* Bench, HR-Bench):
``Benchmark`` reads a file in their layouts, ``Evaluation`` rolls a policy out on it with the
zoom tool and writes the report (``mapo-eval``)."""

from .benchmark import Benchmark, BenchItem
from .run import EvalSettings, Evaluation, Policy, load_policy, pass_at_k, wilson

__all__ = ["Benchmark", "BenchItem", "EvalSettings", "Evaluation", "Policy", "load_policy",
           "pass_at_k", "wilson"]
