"""Triton kernel for batched crop-and-zoom, straight to uint8 crops or to vision-encoder patches
(the math is written out in ``crop_zoom_ref.py``, the reference it is tested against).

Grid: (output tiles of all crops, channels). A tile is ``BLOCK x BLOCK`` output pixels of one
crop (in patch mode: one ``patch_size x patch_size`` patch). Each program computes its tile as
``Wy @ image @ Wx^T`` over the box's pixel window, in ``CHUNK``-sized pieces with ``tl.dot``;
the separable filter weights are evaluated on the fly from the box geometry, so nothing but the
source images, a few per-crop scalars and the output is ever in device memory. Images of
different sizes stay where they are: the kernel gets a table of their addresses (no copy).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreting
from ._compile import CompileCase, ptr, signature
from .crop_zoom_ref import FILTERS

Tensor = torch.Tensor


@triton.jit
def _filter(x, MODE: tl.constexpr):
    ax = tl.abs(x)
    if MODE == 0:  # bicubic, a = -0.5 (PIL)
        near = (1.5 * ax - 2.5) * ax * ax + 1.0
        far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * -0.5
        return tl.where(ax < 1.0, near, tl.where(ax < 2.0, far, 0.0))
    else:  # bilinear
        return tl.maximum(1.0 - ax, 0.0)


@triton.jit
def _window(lo, hi, out_size, t0, t_last, SUPPORT: tl.constexpr, ANTIALIAS: tl.constexpr,
            BLOCK: tl.constexpr):
    """For output samples t0 + [0, BLOCK) of the interval [lo, hi) resized to out_size: their
    centres, the filter scale, and the pixel window [p_lo, p_hi) that outputs t0..t_last
    read (within the interval's pixels [floor(lo), ceil(hi)))."""
    scale = (hi - lo) / out_size
    if ANTIALIAS:
        fs = tl.maximum(scale, 1.0)
    else:
        fs = 1.0
    centers = lo + ((t0 + tl.arange(0, BLOCK)).to(tl.float32) + 0.5) * scale
    p_lo = tl.maximum(tl.floor(lo + (t0 + 0.5) * scale - SUPPORT * fs).to(tl.int32),
                      tl.floor(lo).to(tl.int32))
    p_hi = tl.minimum(tl.ceil(lo + (t_last + 0.5) * scale + SUPPORT * fs).to(tl.int32) + 1,
                      tl.ceil(hi).to(tl.int32))
    return centers, fs, p_lo, p_hi


@triton.jit
def _crop_zoom_kernel(img_addr_ptr, img_hw_ptr, crop_img_ptr, box_ptr, out_hw_ptr,
                      out_off_ptr, tiles_ptr, mean_ptr, std_ptr, out_ptr,
                      MODE: tl.constexpr, SUPPORT: tl.constexpr, ANTIALIAS: tl.constexpr,
                      PATCHES: tl.constexpr, PATCH: tl.constexpr, MERGE: tl.constexpr,
                      TEMPORAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    tile = tl.program_id(0)
    ch = tl.program_id(1)
    m = tl.load(tiles_ptr + tile * 3)
    ty0 = tl.load(tiles_ptr + tile * 3 + 1)
    tx0 = tl.load(tiles_ptr + tile * 3 + 2)
    img = tl.load(crop_img_ptr + m)
    base = tl.load(img_addr_ptr + img).to(tl.pointer_type(tl.uint8))  # the image's address
    H = tl.load(img_hw_ptr + img * 2)
    W = tl.load(img_hw_ptr + img * 2 + 1)
    x1 = tl.load(box_ptr + m * 4)
    y1 = tl.load(box_ptr + m * 4 + 1)
    x2 = tl.load(box_ptr + m * 4 + 2)
    y2 = tl.load(box_ptr + m * 4 + 3)
    oh = tl.load(out_hw_ptr + m * 2)
    ow = tl.load(out_hw_ptr + m * 2 + 1)
    if PATCHES:  # a tile is one patch: PATCH x PATCH valid pixels of the BLOCK x BLOCK block
        lim_h = tl.minimum(ty0 + PATCH, oh)
        lim_w = tl.minimum(tx0 + PATCH, ow)
    else:
        lim_h = oh
        lim_w = ow
    cy, fsy, r_lo, r_hi = _window(y1, y2, oh, ty0, lim_h - 1, SUPPORT, ANTIALIAS, BLOCK)
    cx, fsx, c_lo, c_hi = _window(x1, x2, ow, tx0, lim_w - 1, SUPPORT, ANTIALIAS, BLOCK)

    chan = base + ch.to(tl.int64) * H * W
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    wsum_y = tl.zeros((BLOCK,), dtype=tl.float32)
    wsum_x = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        wx = tl.where((c < c_hi)[:, None],
                      _filter((c[:, None].to(tl.float32) + 0.5 - cx[None, :]) / fsx, MODE), 0.0)
        wsum_x += tl.sum(wx, axis=0)
    for r0 in range(r_lo, r_hi, CHUNK):
        r = r0 + tl.arange(0, CHUNK)
        r_ok = r < r_hi
        wy = tl.where(r_ok[None, :],
                      _filter((r[None, :].to(tl.float32) + 0.5 - cy[:, None]) / fsy, MODE), 0.0)
        wsum_y += tl.sum(wy, axis=1)
        rows = tl.zeros((CHUNK, BLOCK), dtype=tl.float32)
        for c0 in range(c_lo, c_hi, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            c_ok = c < c_hi
            wx = tl.where(c_ok[:, None],
                          _filter((c[:, None].to(tl.float32) + 0.5 - cx[None, :]) / fsx, MODE),
                          0.0)
            px = tl.load(chan + r[:, None].to(tl.int64) * W + c[None, :],
                         mask=r_ok[:, None] & c_ok[None, :], other=0).to(tl.float32)
            rows = tl.dot(px, wx, rows, input_precision="ieee")
        acc = tl.dot(wy, rows, acc, input_precision="ieee")
    den = wsum_y[:, None] * wsum_x[None, :]
    val = acc / tl.where(den != 0.0, den, 1.0)  # zero only on rows/columns outside the tile
    val = tl.floor(tl.minimum(tl.maximum(val, 0.0), 255.0) + 0.5)
    yy = ty0 + tl.arange(0, BLOCK)
    xx = tx0 + tl.arange(0, BLOCK)
    ok = (yy < lim_h)[:, None] & (xx < lim_w)[None, :]
    off = tl.load(out_off_ptr + m)
    if PATCHES:
        norm = (val / 255.0 - tl.load(mean_ptr + ch)) / tl.load(std_ptr + ch)
        gy = ty0 // PATCH
        gx = tx0 // PATCH
        blocks_w = ow // (PATCH * MERGE)
        row = off + (((gy // MERGE) * blocks_w + gx // MERGE) * MERGE + gy % MERGE) * MERGE \
            + gx % MERGE
        py = tl.arange(0, BLOCK)[:, None]
        pxx = tl.arange(0, BLOCK)[None, :]
        row_len = 3 * TEMPORAL * PATCH * PATCH
        for t in tl.static_range(TEMPORAL):
            col = ((ch * TEMPORAL + t) * PATCH + py) * PATCH + pxx
            tl.store(out_ptr + row.to(tl.int64) * row_len + col, norm, mask=ok)
    else:
        dst = out_ptr + off + (ch.to(tl.int64) * oh + yy[:, None]) * ow + xx[None, :]
        tl.store(dst, val.to(tl.uint8), mask=ok)


def _addresses(images: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor, Tensor]:
    """The images as contiguous uint8 (views when they already are), a device table of their
    addresses (int64) and their ``(H, W)`` (int32)."""
    dev = images[0].device
    ims = [im.contiguous() for im in images]
    addr = torch.tensor([im.data_ptr() for im in ims], dtype=torch.int64)
    hw = torch.tensor([[im.shape[1], im.shape[2]] for im in ims], dtype=torch.int32)
    return ims, addr.to(dev), hw.to(dev)


def _tiles(sizes: Tensor, step: int) -> Tensor:
    """``[n_tiles, 3]`` int32 (crop, y0, x0) covering each crop's ``(h, w)`` in ``step``s."""
    ny = (sizes[:, 0] + step - 1) // step
    nx = (sizes[:, 1] + step - 1) // step
    counts = ny * nx
    crop = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum())) - start[crop]
    return torch.stack([crop, (local // nx[crop]) * step, (local % nx[crop]) * step],
                       1).to(torch.int32)


#: Patch geometries ``(patch, temporal, merge)`` the patch mode is compiled for (Qwen2-VL and
#: Qwen2.5-VL: 14; 16 for their successors); others take the torch path (``supports_patches``).
PATCH_GEOMETRIES = ((14, 2, 2), (16, 2, 2))
IMAGE_BLOCK, CHUNK = 32, 32
INTERPRETER_BLOCK = 16


def supports_patches(patch: int, temporal: int, merge: int) -> bool:
    return (patch, temporal, merge) in PATCH_GEOMETRIES


def _meta(patches: bool, patch: int, temporal: int, merge: int) -> dict:
    """The tile constexprs of a launch (the patch tile covers one patch)."""
    block = triton.next_power_of_2(patch) if patches else \
        (INTERPRETER_BLOCK if interpreting() else IMAGE_BLOCK)
    return dict(PATCHES=patches, PATCH=patch, MERGE=merge, TEMPORAL=temporal, BLOCK=block,
                CHUNK=INTERPRETER_BLOCK if interpreting() else CHUNK)


def _launch(images, image_index, boxes, sizes, mode, antialias, out, out_off, patches,
            mean=None, std=None, patch=14, temporal=2, merge=2):
    dev = images[0].device
    ims, img_addr, img_hw = _addresses(images)  # ims: kept alive through the launch
    sizes_t = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    meta = _meta(patches, patch, temporal, merge)
    tiles = _tiles(sizes_t, patch if patches else meta["BLOCK"]).to(dev)
    if tiles.shape[0] == 0:
        return
    code, support = FILTERS[mode]
    dummy = torch.zeros(3, dtype=torch.float32, device=dev)
    _crop_zoom_kernel[(tiles.shape[0], 3)](
        img_addr, img_hw, torch.as_tensor(image_index, dtype=torch.int32, device=dev),
        torch.as_tensor(boxes, dtype=torch.float32, device=dev).reshape(-1, 4).contiguous(),
        sizes_t.to(torch.int32).to(dev), out_off.to(dev), tiles,
        dummy if mean is None else mean, dummy if std is None else std, out,
        MODE=code, SUPPORT=support, ANTIALIAS=bool(antialias), **meta, num_warps=4)


def crop_and_zoom(images: Sequence[Tensor], image_index: Sequence[int],
                  boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]], mode: str,
                  antialias: bool, out: Tensor = None) -> List[Tensor]:
    """uint8 ``[3, h, w]`` crops, views of one flat output buffer (``out``, when given). Same
    arguments as ``crop_zoom_ref.crop_and_zoom`` (boxes already validated)."""
    counts = [3 * h * w for h, w in sizes]
    if out is None:
        out = torch.empty(sum(counts), dtype=torch.uint8, device=images[0].device)
    off = torch.zeros(len(sizes), dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)[:-1]
    _launch(images, image_index, boxes, sizes, mode, antialias, out, off, patches=False)
    return [out[o:o + n].view(3, h, w) for o, n, (h, w) in zip(off.tolist(), counts, sizes)]


def crop_to_patches(images: Sequence[Tensor], image_index: Sequence[int],
                    boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]],
                    mode: str, antialias: bool, mean: Tensor, std: Tensor, patch_size: int,
                    temporal_patch_size: int, merge_size: int, out: Tensor = None) -> Tensor:
    """float32 ``pixel_values``, same arguments as ``crop_zoom_ref.crop_to_patches``; ``out``
    may supply the output buffer."""
    n_patches = [(h // patch_size) * (w // patch_size) for h, w in sizes]
    width = 3 * temporal_patch_size * patch_size ** 2
    if out is None:
        out = torch.empty(sum(n_patches), width, dtype=torch.float32, device=images[0].device)
    off = torch.zeros(len(sizes), dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(n_patches, dtype=torch.int64), 0)[:-1]
    _launch(images, image_index, boxes, sizes, mode, antialias, out, off, patches=True,
            mean=mean.to(torch.float32).contiguous(), std=std.to(torch.float32).contiguous(),
            patch=patch_size, temporal=temporal_patch_size, merge=merge_size)
    return out


def compile_cases() -> List[CompileCase]:
    f32 = ptr(torch.float32)
    cases = []
    for mode, (code, support) in FILTERS.items():
        for antialias in (False, True):
            geoms = [(False, 14, 2, 2)] + [(True,) + g for g in PATCH_GEOMETRIES]
            for patches, patch, temporal, merge in geoms:
                sig = signature(_crop_zoom_kernel, dict(
                    img_addr_ptr="*i64", img_hw_ptr="*i32", crop_img_ptr="*i32",
                    box_ptr=f32, out_hw_ptr="*i32", out_off_ptr="*i64", tiles_ptr="*i32",
                    mean_ptr=f32, std_ptr=f32, out_ptr=f32 if patches else "*u8"))
                meta = dict(_meta(patches, patch, temporal, merge),
                            BLOCK=triton.next_power_of_2(patch) if patches else IMAGE_BLOCK,
                            CHUNK=CHUNK)
                label = f"{mode}{' antialias' if antialias else ''} " + \
                    (f"patches {patch}x{patch}" if patches else "uint8")
                cases.append(CompileCase(_crop_zoom_kernel, label, sig,
                                         dict(meta, MODE=code, SUPPORT=support,
                                              ANTIALIAS=antialias), num_warps=4, num_stages=1,
                                         default=antialias and mode == "bicubic" and
                                         patch == 14, no_mma=False))
    return cases
