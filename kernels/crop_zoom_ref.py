"""Plain-torch crop-and-zoom: the reference and the CPU path of ``crop_zoom.py``'s kernel.

A crop of box ``(x1, y1, x2, y2)`` (pixel coordinates, pixel ``j`` covering ``[j, j+1)``)
resized to ``out_h x out_w`` is separable resampling with PIL's filters:

    scale   = (x2 - x1) / out_w,   fs = max(scale, 1) if antialias else 1
    center  = x1 + (i + 0.5) * scale                         (output column i)
    w[i, j] = filter((j + 0.5 - center) / fs)                 for pixels j in [floor(x1), ceil(x2))
    out     = (Wy @ image @ Wx^T) / (row sums of Wy x row sums of Wx)

For integer boxes this is exactly PIL's ``img.crop(box).resize((out_w, out_h), resample)``
(up to PIL's 8-bit intermediate rounding); fractional boxes sample at their exact position.
Values are rounded half up to uint8, as PIL does. ``patchify`` lays a normalised crop out as
``transformers``' ``Qwen2VLImageProcessor`` does.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

Tensor = torch.Tensor

#: filter name -> (code used by the Triton kernel, support radius)
FILTERS = {"bicubic": (0, 2.0), "bilinear": (1, 1.0)}
CUBIC_A = -0.5


def filter_values(x: Tensor, mode: str) -> Tensor:
    ax = x.abs()
    if mode == "bicubic":
        a = CUBIC_A
        near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
        far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a
        return torch.where(ax < 1.0, near, torch.where(ax < 2.0, far, torch.zeros_like(ax)))
    return (1.0 - ax).clamp_min(0.0)


def axis_weights(lo: float, hi: float, out_size: int, mode: str, antialias: bool
                 ) -> Tuple[int, Tensor]:
    """``(first_pixel, W [out_size, n_pixels])``: normalised weights of the pixels
    ``[floor(lo), ceil(hi))`` for each output sample of the interval ``[lo, hi)``."""
    first, last = math.floor(lo), math.ceil(hi)
    scale = (hi - lo) / out_size
    fs = max(scale, 1.0) if antialias else 1.0
    centers = lo + (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    pix = torch.arange(first, last, dtype=torch.float64) + 0.5
    w = filter_values((pix[None, :] - centers[:, None]) / fs, mode)
    return first, (w / w.sum(1, keepdim=True)).to(torch.float32)


def crop_resize(image: Tensor, box: Sequence[float], out_h: int, out_w: int, mode: str,
                antialias: bool) -> Tensor:
    """float32 ``[C, out_h, out_w]`` (not rounded) from uint8 ``image [C, H, W]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x0, wx = axis_weights(x1, x2, out_w, mode, antialias)
    y0, wy = axis_weights(y1, y2, out_h, mode, antialias)
    region = image[:, y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]].to(torch.float32)
    return torch.matmul(torch.matmul(wy.to(image.device), region), wx.t().to(image.device))


def round_uint8(x: Tensor) -> Tensor:
    """Round half up and saturate, as PIL does."""
    return torch.floor(x.clamp(0.0, 255.0) + 0.5).to(torch.uint8)


def crop_and_zoom(images: Sequence[Tensor], image_index: Sequence[int],
                  boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]], mode: str,
                  antialias: bool) -> List[Tensor]:
    """uint8 ``[C, h, w]`` crops, one per box (boxes already validated)."""
    return [round_uint8(crop_resize(images[i], b, h, w, mode, antialias))
            for i, b, (h, w) in zip(image_index, boxes, sizes)]


def patchify(x: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> Tensor:
    """``[C, H, W]`` -> ``[grid_h * grid_w, C * temporal * patch * patch]`` in
    ``Qwen2VLImageProcessor``'s order: rows (block row, block col, mh, mw), columns
    (channel, temporal copy, py, px)."""
    C, H, W = x.shape
    p, m = patch_size, merge_size
    gh, gw = H // p, W // p
    t = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    t = t[:, :, :, :, :, None].expand(*t.shape[:5], temporal_patch_size, p, p)
    return t.reshape(gh * gw, C * temporal_patch_size * p * p)


def crop_to_patches(images: Sequence[Tensor], image_index: Sequence[int],
                    boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]],
                    mode: str, antialias: bool, mean: Tensor, std: Tensor, patch_size: int,
                    temporal_patch_size: int, merge_size: int) -> Tensor:
    """float32 ``pixel_values [sum of patches, C * temporal * patch^2]``: each crop rounded to
    uint8 levels (as the processor's PIL resize does), rescaled by 1/255, normalised, laid out
    by ``patchify`` and concatenated."""
    rows = []
    for crop in crop_and_zoom(images, image_index, boxes, sizes, mode, antialias):
        x = (crop.to(torch.float32) / 255.0 - mean[:, None, None]) / std[:, None, None]
        rows.append(patchify(x, patch_size, temporal_patch_size, merge_size))
    if not rows:
        return torch.empty(0, 3 * temporal_patch_size * patch_size ** 2)
    return torch.cat(rows)
