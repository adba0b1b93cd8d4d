"""The benchmark harness writes its reports, the documentation's benchmark tables page is
generated from them, and the committed page is the one the committed reports generate."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import harness  # noqa: E402
import run  # noqa: E402


def test_report_and_tables_page(tmp_path):
    cases = [harness.measure("baseline", lambda: sum(range(1000)), torch.device("cpu"),
                             repeats=2, notes="plain"),
             harness.measure("mapo_fast", lambda: None, torch.device("cpu"), repeats=2)]
    info = harness.device_info(torch.device("cpu"))
    paths = harness.write_report("demo-cpu", "Demo", [{"workload": "w", "cases": cases}], info,
                                 tmp_path, baseline="mapo_fast", extra={"k": 1},
                                 extra_md="**extra**")
    data = json.loads(paths["json"].read_text())
    assert data["info"]["device"] == "cpu" and data["extra"] == {"k": 1}
    assert [c["name"] for c in data["workloads"][0]["cases"]] == ["baseline", "mapo_fast"]
    assert "**extra**" in paths["md"].read_text() and paths["png"].stat().st_size > 0

    (tmp_path / "train-cpu.json").write_text(json.dumps({"runs": {}}))  # not a report
    page = run.write_tables_page(tmp_path, tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert text.startswith("# Benchmark tables") and "## Demo" in text
    assert "| baseline |" in text and "`bench/results/demo-cpu.json`" in text
    assert "train-cpu" not in text
    index = run.write_index(tmp_path).read_text()
    assert "demo-cpu.md" in index and "train-cpu" not in index


def test_the_committed_tables_page_matches_the_committed_reports():
    """docs/benchmarks/results.md is generated, never edited: regenerate it with
    ``mapo-bench`` (or ``python -c "import run; run.write_tables_page(run.HERE / 'results')"``
    from bench/) after changing a report."""
    assert run.TABLES_PAGE.read_text() == run.tables_page(run.HERE / "results")
