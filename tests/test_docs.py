"""The documentation's generated parts stay true to their sources: every configuration key has
its help text (the source of `mapo-train --help` and of the CLI reference page), the build hook
renders every key, every page is in the site's navigation, and the README stays short."""

import importlib.util
import re
from pathlib import Path

from mapo_fast.trainer.config import reference

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_key_has_help():
    assert [key for key, _, _, text in reference() if not text.strip()] == []


def test_the_algo_help_names_every_registered_estimator():
    from mapo_fast.advantage import ADVANTAGE_ESTIMATORS
    text = dict((k, h) for k, _, _, h in reference())["algo"]
    assert [n for n in ADVANTAGE_ESTIMATORS if f"`{n}`" not in text] == []


def test_the_cli_page_lists_every_key_with_its_default():
    table = _hooks().cli_table()
    for key, _, default, _ in reference():
        shown = "none" if default is None else repr(default)
        assert f"| `--{key}` |" in table and f"`{shown}`" in table


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    listed = set(re.findall(r":\s+(\S+\.md)\s*$", nav, flags=re.M))
    assert pages == listed


def test_the_readme_stays_short():
    # about 110 of its lines are the three quickstart programs, shown whole
    assert len((ROOT / "README.md").read_text().splitlines()) <= 270


def glued_lists(text: str):
    """``(line, text)`` of every list item that follows a paragraph line with no blank line
    between (Markdown then renders the item as part of the paragraph, with a literal "- "),
    outside code blocks."""
    import re
    item = re.compile(r"^\s*([-*+]|\d+\.)\s")
    found, fence, prev = [], False, ""
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence, prev = not fence, line
            continue
        if fence:
            continue
        if item.match(line) and prev.strip() and not item.match(prev) and \
                not prev.startswith(" ") and not prev.lstrip().startswith(("|", "#", ">", "<")):
            found.append((n, line[:60]))
        prev = line
    return found


def test_no_list_is_glued_to_a_paragraph():
    pages = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    glued = {str(p.relative_to(ROOT)): glued_lists(p.read_text()) for p in pages}
    assert not {k: v for k, v in glued.items() if v}
    assert glued_lists("Text:\n- item\n") == [(2, "- item")]  # the check itself


def test_every_picture_on_a_page_exists():
    """``![...](path)`` on every page points at a file: a page's own folder, or ``figures/``,
    which the site serves from ``bench/results/`` (docs/hooks.py)."""
    import re
    missing, shown = [], 0
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            shown += 1
            path = (page.parent / target).resolve()
            rel = path.relative_to((ROOT / "docs").resolve()) if path.is_relative_to(
                (ROOT / "docs").resolve()) else None
            if rel is not None and rel.parts[0] == "figures":
                path = ROOT / "bench" / "results" / Path(*rel.parts[1:])
            if not path.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing
    assert shown >= 10  # the benchmark tables and the study show their figures
