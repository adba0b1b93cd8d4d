"""Plain-torch crop-and-zoom: the reference and the CPU path of ``crop_zoom.py``'s kernel.

A crop of box ``(x1, y1, x2, y2)`` (pixel coordinates, pixel ``j`` covering ``[j, j+1)``)
resized to ``out_h x out_w`` is separable resampling with PIL's filters:

    scale   = (x2 - x1) / out_w,   fs = max(scale, 1) if antialias else 1
    center  = x1 + (i + 0.5) * scale                         (output column i)
    w[i, j] = filter((j + 0.5 - center) / fs)                 for pixels j in [floor(x1), ceil(x2))
    out     = Wy @ image @ Wx^T,   Wy, Wx with rows normalised to sum 1

(Wx, Wy are banded: a few taps per output; the CPU path stores them as sparse CSR matrices.)

For integer boxes this is exactly PIL's ``img.crop(box).resize((out_w, out_h), resample)``
(up to PIL's 8-bit intermediate rounding); fractional boxes sample at their exact position.
Values are rounded half up to uint8, as PIL does. ``patchify`` lays a normalised crop out as
``transformers``' ``Qwen2VLImageProcessor`` does.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
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
    """``(first_pixel, W)``: ``W`` is a sparse CSR ``[out_size, n_pixels]`` float32 matrix of
    the normalised weights of the pixels ``[floor(lo), ceil(hi))`` for each output sample of
    the interval ``[lo, hi)``. Only the taps within the filter's reach are stored."""
    first, last = math.floor(lo), math.ceil(hi)
    n = last - first
    scale = (hi - lo) / out_size
    fs = max(scale, 1.0) if antialias else 1.0
    reach = FILTERS[mode][1] * fs
    taps = min(n, math.ceil(2 * reach) + 2)
    centers = lo + (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # exact positions
    start = (torch.floor(centers - reach).to(torch.int64) - first).clamp(0, n - taps)
    idx = start[:, None] + torch.arange(taps)                         # [out, taps], in range
    w = filter_values((idx + first + 0.5 - centers[:, None]) / fs, mode)
    w = (w / w.sum(1, keepdim=True)).to(torch.float32)
    crow = torch.arange(0, (out_size + 1) * taps, taps, dtype=torch.int64)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta
        warnings.simplefilter("ignore")
        return first, torch.sparse_csr_tensor(crow, idx.reshape(-1), w.reshape(-1),
                                              size=(out_size, n))


def crop_resize(image: Tensor, box: Sequence[float], out_h: int, out_w: int, mode: str,
                antialias: bool) -> Tensor:
    """float32 ``[C, out_h, out_w]`` (not rounded; a transposed view) from uint8
    ``image [C, H, W]``: per channel, rows first (sparse ``Wy`` times the region in its natural
    layout), then columns (sparse ``Wx`` times the transposed, already reduced rows)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x0, wx = axis_weights(x1, x2, out_w, mode, antialias)
    y0, wy = axis_weights(y1, y2, out_h, mode, antialias)
    R, Cw = wy.shape[1], wx.shape[1]
    region = image[:, y0:y0 + R, x0:x0 + Cw].to(torch.float32)            # [C, R, Cw]
    wx, wy = wx.to(image.device), wy.to(image.device)
    out = torch.empty(image.shape[0], out_w, out_h, dtype=torch.float32, device=image.device)
    for c in range(image.shape[0]):
        torch.mm(wx, torch.sparse.mm(wy, region[c]).t().contiguous(), out=out[c])  # [ow, oh]
    return out.transpose(1, 2)


def round_levels_(x: Tensor) -> Tensor:
    """Round half up to integer grey levels in [0, 255], in place (as PIL does)."""
    return x.clamp_(0.0, 255.0).add_(0.5).floor_()


#: Below this many output pixels in all, crops run one after another: starting threads costs
#: more than small crops (a rollout step's 56x56 zooms are many times faster without them).
PARALLEL_MIN_PIXELS = 512 * 512


def _each(fn, n: int, pixels: int) -> list:
    """``[fn(k) for k in range(n)]``; for ``pixels >= PARALLEL_MIN_PIXELS`` of output on as
    many threads as torch's intra-op pool has (more oversubscribes the cores: each op also
    runs on that pool): each crop is a chain of torch ops (which release the GIL), and crops
    are independent, so the results do not depend on it."""
    workers = min(n, torch.get_num_threads())
    if workers <= 1 or pixels < PARALLEL_MIN_PIXELS:
        return [fn(k) for k in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


def crop_and_zoom(images: Sequence[Tensor], image_index: Sequence[int],
                  boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]], mode: str,
                  antialias: bool) -> List[Tensor]:
    """uint8 ``[C, h, w]`` crops, one per box (boxes already validated)."""
    def one(k: int) -> Tensor:
        h, w = sizes[k]
        x = crop_resize(images[image_index[k]], boxes[k], h, w, mode, antialias)
        return round_levels_(x).to(torch.uint8).contiguous()
    return _each(one, len(boxes), sum(h * w for h, w in sizes))


def patch_view(rows: Tensor, C: int, H: int, W: int, patch_size: int, temporal_patch_size: int,
               merge_size: int) -> Tensor:
    """``rows [grid_h * grid_w, C * temporal * patch^2]`` viewed as ``[gh/m, gw/m, m, m, C,
    temporal, p, p]``: ``Qwen2VLImageProcessor``'s order (rows: block row, block col, mh, mw;
    columns: channel, temporal copy, py, px)."""
    p, m = patch_size, merge_size
    return rows.view(H // p // m, W // p // m, m, m, C, temporal_patch_size, p, p)


def image_as_patches(x: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
                     ) -> Tensor:
    """``x [C, H, W]`` as a (strided, broadcast) ``[gh/m, gw/m, m, m, C, temporal, p, p]``
    view, to copy into ``patch_view``."""
    C, H, W = x.shape
    p, m = patch_size, merge_size
    t = x.reshape(C, H // p // m, m, p, W // p // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return t[:, :, :, :, :, None].expand(*t.shape[:5], temporal_patch_size, p, p)


def patchify(x: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> Tensor:
    """``[C, H, W]`` -> ``[grid_h * grid_w, C * temporal * patch * patch]`` (a new tensor)."""
    C, H, W = x.shape
    rows = torch.empty((H // patch_size) * (W // patch_size),
                       C * temporal_patch_size * patch_size ** 2, dtype=x.dtype, device=x.device)
    patch_view(rows, C, H, W, patch_size, temporal_patch_size, merge_size).copy_(
        image_as_patches(x, patch_size, temporal_patch_size, merge_size))
    return rows


def crop_to_patches(images: Sequence[Tensor], image_index: Sequence[int],
                    boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]],
                    mode: str, antialias: bool, mean: Tensor, std: Tensor, patch_size: int,
                    temporal_patch_size: int, merge_size: int, out: Tensor = None) -> Tensor:
    """float32 ``pixel_values [sum of patches, C * temporal * patch^2]``: each crop rounded to
    uint8 levels (as the processor's PIL resize does), rescaled by 1/255, normalised, and
    written straight into its rows of one preallocated output (``out``, when given)."""
    C = images[0].shape[0]
    counts = [(h // patch_size) * (w // patch_size) for h, w in sizes]
    if out is None:
        out = torch.empty(sum(counts), C * temporal_patch_size * patch_size ** 2,
                          dtype=torch.float32, device=images[0].device)
    scale, shift = _normaliser(mean, std, out.device)
    starts = [sum(counts[:k]) for k in range(len(counts))]

    def one(k: int) -> None:
        h, w = sizes[k]
        x = round_levels_(crop_resize(images[image_index[k]], boxes[k], h, w, mode, antialias))
        write_patches(x, out[starts[k]:starts[k] + counts[k]], scale, shift, patch_size,
                      temporal_patch_size, merge_size)
    _each(one, len(boxes), sum(h * w for h, w in sizes))
    return out


def _normaliser(mean: Tensor, std: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` ``[C, 1, 1]`` with ``x * scale - shift = (x / 255 - mean) / std``."""
    return ((1.0 / (255.0 * std)).to(device)[:, None, None],
            (mean / std).to(device)[:, None, None])


def write_patches(x: Tensor, rows: Tensor, scale: Tensor, shift: Tensor, patch_size: int,
                  temporal_patch_size: int, merge_size: int) -> None:
    """``x [C, h, w]`` float32 grey levels, normalised in place (``x * scale - shift`` =
    ``(x / 255 - mean) / std``) and written into its ``rows`` of ``pixel_values``."""
    C, h, w = x.shape
    x.mul_(scale).sub_(shift)
    patch_view(rows, C, h, w, patch_size, temporal_patch_size, merge_size).copy_(
        image_as_patches(x, patch_size, temporal_patch_size, merge_size))


def crops_to_patches(crops: Sequence[Tensor], mean: Tensor, std: Tensor, patch_size: int,
                     temporal_patch_size: int, merge_size: int) -> Tensor:
    """float32 ``pixel_values`` of uint8 crops already at their patch-grid size (no resample):
    what ``crop_to_patches`` gives for the boxes the crops were cut from, bit for bit."""
    C = crops[0].shape[0]
    counts = [(c.shape[1] // patch_size) * (c.shape[2] // patch_size) for c in crops]
    out = torch.empty(sum(counts), C * temporal_patch_size * patch_size ** 2,
                      dtype=torch.float32, device=crops[0].device)
    scale, shift = _normaliser(mean, std, out.device)
    start = 0
    for c, n in zip(crops, counts):
        write_patches(c.to(torch.float32), out[start:start + n], scale, shift, patch_size,
                      temporal_patch_size, merge_size)
        start += n
    return out
