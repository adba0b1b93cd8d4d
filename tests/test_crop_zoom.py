"""crop_and_zoom / crop_to_patches against PIL and transformers' Qwen2VLImageProcessor.

Tolerances: integer boxes must agree with PIL's crop + resize to a mean absolute difference of
1.5 grey levels (the requirement; observed 0.21-0.42). PIL resamples in two passes with an
8-bit intermediate that it clips to [0, 255]; we resample in one float pass. On smooth
(natural-image-like) inputs the two differ by at most 1 level at any pixel (rounding at .5);
on pure noise, bicubic overshoot between neighbouring 0 and 255 pixels is clipped by PIL's
intermediate and single pixels differ by up to ~22 levels, so the per-pixel bound is only
asserted on smooth images. Patches are compared in grey levels for the same reason (one level
is 1/255/std ~ 0.015 in normalised units)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mapo_fast
from mapo_fast.tools import BoxError, crop_and_zoom, crop_to_patches, smart_resize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def rand_image(h, w, g, smooth=False):
    im = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    if smooth and min(h, w) >= 5:  # natural-image-like: local correlation
        im = torch.nn.functional.avg_pool2d(im.float()[None], 5, 1, 2)[0].round().to(torch.uint8)
    return im


def pil_crop(im, box, out_hw):
    pil = Image.fromarray(im.permute(1, 2, 0).numpy())
    res = pil.crop(tuple(int(v) for v in box)).resize((out_hw[1], out_hw[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(res).copy()).permute(2, 0, 1)


def random_boxes(h, w, g, n):
    """Integer boxes: random, touching every border, 1-pixel, the whole image, and thin."""
    out = [(0, 0, w, h), (w - 1, h - 1, w, h), (0, h // 2, w, h)]
    for _ in range(n):
        x1 = int(torch.randint(0, w, (1,), generator=g))
        y1 = int(torch.randint(0, h, (1,), generator=g))
        x2 = int(torch.randint(x1 + 1, w + 1, (1,), generator=g))
        y2 = int(torch.randint(y1 + 1, h + 1, (1,), generator=g))
        out.append((x1, y1, x2, y2))
    return [b for b in out if max(b[2] - b[0], b[3] - b[1]) / min(b[2] - b[0], b[3] - b[1]) <= 200]


SHAPES = [(1, 1), (1, 190), (7, 5), (61, 77), (300, 451), (1024, 767), (3000, 211)]


@pytest.mark.parametrize("hw", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_integer_boxes_agree_with_pil(hw):
    g = torch.Generator().manual_seed(hw[0] * 7919 + hw[1])
    for smooth in (False, True):
        im = rand_image(*hw, g, smooth)
        boxes = random_boxes(*hw, g, 4)
        crops = crop_and_zoom([im], [(0, *b) for b in boxes])
        for box, crop in zip(boxes, crops):
            assert crop.dtype == torch.uint8
            expected = smart_resize(box[3] - box[1], box[2] - box[0], 28, 56 * 56, 1024 * 28 * 28)
            assert tuple(crop.shape[1:]) == expected
            ref = pil_crop(im, box, expected)
            d = (crop.int() - ref.int()).abs().float()
            assert d.mean() <= 1.5, (box, d.mean())
            if smooth:
                assert d.max() <= 2, (box, d.max())


def test_fixed_size_and_boxes_larger_than_the_output():
    g = torch.Generator().manual_seed(1)
    im = rand_image(400, 500, g, smooth=True)
    boxes = [(0, 0, 0, 500, 400), (0, 10, 20, 33, 25)]
    for crop, b in zip(crop_and_zoom(im, boxes, size=(32, 48)), boxes):
        assert crop.shape == (3, 32, 48)
        d = (crop.int() - pil_crop(im, b[1:], (32, 48)).int()).abs().float()
        assert d.mean() <= 1.5


def test_fractional_boxes_sample_at_their_exact_position():
    """On an image linear in x, bilinear upsampling is exact: interior outputs equal the line at
    each output sample's exact (fractional) position."""
    W, H = 64, 8
    x = torch.arange(W, dtype=torch.float32)
    im = (3.0 * x + 20.0).round().to(torch.uint8).expand(3, H, W).contiguous()
    x1, x2 = 10.25, 30.75
    out_w = 41
    crop = crop_and_zoom(im, [(0, x1, 2.0, x2, 6.0)], size=(4, out_w), mode="bilinear")[0]
    centers = x1 + (torch.arange(out_w) + 0.5) * (x2 - x1) / out_w
    expected = 3.0 * (centers - 0.5) + 20.0
    interior = slice(2, out_w - 2)
    got = crop[0, 1].float()
    assert (got[interior] - expected[interior]).abs().max() <= 0.5 + 1e-4
    # shifting the box by a quarter pixel shifts every sample by 3 * 0.25 grey levels
    shifted = crop_and_zoom(im, [(0, x1 + 0.25, 2.0, x2 + 0.25, 6.0)], size=(4, out_w),
                            mode="bilinear")[0][0, 1].float()
    assert ((shifted - got)[interior] - 0.75).abs().max() <= 1.0


