"""The benchmark harness writes its reports, and the README table is regenerated from them
(between its markers, leaving the rest of the README as it was)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import harness  # noqa: E402
import run  # noqa: E402


def test_report_and_readme_table(tmp_path):
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
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\\nbefore\\n{run.BEGIN}\\nold table\\n{run.END}\\nafter\\n")
    assert run.update_readme(tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("# title\\nbefore\\n") and text.endswith("after\\n")
    assert "old table" not in text and "| baseline |" in text and "demo-cpu.json" in text
    assert run.update_readme(tmp_path, readme)  # idempotent
    assert readme.read_text() == text
    assert not run.update_readme(tmp_path, tmp_path / "missing.md")
    index = run.write_index(tmp_path).read_text()
    assert "demo-cpu.md" in index and "train-cpu" not in index
