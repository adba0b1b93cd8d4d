"""Benchmark harness: time and peak memory of side-by-side cases in one process, device and
version provenance, and JSON + markdown + PNG reports.

Peak memory is the peak *beyond what existed before the call* (inputs are allocated first),
taken on a separate, untimed call: on CUDA from the caching allocator's peak statistics; on
CPU in a fresh subprocess (``memory_in_subprocess``) from its peak resident set (reset through
``/proc/self/clear_refs``, read from ``VmHWM``). Times are medians over repeats after a
warm-up call, in this process with the allocator in its normal regime; compare ratios within
one run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

MiB = 1024 * 1024


def device_info(device: torch.device) -> Dict[str, str]:
    info = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device_name"] = _cpu_name()
    from importlib import metadata
    for dist, key in (("triton", "triton"), ("liger-kernel", "liger_kernel"),
                      ("transformers", "transformers"), ("mapo_fast", "mapo_fast")):
        try:
            info[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # optional peers: absent is fine
            pass
    return info


def device_slug(device: torch.device) -> str:
    """A short file-name tag for the device: ``cpu``, ``h100``, ``h200``, ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|a100|l40s|b200|rtx\s?\w+|\w+)", name.replace("nvidia ", ""))
    return m.group(1).replace(" ", "") if m else "cuda"


MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def memory_in_subprocess(script: Path, args: List[str]) -> Optional[float]:
    """Peak extra MiB of one case, measured by ``script args --memory-only`` in a fresh process
    whose glibc maps every allocation over 128 KiB on allocation and unmaps it on free (set
    from the start through ``MALLOC_MMAP_THRESHOLD_``): its resident set then follows live
    tensors, and freed blocks cannot hide new allocations. Timing runs stay in the parent,
    with the allocator in its normal regime."""
    env = dict(os.environ, **MMAP_ENV)
    proc = subprocess.run([sys.executable, str(script), *args, "--memory-only"], env=env,
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_extra_mib"]
    print(f"    memory measurement failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    return None


def report_memory(fn: Callable[[], None], device: torch.device,
                  reset: Optional[Callable[[], None]] = None) -> None:
    """The ``--memory-only`` side: one warm-up call, then one measured call; prints JSON."""
    if reset:
        reset()
    fn()
    if reset:
        reset()
    with PeakMemory(device) as pm:
        fn()
    print(json.dumps({"peak_extra_mib": None if pm.peak_extra is None
                      else pm.peak_extra / MiB}), flush=True)


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        if m:
            return f"{m.group(1).strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _rss_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(field_name + r":\s+(\d+)", text).group(1))


class PeakMemory:
    """Context manager measuring the peak bytes allocated beyond the level at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_extra: Optional[int] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif sys.platform.startswith("linux"):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        else:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak_extra = _rss_kib("VmHWM") * 1024 - self.base
        return False


@dataclass
class CaseResult:
    name: str
    times_ms: List[float]
    peak_extra_mib: Optional[float]
    notes: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, fn: Callable[[], None], device: torch.device, *, repeats: int = 3,
            warmup: int = 1, reset: Optional[Callable[[], None]] = None, notes: str = "",
            memory: Optional[Callable[[], Optional[float]]] = None,
            peak_memory: bool = True) -> CaseResult:
    """Runs ``fn`` ``warmup`` times, then ``repeats`` timed times. Peak memory (unless
    ``peak_memory`` is False): on CUDA from a separate untimed call here; elsewhere from
    ``memory()`` (e.g. ``memory_in_subprocess``). ``reset`` runs before every call, untimed
    (e.g. to drop ``.grad``)."""
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    _sync(device)
    peak = None
    if peak_memory and device.type == "cuda":
        if reset:
            reset()
        with PeakMemory(device) as pm:
            fn()
        peak = pm.peak_extra / MiB
    elif peak_memory and memory is not None:
        peak = memory()
    times = []
    for _ in range(repeats):
        if reset:
            reset()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return CaseResult(name, times, peak, notes)


def parse_args(doc: str, scales: Dict, argv=None, options: Optional[Dict[str, Dict]] = None):
    """The command line every benchmark module shares: ``--scale --device --repeats --out
    --tag``, plus the hidden ``--workload --case --memory-only`` of ``memory_in_subprocess``
    and a module's own ``options`` (flag -> ``add_argument`` keywords)."""
    import argparse
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in (options or {}).items():
        p.add_argument(flag, **kw)
    p.add_argument("--scale", choices=sorted(scales), default="cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default=None, help="file name tag (default: device and scale)")
    p.add_argument("--workload", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    a.tag = a.tag or f"{a.device.type}-{a.scale}"
    return a


def main(doc: str, scales: Dict, run: Callable, argv=None,
         memory_case: Optional[Callable] = None,
         options: Optional[Dict[str, Dict]] = None) -> None:
    """A benchmark module's entry point: ``run(scale, device, repeats, out, tag, **own)``
    writes the report (``own``: the values of the module's ``options``); with
    ``--memory-only``, ``memory_case(args)`` measures one case for ``memory_in_subprocess``."""
    a = parse_args(doc, scales, argv, options)
    if a.memory_only:
        memory_case(a)
        return
    own = {flag.lstrip("-").replace("-", "_"): None for flag in options or {}}
    own = {k: getattr(a, k) for k in own}
    paths = run(a.scale, a.device, a.repeats, a.out, a.tag, **own)
    print(f"wrote {', '.join(str(v) for v in paths.values())}")


def split_passthrough(argv: List[str]) -> Tuple[List[str], List[str]]:
    """``(own, passed)``: the arguments before ``--`` and those after it (passed on, e.g. to
    ``mapo-train``)."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return list(argv[:i]), list(argv[i + 1:])


def write_json_md(stem: Path, result: object, md: str) -> None:
    """``stem.json`` (``result``) and ``stem.md`` (``md``), the folder made; ``md`` printed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)


def run_with_package(package_dir: str, script: Path, args: List[str], tag: str) -> Dict:
    """Runs benchmark ``script`` with ``args`` in a subprocess whose ``mapo_fast`` is the
    package in ``package_dir`` (a directory holding ``mapo_fast/``, e.g. another revision's
    checkout); returns its JSON report."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_dir,
                                                           str(script.resolve().parent)]))
        subprocess.run([sys.executable, str(script.resolve()), *args, "--out", tmp, "--tag",
                        tag], env=env, check=True, cwd=tmp)
        report = next(Path(tmp).glob(f"*-{tag}.json"))
        return json.loads(report.read_text())


def write_report(name: str, title: str, results: List[Dict], info: Dict[str, str],
                 out_dir: Path, baseline: str, description: str = "",
                 extra: Optional[Dict] = None, extra_md: str = "") -> Dict[str, Path]:
    """Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir``.

    ``results``: one dict per workload with ``workload`` (str) and ``cases`` (list of
    ``CaseResult``); ratios are against the case named ``baseline`` (when a workload has it).
    ``extra`` goes into the JSON as is, ``extra_md`` into the markdown after the tables.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "title": title, "info": info, "baseline": baseline,
               "description": description, "workloads": [], "extra": extra or {}}
    lines = [f"# {title}", "", description, "",
             f"Measured on **{info.get('device_name')}** ({info['device']}), torch "
             f"{info['torch']}, Python {info['python']}"
             + "".join(f", {k} {info[k]}" for k in ("triton", "liger_kernel") if k in info)
             + ".", ""]
    for wl in results:
        cases: List[CaseResult] = wl["cases"]
        base = next((c for c in cases if c.name == baseline), None)
        payload["workloads"].append({
            "workload": wl["workload"],
            "cases": [dict(asdict(c), median_ms=c.median_ms) for c in cases]})
        lines += [f"## {wl['workload']}", "",
                  f"| case | median time (ms) | time / {baseline} | peak extra memory (MiB) "
                  f"| memory / {baseline} | notes |",
                  "|---|---:|---:|---:|---:|---|"]
        for c in cases:
            tr = f"{c.median_ms / base.median_ms:.2f}x" if base else "-"
            mem = "-" if c.peak_extra_mib is None else f"{c.peak_extra_mib:.0f}"
            mr = "-" if (base is None or c.peak_extra_mib is None or not base.peak_extra_mib) \
                else f"{c.peak_extra_mib / base.peak_extra_mib:.2f}x"
            lines.append(f"| {c.name} | {c.median_ms:.1f} | {tr} | {mem} | {mr} | {c.notes} |")
        lines.append("")
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md",
             "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    if extra_md:
        lines += [extra_md, ""]
    lines.append(f"![{title}]({paths['png'].name})")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(results, title, info, paths["png"])
    return paths


def _value(ms: float) -> str:
    """A bar's label: ``12,345 ms``, ``3.1 ms``, ``0.61 ms``."""
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2g} ms"


def replot(json_path: Path) -> Path:
    """Draws ``<name>.png`` again from a report's ``<name>.json`` (``write_report``'s), with
    the current figure layout; nothing is measured."""
    data = json.loads(Path(json_path).read_text())
    results = [{"workload": wl["workload"],
                "cases": [CaseResult(c["name"], list(c.get("times_ms") or [c["median_ms"]]),
                                     c.get("peak_extra_mib"), c.get("notes", ""))
                          for c in wl["cases"]]} for wl in data["workloads"]]
    png = Path(json_path).with_suffix(".png")
    _plot(results, data["title"], data["info"], png)
    return png


def _plot(results: List[Dict], title: str, info: Dict[str, str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # the memory column only where some case measured memory
    memory = any(c.peak_extra_mib is not None for wl in results for c in wl["cases"])
    fig, axes = plt.subplots(len(results), 2 if memory else 1,
                             figsize=(11 if memory else 9.5, 2.2 + 1.6 * len(results)),
                             squeeze=False)
    for row, wl in zip(axes, results):
        cases: List[CaseResult] = wl["cases"]
        names = [c.name for c in cases]
        bars = row[0].barh(names, [c.median_ms for c in cases], color="#4c72b0")
        row[0].bar_label(bars, labels=[_value(c.median_ms) for c in cases], padding=3,
                         fontsize=8)  # the value, also where a bar is too short to see
        row[0].margins(x=0.12)
        row[0].set_xlabel("median time (ms), lower is better")
        row[0].xaxis.set_major_locator(MaxNLocator(nbins=4))  # tick labels that never overlap
        if memory:
            mems = [c.peak_extra_mib or 0.0 for c in cases]
            bars = row[1].barh(names, mems, color="#dd8452")
            row[1].bar_label(bars, labels=["-" if c.peak_extra_mib is None else
                                           f"{c.peak_extra_mib:,.0f} MiB" for c in cases],
                             padding=3, fontsize=8)
            row[1].margins(x=0.15)
            row[1].set_xlabel("peak extra memory (MiB), lower is better")
        row[0].set_title(textwrap.fill(wl["workload"], 120), loc="left", fontsize=9)
        for ax in row:
            ax.invert_yaxis()
    fig.suptitle(f"{title} — {info.get('device_name')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
