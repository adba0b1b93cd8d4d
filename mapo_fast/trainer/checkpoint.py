"""Checkpoints: atomic writes (a kill during a save leaves the previous checkpoint intact) and
everything needed to continue a run exactly: model and optimizer state, the step, the RNG
states, the config and the tokenizer."""

from __future__ import annotations

import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

PATTERN = re.compile(r"^step_(\d{6})\.pt$")


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str, step: int, payload: Dict[str, Any], *, keep: int = 2) -> str:
    """Writes ``folder/step_<6-digit step>.pt`` through a temporary file and an atomic rename, then
    removes all but the newest ``keep`` checkpoints. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.pt")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload, step=step), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in list_checkpoints(folder)[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(folder: str) -> List[str]:
    """Complete checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if PATTERN.match(n))
    return [os.path.join(folder, n) for n in names]


def latest(folder: str) -> Optional[str]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load(path: str) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
