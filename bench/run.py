"""Runs every benchmark in bench/ at one scale and writes their reports (JSON + markdown +
PNG, with device and versions) to bench/results/, plus an index, RESULTS.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_advantage  # noqa: E402
import bench_allocator  # noqa: E402
import bench_loss  # noqa: E402
import bench_rollout  # noqa: E402
import bench_tools  # noqa: E402
import bench_train  # noqa: E402
from harness import device_slug  # noqa: E402

BENCHMARKS = {"loss": bench_loss, "tools": bench_tools, "advantage": bench_advantage,
              "allocator": bench_allocator, "rollout": bench_rollout, "train": bench_train}
#: Run when no --only is given; the training study (about an hour on 2 cores) only on request.
DEFAULT = ("advantage", "allocator", "loss", "rollout", "tools")


def reports(out: Path):
    """``(path, data)`` of every benchmark report in ``out`` (JSON files written by
    ``harness.write_report``; other JSON there, such as training results, is skipped)."""
    for js in sorted(out.glob("*.json")):
        data = json.loads(js.read_text())
        if isinstance(data, dict) and "benchmark" in data and "info" in data:
            yield js, data


def write_index(out: Path) -> Path:
    """RESULTS.md: every report found in ``out``, newest figures per file, with provenance."""
    lines = ["# Benchmark results", "",
             "Each row links the report it comes from; every JSON file records the device, "
             "versions and all timings.", ""]
    for js, data in reports(out):
        info = data["info"]
        lines.append(f"- [{data['title']}]({js.with_suffix('.md').name}) — "
                     f"{info.get('device_name')} ({info['device']}), torch {info['torch']}")
    for js in sorted(out.glob("train-study-*.json")):  # bench_train.py's seed studies
        data = json.loads(js.read_text())
        if isinstance(data, dict) and data.get("study") == "train":
            info = data["info"]
            lines.append(f"- [Training study: MAPO vs GRPO over seeds]"
                         f"({js.with_suffix('.md').name}) — {info.get('device_name')} "
                         f"({info['device']}), torch {info['torch']}")
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


README = HERE.parent / "README.md"
BEGIN, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def readme_table(out: Path) -> str:
    """Markdown tables of every JSON report in ``out``, each saying where it was measured."""
    parts = []
    for js, data in reports(out):
        info = data["info"]
        parts.append(f"**{data['title']}** — measured on {info.get('device_name')} "
                     f"({info['device']}), torch {info['torch']}; source: "
                     f"[`bench/results/{js.name}`](bench/results/{js.name})")
        for wl in data["workloads"]:
            cases = wl["cases"]
            base = next((c for c in cases if c["name"] == data["baseline"]), None)
            parts += ["", f"{wl['workload']}:", "",
                      f"| case | time (ms) | time vs {data['baseline']} | peak extra memory (MiB) "
                      "| notes |",
                      "|---|---:|---:|---:|---|"]
            for c in cases:
                ratio = f"{c['median_ms'] / base['median_ms']:.2f}x" if base else "-"
                mem = "-" if c["peak_extra_mib"] is None else f"{c['peak_extra_mib']:.0f}"
                parts.append(f"| {c['name']} | {_ms(c['median_ms'])} | {ratio} | {mem} "
                             f"| {c.get('notes', '')} |")
        parts.append("")
    return "\n".join(parts)


def update_readme(out: Path, readme: Path = README) -> bool:
    """Replaces the block between the bench-table markers of the README; False if absent."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if BEGIN not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    readme.write_text(f"{head}{BEGIN}\n{readme_table(out)}\n{END}{tail}")
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="mapo-bench", description=__doc__)
    p.add_argument("--scale", choices=["quick", "cpu", "gpu"], default=None,
                   help="workload size (default: gpu on CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="same as --scale quick (CPU minutes)")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                   help="run only these benchmarks (repeatable); `train` (the MAPO vs GRPO "
                        "seed study, bench/bench_train.py) runs only when named")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--gpu-check", action="store_true",
                   help="run bench/gpu_check.py instead (the first thing to run on a GPU); "
                        "with --quick: its toy sizes")
    a = p.parse_args(argv)
    if a.gpu_check:
        import gpu_check
        sys.exit(gpu_check.main(["--out", str(a.out), "--repeats", str(a.repeats)]
                                + (["--toy"] if a.quick else [])))
    device = torch.device(a.device)
    scale = "quick" if a.quick else (a.scale or ("gpu" if device.type == "cuda" else "cpu"))
    for name in a.only or DEFAULT:
        print(f"[{name}] scale={scale} device={device}", flush=True)
        default_scale = "gpu" if device.type == "cuda" else "cpu"
        tag = device_slug(device) + ("" if scale == default_scale else f"-{scale}")
        paths = BENCHMARKS[name].run(scale, device, a.repeats, a.out, tag)
        print(f"[{name}] wrote {paths['md']}", flush=True)
    print(f"index: {write_index(a.out)}")
    if a.out.resolve() == (HERE / "results").resolve() and update_readme(a.out):
        print(f"updated the benchmark table of {README}")


if __name__ == "__main__":
    main()
