"""Vision pretraining (built-in task): before the warm start, the policy's vision tower learns
to name what a zoomed crop shows, so that a right zoom can carry the answer.

Each step cuts the four quadrant zooms of ``warm_start.batch_size`` training images exactly as
the zoom tool and the rollout engine cut them (``crop_and_zoom`` at the vision tower's patch
grid and pixel bounds, then its patches), runs the tower (with its merger) on them, averages
each crop's merged features and trains the tower and a linear probe to name the crop's colour,
or ``none`` (``VisualSearchTask.quadrant_crops``). The probe is dropped afterwards; the tower
keeps what it learned, and with ``warm_start.freeze_vision`` it is frozen for the rest of the
run (the warm start and RL then train the language side to use it). The held-out accuracy of
the probe, overall and on target crops whose ring tint names another colour (the overview's
shortcut is wrong there), is returned and logged.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..rollout.multimodal import VisionAdapter
from ..tools.ops import crop_and_zoom
from .metrics import MetricsLog, Progress

#: Where vision pretraining's samples start in the task's train split (apart from the warm
#: start's and the RL steps').
FIRST_SAMPLE = 20_000_000
#: Held-out images (``eval`` split) the probe's accuracy is measured on.
HELD_OUT = 128


def crop_features(model: Any, adapter: VisionAdapter, images: Sequence[torch.Tensor],
                  boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """``[M, hidden]``: the mean merged vision feature of each crop ``boxes[m] = (image_index,
    x1, y1, x2, y2)`` (original pixels), cut as the zoom tool cuts it; with gradients."""
    crops = crop_and_zoom(list(images), [list(b) for b in boxes], **adapter.crop_kwargs)
    pixel_values, grid = adapter.crop_patches(crops)
    dev = next(model.model.visual.parameters()).device
    out = model.model.get_image_features(pixel_values.to(dev), image_grid_thw=grid.to(dev))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, torch.Tensor):  # one tensor for all crops: split per crop
        per = [int(t * h * w) // adapter.merge ** 2 for t, h, w in grid.tolist()]
        feats = feats.split(per)
    return torch.stack([f.float().mean(0) for f in feats])


def _batch(task: Any, samples: Sequence[Any]) -> Tuple[List[torch.Tensor], List[List[float]],
                                                        List[int]]:
    images, boxes, labels = [], [], []
    for k, s in enumerate(samples):
        b, lab = task.quadrant_crops(s)
        images.append(s.image)
        boxes += [[float(k)] + box[1:] for box in b]
        labels += lab
    return images, boxes, labels


def pretrain_vision(model: Any, task: Any, adapter: VisionAdapter, *, steps: int,
                    batch_size: int, lr: float, out: str, progress: bool = True,
                    autocast: Any = None, write: bool = True) -> Dict[str, float]:
    """Trains ``model``'s vision tower for ``steps`` steps (see the module doc); writes
    ``out/vision_pretrain.jsonl`` (with ``write``: one process of several writes it) and
    returns the held-out ``vision_crop_accuracy`` and ``vision_tint_wrong_accuracy``. Every
    process runs the same steps on the same samples from the same seed."""
    import contextlib
    autocast = autocast or contextlib.nullcontext
    visual = model.model.visual
    classes = task.crop_classes()
    dev = next(visual.parameters()).device
    with torch.no_grad(), autocast():
        width = crop_features(model, adapter, *_batch(task, task.batch("train", 0, 1))[:2]
                              ).shape[-1]
    probe = torch.nn.Linear(width, len(classes)).to(dev)
    was_training = visual.training
    visual.train()
    opt = torch.optim.AdamW(list(visual.parameters()) + list(probe.parameters()), lr=lr)
    log = MetricsLog(os.path.join(out, "vision_pretrain.jsonl"))
    if write:
        log.truncate_after(0)  # a fresh stage: no records of an earlier run's stage
    bar = Progress(steps, "vision pretraining", enabled=progress)
    for i in range(steps):
        images, boxes, labels = _batch(task, task.batch(
            "train", FIRST_SAMPLE + i * batch_size, batch_size))
        with autocast():
            logits = probe(crop_features(model, adapter, images, boxes))
        target = torch.tensor(labels, device=dev)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": i + 1, "loss": float(loss.detach()),
               "accuracy": float((logits.argmax(-1) == target).float().mean())}
        if write:
            log.append(rec)
        bar.update(i + 1, rec, ("loss", "accuracy"))
    bar.close()
    visual.train(was_training)
    return held_out_accuracy(model, task, adapter, probe, autocast)


@torch.no_grad()
def held_out_accuracy(model: Any, task: Any, adapter: VisionAdapter, probe: Any,
                      autocast: Any) -> Dict[str, float]:
    """The probe's accuracy on the quadrant crops of ``HELD_OUT`` eval images, and on the
    target crops whose ring tint is another colour."""
    right, n, tint_right, tint_n = 0, 0, 0, 0
    for start in range(0, HELD_OUT, 32):
        samples = task.batch("eval", start, 32)
        images, boxes, labels = _batch(task, samples)
        with autocast():
            pred = probe(crop_features(model, adapter, images, boxes)).argmax(-1).tolist()
        right += sum(p == y for p, y in zip(pred, labels))
        n += len(labels)
        for k, s in enumerate(samples):
            if s.hint != s.answer:
                q = 2 * s.quadrant[0] + s.quadrant[1]
                tint_right += pred[4 * k + q] == labels[4 * k + q]
                tint_n += 1
    return {"vision_crop_accuracy": right / n,
            "vision_tint_wrong_accuracy": tint_right / tint_n if tint_n else float("nan")}


def freeze_vision(model: Any) -> int:
    """Stops gradients to the vision tower (and its merger); returns the parameters frozen."""
    params = list(model.model.visual.parameters())
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)
