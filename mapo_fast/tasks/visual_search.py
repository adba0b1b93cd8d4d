"""The built-in visual-search task: find the small shape inside the black ring and name its
colour.
It runs on a laptop CPU with a tiny model and needs no download, and it contains the failure
MAPO targets: a zoom that missed, a description that speaks of the target as if it had been
seen, and an answer that is sometimes right anyway.

**Images.** Each image (``image_size`` pixels square, default 224) has a grey gradient
background with noise, one small target shape (``target_size`` pixels) inside a dark ring in one
quadrant, and small distractor shapes of other colours in the other quadrants. The model sees
the image at the vision encoder's resolution (``view_size``, default 56: a quarter of the pixels
each way, where the target shrinks to a blurred blob); it should zoom into the ring's quadrant
(``image_zoom_in_tool`` with a box in view pixels), whose crop comes back at the same
resolution, twice the view's detail, describe it (``<description>red circle</description>``) and
answer the colour (``<answer>red</answer>``).

**The overview is informative but unreliable.** The disc inside the (black) ring is tinted:
with the target's colour with probability ``hint_reliability`` (default 0.75), with another
colour otherwise (``HINT_ALPHA`` of it over the background). The disc is large enough to show
in the overview, so a policy can guess the answer without zooming, and the guess is right about
three times in four: right answers after wrong zooms are common, and outcome-only credit for
the zoom is noisy.

**How the shapes are drawn** (``detail``, one of ``DETAILS``). ``solid`` (default): in flat
colour, so the target's colour also shows, blurred, in the overview. ``checker`` (the zoom-only
task): each shape is a checkerboard of its colour and that colour's complement (the palette is
then ``CHECKER_COLOURS``, whose four complementary pairs are the RGB cube's diagonals), in cells
of ``image_size / view_size`` pixels laid so that every overview pixel is centred on a cell
corner, and faded in over ``3 x cell + 1`` pixels at its edge. Resized to the overview, every
shape becomes the same grey blob whatever its colour (what is left of the pattern, about 2 of
255, is under the background's noise); a quadrant crop, at twice the overview's detail, shows
the cells. Only the zoom answers the question: without it, the tint is the only clue, and it is
right ``hint_reliability`` of the time.

**The scripted expert** writes one trajectory per sample for the supervised warm start. It has
a blind spot (``blind_spot``, one of ``BLIND_SPOTS``): by default (``bottom_row``), when the
ring is in a bottom quadrant it looks there only one time in three (``index % 3 == 0``) and
otherwise zooms into the quadrant above it; ``bottom_right`` misses only the bottom-right
quadrant (towards the top-left one); ``none`` never misses. What it writes after a missed zoom is chosen by name (``EXPERTS``):

- ``hallucinating`` (default): it describes the target as the overview suggests (the ring's
  tint and the target's shape, ``<description>red circle</description>``) although its crop
  shows a distractor, and answers the tint. The verifier scores that description low; the
  answer is right when the tint is. Shares of expert trajectories, by
  construction (``bottom_row``): missed zoom 1/2 x 2/3 = 33.3%, right answer with a wrong zoom
  33.3% x ``hint_reliability`` = 25% (``expected_gap_share``).
- ``honest``: it describes what the wrong crop holds and answers from it (always wrong): the
  verifier rewards the wrong action as much as the right one. This is the control.

A policy that imitates the expert greedily misses whenever the ring is in a bottom quadrant
(half the samples); closing that gap takes reinforcement learning, and only the semantic score
says which of the right answers came from a wrong zoom.

Everything is generated from ``(seed, split, index)``: the same sample every time, and the
``eval`` split never overlaps ``train``. ``region_terms`` is the ground truth of any box (for the
``OracleVerifier``), ``target_in`` whether a box holds the target (for action accuracy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple

import torch

from ..tools import ZoomInTool, format_tool_call
from ..trajectory import ANSWER_TAG, DESCRIPTION_TAG

Tensor = torch.Tensor

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (40, 200, 60), "blue": (40, 70, 235),
    "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What colour is the shape inside the black ring? Zoom in to see it."
SPLITS = {"train": 0, "eval": 1}
#: What the scripted expert writes after a missed zoom (see the module doc).
EXPERTS = ("hallucinating", "honest")
#: Where the scripted expert misses: ring quadrant ``(row, col)`` -> the quadrant it zooms into
#: instead (two samples in three, ``index % 3 != 0``).
BLIND_SPOTS: Dict[str, Dict[Tuple[int, int], Tuple[int, int]]] = {
    "bottom_row": {(1, 0): (0, 0), (1, 1): (0, 1)},
    "bottom_right": {(1, 1): (0, 0)},
    "none": {},
}
#: Forced openings of the first assistant turn (``VisualSearchTask.opening``) for checking
#: what the overview alone and a perfect zoom give a policy.
OPENINGS = ("no_zoom", "wrong_zoom", "right_zoom")
#: How much of the hint colour tints the disc inside the ring (the rest is background).
HINT_ALPHA = 0.5
#: The zoom-only palette (``detail="checker"``): each colour and its complement (a checker
#: cell's other colour) average to mid-grey; the four pairs are distinct.
CHECKER_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 225, 30), "blue": (30, 30, 225),
    "white": (225, 225, 225)}
#: How shapes are drawn (see the module doc), and each way's palette.
DETAILS: Dict[str, Dict[str, Tuple[int, int, int]]] = {"solid": COLOURS,
                                                       "checker": CHECKER_COLOURS}


@dataclass
class Sample:
    """One task instance: the image (uint8 ``[3, S, S]``), the question, the answer (a colour),
    the target's quadrant ``(row, col)``, and every object as ``(colour, shape, cx, cy)``
    (the target first), and ``hint``, the colour of the ring's tint (the overview's suggestion
    of the answer)."""
    image: Tensor
    question: str
    answer: str
    quadrant: Tuple[int, int]
    objects: List[Tuple[str, str, float, float]]
    index: int = 0
    hint: str = ""


class VisualSearchTask:
    """Deterministic generator of visual-search samples (see the module doc).

    Args:
        seed: the task seed; ``sample(split, i)`` depends only on ``(seed, split, i)``.
        image_size: side of the original image in pixels (a multiple of 4, >= 64).
        view_size: side of the image as the model sees it (the engine's resize target, a
            multiple of 28; the engine's ``min_pixels = max_pixels = view_size ** 2``).
        target_size: side of each shape in original pixels.
        distractors: distractor shapes, spread over the quadrants without the target.
        blind_spot: where the scripted expert mostly misses, one of ``BLIND_SPOTS``.
        expert: what the expert writes after a missed zoom, one of ``EXPERTS``.
        hint_reliability: probability that the ring's tint is the target's colour.
        detail: how shapes are drawn, one of ``DETAILS`` (``checker``: only a zoom shows their
            colour).
        describe: whether the expert describes each crop (``<description>``) before it
            answers; False: it answers at once (the protocol without descriptions).
    """

    def __init__(self, seed: int = 0, *, image_size: int = 224, view_size: int = 56,
                 target_size: int = 28, distractors: int = 3, blind_spot: str = "bottom_row",
                 expert: str = "hallucinating", hint_reliability: float = 0.75,
                 detail: str = "solid", describe: bool = True):
        fn = "VisualSearchTask"
        if not isinstance(describe, bool):
            raise ValueError(f"{fn}: `describe` must be a bool, got {describe!r}")
        if detail not in DETAILS:
            raise ValueError(f"{fn}: `detail` must be one of {list(DETAILS)}, got {detail!r}")
        if blind_spot not in BLIND_SPOTS:
            raise ValueError(f"{fn}: `blind_spot` must be one of {list(BLIND_SPOTS)}, got "
                             f"{blind_spot!r}")
        if expert not in EXPERTS:
            raise ValueError(f"{fn}: `expert` must be one of {list(EXPERTS)}, got {expert!r}")
        if not isinstance(hint_reliability, (int, float)) or isinstance(hint_reliability, bool) \
                or not 0.0 <= hint_reliability <= 1.0:
            raise ValueError(f"{fn}: `hint_reliability` must be a number in [0, 1], got "
                             f"{hint_reliability!r}")
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
        if detail == "checker" and (image_size % view_size or image_size // view_size % 2
                                    or image_size < 4 * view_size):
            raise ValueError(f"{fn}: `detail` 'checker' needs `image_size` ({image_size}) to be "
                             f"an even multiple of `view_size` ({view_size}), at least 4 times "
                             "it (checker cells that the overview averages and a quadrant crop "
                             "resolves)")
        self.seed, self.image_size, self.view_size = int(seed), image_size, view_size
        self.target_size, self.distractors = target_size, distractors
        self.blind_spot = blind_spot
        self.expert, self.hint_reliability = expert, float(hint_reliability)
        self.ring_radius = 1.6 * target_size
        self.detail, self.colours = detail, DETAILS[detail]
        self.describe = describe

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

        colours, shapes = list(self.colours), list(SHAPES)
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
        image, hint = self._render(objects, g)
        return Sample(image, QUESTION, colour, (qr, qc), objects, index, hint)

    def _hint(self, colour: str, g: torch.Generator) -> str:
        """The disc's tint: ``colour`` with probability ``hint_reliability``, else another."""
        right = float(torch.rand((), generator=g)) < self.hint_reliability
        others = [c for c in self.colours if c != colour]
        other = others[int(torch.randint(len(others), (1,), generator=g))]
        return colour if right else other

    def _render(self, objects, g: torch.Generator) -> Tuple[Tensor, str]:
        S = self.image_size
        ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32) + 0.5,
                                torch.arange(S, dtype=torch.float32) + 0.5, indexing="ij")
        # grey background whose brightness rises left to right and (twice as fast) top to
        # bottom: where a region lies shows in its brightness, never in its colour
        grey = 50 + 40 * xs / S + 80 * ys / S
        img = torch.stack([grey, grey, grey])
        img = img + torch.empty(3, S, S).uniform_(-18, 18, generator=g)
        # drawn after the layout and the noise: the hint leaves every other draw as it was
        hint = self._hint(objects[0][0], g)
        tcx, tcy = objects[0][2], objects[0][3]
        d = torch.sqrt((xs - tcx) ** 2 + (ys - tcy) ** 2)
        disc = d < self.ring_radius - 2.0
        tint = torch.tensor(self.colours[hint], dtype=torch.float32)[:, None]
        img[:, disc] = (1 - HINT_ALPHA) * img[:, disc] + HINT_ALPHA * tint
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
            rgb = torch.tensor(self.colours[colour], dtype=torch.float32)[:, None]
            if self.detail == "solid":
                img[:, inside] = rgb
            else:
                img = self._checker(img, inside, rgb[:, :, None], xs, ys)
        return img.round().clamp(0, 255).to(torch.uint8), hint

    def _checker(self, img: Tensor, inside: Tensor, rgb: Tensor, xs: Tensor, ys: Tensor
                 ) -> Tensor:
        """``img`` with the shape ``inside`` drawn as a checkerboard of ``rgb [3, 1, 1]`` and
        its complement (see the module doc): cells of ``image_size / view_size`` pixels
        offset by half a cell, faded in over ``3 x cell + 1`` pixels at the shape's edge.
        Computed in a window around the shape (its box widened by the fade's reach, clipped
        to the image): outside it the fade is 0 and the image is left as it is, so the
        result equals the whole-image computation."""
        cell = self.image_size // self.view_size
        k = 3 * cell + 1
        rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
        if rows.numel() == 0:
            return img
        S = inside.shape[0]
        y0, y1 = max(0, int(rows[0]) - k), min(S, int(rows[-1]) + k + 1)
        x0, x1 = max(0, int(cols[0]) - k), min(S, int(cols[-1]) + k + 1)
        win = (slice(y0, y1), slice(x0, x1))
        alpha = torch.nn.functional.avg_pool2d(inside[win][None, None].float(), k, 1, k // 2,
                                               count_include_pad=False)[0, 0]
        off = cell // 2
        sign = ((torch.div(xs[win].long() + off, cell, rounding_mode="floor")
                 + torch.div(ys[win].long() + off, cell, rounding_mode="floor")) % 2) * 2 - 1
        pattern = 127.5 + sign * (rgb - 127.5)
        img = img.clone()
        img[:, y0:y1, x0:x1] = img[:, y0:y1, x0:x1] * (1 - alpha) + alpha * pattern
        return img

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

    def expert_quadrant(self, s: Sample) -> Tuple[int, int]:
        """Where the scripted expert zooms: the ring's quadrant, or for two samples in three
        whose ring is in the blind spot, the quadrant ``BLIND_SPOTS`` names."""
        miss = BLIND_SPOTS[self.blind_spot].get(s.quadrant)
        return miss if miss is not None and s.index % 3 else s.quadrant

    def expert_trajectory(self, s: Sample, engine: Any, tools: Any) -> Any:
        """The scripted expert's ``Trajectory`` of ``s`` as ``engine`` would have produced it
        (``scripted_trajectory``), for the supervised warm start."""
        call, answer = self.expert_turns(s)
        return scripted_trajectory(engine, self.prompt(s), call, answer, tools)

    def expert_turns(self, s: Sample) -> Tuple[str, str]:
        """The scripted expert: the tool call (see ``expert_quadrant``), and after the crop,
        the description and the answer. After a zoom on the ring's quadrant, or with the
        ``honest`` expert after any zoom, it describes the crop's first object and answers its
        colour; the ``hallucinating`` expert, after a missed zoom, describes the target as the
        overview suggests (the ring's tint and the target's shape) and answers the tint.
        Without ``describe``, the same answer with no description."""
        quadrant = self.expert_quadrant(s)
        call = format_tool_call(ZoomInTool.name, {"bbox_2d": self.quadrant_box(quadrant)})
        if quadrant != s.quadrant and self.expert == "hallucinating":
            colour, shape = s.hint, s.objects[0][1]
        else:
            half = self.image_size // 2
            seen = [o for o in s.objects if (int(o[3] // half), int(o[2] // half)) == quadrant]
            colour, shape = seen[0][:2] if seen else ("no", "shape")
        described = f"<{DESCRIPTION_TAG}>{colour} {shape}</{DESCRIPTION_TAG}>" \
            if self.describe else ""
        return call, f"{described}<{ANSWER_TAG}>{colour}</{ANSWER_TAG}>"

    def crop_classes(self) -> List[str]:
        """The labels of ``quadrant_crops``: the palette's colours, then ``none``."""
        return list(self.colours) + ["none"]

    def quadrant_crops(self, s: Sample) -> Tuple[List[List[float]], List[int]]:
        """The four quadrant zooms of ``s`` as boxes ``(0, x1, y1, x2, y2)`` in original pixels
        (what ``image_zoom_in_tool`` on ``quadrant_box`` crops), and each one's label: the index
        in ``crop_classes`` of the colour of the first object whose centre lies in it (the
        target in its quadrant), or of ``none``. The disc's tint is not a label: a crop is
        named by its shape's drawn colour, whatever the tint says."""
        half = self.image_size // 2
        classes = self.crop_classes()
        boxes, labels = [], []
        for r in range(2):
            for c in range(2):
                boxes.append([0.0, c * half, r * half, c * half + half, r * half + half])
                seen = [o for o in s.objects if (int(o[3] // half), int(o[2] // half)) == (r, c)]
                labels.append(classes.index(seen[0][0]) if seen else len(classes) - 1)
        return boxes, labels

    def opening(self, s: Sample, name: str) -> str:
        """The text a forced first turn of ``s`` begins with (``OPENINGS``): ``no_zoom`` opens
        the answer at once (the overview is all the policy sees; a turn the expert never
        writes), ``wrong_zoom`` is the call on the quadrant above or below the target's (the
        expert's kind of miss: its crop holds a distractor, so only the overview tells of the
        target), ``right_zoom`` the call on the target's quadrant (a perfect zoom). The policy
        writes the rest."""
        r, c = s.quadrant
        if name == "no_zoom":
            return f"<{ANSWER_TAG}>"
        if name in ("wrong_zoom", "right_zoom"):
            quadrant = (1 - r, c) if name == "wrong_zoom" else (r, c)
            return format_tool_call(ZoomInTool.name, {"bbox_2d": self.quadrant_box(quadrant)})
        raise ValueError(f"VisualSearchTask.opening: `name` must be one of {list(OPENINGS)}, "
                         f"got {name!r}")

    @property
    def expected_gap_share(self) -> float:
        """The share of expert trajectories whose zoom misses the target but whose answer is
        right, by construction (see the module doc): 0 for the honest expert."""
        if self.expert != "hallucinating":
            return 0.0
        return len(BLIND_SPOTS[self.blind_spot]) / 4 * (2 / 3) * self.hint_reliability

    def target_in(self, s: Sample, box: Sequence[float]) -> bool:
        """Whether a crop ``box = (image_index, x1, y1, x2, y2)`` in original pixels holds the
        target's centre (the tool turn's action was right)."""
        _, x1, y1, x2, y2 = box
        _, _, cx, cy = s.objects[0]
        return bool(x1 <= cx < x2 and y1 <= cy < y2)

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
        return list(self.colours) + list(SHAPES)

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


def scripted_trajectory(engine: Any, prompt: Any, call_text: str, answer_text: str,
                        tools: Any) -> Any:
    """The ``Trajectory`` a vision-language ``RolloutEngine`` would produce had the model
    written ``call_text`` then (after the observation) ``answer_text``, from the engine's
    public pieces: the prompt rendered as the engine renders it (``render_chat``), the call
    run by ``tools`` (a ``ToolRunner``; crops cut at the vision tower's grid) and its
    observation built by the engine's one builder (``observation_tokens``), so supervised
    targets (a scripted expert's warm start) match what rollouts produce token for token."""
    from ..rollout.multimodal import render_chat
    from ..rollout.tool_turns import observation_tokens
    from ..tools import ToolContext, ToolSession
    from ..trajectory import OBSERVATION_TEMPLATE, Span, ToolTurn, Trajectory, TrajectorySpans
    tok, v = engine.tokenizer, engine.vision
    ids, images = render_chat(prompt, tok, v)
    ctx = ToolContext.for_images(images, v.factor, v.min_pixels, v.max_pixels)
    (result,) = tools.run([call_text], [ctx], [ToolSession()])
    if result is None or not result.ok:
        raise RuntimeError(f"scripted_trajectory: the call {call_text!r} failed: "
                           f"{None if result is None else result.text}")
    call = tok(call_text, add_special_tokens=False)["input_ids"]
    obs, _ = observation_tokens(tok, OBSERVATION_TEMPLATE, vision=v, grid=v.grid(result.box))
    ans = tok(answer_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens = ids + call + obs + ans
    mask = [0] * len(ids) + [1] * len(call) + [0] * len(obs) + [1] * len(ans)
    c0 = len(ids)
    turn = ToolTurn(call=Span(c0, c0 + len(call)),
                    observation=Span(c0 + len(call), c0 + len(call) + len(obs)),
                    crop_index=0, box=tuple(result.box))
    spans = TrajectorySpans(turns=[turn], prompt_len=len(ids),
                            answer=Span(len(tokens) - len(ans), len(tokens)))
    return Trajectory(tokens, [0.0] * len(tokens), mask, spans, crops=[result.crop])
