"""Batched crop-and-zoom on the device: crops resized for the vision encoder, as uint8 images
or directly as Qwen2/2.5-VL patches. Validation and device dispatch happen here, once:
Triton on CUDA (``kernels/crop_zoom.py``), the same math in torch elsewhere
(``kernels/crop_zoom_ref.py``)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._dispatch import backend_for, triton_module
from ..kernels import crop_zoom_ref

Tensor = torch.Tensor
KERNEL = "crop_zoom"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = tuple(crop_zoom_ref.FILTERS)
MAX_ASPECT = 200
#: Qwen2-VL's resize rule: sides are multiples of FACTOR, areas within [MIN_PIXELS, MAX_PIXELS]
#: (the processor's defaults); every op, tool context, adapter and engine defaults to these.
FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


class BoxError(ValueError):
    """A box that cannot be cropped; ``code`` names the problem (``bbox_not_finite``,
    ``bbox_empty``, ``bbox_outside``, ``bbox_too_small``, ``bbox_aspect``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _fmt(v: float) -> str:
    return f"{v:g}"


def check_box(box: Sequence[float], width: float, height: float, *, min_size: float = 0.0,
              name: str = "box", max_aspect: Optional[float] = MAX_ASPECT
              ) -> Tuple[float, float, float, float]:
    """Validates ``(x1, y1, x2, y2)`` against a ``width x height`` image (and, unless
    ``max_aspect`` is None, its aspect ratio); raises ``BoxError`` whose message names
    ``name`` and the values. A number too large for a float is ``bbox_not_finite``."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except OverflowError:
        raise BoxError("bbox_not_finite", f"{name} has a coordinate too large to represent "
                                          f"(at most about 1.8e308)") from None
    shown = "[" + ", ".join(_fmt(v) for v in (x1, y1, x2, y2)) + "]"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise BoxError("bbox_not_finite", f"{name} {shown} has a non-finite coordinate")
    if not (x2 > x1 and y2 > y1):
        raise BoxError("bbox_empty", f"{name} {shown} is empty: it needs x2 > x1 and y2 > y1")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise BoxError("bbox_outside", f"{name} {shown} is outside the image "
                                       f"(width {_fmt(width)}, height {_fmt(height)})")
    if x2 - x1 < min_size or y2 - y1 < min_size:
        raise BoxError("bbox_too_small", f"{name} {shown} is smaller than the minimum of "
                                         f"{_fmt(min_size)} x {_fmt(min_size)} pixels")
    if max_aspect is not None and max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1) > max_aspect:
        raise BoxError("bbox_aspect", f"{name} {shown} has an aspect ratio above {max_aspect:g}")
    return x1, y1, x2, y2


def zoom_size(height: float, width: float, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
              max_pixels: int = MAX_PIXELS) -> Tuple[int, int]:
    """The output size of a crop of ``height x width`` original pixels: ``smart_resize`` with
    the aspect ratio first clamped to ``MAX_ASPECT`` (a box drawn within the limit on the
    resized image the model sees can be thinner in original pixels; its crop is stretched to
    the limit rather than refused)."""
    if height > width * MAX_ASPECT:
        height = width * MAX_ASPECT
    elif width > height * MAX_ASPECT:
        width = height * MAX_ASPECT
    return smart_resize(height, width, factor, min_pixels, max_pixels)


def smart_resize(height: float, width: float, factor: int = FACTOR,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, area within
    ``[min_pixels, max_pixels]``, aspect ratio preserved as closely as possible (small inputs
    are zoomed up). Raises ``ValueError`` for an aspect ratio above 200."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and v > 0 for v in (height, width)):
        raise ValueError(f"smart_resize: `height` and `width` must be finite numbers > 0, got "
                         f"{height!r}, {width!r}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"smart_resize: aspect ratio must be at most {MAX_ASPECT}, got "
                         f"{max(height, width) / min(height, width):g}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


ImagesArg = Union[Tensor, Sequence[Tensor]]


def _images(fn: str, images: ImagesArg) -> List[Tensor]:
    if not isinstance(images, (Tensor, list, tuple)):
        raise ValueError(f"{fn}: `images` must be a uint8 tensor or a list of uint8 [3, H, W] "
                         f"tensors, got {type(images).__name__}")
    if isinstance(images, Tensor):
        images = list(images) if images.dim() == 4 else [images]
    images = list(images)
    if not images:
        raise ValueError(f"{fn}: `images` is empty")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 or \
                im.dtype != torch.uint8:
            desc = f"{tuple(im.shape)} {im.dtype}" if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"{fn}: `images[{i}]` must be a uint8 [3, H, W] tensor, got {desc}")
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"{fn}: `images[{i}]` is empty, shape {tuple(im.shape)}")
        if im.device != images[0].device:
            raise ValueError(f"{fn}: `images[{i}]` is on {im.device}, `images[0]` on "
                             f"{images[0].device}: all images must share a device")
    return [im if im.is_contiguous() else im.contiguous() for im in images]


def _boxes(fn: str, boxes, images: List[Tensor]) -> Tuple[List[int], List[Tuple[float, ...]]]:
    if isinstance(boxes, (str, bytes)) or boxes is None:
        raise ValueError(f"{fn}: `boxes` must be an [M, 5] tensor or a sequence of "
                         f"(image_index, x1, y1, x2, y2) rows, got {type(boxes).__name__}")
    if not isinstance(boxes, Tensor) and len(boxes) == 0:
        return [], []
    try:
        b = torch.as_tensor(boxes, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"{fn}: `boxes` must be an [M, 5] tensor or a sequence of "
                         "(image_index, x1, y1, x2, y2) rows of numbers, got "
                         f"{_describe(boxes)}") from None
    if b.dim() != 2 or b.shape[1] != 5:
        raise ValueError(f"{fn}: `boxes` must have shape [M, 5] (image_index, x1, y1, x2, y2), "
                         f"got {tuple(b.shape)}")
    index, out = [], []
    for m, row in enumerate(b.tolist()):
        i = row[0]
        if not (math.isfinite(i) and float(i).is_integer() and 0 <= i < len(images)):
            raise ValueError(f"{fn}: `boxes[{m}]` has image_index {i:g}, but there are "
                             f"{len(images)} images")
        H, W = images[int(i)].shape[1:]
        try:  # any aspect ratio: zoom_size clamps the output's
            out.append(check_box(row[1:], W, H, name=f"`boxes[{m}]`", max_aspect=None))
        except BoxError as e:
            raise BoxError(e.code, f"{fn}: {e} (image {int(i)})") from None
        index.append(int(i))
    return index, out


def _describe(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


#: Largest output side and area of one crop: far above any vision encoder's input (Qwen2-VL's
#: default maximum is 12.8 M pixels), and refused here rather than failing inside torch's
#: allocator (a 2^28-pixel crop is 768 MiB of uint8, 3 GiB of float patches).
MAX_SIDE = 16384
MAX_OUTPUT_PIXELS = 2 ** 28


def _size(fn: str, arg: str, size) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, (tuple, list, Tensor)):
        hw = tuple(size)
    else:
        raise ValueError(f"{fn}: `{arg}` must be a positive int or (height, width), got "
                         f"{size!r}")
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                               for v in hw):
        raise ValueError(f"{fn}: `{arg}` must be a positive int or (height, width), got {size!r}")
    if max(hw) > MAX_SIDE or hw[0] * hw[1] > MAX_OUTPUT_PIXELS:
        raise ValueError(f"{fn}: `{arg}` {tuple(hw)} is too large: at most {MAX_SIDE} pixels a "
                         f"side and {MAX_OUTPUT_PIXELS} pixels in all")
    return hw


def _sizes(fn: str, boxes, size, factor, min_pixels, max_pixels) -> List[Tuple[int, int]]:
    if isinstance(size, list):
        if len(size) != len(boxes):
            raise ValueError(f"{fn}: `size` is a list of {len(size)} sizes for {len(boxes)} "
                             "boxes; give one (height, width) per box")
        return [_size(fn, f"size[{i}]", s) for i, s in enumerate(size)]
    if size is not None:
        return [_size(fn, "size", size)] * len(boxes)
    for arg, v in (("factor", factor), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{fn}: `{arg}` must be a positive int, got {v!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"{fn}: `min_pixels` ({min_pixels}) must not exceed `max_pixels` "
                         f"({max_pixels})")
    return [zoom_size(y2 - y1, x2 - x1, factor, min_pixels, max_pixels)
            for x1, y1, x2, y2 in boxes]


def _mode(fn: str, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{fn}: `mode` must be one of {list(MODES)}, got {mode!r}")
    return mode


def crop_and_zoom(images: ImagesArg, boxes, *,
                  size: Union[int, Tuple[int, int], List[Tuple[int, int]], None] = None,
                  factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                  mode: str = "bicubic", antialias: bool = True) -> List[Tensor]:
    """Crops boxes out of images and resizes them, batched, on the images' device.

    Args:
        images: a list of uint8 ``[3, H, W]`` tensors (sizes may differ, one device), or one
            such tensor, or a ``[N, 3, H, W]`` batch.
        boxes: ``[M, 5]`` float (tensor or nested sequence): ``(image_index, x1, y1, x2, y2)``
            in pixel coordinates of the original image (fractional boxes sample at their
            exact position). Any aspect ratio (the output's is clamped, ``zoom_size``); an
            empty sequence gives ``[]``.
        size: output ``(h, w)`` (or an int for squares) for every crop, or a list of one
            ``(h, w)`` per box; default: ``zoom_size`` of each box (Qwen2-VL's
            ``smart_resize``) with ``factor``, ``min_pixels``, ``max_pixels``.
        mode: ``"bicubic"`` (PIL's, a = -0.5) or ``"bilinear"``; ``antialias`` widens the
            filter when shrinking, as PIL does.

    Returns: a list of M uint8 ``[3, h, w]`` crops (on the images' device). Integer boxes agree
    with PIL's ``img.crop(box).resize((w, h), BICUBIC)`` (mean absolute difference ~0.1-0.3
    grey levels). Bad arguments raise ``ValueError`` naming them; bad boxes ``BoxError``.
    """
    fn = "crop_and_zoom"
    ims = _images(fn, images)
    index, bx = _boxes(fn, boxes, ims)
    sizes = _sizes(fn, bx, size, factor, min_pixels, max_pixels)
    _mode(fn, mode)
    if not bx:
        return []
    if backend_for(ims[0], KERNEL) == "triton":
        return triton_module(KERNEL).crop_and_zoom(ims, index, bx, sizes, mode, antialias)
    return crop_zoom_ref.crop_and_zoom(ims, index, bx, sizes, mode, antialias)


def crop_to_patches(images: ImagesArg, boxes, *, patch_size: int = 14,
                    temporal_patch_size: int = 2, merge_size: int = 2,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                    mode: str = "bicubic", antialias: bool = True,
                    out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The crops of ``boxes``, resized by ``smart_resize`` (factor ``patch_size *
    merge_size``), rescaled by 1/255, normalised with ``mean``/``std`` and laid out exactly as
    ``transformers``' ``Qwen2VLImageProcessor`` emits them, ready for a Qwen2/2.5-VL vision
    tower. On CUDA one Triton kernel writes the patches straight from the source images.

    Returns ``(pixel_values [sum_m gh_m * gw_m, 3 * temporal_patch_size * patch_size**2]``
    float32, ``image_grid_thw [M, 3]`` int64 with rows ``(1, gh_m, gw_m)``), on the images'
    device. Defaults are the processor's (``min_pixels`` 56*56, ``max_pixels`` 28*28*1280).

    ``out`` (optional): a contiguous float32 tensor of exactly that shape on the images'
    device, written and returned as ``pixel_values``. Reusing one across calls (a slice of a
    larger buffer works) saves allocating, and on CPU first-touching, fresh memory each time.
    """
    fn = "crop_to_patches"
    ims = _images(fn, images)
    for arg, v in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size),
                   ("merge_size", merge_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{fn}: `{arg}` must be a positive int, got {v!r}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    if mean_t.shape != (3,) or std_t.shape != (3,) or not bool((std_t > 0).all()):
        raise ValueError(f"{fn}: `mean` and `std` must hold 3 values, std > 0; got {mean!r}, "
                         f"{std!r}")
    index, bx = _boxes(fn, boxes, ims)
    sizes = _sizes(fn, bx, None, patch_size * merge_size, min_pixels, max_pixels)
    _mode(fn, mode)
    dev = ims[0].device
    grid = torch.tensor([[1, h // patch_size, w // patch_size] for h, w in sizes],
                        dtype=torch.int64).reshape(-1, 3).to(dev)
    width = 3 * temporal_patch_size * patch_size ** 2
    shape = (sum((h // patch_size) * (w // patch_size) for h, w in sizes), width)
    if out is not None and (not isinstance(out, Tensor) or tuple(out.shape) != shape or
                            out.dtype != torch.float32 or out.device != dev or
                            not out.is_contiguous()):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}"
               f"{'' if out.is_contiguous() else ', not contiguous'}"
               if isinstance(out, Tensor) else type(out).__name__)
        raise ValueError(f"{fn}: `out` must be a contiguous float32 tensor of shape {shape} on "
                         f"{dev}, got {got}")
    args = (ims, index, bx, sizes, mode, antialias, mean_t.to(dev), std_t.to(dev), patch_size,
            temporal_patch_size, merge_size)
    if not bx:
        return (torch.empty(0, width, device=dev) if out is None else out), grid
    if backend_for(ims[0], KERNEL) == "triton" and \
            triton_module(KERNEL).supports_patches(patch_size, temporal_patch_size, merge_size):
        return triton_module(KERNEL).crop_to_patches(*args, out=out), grid
    return crop_zoom_ref.crop_to_patches(*args, out=out), grid


def crops_to_patches(crops: Sequence[Tensor], *, patch_size: int = 14,
                     temporal_patch_size: int = 2, merge_size: int = 2,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                     ) -> Tuple[Tensor, Tensor]:
    """The vision-tower input of crops that ``crop_and_zoom`` already cut at their patch-grid
    size (``factor = patch_size * merge_size``, the same pixel bounds): normalised and laid out
    as ``crop_to_patches`` does, without resampling again (on CPU equal to ``crop_to_patches``
    of the crops' boxes, bit for bit). ``crops``: uint8 ``[3, h, w]``, ``h`` and ``w``
    multiples of ``factor``. Returns ``(pixel_values [sum of patches, 3 * temporal *
    patch^2]`` float32, ``image_grid_thw [M, 3]`` int64)."""
    fn = "crops_to_patches"
    factor = patch_size * merge_size
    for k, c in enumerate(crops):
        if not isinstance(c, Tensor) or c.dtype != torch.uint8 or c.dim() != 3 or \
                c.shape[0] != 3 or c.shape[1] % factor or c.shape[2] % factor:
            got = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{fn}: `crops[{k}]` must be a uint8 [3, h, w] tensor with h and w "
                             f"multiples of {factor}, got {got}")
    grid = torch.tensor([[1, c.shape[1] // patch_size, c.shape[2] // patch_size] for c in crops],
                        dtype=torch.int64).reshape(-1, 3)
    if not crops:
        return torch.empty(0, 3 * temporal_patch_size * patch_size ** 2), grid
    pv = crop_zoom_ref.crops_to_patches(list(crops), torch.as_tensor(mean, dtype=torch.float32),
                                        torch.as_tensor(std, dtype=torch.float32), patch_size,
                                        temporal_patch_size, merge_size)
    return pv, grid.to(pv.device)
