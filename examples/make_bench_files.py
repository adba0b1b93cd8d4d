"""Small made-up benchmark files in V* Bench's and HR-Bench's layouts, to try ``mapo-eval``
without a download: each image is noise with one small coloured square, the question asks its
colour (V*: ``direct_attributes``) or which half it is in (``relative_position``); the target's
box is given, so action accuracy is reported. Also a few bad records (a missing image, an
answer that names no option, a question without options) that ``mapo-eval`` skips with a
reason.

``--builtin-seed K`` also writes ``builtin/test_questions.jsonl``: the built-in task's held-out
samples (``mapo-train --seed K``'s ``eval`` split, with its ``--task.*`` options given after
``--``) as multiple-choice questions in V* Bench's layout, the target's box included, so that a
``mapo-train`` checkpoint can be scored by ``mapo-eval`` on the images it was evaluated on:

    python examples/make_bench_files.py --out bench_files --n 24
    mapo-eval --model runs/mapo --data bench_files/vstar/test_questions.jsonl --out runs/eval-vstar
    mapo-eval --model runs/mapo --data bench_files/hr_bench_4k.parquet --out runs/eval-hr
    python examples/make_bench_files.py --out bench_files --builtin-seed 0 --n 256
    mapo-eval --model runs/mapo --data bench_files/builtin/test_questions.jsonl --system none
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from typing import Any, Dict, List, Tuple

import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 30)}
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def scene(i: int, size: int) -> Tuple[Any, str, List[int]]:
    """A PIL image (noise and one square), the square's colour and box ``[x1, y1, x2, y2]``."""
    from PIL import Image
    g = torch.Generator().manual_seed(i)
    px = torch.randint(90, 160, (size, size, 3), generator=g, dtype=torch.uint8)
    colour = list(COLOURS)[i % len(COLOURS)]
    side = max(8, size // 12)
    x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
    px[y:y + side, x:x + side] = torch.tensor(COLOURS[colour], dtype=torch.uint8)
    return Image.fromarray(px.numpy()), colour, [x, y, x + side, y + side]


def question(i: int, colour: str, box: List[int], size: int) -> Tuple[str, List[str], int, str]:
    """``(question, options, index of the right one, category)``."""
    if i % 3 == 2:
        left = (box[0] + box[2]) / 2 < size / 2
        return (f"Is the {colour} square on the left or the right side of the image?",
                ["left", "right"], 0 if left else 1, "relative_position")
    names = list(COLOURS)
    return ("What is the colour of the small square?", names, names.index(colour),
            "direct_attributes")


def vstar(out: str, n: int, size: int) -> str:
    """``out/vstar/test_questions.jsonl`` with images under ``out/vstar/<category>/``."""
    root = os.path.join(out, "vstar")
    rows: List[Dict[str, Any]] = []
    for i in range(n):
        img, colour, box = scene(i, size)
        q, options, right, cat = question(i, colour, box, size)
        rel = f"{cat}/sa_{i}.png"
        os.makedirs(os.path.join(root, cat), exist_ok=True)
        img.save(os.path.join(root, rel))
        inline = "\n".join(f"({'ABCD'[j]}) {o}" for j, o in enumerate(options))
        rows.append({"image": rel, "text": f"{q}\n{inline}\n{INSTRUCTION}", "category": cat,
                     "question_id": i, "label": "ABCD"[right], "bbox": box})
    rows += [{"image": "direct_attributes/missing.png", "text": "Which?\n(A) a\n(B) b",
              "category": "direct_attributes", "question_id": n, "label": "A"},
             {"image": rows[0]["image"], "text": "Which?\n(A) a\n(B) b",
              "category": "direct_attributes", "question_id": n + 1, "label": "E"},
             {"image": rows[0]["image"], "text": "A question without options",
              "category": "direct_attributes", "question_id": n + 2, "label": "A"}]
    path = os.path.join(root, "test_questions.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def hr_bench(out: str, n: int, size: int) -> str:
    """``out/hr_bench_4k.parquet``: options as columns A-D, the image base64-encoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = []
    for i in range(n):
        img, colour, box = scene(1000 + i, size)
        q, options, right, _ = question(i, colour, box, size)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        opts = (options + ["-", "-"])[:4] if len(options) < 4 else options
        rows.append({"index": i, "question": q, **{L: o for L, o in zip("ABCD", opts)},
                     "answer": "ABCD"[right], "category": "single" if i % 2 else "cross",
                     "image": base64.b64encode(buf.getvalue()).decode()})
    rows.append(dict(rows[0], index=n, image="not base64 and not a file"))
    path = os.path.join(out, "hr_bench_4k.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def builtin(out: str, n: int, seed: int, task_args: List[str]) -> str:
    """``out/builtin/test_questions.jsonl``: the first ``n`` held-out samples of the built-in
    task of ``seed`` (``task_args``: its ``--task.*`` keys), the question with the palette as
    options, the answer's letter, the target's box."""
    from mapo_fast.trainer import parse_args
    cfg = parse_args(["--seed", str(seed), *task_args])
    task = cfg.visual_search_task()
    root = os.path.join(out, "builtin")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    from PIL import Image
    palette = list(task.colours)
    rows = []
    for i in range(n):
        s = task.sample("eval", i)
        rel = f"images/{i}.png"
        Image.fromarray(s.image.permute(1, 2, 0).numpy()).save(os.path.join(root, rel))
        h = task.target_size / 2
        _, _, cx, cy = s.objects[0]
        inline = "\n".join(f"({'ABCD'[j]}) {c}" for j, c in enumerate(palette))
        rows.append({"image": rel, "text": f"{s.question}\n{inline}", "category": task.detail,
                     "question_id": i, "label": "ABCD"[palette.index(s.answer)],
                     "bbox": [cx - h, cy - h, cx + h, cy + h]})
    path = os.path.join(root, "test_questions.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def main(argv=None) -> Tuple[str, ...]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_files", help="output folder (default bench_files)")
    p.add_argument("--n", type=int, default=24, help="questions per file (default 24)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--builtin-seed", type=int, default=None,
                   help="also the built-in task's held-out samples of this seed (task keys "
                        "after --)")
    argv = list(sys.argv[1:] if argv is None else argv)
    task_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.n < 1 or a.size < 32:
        p.error(f"--n must be >= 1 and --size >= 32, got {a.n} and {a.size}")
    os.makedirs(a.out, exist_ok=True)
    paths = vstar(a.out, a.n, a.size), hr_bench(a.out, a.n, a.size)
    if a.builtin_seed is not None:
        paths += (builtin(a.out, a.n, a.builtin_seed, task_args),)
    print("wrote", *paths)
    return paths


if __name__ == "__main__":
    main()
