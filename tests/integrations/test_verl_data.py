"""``examples/verl/prepare_data.py`` on made-up questions (images written in code, a few bad
lines): verl's RL dataset columns, the system prompt, the answers, every bad line skipped with
its reason, and the resize bounds that put verl's image loading in the zoom tool's frame. verl
loads a row's image with ``qwen_vl_utils.fetch_image``, which resizes by ``smart_resize`` with
the image entry's ``min_pixels`` / ``max_pixels`` (factor 28; without them its defaults, about
12.8 MP: ``QWEN_VL_UTILS_MAX``, qwen-vl-utils 0.0.14)."""

import importlib.util
import io
import json
from pathlib import Path

import pytest

PIL = pytest.importorskip("PIL.Image")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("yaml")

from mapo_fast.tools.ops import smart_resize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QWEN_VL_UTILS_MAX = 16384 * 28 * 28


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data",
                                                  ROOT / "examples" / "verl" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def made_up(tmp_path):
    sizes = {"small.png": (200, 120), "wide.png": (1800, 600), "huge.png": (4600, 3400)}
    for name, size in sizes.items():
        PIL.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    lines = [json.dumps({"image": "small.png", "question": "What colour?", "answer": "red"}),
             json.dumps({"image": "wide.png", "question": " Which side? ", "answer": 2,
                         "id": "q-wide", "data_source": "made_up"}),
             "{not json",
             json.dumps({"image": "missing.png", "question": "?", "answer": "x"}),
             json.dumps({"image": "small.png", "question": "Q", "answer": {"x": 1}}),
             json.dumps({"image": "small.png", "question": "", "answer": "x"}),
             json.dumps({"image": "huge.png", "question": "What is on the sign?",
                         "answer": "stop"})]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, sizes


def test_prepared_rows(tmp_path, capsys):
    script = load_script()
    questions, sizes = made_up(tmp_path)
    out = tmp_path / "data" / "train.parquet"
    summary = script.main([str(questions), str(out), "--val-fraction", "0.34"])
    err = capsys.readouterr().err
    for reason in ["line 3: not JSON", "line 4: no image file ('missing.png')",
                   "line 5: the answer must be a non-empty string or number, got {'x': 1}",
                   "line 6: no question"]:
        assert reason in err
    assert summary["train"] == 2 and summary["val"] == 1 and summary["skipped"] == 4
    train = pq.read_table(out).to_pylist()
    val = pq.read_table(tmp_path / "data" / "train_val.parquet").to_pylist()
    rows = train + val
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["red", "2", "stop"]
    assert rows[1]["data_source"] == "made_up" and rows[1]["extra_info"]["id"] == "q-wide"
    resize = script.tool_resize()
    for r, name in zip(rows, ["small.png", "wide.png", "huge.png"]):
        system, user = r["prompt"]
        assert system["role"] == "system" and "image_zoom_in_tool" in system["content"]
        assert "<description>" in system["content"] and "<answer>" in system["content"]
        assert user["content"].startswith("<image>") and user["content"].count("<image>") == 1
        assert r["agent_name"] == "tool_agent"
        (image,) = r["images"]
        assert {k: image[k] for k in resize} == resize
        assert PIL.open(io.BytesIO(image["bytes"])).size == sizes[name]


def test_the_rows_put_verls_image_loading_in_the_tools_frame(tmp_path):
    """The frame verl's loading gives each row's image (``smart_resize`` with the row's bounds,
    factor 28) is the zoom tool's (its ``ToolContext`` from ``zoom_tool.yaml``'s config); for
    the 15.6 MP image it is not the frame of qwen_vl_utils' defaults."""
    from mapo_fast.tools.protocol import ToolContext
    import torch
    script = load_script()
    questions, sizes = made_up(tmp_path)
    out = tmp_path / "train.parquet"
    script.main([str(questions), str(out)])
    resize = script.tool_resize()
    for r in pq.read_table(out).to_pylist():
        (image,) = r["images"]
        w, h = PIL.open(io.BytesIO(image["bytes"])).size
        loaded = smart_resize(h, w, factor=28, min_pixels=image["min_pixels"],
                              max_pixels=image["max_pixels"])
        ctx = ToolContext.for_images([torch.zeros(3, h, w, dtype=torch.uint8)], factor=28,
                                     **resize)
        assert tuple(ctx.model_sizes[0]) == tuple(loaded)
    w, h = sizes["huge.png"]
    assert smart_resize(h, w, factor=28, max_pixels=QWEN_VL_UTILS_MAX) != \
        smart_resize(h, w, factor=28, **resize)


def test_bad_arguments_are_named(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "none.jsonl"), str(tmp_path / "o.parquet")])
    questions, _ = made_up(tmp_path)
    with pytest.raises(SystemExit):
        script.main([str(questions), str(tmp_path / "o.parquet"), "--val-fraction", "1.5"])


def test_smoke_assets_load_and_prepare(tmp_path):
    """``make_smoke_assets.py`` (the one-GPU smoke run's inputs): the checkpoint folder loads
    as a Qwen2.5-VL with its tokenizer's chat template and image processor, the CLIP folder as
    a ``CLIPVerifier``, and ``prepare_data.py`` takes its questions."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

    from mapo_fast.rewards.clip import CLIPVerifier
    spec = importlib.util.spec_from_file_location(
        "make_smoke_assets", ROOT / "examples" / "verl" / "make_smoke_assets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = mod.make(tmp_path / "smoke")
    assert AutoConfig.from_pretrained(paths["model"]).model_type == "qwen2_5_vl"
    tok = AutoTokenizer.from_pretrained(paths["model"])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert Qwen2VLImageProcessorPil.from_pretrained(paths["model"]).size.longest_edge == 1003520
    assert CLIPVerifier.from_pretrained(paths["clip"]).device == __import__("torch").device("cpu")
    summary = load_script().main([paths["questions"], str(tmp_path / "smoke" / "t.parquet"),
                                  "--val-fraction", "0.25"])
    assert summary["train"] == 6 and summary["val"] == 2 and summary["skipped"] == 0
