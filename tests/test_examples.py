"""The examples run, as a user runs them: each quickstart in its own process from a directory
outside the repository, and the README's copy of each quickstart is the file itself (so the
text cannot drift from the code)."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: the README's complete quickstart programs, with a line each must print
QUICKSTARTS = {"quickstart_loss.py": r"loss [+-]\d\.\d+, \|grad\| of the head \d+\.\d+, "
                                     r"ratio mean 1\.0000",
               "quickstart_rollout.py": r"\d+ tokens, 32 generated, \d+ tool turns, \d+ crops"}
#: every program the README shows whole (the TRL one runs in TRL's environment:
#: tests/integrations/test_trl_vl.py)
SHOWN = sorted(QUICKSTARTS) + ["trl/quickstart_trl.py"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_drop_in_loss_example_trains():
    losses = load("drop_in_loss").main(steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] != losses[-1]  # the optimiser step changed the policy


@pytest.mark.parametrize("name", sorted(QUICKSTARTS))
def test_quickstart_runs_as_written(name, tmp_path):
    """Run from an empty directory with the file's own path, as a user copies it."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(QUICKSTARTS[name], proc.stdout), proc.stdout


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", SHOWN)
def test_the_readme_shows_the_quickstart_file_itself(name):
    code = (EXAMPLES / name).read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"`examples/{name}`" in readme
    assert code in python_blocks(readme), f"the README's copy of examples/{name} differs"
