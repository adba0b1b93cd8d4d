"""Model text is untrusted: one call's bad box never changes another call's result (a fuzz test
over mixed batches), box rules are checked and reported in the pixels the model sees, huge
numbers are bbox errors, every parser of model text is linear on 1 MB adversarial inputs, and
crop_and_zoom names the argument for every wrong type."""

import json
import random
import time

import pytest
import torch

from mapo_fast.rewards import AccuracyReward, FormatReward, extract_answer
from mapo_fast.tools import (ToolContext, ToolRunner, ToolSession, crop_and_zoom,
                             parse_tool_calls)
from mapo_fast.trajectory import spans_from_text


def call(bbox, **extra):
    args = dict(bbox_2d=bbox, **extra)
    return "<tool_call>" + json.dumps({"name": "image_zoom_in_tool", "arguments": args}) + \
        "</tool_call>"


def run(texts, images):
    return ToolRunner().run(texts, [ToolContext.for_images([im]) for im in images],
                            [ToolSession() for _ in texts])


def test_a_bad_box_fails_only_its_own_call():
    a = torch.zeros(3, 300, 451, dtype=torch.uint8)
    b = torch.zeros(3, 20, 1000, dtype=torch.uint8)
    alone = run([call([0, 0, 200, 150])], [a])[0]
    both = run([call([0, 0, 200, 150]), call([0, 0, 800, 4])], [a, b])
    assert alone.ok and both[0].ok and torch.equal(both[0].crop, alone.crop)
    # aspect 200 in the pixels the model sees (278 in original pixels): valid, and cropped
    assert both[1].ok and both[1].crop.shape[0] == 3
    too_thin = run([call([0, 0, 900, 4])], [b])[0]
    assert too_thin.code == "bbox_aspect" and "[0, 0, 900, 4]" in too_thin.text


def test_huge_and_non_finite_numbers_are_bbox_errors():
    im = torch.zeros(3, 64, 64, dtype=torch.uint8)
    texts = ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, %s, 9]}}'
             '</tool_call>' % v for v in ("9" * 400, "1e400", "-1e400")]
    for r in run(texts, [im] * 3):
        assert not r.ok and r.code == "bbox_not_finite", r.text


def random_call(rng: random.Random, size):
    h, w = size
    kind = rng.randrange(7)
    if kind == 5:  # thin: within 200:1 in view pixels, beyond it in original pixels when the
        return call([0, 0, rng.uniform(0.6, 1.0) * w, 4])  # resize changed the aspect ratio
    if kind == 0:
        return call([rng.uniform(-50, w), rng.uniform(-50, h), rng.uniform(0, w + 50),
                      rng.uniform(0, h + 50)])
    if kind == 1:
        return call([0, 0, "1", 2])
    if kind == 2:
        return '<tool_call>{"name": "image_zoom_in_tool"'
    if kind == 3:
        return call([0, 0, w, rng.choice([1, 2, 3])])  # thin or too small
    x1, y1 = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
    return call([x1, y1, rng.uniform(x1 + 5, w), rng.uniform(y1 + 5, h)])


def test_fuzz_mixed_batches_equal_each_call_run_alone():
    rng = random.Random(0)
    shapes = [(rng.randrange(30, 400), rng.randrange(30, 400)) for _ in range(6)] + [(20, 1000)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(i))
              for i, (h, w) in enumerate(shapes)]
    checked = ok = 0
    for _ in range(60):
        n = rng.randrange(2, 7)
        ims = [rng.choice(images) for _ in range(n)]
        sizes = [ToolContext.for_images([im]).model_sizes[0] for im in ims]
        texts = [random_call(rng, s) for s in sizes]
        batch = run(texts, ims)
        for text, im, got in zip(texts, ims, batch):
            alone = run([text], [im])[0]
            assert (got.ok, got.code, got.text) == (alone.ok, alone.code, alone.text)
            if got.ok:
                assert torch.equal(got.crop, alone.crop) and got.box == alone.box
                ok += 1
            checked += 1
    assert checked >= 200 and ok >= 40


MB = 2 ** 20
ADVERSARIAL = {  # each repeated to 1 MiB
    "open tool tags": "<tool_call>", "open answer tags": "<answer>",
    "open descriptions": "<description>", "unclosed image": "<|vision_start|>",
    "unclosed response": "<tool_response>", "boxed": "\\boxed{", "digits": "1",
    "nested calls": "<tool_call><tool_call>x</tool_call>",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_parsers_are_linear_on_1mb_inputs(name):
    text = (ADVERSARIAL[name] * (MB // len(ADVERSARIAL[name]) + 1))[:MB]

    class Chars:  # a tokenizer with character offsets: one token per character
        def __call__(self, s, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [ord(c) % 256 for c in s],
                    "offset_mapping": [(i, i + 1) for i in range(len(s))]}

    t0 = time.perf_counter()
    parse_tool_calls(text)
    extract_answer(text)
    AccuracyReward()(text, "red")
    FormatReward()(text)
    spans_from_text(text, Chars())
    # quadratic parsing took over 20 s at 99 KB; a linear pass takes well under a second
    assert time.perf_counter() - t0 < 10.0


@pytest.mark.parametrize("boxes, size, match", [
    ("0,0,1,1", None, "`boxes` must be an \\[M, 5\\] tensor or a sequence of .* got str"),
    (None, None, "`boxes` must be .* got NoneType"),
    ([[0, "a", 0, 1, 1]], None, "`boxes` must be .* rows of numbers"),
    ([[0, 0, 0, 4, 4]], 2.5, "`size` must be a positive int or \\(height, width\\), got 2.5"),
    ([[0, 0, 0, 4, 4]], "big", "`size` must be a positive int"),
])
def test_crop_and_zoom_names_the_bad_argument(boxes, size, match):
    im = torch.zeros(3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        crop_and_zoom([im], boxes, size=size)


@pytest.mark.parametrize("images, match", [(None, "got NoneType"), ("img", "got str")])
def test_crop_ops_name_bad_images(images, match):
    from mapo_fast.tools import crop_to_patches
    for op in (crop_and_zoom, crop_to_patches):
        with pytest.raises(ValueError, match=f"`images` must be .* {match}"):
            op(images, [[0, 0, 0, 4, 4]])


def test_smart_resize_names_bad_sizes():
    from mapo_fast.tools import smart_resize
    for bad in ("a", float("nan"), 0, None):
        with pytest.raises(ValueError, match="`height` and `width` must be finite numbers > 0"):
            smart_resize(bad, 3)


def test_crop_and_zoom_of_no_boxes_is_empty():
    im = torch.zeros(3, 16, 16, dtype=torch.uint8)
    assert crop_and_zoom([im], []) == [] and crop_and_zoom([im], torch.zeros(0, 5)) == []
