"""Checkpoints: atomic writes (a kill during a save leaves the previous checkpoint intact),
a SHA-256 of every file checked before it is loaded (``step_<step>.pt`` with its digest in
``step_<step>.pt.sha256``: a bit flip or a truncation is found, never loaded), and everything
needed to continue a run exactly: model and optimizer state, the step, the RNG states, the
config and the tokenizer."""

from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

PATTERN = re.compile(r"^step_(\d{6})\.pt$")
DIGEST = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def seed_everything(seed: int) -> None:
    """Seeds every global RNG the trainer or a model could draw from (torch on every device,
    numpy, Python), so their checkpointed states are the same in every run of a seed."""
    torch.manual_seed(seed)  # all devices
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


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


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: str, write: Callable[[Any], None]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(folder: str, step: int, payload: Dict[str, Any], *, keep: int = 2) -> str:
    """Writes ``folder/step_<6-digit step>.pt`` and then its digest, each through a temporary
    file and an atomic rename (a checkpoint without its digest is incomplete), then removes all
    but the newest ``keep`` checkpoints. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.pt")
    _write_atomic(path, lambda f: torch.save(dict(payload, step=step), f))
    digest = sha256_file(path)
    _write_atomic(path + DIGEST, lambda f: f.write(digest.encode()))
    for old in list_checkpoints(folder)[:-keep]:
        os.remove(old)
        if os.path.exists(old + DIGEST):
            os.remove(old + DIGEST)
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


def verify(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used (no digest, a digest that does not match,
    unreadable), or None when it is intact."""
    try:
        with open(path + DIGEST) as f:
            want = f.read().strip()
    except OSError:
        return "it has no digest file (the save did not complete)"
    try:
        got = sha256_file(path)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if got != want:
        return "its SHA-256 does not match its digest (the file is corrupt or truncated)"
    return None


def load(path: str) -> Dict[str, Any]:
    """The payload of an intact checkpoint; ``CheckpointError`` naming the file otherwise."""
    why = verify(path)
    if why is not None:
        raise CheckpointError(f"checkpoint {path}: {why}")
    return _read(path)


def _read(path: str) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_latest(folder: str, warn: Callable[[str], None] = print
                ) -> Tuple[str, Dict[str, Any]]:
    """``(path, payload)`` of the newest intact checkpoint in ``folder``; each newer one that
    is not intact is reported through ``warn`` by name and skipped. ``CheckpointError`` when
    there is none."""
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"no checkpoint under {folder}")
    bad = []
    for path in reversed(found):
        why = verify(path)
        if why is None:
            return path, _read(path)
        warn(f"checkpoint {path} is skipped: {why}")
        bad.append(f"{os.path.basename(path)}: {why}")
    raise CheckpointError(f"no intact checkpoint under {folder} ({'; '.join(bad)})")


def save_run(parts: Any, step: int, evals: Dict[str, Any]) -> Optional[str]:
    """A built run's checkpoint of ``step`` (``RunParts``: the policy and optimizer state
    gathered from every rank, the RNG states, ``evals``, the config, the vision report, and
    the tokenizer when it was built from the task rather than loaded) under
    ``<out>/checkpoints``, keeping ``keep_checkpoints``; every rank waits for it. Returns
    the path on the main rank, else None."""
    state = parts.dist.checkpoint_state(parts.policy, parts.optimizer)
    path = None
    if parts.dist.main:
        cfg = parts.cfg
        tok = getattr(parts.tokenizer, "backend_tokenizer", None)
        path = save(os.path.join(parts.out, "checkpoints"), step, dict(
            state, rng=rng_state(), evals=evals, config=cfg.to_dict(),
            vision_report=parts.vision_report,
            tokenizer=tok.to_str() if tok is not None and not cfg.model.path else None),
            keep=cfg.keep_checkpoints)
    parts.dist.barrier()
    return path


def weights_checksum(model: torch.nn.Module) -> str:
    """A hash of ``model``'s state (names and float32 values): equal on every rank whose
    weights agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