def test_batched_call_equals_per_image_calls():
    g = torch.Generator().manual_seed(2)
    images = [rand_image(h, w, g, smooth=True) for h, w in [(97, 131), (640, 480), (33, 35)]]
    boxes = [(2, 1, 1, 30, 20), (0, 5, 5, 90, 60), (1, 100, 50, 420, 600), (0, 0, 0, 131, 97),
             (1, 0.5, 0.5, 10.5, 30.25)]
    batched = crop_and_zoom(images, boxes)
    for b, crop in zip(boxes, batched):
        alone = crop_and_zoom(images[int(b[0])], [(0, *b[1:])])[0]
        assert torch.equal(crop, alone)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf
    g = torch.Generator().manual_seed(3)
    for _ in range(300):
        h, w = (int(v) for v in torch.randint(1, 4000, (2,), generator=g))
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, 28, 56 * 56, 1024 * 28 * 28) == hf(h, w, 28, 56 * 56,
                                                                     1024 * 28 * 28), (h, w)


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil()


@pytest.mark.parametrize("hw", [(61, 77), (300, 451), (1200, 900), (2000, 3000)])
def test_patches_match_qwen2vl_image_processor(hw):
    g = torch.Generator().manual_seed(hw[0] + hw[1])
    im = rand_image(*hw, g, smooth=True)
    boxes = random_boxes(*hw, g, 3)
    proc = hf_processor()
    pil = Image.fromarray(im.permute(1, 2, 0).numpy())
    ref = proc([pil.crop(b) for b in boxes], return_tensors="np")
    pixel_values, grid = crop_to_patches([im], [(0, *b) for b in boxes])
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert pixel_values.shape == ref["pixel_values"].shape
    # compare in grey levels: undo the normalisation's 1/(255 std) per channel
    std = np.repeat(CLIP_STD, 2 * 14 * 14)
    levels = np.abs(pixel_values.numpy() - ref["pixel_values"]) * std * 255
    assert levels.mean() <= 0.5, levels.mean()
    assert levels.max() <= 2.0 + 1e-3, levels.max()


