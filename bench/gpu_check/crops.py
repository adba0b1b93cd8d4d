"""The crop-and-zoom section."""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from .common import Sizes

def crop_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Bicubic antialiased crops of large images: the kernel against the torch path (uint8, at
    most one level apart) and its time against slicing + ``F.interpolate`` per box."""
    from mapo_fast.kernels import crop_zoom as K
    from mapo_fast.kernels import crop_zoom_ref as R
    n, n_img, side, out_side = sz.crops
    g = torch.Generator(device=dev).manual_seed(2)
    images = [torch.randint(0, 256, (3, side, side), generator=g, device=dev,
                            dtype=torch.uint8) for _ in range(n_img)]
    index = [i % n_img for i in range(n)]
    boxes = []
    for i in range(n):
        x1, y1 = (float(v) for v in torch.randint(0, side // 2, (2,), generator=g, device=dev))
        span = side // 8 + (i * 37) % (side // 3)
        boxes.append((x1, y1, min(side, x1 + span), min(side, y1 + span * 0.75)))
    sizes = [(out_side, out_side)] * n
    got = K.crop_and_zoom(images, index, boxes, sizes, "bicubic", True)
    want = R.crop_and_zoom(images, index, boxes, sizes, "bicubic", True)
    diff = max(int((a.int() - b.int()).abs().max()) for a, b in zip(got, want))

    def interpolate():
        for i, (x1, y1, x2, y2) in zip(index, boxes):
            crop = images[i][:, int(y1):math.ceil(y2), int(x1):math.ceil(x2)].float()
            F.interpolate(crop[None], size=(out_side, out_side), mode="bicubic",
                          antialias=True).clamp_(0, 255).round_().to(torch.uint8)

    return {"sizes": dict(boxes=n, images=n_img, side=side, out=out_side),
            "max_level_diff": diff, "ok": diff <= 1,
            "ms": {"triton": measure(lambda: K.crop_and_zoom(images, index, boxes, sizes,
                                                             "bicubic", True)),
                   "torch_path": measure(lambda: R.crop_and_zoom(images, index, boxes, sizes,
                                                                 "bicubic", True)),
                   "interpolate_per_box": measure(interpolate)}}
