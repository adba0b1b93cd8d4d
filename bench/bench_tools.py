"""Crop-and-zoom to vision-encoder patches, side by side in one run: PIL crop + resize +
transformers' Qwen2-VL image processor per crop (what trainers do today), the same processor
called once on all crops, torchvision ``roi_align`` + normalise + patchify (when torchvision
imports), and ``mapo_fast.crop_to_patches`` (one batched call; and again writing into an
output buffer reused across calls, ``out=``, as a rollout loop can).

Workload: 64 boxes (sides 96-1024 px, seeded) over 8 images of 2048 x 2048 (and 4096 x 4096).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Tuple

import torch

import mapo_fast
from mapo_fast.kernels.crop_zoom_ref import patchify
from mapo_fast.tools.ops import CLIP_MEAN, CLIP_STD, smart_resize

try:
    from harness import (device_info, main as bench_main, measure, memory_in_subprocess,
                         report_memory, write_report)
except ImportError:  # imported as bench.bench_tools
    from .harness import (device_info, main as bench_main, measure, memory_in_subprocess,
                         report_memory, write_report)

# (images, side, boxes) per scale
SCALES = {"quick": [(2, 512, 8)], "cpu": [(8, 2048, 64), (8, 4096, 64)],
          "gpu": [(8, 2048, 64), (8, 4096, 64), (8, 4096, 512)]}


def make_workload(n_images: int, side: int, n_boxes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n_images):  # smooth random content: compressible like a photo, no PIL decode
        small = torch.randint(0, 256, (3, side // 16, side // 16), generator=g).float()
        images.append(torch.nn.functional.interpolate(small[None], size=(side, side),
                                                      mode="bilinear")[0].round()
                      .clamp(0, 255).to(torch.uint8))
    boxes = []
    for _ in range(n_boxes):
        w, h = (int(v) for v in torch.randint(min(96, side // 2), min(1024, side) + 1, (2,),
                                              generator=g))
        x1 = int(torch.randint(0, side - w + 1, (1,), generator=g))
        y1 = int(torch.randint(0, side - h + 1, (1,), generator=g))
        boxes.append((int(torch.randint(0, n_images, (1,), generator=g)), x1, y1, x1 + w, y1 + h))
    return [im.to(device) for im in images], boxes


def patch_count(boxes) -> int:
    """Patch rows of the crops of ``boxes`` at the processor's default resize rule."""
    return sum((h // 14) * (w // 14) for h, w in
               (smart_resize(y2 - y1, x2 - x1, 28, 56 * 56, 28 * 28 * 1280)
                for _, x1, y1, x2, y2 in boxes))


def cases(images, boxes, device) -> List[Tuple[str, Callable[[], None], str]]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc = Qwen2VLImageProcessorPil()
    pil = [Image.fromarray(im.cpu().permute(1, 2, 0).numpy()) for im in images]

    def per_crop():  # the patches are kept until the model consumes them, as a trainer does
        return [proc(pil[i].crop(tuple(b)), return_tensors="np") for i, *b in boxes]

    def batched_processor():
        return proc([pil[i].crop(tuple(b)) for i, *b in boxes], return_tensors="np")

    out = [("PIL + HF processor, per crop", per_crop, "what trainers do today"),
           ("PIL + HF processor, one call", batched_processor, "all crops in one processor call")]
    try:
        from torchvision.ops import roi_align
        mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=device)[:, None, None]
        fimgs = [im.float()[None] for im in images]

        def torchvision_path():
            for i, x1, y1, x2, y2 in boxes:
                h, w = smart_resize(y2 - y1, x2 - x1, 28, 56 * 56, 28 * 28 * 1280)
                r = roi_align(fimgs[i], [torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32,
                                                      device=device)], (h, w), aligned=True)[0]
                patchify((r.round() / 255.0 - mean) / std, 14, 2, 2)
        out.append(("torchvision roi_align + patchify", torchvision_path, "bilinear, per box"))
    except Exception:  # torchvision absent or not loadable beside this torch build
        pass

    def ours():
        return mapo_fast.crop_to_patches(images, boxes)
    out.append(("mapo_fast crop_to_patches", ours,
                "Triton" if device.type == "cuda" else "torch path, one batched call"))
    buf = torch.empty(patch_count(boxes), 3 * 2 * 14 * 14, device=device)
    buf.zero_()  # touched once, before timing

    def ours_reused():
        return mapo_fast.crop_to_patches(images, boxes, out=buf)
    out.append(("mapo_fast crop_to_patches, out= reused", ours_reused,
                "same call writing a buffer allocated once (not counted)"))
    return out


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str):
    info = device_info(device)
    results = []
    for i, (n_images, side, n_boxes) in enumerate(SCALES[scale]):
        images, boxes = make_workload(n_images, side, n_boxes, device)
        patches = patch_count(boxes)
        workload = f"{n_boxes} boxes over {n_images} images of {side}x{side} -> {patches} patches"
        rows = []
        for name, fn, notes in cases(images, boxes, device):
            print(f"  {workload}: {name} ...", flush=True)
            args = ["--scale", scale, "--device", str(device), "--workload", str(i),
                    "--case", name]
            r = measure(name, fn, device, repeats=repeats, notes=notes,
                        memory=lambda args=args: memory_in_subprocess(Path(__file__), args))
            r.notes += f"; {n_boxes / (r.median_ms / 1e3):.0f} crops/s"
            print(f"    {r.median_ms:.1f} ms", flush=True)
            rows.append(r)
        results.append({"workload": workload, "cases": rows})
    desc = ("Boxes of 96-1024 px cropped from uint8 images and turned into Qwen2-VL patches "
            "(smart_resize, bicubic, rescale, CLIP normalisation, patch layout). Ratios are "
            "against mapo_fast; throughput in the notes. torchvision's roi_align row appears "
            "only where torchvision imports.")
    return write_report(f"tools-{tag}", "Crop-and-zoom to encoder patches", results, info, out_dir,
                        baseline="mapo_fast crop_to_patches", description=desc)


def _memory_case(a) -> None:
    images, boxes = make_workload(*SCALES[a.scale][a.workload], a.device)
    report_memory(dict((n, f) for n, f, _ in cases(images, boxes, a.device))[a.case], a.device)


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv, memory_case=_memory_case)


if __name__ == "__main__":
    main()