def test_errors_name_the_argument():
    im = torch.zeros(3, 20, 30, dtype=torch.uint8)
    cases = [
        (lambda: crop_and_zoom([im], [(0, 5, 5, 4, 9)]), BoxError, r"`boxes\[0\]` \[5, 5, 4, 9\] is empty"),
        (lambda: crop_and_zoom([im], [(0, 0, 0, 31, 9)]), BoxError, r"outside the image \(width 30, height 20\)"),
        (lambda: crop_and_zoom([im], [(0, 0, math.nan, 3, 9)]), BoxError, "non-finite"),
        (lambda: crop_and_zoom([im], [(1, 0, 0, 3, 9)]), ValueError, r"`boxes\[0\]` has image_index 1"),
        (lambda: crop_and_zoom([im], [(0, 0, 0, 3)]), ValueError, r"`boxes` must have shape \[M, 5\]"),
        (lambda: crop_and_zoom([im.float()], [(0, 0, 0, 3, 9)]), ValueError, r"`images\[0\]` must be a uint8"),
        (lambda: crop_and_zoom([im], [(0, 0, 0, 3, 9)], size=0), ValueError, "`size`"),
        (lambda: crop_and_zoom([im], [(0, 0, 0, 3, 9)], mode="lanczos"), ValueError, "`mode`.*'lanczos'"),
        (lambda: crop_and_zoom([im], [(0, 0, 0, 3, 9)], min_pixels=10, max_pixels=5), ValueError, "`min_pixels`"),
        (lambda: crop_to_patches([im], [(0, 0, 0, 3, 9)], std=(1, 0, 1)), ValueError, "`std`"),
        (lambda: crop_and_zoom([], [(0, 0, 0, 3, 9)]), ValueError, "`images` is empty"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_kernel_under_interpreter_equals_torch_path(monkeypatch):
    """The Triton kernel (interpreter on CPU) against the torch path, crops and patches, with
    poisoned output buffers; values may differ by one level where fp32 and fp64 round a .5
    differently."""
    pytest.importorskip("triton")
    from mapo_fast.kernels import crop_zoom as K
    from mapo_fast.kernels import crop_zoom_ref as R
    g = torch.Generator().manual_seed(4)
    images = [rand_image(37, 53, g).to(DEV), rand_image(90, 20, g).to(DEV)]
    index = [0, 1, 0]
    boxes = [(3.0, 4.0, 50.0, 30.0), (0.0, 0.0, 20.0, 90.0), (10.25, 7.5, 11.75, 9.0)]
    sizes = [(17, 30), (40, 9), (5, 6)]
    for mode, aa in [("bicubic", True), ("bilinear", False)]:
        flat = torch.full((sum(3 * h * w for h, w in sizes),), 77, dtype=torch.uint8, device=DEV)
        got = K.crop_and_zoom(images, index, boxes, sizes, mode, aa, out=flat)
        want = R.crop_and_zoom([im.cpu() for im in images], index, boxes, sizes, mode, aa)
        for a, b in zip(got, want):
            assert (a.cpu().int() - b.int()).abs().max() <= 1
    sizes = [(28, 56), (56, 28), (28, 28)]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=DEV)
    std = torch.tensor(CLIP_STD, device=DEV)
    out = torch.full((2 * 4 + 2 * 4 + 4, 1176), float("nan"), device=DEV)
    got = K.crop_to_patches(images, index, boxes, sizes, "bicubic", True, mean, std, 14, 2, 2,
                            out=out)
    want = R.crop_to_patches([im.cpu() for im in images], index, boxes, sizes, "bicubic", True,
                             mean.cpu(), std.cpu(), 14, 2, 2)
    assert torch.isfinite(got).all(), "unwritten patch elements"
    assert ((got.cpu() - want).abs() * std.cpu().repeat_interleave(392) * 255).max() <= 1.0 + 1e-3


def test_public_ops_dispatch_to_the_kernel(monkeypatch):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(5)
    im = rand_image(40, 40, g).to(DEV)
    box = [(0, 4.0, 4.0, 30.0, 32.0)]
    monkeypatch.setenv("MAPO_FAST_BACKEND", "torch")
    a, ga = mapo_fast.crop_to_patches(im, box)
    monkeypatch.setenv("MAPO_FAST_BACKEND", "triton")
    b, gb = mapo_fast.crop_to_patches(im, box)
    assert torch.equal(ga, gb)
    assert ((a - b).abs() * torch.tensor(CLIP_STD, device=DEV).repeat_interleave(392) * 255).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_crop_to_patches_writes_a_given_out_buffer(monkeypatch, backend):
    """``out``: a poisoned buffer (or a row slice of a larger one) is filled with exactly the
    patches a fresh call returns, and returned as is; a wrong buffer is named."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MAPO_FAST_BACKEND", backend)
    g = torch.Generator().manual_seed(6)
    images = [rand_image(70, 95, g).to(DEV), rand_image(61, 44, g).to(DEV)]
    boxes = [(0, 3, 4, 60, 50), (1, 0.5, 2.0, 40.0, 61.0)]
    want, grid = crop_to_patches(images, boxes)
    buf = torch.full((want.shape[0] + 5, want.shape[1]), float("nan"), device=DEV)
    got, grid2 = crop_to_patches(images, boxes, out=buf[:want.shape[0]])
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
    assert torch.equal(grid, grid2) and torch.isnan(buf[want.shape[0]:]).all()
    shape = tuple(want.shape)
    for bad, text in [(torch.empty(shape[0] + 1, shape[1], device=DEV),
                       rf"got \({shape[0] + 1}, {shape[1]}\) torch.float32"),
                      (torch.empty(shape, dtype=torch.float64, device=DEV), "torch.float64"),
                      (torch.empty(shape[1], shape[0], device=DEV).t(), ", not contiguous"),
                      ("buffer", "got str")]:
        with pytest.raises(ValueError, match=rf"crop_to_patches: `out` must be a contiguous "
                                             rf"float32 tensor of shape \({shape[0]}, "
                                             rf"{shape[1]}\) on .*{text}"):
            crop_to_patches(images, boxes, out=bad)


def test_patches_of_the_crops_equal_cutting_the_boxes_again():
    """A crop cut once by ``crop_and_zoom`` at the patch grid, laid out by ``crops_to_patches``
    (no resample), equals ``crop_to_patches`` of its box from the original, bit for bit
    (awkward fractional boxes, shrinking and enlarging, two images)."""
    from mapo_fast.tools import crops_to_patches
    g = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (3, 97, 131), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (3, 300, 250), dtype=torch.uint8, generator=g)]
    boxes = [(0, 3.5, 2.25, 90.0, 60.75), (1, 10, 20, 240, 290), (1, 0, 0, 29, 31),
             (0, 50, 40, 131, 97)]
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    crops = crop_and_zoom(images, boxes, factor=28, **kw)
    got, grid = crops_to_patches(crops)
    want, want_grid = crop_to_patches(images, boxes, **kw)
    assert torch.equal(grid, want_grid)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"`crops\[1\]` must be a uint8 \[3, h, w\] tensor with "
                                         r"h and w multiples of 28, got torch.uint8 \(3, 30, 28\)"):
        crops_to_patches([crops[0], torch.zeros(3, 30, 28, dtype=torch.uint8)])
    empty, empty_grid = crops_to_patches([])
    assert empty.shape == (0, 3 * 2 * 14 ** 2) and empty_grid.shape == (0, 3)
