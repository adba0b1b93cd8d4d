"""The built-in visual-search task: find the small shape inside the black ring and name its
colour. It runs on a laptop CPU with a tiny model and needs no download.

Each image (``image_size`` pixels square, default 224) has a grey gradient background with
noise, one small target shape (``target_size`` pixels) inside a dark ring in one quadrant, and
small distractor shapes of other colours in the other quadrants. The model sees the image at the
vision encoder's resolution (``view_size``, default 56: a quarter of the pixels each way, where
the 16-pixel target shrinks to 4 pixels, blurred into the background); it should zoom into
the ring's quadrant (``image_zoom_in_tool`` with a box in view pixels), whose crop comes back at
the same resolution, twice the view's detail (an 8-pixel blob), describe it
(``<description>red circle</description>``) and answer the colour (``<answer>red</answer>``).

Everything is generated from ``(seed, split, index)``: the same sample every time, and the
``eval`` split never overlaps ``train``. The scripted expert writes a trajectory for each sample
(for the supervised warm start); by default it has a blind spot: when the ring is in the
bottom-right quadrant it looks there only one time in three, and otherwise zooms into the
top-left one, describes what it finds there and answers from that. A policy that imitates it
(greedily: the top-left zoom) is right about three times in four; closing the gap takes
reinforcement learning. ``region_terms`` is the
ground truth of any box (for the ``OracleVerifier``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple

import torch

Tensor = torch.Tensor

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (40, 200, 60), "blue": (40, 70, 235),
    "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What colour is the shape inside the black ring? Zoom in to see it."
SPLITS = {"train": 0, "eval": 1}


@dataclass
class Sample:
    """One task instance: the image (uint8 ``[3, S, S]``), the question, the answer (a colour),
    the target's quadrant ``(row, col)``, and every object as ``(colour, shape, cx, cy)``
    (the target first)."""
    image: Tensor
    question: str
    answer: str
    quadrant: Tuple[int, int]
    objects: List[Tuple[str, str, float, float]]
    index: int = 0


class VisualSearchTask:
    """Deterministic generator of visual-search samples (see the module doc).

    Args:
        seed: the task seed; ``sample(split, i)`` depends only on ``(seed, split, i)``.
        image_size: side of the original image in pixels (a multiple of 4, >= 64).
        view_size: side of the image as the model sees it (the engine's resize target, a
            multiple of 28; the engine's ``min_pixels = max_pixels = view_size ** 2``).
        target_size: side of each shape in original pixels.
        distractors: distractor shapes, spread over the quadrants without the target.
        expert_blind_spot: the scripted expert mostly misses the bottom-right quadrant (see
            the module doc); False makes it perfect.
    """

    def __init__(self, seed: int = 0, *, image_size: int = 224, view_size: int = 56,
                 target_size: int = 28, distractors: int = 3, expert_blind_spot: bool = True):
        fn = "VisualSearchTask"
        for name, v, lo in (("image_size", image_size, 64), ("view_size", view_size, 56),
                            ("target_size", target_size, 4), ("distractors", distractors, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{fn}: `{name}` must be an int >= {lo}, got {v!r}")
        if image_size % 4:
            raise ValueError(f"{fn}: `image_size` must be a multiple of 4, got {image_size}")
        if view_size % 28:
            raise ValueError(f"{fn}: `view_size` must be a multiple of 28, got {view_size}")
        if 4 * target_size > image_size // 2:
            raise ValueError(f"{fn}: `target_size` {target_size} is too large for a quadrant of "
                             f"{image_size // 2} pixels (at most {image_size // 8})")
        self.seed, self.image_size, self.view_size = int(seed), image_size, view_size
        self.target_size, self.distractors = target_size, distractors
        self.expert_blind_spot = bool(expert_blind_spot)
        self.ring_radius = 1.6 * target_size

    # ---- samples -----------------------------------------------------------------------------
    def sample(self, split: str, index: int) -> Sample:
        if split not in SPLITS:
            raise ValueError(f"VisualSearchTask.sample: `split` must be one of {list(SPLITS)}, "
                             f"got {split!r}")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"VisualSearchTask.sample: `index` must be an int >= 0, got "
                             f"{index!r}")
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + SPLITS[split] * 7_919 + index * 2) % (2 ** 63))
        half = self.image_size // 2

        def randint(n: int) -> int:
            return int(torch.randint(n, (1,), generator=g))

        colours, shapes = list(COLOURS), list(SHAPES)
        colour, shape = colours[randint(len(colours))], shapes[randint(len(shapes))]
        qr, qc = randint(2), randint(2)
        margin = self.ring_radius + 4
        cx = qc * half + margin + float(torch.rand((), generator=g)) * (half - 2 * margin)
        cy = qr * half + margin + float(torch.rand((), generator=g)) * (half - 2 * margin)
        objects = [(colour, shape, cx, cy)]
        others = [(r, c) for r in range(2) for c in range(2) if (r, c) != (qr, qc)]
        for k in range(self.distractors):
            r, c = others[k % len(others)]
            dc = [x for x in colours if x != colour][randint(len(colours) - 1)]
            ds = shapes[randint(len(shapes))]
            m = self.target_size
            x = c * half + m + float(torch.rand((), generator=g)) * (half - 2 * m)
            y = r * half + m + float(torch.rand((), generator=g)) * (half - 2 * m)
            objects.append((dc, ds, x, y))
        image = self._render(objects, g)
        return Sample(image, QUESTION, colour, (qr, qc), objects, index)

    def _render(self, objects, g: torch.Generator) -> Tensor:
        S = self.image_size
        ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32) + 0.5,
                                torch.arange(S, dtype=torch.float32) + 0.5, indexing="ij")
        # grey background whose brightness rises left to right and (twice as fast) top to
        # bottom: where a region lies shows in its brightness, never in its colour
        grey = 50 + 40 * xs / S + 80 * ys / S
        img = torch.stack([grey, grey, grey])
        img = img + torch.empty(3, S, S).uniform_(-18, 18, generator=g)
        tcx, tcy = objects[0][2], objects[0][3]
        d = torch.sqrt((xs - tcx) ** 2 + (ys - tcy) ** 2)
        ring = (d - self.ring_radius).abs() <= 2.0
        img[:, ring] = 20.0
        h = self.target_size / 2
        for colour, shape, cx, cy in objects:
            dx, dy = xs - cx, ys - cy
            if shape == "circle":
                inside = dx ** 2 + dy ** 2 <= h ** 2
            elif shape == "square":
                inside = (dx.abs() <= h * 0.85) & (dy.abs() <= h * 0.85)
            else:  # triangle, apex up
                inside = (dy <= h) & (dy >= -h) & (dx.abs() <= (dy + h) / 2)
            img[:, inside] = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None]
        return img.round().clamp(0, 255).to(torch.uint8)

    def batch(self, split: str, start: int, n: int) -> List[Sample]:
        return [self.sample(split, i) for i in range(start, start + n)]

    # ---- prompts, expert, ground truth ---------------------------------------------------------
    @staticmethod
    def images(s: Sample) -> List[Tensor]:
        """The sample's original images, in prompt order."""
        return [s.image]

    def prompt(self, s: Sample) -> List[Dict[str, Any]]:
        """The chat prompt of a sample (image, then question) for ``RolloutEngine``."""
        return [{"role": "user", "content": [{"type": "image", "image": s.image},
                                             {"type": "text", "text": s.question}]}]

    def quadrant_box(self, quadrant: Tuple[int, int]) -> List[int]:
        """The zoom box of a quadrant in view pixels ``[x1, y1, x2, y2]``."""
        r, c = quadrant
        h = self.view_size // 2
        return [c * h, r * h, c * h + h, r * h + h]

    def expert_turns(self, s: Sample) -> Tuple[str, str]:
        """The scripted expert: the tool call (zoom on the ring's quadrant, or with the blind
        spot, for two samples in three whose ring is bottom-right, on the top-left one), and
        after the crop, the description of the crop's first object and the answer from it."""
        quadrant = s.quadrant
        if self.expert_blind_spot and quadrant == (1, 1) and s.index % 3:
            quadrant = (0, 0)
        call = {"name": "image_zoom_in_tool",
                "arguments": {"bbox_2d": self.quadrant_box(quadrant)}}
        half = self.image_size // 2
        seen = [o for o in s.objects if (int(o[3] // half), int(o[2] // half)) == quadrant]
        colour, shape = seen[0][:2] if seen else ("no", "shape")
        return (f"<tool_call>{json.dumps(call)}</tool_call>",
                f"<description>{colour} {shape}</description><answer>{colour}</answer>")

    def region_terms(self, s: Sample, box: Sequence[float]) -> Set[str]:
        """The ground truth of a crop ``box = (image_index, x1, y1, x2, y2)`` in original
        pixels: the colour and shape of every object whose centre lies inside it."""
        _, x1, y1, x2, y2 = box
        out: Set[str] = set()
        for colour, shape, cx, cy in s.objects:
            if x1 <= cx < x2 and y1 <= cy < y2:
                out |= {colour, shape}
        return out

    @property
    def vocabulary(self) -> List[str]:
        """The terms the ``OracleVerifier`` looks for in descriptions."""
        return list(COLOURS) + list(SHAPES)

    def corpus(self, n: int = 64) -> List[str]:
        """Text for training the task's tokenizer: prompts and expert turns, with every box a
        model may write."""
        texts = [QUESTION]
        for i in range(n):
            s = self.sample("train", i)
            texts += list(self.expert_turns(s))
        for r in range(2):
            for c in range(2):
                texts.append(json.dumps({"bbox_2d": self.quadrant_box((r, c))}))
        texts += [f"<|im_start|>{role}\n" for role in ("system", "user", "assistant")]
        texts += ["<|im_end|>\n", "<tool_response>", "</tool_response>",
                  "Error: bbox_2d is outside the image"] + [str(i) for i in range(200)]
        return texts * 4

