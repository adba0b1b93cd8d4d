"""MkDocs hook: pages whose content is made from the sources at build time, so that they can
never drift from them.

``<!-- mapo:eval-help -->`` becomes ``mapo-eval --help``. ``<!-- mapo:cli-reference -->`` becomes the table of every ``mapo-train`` key, its type, default
and help, from ``mapo_fast/trainer/config.py`` (``reference()``: the same source as
``mapo-train --help``). ``<!-- mapo:compat NAME -->`` (``VERL``, ``TRL``) becomes the tested
version range and the table of private symbols an integration touches, from
``mapo_fast/integrations/_compat.py`` (the list ``register()`` / the trainer check). Both
modules are loaded from their files: they import only the standard library, so the site builds
without torch.

The figures of ``bench/results/*.png`` are added to the site as ``figures/<name>.png`` (they
live beside their reports, outside ``docs/``), so that pages show them:
``![...](../figures/loss-cpu.png)``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- mapo:cli-reference -->"
EVAL_MARKER = "<!-- mapo:eval-help -->"
COMPAT_MARKER = re.compile(r"<!-- mapo:compat (\w+) -->")


def _load(relative: str, name: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def _config_module():
    return _load("mapo_fast/trainer/config.py", "_mapo_config_for_docs")


def compat_table(name: str) -> str:
    """The tested range and the private-symbol table of ``_compat.<name>``."""
    fw = getattr(_load("mapo_fast/integrations/_compat.py", "_mapo_compat_for_docs"), name)
    lo, hi = fw.tested
    rows = [f"Tested with {fw.name} >= {lo}, < {hi}.", "", "| symbol | what the integration "
            "does with it |", "|---|---|"]
    rows += [f"| `{spec.replace(':', '.')}` | {purpose.replace('|', '/')} |"
             for spec, purpose in fw.private]
    return "\n".join(rows) + "\n"


def cli_table() -> str:
    """The markdown table of every key (grouped by section)."""
    rows = _config_module().reference()
    out, section = [], None
    for key, kind, default, text in rows:
        head = key.split(".")[0] if "." in key else "top level"
        if head != section:
            section = head
            out += ["", f"### `{head}`" if head != "top level" else "### Top level", "",
                    "| key | type | default | what it does |", "|---|---|---|---|"]
        shown = "none" if default is None else repr(default)
        out.append(f"| `--{key}` | {kind} | `{shown}` | {text.replace('|', '/')} |")
    return "\n".join(out).strip() + "\n"


def on_files(files, config):
    """``bench/results/*.png`` as ``figures/*.png`` of the site."""
    from mkdocs.structure.files import File
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files


def eval_help() -> str:
    """``mapo-eval --help`` as a text block (``mapo_fast/cli.py``: standard library only)."""
    import os
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
    text = _load("mapo_fast/cli.py", "_mapo_cli_for_docs").eval_parser().format_help()
    return "```text\n" + text.rstrip() + "\n```\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_table())
    if EVAL_MARKER in markdown:
        markdown = markdown.replace(EVAL_MARKER, eval_help())
    return COMPAT_MARKER.sub(lambda m: compat_table(m.group(1)), markdown)
