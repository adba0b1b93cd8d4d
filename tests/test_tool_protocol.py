import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapo_fast.tools import (ERROR_CODES, Tool, ToolArgumentError, ToolContext, ToolRegistry,
                             ToolResult, ToolRunner, ToolSession, crop_and_zoom,
                             parse_tool_calls)
from mapo_fast.tools import protocol

IMAGE = torch.randint(0, 256, (3, 1000, 1400), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
CTX = ToolContext.for_images([IMAGE])  # the model sees 840 x 1176 (smart_resize, 28*28*1280)


def call(args=None, name="image_zoom_in_tool", raw=None):
    body = raw if raw is not None else json.dumps({"name": name, "arguments": args or {}})
    return f"Let me look closer. <tool_call>{body}</tool_call>"


def run_one(text, session=None, runner=None):
    runner = runner or ToolRunner()
    return runner.run([text], [CTX], [session or ToolSession()])[0], runner


MALFORMED = {
    "bad_json": (call(raw='{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}'),
                 "tool call is not valid JSON"),
    "bad_call": (call(raw='["image_zoom_in_tool"]'), 'must be a JSON object with a string "name"'),
    "unknown_tool": (call({"bbox_2d": [1, 2, 30, 40]}, name="rm -rf"),
                     'unknown tool "rm -rf"; available: image_zoom_in_tool'),
    "missing_bbox": (call({"label": "sign"}), "missing argument bbox_2d"),
    "bbox_not_numeric": (call({"bbox_2d": ["10", 20, 30, 40]}),
                         'bbox_2d must be 4 numbers [x1, y1, x2, y2], got ["10", 20, 30, 40]'),
    "bbox_not_numeric-3": (call({"bbox_2d": [10, 20, 30]}), "bbox_2d must be 4 numbers"),
    "bbox_not_numeric-bool": (call({"bbox_2d": [True, 20, 30, 40]}), "bbox_2d must be 4 numbers"),
    "bbox_not_finite": (call(raw='{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
                                 '[NaN, 20, 30, 40]}}'), "bbox_2d [nan, 20, 30, 40] has a non-finite"),
    "bbox_not_finite-inf": (call(raw='{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
                                     '[10, 20, Infinity, 40]}}'), "non-finite"),
    "bbox_empty": (call({"bbox_2d": [30, 20, 10, 40]}), "bbox_2d [30, 20, 10, 40] is empty: it needs x2 > x1"),
    "bbox_outside": (call({"bbox_2d": [10, 20, 1200, 40]}),
                     "bbox_2d [10, 20, 1200, 40] is outside the image (width 1176, height 840)"),
    "bbox_too_small": (call({"bbox_2d": [10, 20, 12, 40]}),
                       "bbox_2d [10, 20, 12, 40] is smaller than the minimum of 4 x 4 pixels"),
    "bbox_aspect": (call({"bbox_2d": [0, 0, 1176, 5]}), "aspect ratio above 200"),
    "bad_image_index": (call({"bbox_2d": [10, 20, 30, 40], "image_index": 3}),
                        "image_index 3 names no image; there are 1"),
    "unclosed_tag": ("<tool_call>{\"name\": \"image_zoom_in_tool\"", "unclosed <tool_call> tag"),
    "call_too_long": (call({"bbox_2d": [1, 2, 30, 40], "label": "x" * 5000}),
                      "characters; the limit is 4096"),
    "multiple_calls": (call({"bbox_2d": [1, 2, 30, 40]}) + call({"bbox_2d": [1, 2, 30, 40]}),
                       "2 tool calls in one turn; make at most 1"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_each_malformed_call_becomes_a_specific_error(case):
    text, message = MALFORMED[case]
    result, runner = run_one(text)
    code = case.split("-")[0]
    assert not result.ok and result.code == code and code in ERROR_CODES
    assert result.text.startswith("Error: ") and message in result.text, result.text
    assert runner.stats[f"error:{code}"] == 1 and runner.stats["calls"] == 1


def test_too_many_calls_per_trajectory():
    session = ToolSession(max_calls=2)
    runner = ToolRunner()
    ok = call({"bbox_2d": [10, 20, 300, 400]})
    assert run_one(ok, session, runner)[0].ok and run_one(ok, session, runner)[0].ok
    result = run_one(ok, session, runner)[0]
    assert result.code == "too_many_calls" and "at most 2 per trajectory" in result.text
    assert runner.stats["ok"] == 2 and runner.stats["error:too_many_calls"] == 1


def test_zoom_maps_model_coordinates_back_to_the_original():
    assert CTX.model_sizes == [(840, 1176)]
    result, _ = run_one(call({"bbox_2d": [117.6, 84, 588, 420], "label": "sign"}))
    assert result.ok and result.label == "sign"
    assert result.box == pytest.approx((0, 140.0, 100.0, 700.0, 500.0))
    # the crop is taken from the original image: it equals crop_and_zoom of the mapped box
    assert torch.equal(result.crop, crop_and_zoom(IMAGE, [result.box])[0])


def test_no_call_means_final_answer():
    result, runner = run_one("The sign says 42. <answer>42</answer>")
    assert result is None and runner.stats["calls"] == 0


def test_batch_crops_in_one_call(monkeypatch):
    seen = []
    real = protocol.crop_and_zoom
    monkeypatch.setattr(protocol, "crop_and_zoom",
                        lambda images, boxes, **kw: seen.append(len(boxes)) or real(images, boxes, **kw))
    texts = [call({"bbox_2d": [10, 20, 300, 400]}), "no call", call({"bbox_2d": [0, 0, 5]}),
             call({"bbox_2d": [500, 500, 900, 800]})]
    results = ToolRunner().run(texts, [CTX] * 4, [ToolSession() for _ in texts])
    assert seen == [2]
    assert [r is None for r in results] == [False, True, False, False]
    assert results[0].ok and results[3].ok and results[2].code == "bbox_not_numeric"


def test_registry_accepts_user_tools_and_survives_their_bugs():
    class Echo(Tool):
        name = "echo"

        def prepare(self, arguments, context):
            if "boom" in arguments:
                raise RuntimeError("bug")
            if "bad" in arguments:
                raise ToolArgumentError("bbox_empty", "bad args")
            return ToolResult(ok=True, text=str(arguments.get("text")))

    registry = ToolRegistry.default()
    registry.register(Echo())
    assert registry.names == ["echo", "image_zoom_in_tool"]
    runner = ToolRunner(registry=registry)
    assert run_one(call({"text": "hi"}, name="echo"), runner=runner)[0].text == "hi"
    assert run_one(call({"boom": 1}, name="echo"), runner=runner)[0].code == "tool_failed"
    assert run_one(call({"bad": 1}, name="echo"), runner=runner)[0].text == "Error: bad args"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Echo())
    assert registry.schemas()[1]["function"]["name"] == "image_zoom_in_tool"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_raises_on_random_text(text):
    calls, errors = parse_tool_calls(text)
    assert isinstance(calls, list) and isinstance(errors, list)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8),
                                                                       children, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(max_size=200).map(lambda s: f"<tool_call>{s}</tool_call>"),
    JSONISH.map(lambda a: call(raw=json.dumps({"name": "image_zoom_in_tool",
                                                "arguments": {"bbox_2d": a}}))),
    JSONISH.map(lambda a: call(raw=json.dumps(a)))))
def test_runner_never_raises_on_malformed_calls(text):
    result = ToolRunner().run([text], [CTX], [ToolSession()])[0]
    assert result is None or result.ok or (result.code in ERROR_CODES and result.text)
