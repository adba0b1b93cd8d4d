"""Ahead-of-time compile check of every Triton kernel for GPU targets, on any machine (no GPU).

Each case of ``CASES`` (every launch configuration the launchers can choose, from the kernel
modules' ``compile_cases()``) is compiled with ``triton.compile`` for a target such as sm_90;
the cubin's resource usage (``cuobjdump --dump-resource-usage``: registers, stack frame and
local memory bytes per thread, static shared memory) plus Triton's dynamic shared memory are
checked against the target: it compiles, shared memory fits, no stack frame or local memory
(where ptxas puts register spills) on the default configurations (``ALLOW_SPILLS`` lists
exceptions with their reason), and on sm_90 a half-precision ``tl.dot`` on a tile of at least
64 rows becomes wgmma.

    python -m mapo_fast.kernels.compile_check [--full] [--targets 90,80] [--json F] [--md F]
                                               [--page docs/guides/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

# Triton 3.9 warns when this is unset; 1 is its default (and the launches' behaviour)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import advantage, crop_zoom, linear_logprob, linear_logprob_chunked, paged_attention
from ._compile import CompileCase, collect

#: Shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TARGETS = (90, 80)
#: (kernel, label) -> why local memory is accepted there (none today).
ALLOW_SPILLS: Dict[tuple, str] = {}


def cases() -> List[CompileCase]:
    return collect(linear_logprob.compile_cases, linear_logprob_chunked.compile_cases,
                   paged_attention.compile_cases, advantage.compile_cases,
                   crop_zoom.compile_cases)


@dataclass
class Result:
    kernel: str
    config: str
    target: int
    num_warps: int
    num_stages: int
    registers: int
    local_bytes: int
    shared_bytes: int
    wgmma: bool
    seconds: float
    default: bool
    problems: List[str]
    ints: str = "unaligned"  # INT_ALIGNMENTS


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``{"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}`` of the cubin's (single)
    kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if "REG:" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", line)}


#: How integer arguments are specialised: ``unaligned`` (none a multiple of 16, the
#: conservative case) and ``aligned`` (every one a multiple of 16, as the JIT marks them at real
#: sizes: hidden 3584, head_dim 128, their strides); a launch specialises a mix in between.
INT_ALIGNMENTS = ("unaligned", "aligned")


def jit_attrs(case: CompileCase, ints: str = "unaligned") -> Dict[tuple, list]:
    """The specialisation Triton's JIT gives a launch: every pointer argument 16-byte aligned
    (``tt.divisibility`` 16, which lets loads vectorise), as torch's allocators align every
    tensor this package launches on; integer arguments (sizes, strides) marked multiples of
    16 too when ``ints`` is ``aligned`` (``INT_ALIGNMENTS``)."""
    names = case.kernel.arg_names
    aligned = ("*",) + (("i32", "i64") if ints == "aligned" else ())
    return {(names.index(k),): [["tt.divisibility", 16]]
            for k, t in case.signature.items() if t.startswith(aligned)}


def compile_case(case: CompileCase, target: int, ints: str = "unaligned") -> Result:
    sig = dict(case.signature, **{k: "constexpr" for k in case.constexprs})
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(case.kernel, sig, constexprs=case.constexprs,
                                      attrs=jit_attrs(case, ints)),
                            target=GPUTarget("cuda", target, 32),
                            options={"num_warps": case.num_warps,
                                     "num_stages": case.num_stages})
    seconds = time.perf_counter() - t0
    use = resource_usage(kernel.asm["cubin"])
    shared = int(kernel.metadata.shared) + use.get("SHARED", 0)
    ptx = kernel.asm["ptx"]
    res = Result(case.name, case.label, target, case.num_warps, case.num_stages, use["REG"],
                 use.get("STACK", 0) + use.get("LOCAL", 0), shared, "wgmma" in ptx,
                 round(seconds, 2), case.default, [], ints)
    res.problems = problems(case, res)
    if case.no_mma and re.search(r"\b(wgmma|mma)\.", ptx):
        res.problems.append("tensor-core instructions in a kernel that must stay exact fp32")
    return res


def problems(case: CompileCase, res: Result) -> List[str]:
    out = []
    if res.shared_bytes > SHARED_LIMIT[res.target]:
        out.append(f"shared memory {res.shared_bytes} B > {SHARED_LIMIT[res.target]} B")
    if res.local_bytes and case.default and (res.kernel, res.config) not in ALLOW_SPILLS:
        out.append(f"{res.local_bytes} B of stack / local memory per thread (register spills)")
    if res.target >= 90 and case.wgmma and not res.wgmma:
        out.append("no wgmma for a half-precision tl.dot of >= 64 rows on sm_90")
    return out


def _compile_index(job: tuple) -> Result:
    """One compile of the selection; a case that does not compile is a result with that
    problem (the matrix goes on)."""
    i, target, full, ints = job
    case = _selected(full)[i]
    try:
        return compile_case(case, target, ints)
    except Exception as err:  # any compiler error is this case's finding
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return Result(case.name, case.label, target, case.num_warps, case.num_stages, 0, 0, 0,
                      False, 0.0, case.default, [f"does not compile: {first}"], ints)


def _selected(full: bool) -> List[CompileCase]:
    return [c for c in cases() if full or c.default]


def run(targets: Sequence[int] = TARGETS, full: bool = False, progress: bool = True,
        workers: Optional[int] = None) -> List[Result]:
    """Compiles the default cases (every case with ``full``) for each target, in ``workers``
    processes (default: one per CPU core); the default cases both ways of
    ``INT_ALIGNMENTS``, the others with unaligned integers."""
    selected = _selected(full)
    todo = [(i, t, full, ints) for t in targets for i, c in enumerate(selected)
            if not c.targets or t in c.targets
            for ints in (INT_ALIGNMENTS if c.default else INT_ALIGNMENTS[:1])]
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    results = []
    with ctx.Pool(workers) as pool:
        for res in pool.imap(_compile_index, todo):
            results.append(res)
            if progress:
                print(f"\r[{len(results)}/{len(todo)}] sm_{res.target} {res.kernel} "
                      f"{res.config}".ljust(79), end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results


def markdown(results: Sequence[Result]) -> str:
    lines = [f"Triton {triton.__version__}, torch {torch.__version__}; spill B = stack frame + "
             "local memory per thread (where register spills go); shared = dynamic + static.",
             "Pointers are 16-byte aligned; integer arguments (sizes, strides) are compiled as "
             "none a multiple of 16 and as all multiples of 16 (the two ends of what the JIT "
             "specialises).",
             "", "| kernel | config | target | ints | warps / stages | registers | spill B | "
             "shared KB | wgmma | problems |", "|---|---|---|---|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.config}{'' if r.default else ' (full)'} | "
                     f"sm_{r.target} | {r.ints} | {r.num_warps} / {r.num_stages} | "
                     f"{r.registers} | "
                     f"{r.local_bytes} | {r.shared_bytes / 1024:.1f} | "
                     f"{'yes' if r.wgmma else '-'} | {'; '.join(r.problems) or 'ok'} |")
    return "\n".join(lines) + "\n"


PAGE_BEGIN, PAGE_END = "<!-- compile-table -->", "<!-- /compile-table -->"


def update_page(path: str, results: Sequence[Result]) -> bool:
    """Puts the default configurations' table between the compile-table markers of the page
    at ``path`` (the documentation's GPU guide); False when the markers are absent."""
    with open(path) as f:
        text = f.read()
    if PAGE_BEGIN not in text or PAGE_END not in text:
        return False
    head, rest = text.split(PAGE_BEGIN, 1)
    tail = rest.split(PAGE_END, 1)[1]
    table = markdown([r for r in results if r.default])
    with open(path, "w") as f:
        f.write(f"{head}{PAGE_BEGIN}\n{table}{PAGE_END}{tail}")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every flag combination, not only "
                    "the default configurations")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)),
                    help="compute capabilities, comma-separated (default %(default)s)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--workers", type=int, help="compile processes (default: CPU cores)")
    ap.add_argument("--page", help="put the default configurations' table into this "
                    "markdown page (between its compile-table markers)")
    args = ap.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    bad = [t for t in targets if t not in SHARED_LIMIT]
    if bad:
        ap.error(f"--targets: {bad} not in {sorted(SHARED_LIMIT)}")
    results = run(targets, args.full, workers=args.workers)
    table = markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    if args.page and not update_page(args.page, results):
        print(f"{args.page}: no compile-table markers; not updated", file=sys.stderr)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
