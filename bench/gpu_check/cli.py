"""The command line: every section (or some) in turn, each report written as it ends."""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from harness import device_slug

from .common import REAL, TOY, timer
from .report import add_section, markdown, new_result, section_markdown
from .sections import SECTIONS

def run(toy: bool, dev: torch.device, repeats: int, only: Optional[List[str]] = None,
        on_section: Optional[Callable[[str, Dict], None]] = None,
        result: Optional[Dict] = None) -> Dict:
    """Every section (or ``only`` these) in turn, added to ``result`` (default: a new
    report); after each, ``on_section(name, result)`` with the result so far."""
    sz = TOY if toy else REAL
    measure = timer(dev, repeats)
    result = new_result(toy, dev) if result is None else result
    names = [n for n in SECTIONS if not only or n in only]
    for name in names:
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = SECTIONS[name](sz, dev, measure)
        except Exception:  # a broken section is recorded; the others still run
            res = {"ok": False, "error": traceback.format_exc()}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        add_section(result, name, res)
        if on_section is not None:
            on_section(name, result)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (0: every check held)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="toy sizes (CPU under TRITON_INTERPRET)")
    p.add_argument("--only", action="append", choices=list(SECTIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True,
                   help="folder for gpu-check-<device>.json and .md (e.g. bench/results)")
    p.add_argument("--append", action="store_true",
                   help="add the sections run to the report already in --out (one process "
                        "per section: bench/gpu_run.sh)")
    p.add_argument("--timed-out", metavar="SECTION", choices=list(SECTIONS),
                   help="record SECTION as stopped by its time limit (--after seconds) in the "
                        "report in --out, and exit 1")
    p.add_argument("--after", type=float, default=None, help="with --timed-out: its limit (s)")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not a.toy:
        p.error("no GPU here: run with --toy (and TRITON_INTERPRET=1) to exercise the command")
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"gpu-check-{device_slug(dev)}{'-toy' if a.toy else ''}"
    previous = json.loads(stem.with_suffix(".json").read_text()) \
        if (a.append or a.timed_out) and stem.with_suffix(".json").exists() else None

    def write(name: str, result: Dict) -> None:
        """Each section as it ends: its report on standard output, and both files rewritten
        with everything so far (a run cut short keeps what it measured)."""
        print("\n".join(section_markdown(name, result["sections"][name])), flush=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(result))
    if a.timed_out:
        result = previous or new_result(a.toy, dev)
        add_section(result, a.timed_out, {"ok": False, "seconds": a.after,
                                          "error": f"stopped by its time limit ({a.after} s)"})
        write(a.timed_out, result)
        return 1
    result = run(a.toy, dev, a.repeats, a.only, on_section=write, result=previous)
    print(f"[gpu-check] wrote {stem}.json and .md; overall "
          f"{'ok' if result['ok'] else 'FAILED'}"
          f"{'' if result['complete'] else ' (not every section has run)'}")
    return 0 if result["ok"] else 1
