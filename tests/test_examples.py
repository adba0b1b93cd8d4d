"""The README's examples run."""

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_drop_in_loss_example_trains():
    losses = load("drop_in_loss").main(steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] != losses[-1]  # the optimiser step changed the policy
