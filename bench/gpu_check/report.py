"""The report: the result record, each section's markdown, the whole page."""

from __future__ import annotations

from typing import Dict, List

import torch
from harness import device_info

from .sections import SECTIONS

def new_result(toy: bool, dev: torch.device) -> Dict:
    """An empty report: the device, versions, no section yet."""
    import triton
    info = dict(device_info(dev), triton=triton.__version__)
    return {"toy": toy, "info": info, "sections": {}, "complete": False, "ok": True}


def add_section(result: Dict, name: str, section: Dict) -> None:
    """``section`` into ``result``, in ``SECTIONS``' order; ``ok`` and ``complete`` (every
    section has a result) updated."""
    result["sections"][name] = section
    result["sections"] = {n: result["sections"][n] for n in SECTIONS
                          if n in result["sections"]}
    result["ok"] = all(sec["ok"] for sec in result["sections"].values())
    result["complete"] = set(SECTIONS) <= set(result["sections"])


def section_markdown(name: str, sec: Dict) -> List[str]:
    """A section's markdown: its verdict and time, its checks, its timings against the
    fastest (or its error)."""
    lines = [f"## {name}: {'ok' if sec['ok'] else 'FAILED'} ({sec['seconds']} s)", ""]
    if "error" in sec:
        return lines + ["```", sec["error"].strip(), "```", ""]
    lines.append(f"sizes: {sec.get('sizes')}")
    for key in ("errors", "max_level_diff", "max_abs_err", "tolerance", "auto_choice",
                "copy_gbps", "new_tokens_per_s", "allocator", "decode_mode", "per_decode_step",
                "greedy_equal", "first_divergence", "update_changed_tokens",
                "graphs_captured"):
        if key in sec:
            lines.append(f"{key}: {sec[key]}")
    ms = sec.get("ms", {})
    if ms:
        base = min(ms.values())
        lines += ["", "| case | ms | vs fastest |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.3f} | {v / base:.2f}x |" for k, v in ms.items()]
    return lines + [""]


def markdown(result: Dict) -> str:
    """The whole report: the device and versions, the verdict, every section."""
    info = result["info"]
    missing = [n for n in SECTIONS if n not in result["sections"]]
    state = ("ok" if result["ok"] else "FAILED") + ("" if result["complete"] else
                                                   f" so far (INCOMPLETE: not run: "
                                                   f"{', '.join(missing)})")
    lines = [f"# GPU check — {info.get('device_name')}", "",
             f"torch {info['torch']}, Triton {info.get('triton')}, CUDA {info.get('cuda', '-')}"
             f"{' — TOY SIZES' if result['toy'] else ''}; overall: {state}", ""]
    for name, sec in result["sections"].items():
        lines += section_markdown(name, sec)
    return "\n".join(lines)
