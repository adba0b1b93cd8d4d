"""mapo-eval: benchmark files in V* Bench's and HR-Bench's layouts (made in code), bad records
skipped with a reason, the statistics against brute force, and whole runs on a mapo-train
checkpoint and a Hugging Face folder: reports, pass@k, resume equal to an uninterrupted run,
refusals naming the argument."""

import importlib.util
import itertools
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from mapo_fast.cli import eval_main, train_main
from mapo_fast.evaluation import Benchmark, EvalSettings, Evaluation, load_policy
from mapo_fast.evaluation import run as run_mod
from mapo_fast.evaluation.run import is_right, ks, pass_at_k, wilson

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parent.parent


def _maker():
    spec = importlib.util.spec_from_file_location(
        "make_bench_files", ROOT / "examples" / "make_bench_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    vstar, hr = _maker().main(["--out", str(out), "--n", "6", "--size", "64"])
    return {"vstar": vstar, "hr": hr, "root": out}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A mapo-train run at toy scale (its checkpoints and config)."""
    out = str(tmp_path_factory.mktemp("run"))
    train_main(["--out", out, "--warm_start.steps", "2", "--steps", "1", "--task.eval_size",
                "4", "--eval_every", "0", "--rollout.prompts_per_step", "2",
                "--rollout.group_size", "2", "--warm_start.batch_size", "2",
                "--rollout.max_new_tokens", "16", "--rollout.max_turns", "2"])
    return out


# ---- reading files ----------------------------------------------------------------------------
def test_vstar_layout_reads_inline_options_and_skips_bad_records(files, caplog):
    with caplog.at_level(logging.WARNING, logger="mapo_fast.evaluation"):
        b = Benchmark(files["vstar"])
    assert len(b.items) == 6
    first = b.items[0]
    assert first.question == "What is the colour of the small square?"
    assert first.options == ["red", "green", "blue", "yellow"] and first.answer == "A"
    assert first.category == "direct_attributes" and first.key == "0"
    assert len(first.boxes) == 1 and first.load().shape == (3, 64, 64)
    pos = b.items[2]
    assert pos.category == "relative_position" and pos.options == ["left", "right"]
    assert dict(b.skipped) == {"missing_image": 1, "bad_answer": 1, "no_options": 1}
    logged = [r.getMessage() for r in caplog.records]
    for line, reason in ((7, "missing_image"), (8, "bad_answer"), (9, "no_options")):
        assert sum(f"line {line} of test_questions.jsonl: {reason}" in m for m in logged) == 1
    text = first.prompt(first.load())[1]["content"][1]["text"]
    assert text.startswith("What is the colour of the small square?\n(A) red\n(B) green\n")


def test_hr_bench_layout_reads_option_columns_and_base64_images(files):
    b = Benchmark(files["hr"])
    assert len(b.items) == 6 and dict(b.skipped) == {"not_an_image": 1}  # nor a path
    it = b.items[1]
    assert it.options == ["red", "green", "blue", "yellow"] and it.category == "single"
    assert isinstance(it.source, bytes) and it.load().shape == (3, 64, 64)
    assert b.items[2].options == ["left", "right", "-", "-"] and not b.items[2].boxes


def test_other_spellings_of_options_answers_and_boxes(tmp_path):
    PIL.new("RGB", (40, 30)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "q1", "options": ["x", "y", "z"], "answer": 2},
        {"image": "a.png", "question": "q2", "options": {"A": "x", "B": "y"}, "answer": "y"},
        {"image": "a.png", "question": "q3", "options": ["x", "y"], "answer": "(b)",
         "bbox": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        {"image": "a.png", "question": "q4", "options": ["x", "y"], "answer": "A",
         "bbox": [3, 2, 1, 4]},
        {"image": "a.png", "question": "q5", "options": ["x", "y"], "answer": True},
        {"image": "../a.png", "question": "q6", "options": ["x", "y"], "answer": "A"},
        {"question": "q7", "options": ["x", "y"], "answer": "A"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    b = Benchmark(str(path))
    assert [(i.question, i.answer) for i in b.items] == [("q1", "C"), ("q2", "B"), ("q3", "B")]
    assert b.items[2].boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert b.items[0].key == "line1"
    assert dict(b.skipped) == {"bad_box": 1, "bad_answer": 1, "outside_root": 1,
                               "no_image": 1, "bad_record": 1}


def test_a_file_without_usable_records_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "none.png", "text": "q\n(A) a\n(B) b",
                                "label": "A"}) + "\n")
    with pytest.raises(ValueError, match="no record is usable .*missing_image"):
        Benchmark(str(path))


# ---- statistics and scoring -------------------------------------------------------------------
def test_pass_at_k_equals_the_mean_over_every_k_subset():
    for n, c in ((5, 0), (5, 2), (6, 6), (4, 1)):
        draws = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(draws, k))
            want = sum(max(s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), want, abs_tol=1e-12)
    assert ks(1) == [1] and ks(5) == [1, 2, 4, 5] and ks(8) == [1, 2, 4, 8]


def test_the_wilson_interval():
    lo, hi = wilson(0.5, 100)  # the textbook value: [0.4038, 0.5962]
    assert math.isclose(lo, 0.4038, abs_tol=1e-4) and math.isclose(hi, 0.5962, abs_tol=1e-4)
    lo, hi = wilson(1.0, 10)
    assert math.isclose(hi, 1.0) and 0.69 < lo < 0.73  # 0.7225
    lo, hi = wilson(0.0, 12)
    assert lo == 0.0 and math.isclose(hi, 0.2425, abs_tol=1e-3)


def test_an_answer_is_right_by_its_letter_or_the_options_text(files):
    item = Benchmark(files["vstar"]).items[1]  # green, B
    for text, right in (("<answer>B</answer>", True), ("<answer>(B)</answer>", True),
                        ("<answer>green</answer>", True), ("<answer>A</answer>", False),
                        ("<answer>red</answer>", False), ("no answer", False)):
        assert is_right(text, item, None)[0] is right, text


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples=0), "`--samples` must be an int >= 1, got 0"),
    (dict(samples=4), "`--samples` 4 needs `--temperature` > 0"),
    (dict(temperature=-1.0), "`--temperature` must be a finite number >= 0, got -1.0"),
    (dict(top_p=0.0), "`--top-p` must be in \\(0, 1\\], got 0.0"),
    (dict(batch_size=0), "`--batch-size` must be an int >= 1, got 0"),
    (dict(max_turns=0), "`--max-turns` must be an int >= 1, got 0"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvalSettings(**kwargs).validate()


# ---- whole runs -------------------------------------------------------------------------------
def test_a_run_writes_reports_and_a_resumed_run_equals_an_uninterrupted_one(
        files, run_folder, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    eval_main(["--model", run_folder, "--data", files["vstar"], "--out", str(full),
               "--batch-size", "4"])
    report = json.loads((full / "report.json").read_text())
    assert report["questions"] == 6 and report["overall"]["questions"] == 6
    assert set(report["categories"]) == {"direct_attributes", "relative_position"}
    assert report["skipped_records"] == {"missing_image": 1, "bad_answer": 1, "no_options": 1}
    o = report["overall"]
    assert 0 <= o["accuracy"] <= 1 and o["accuracy_ci95"][0] <= o["accuracy"]
    assert o["with_boxes"] == 6 and o["action_accuracy"] is not None
    md = (full / "report.md").read_text()
    assert "| **all** | 6 |" in md and "Skipped records: bad_answer: 1" in md
    assert "mapo-eval: accuracy" in capsys.readouterr().out

    part = tmp_path / "part"
    real = Evaluation._chunk
    calls = []

    def stop_after_one(self, engine, c, chunk):
        if calls:
            raise KeyboardInterrupt
        calls.append(c)
        return real(self, engine, c, chunk)
    monkeypatch.setattr(Evaluation, "_chunk", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        eval_main(["--model", run_folder, "--data", files["vstar"], "--out", str(part),
                   "--batch-size", "4"])
    assert len((part / "samples.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(Evaluation, "_chunk", real)
    eval_main(["--model", run_folder, "--data", files["vstar"], "--out", str(part),
               "--batch-size", "4"])
    lines = lambda p: sorted((p / "samples.jsonl").read_text().splitlines())  # noqa: E731
    assert lines(part) == lines(full)
    with pytest.raises(SystemExit, match="holds an evaluation made with other settings "
                                         "\\(batch_size\\)"):
        eval_main(["--model", run_folder, "--data", files["vstar"], "--out", str(part),
                   "--batch-size", "2"])


def test_a_hugging_face_folder_with_sampled_draws_reports_pass_at_k(files, tmp_path):
    from mapo_fast.tasks.tokenizer import build_tokenizer
    from mapo_fast.trainer.config import ModelConfig
    from mapo_fast.trainer.model import tiny_vl_model
    tok = build_tokenizer(["What is the colour? <answer>A</answer>"] * 4, vocab_size=320)
    folder = tmp_path / "hf"
    tiny_vl_model(ModelConfig(hidden_size=32, intermediate_size=32, vision_hidden_size=32),
                  tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    policy = load_policy(str(folder), torch.device("cpu"))
    assert policy.defaults == {"max_new_tokens": 512, "max_turns": 4}
    settings = EvalSettings(samples=3, temperature=1.0, max_new_tokens=8, max_turns=2,
                            min_pixels=28 * 28, max_pixels=56 * 56)
    report = Evaluation(policy, Benchmark(files["hr"]), str(tmp_path / "out"), settings,
                        progress=False).run()
    o = report["overall"]
    assert {"accuracy", "pass@2", "pass@3"} <= set(o)
    assert o["accuracy"] <= o["pass@2"] <= o["pass@3"]
    assert o["action_accuracy"] is None and o["with_boxes"] == 0
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(x)["draws"]) == 3 for x in lines)


@pytest.mark.parametrize("args, match", [
    (["--model", "{tmp}/none"], "`--model` '.*none' is neither a checkpoint file nor a folder"),
    (["--model", "{tmp}"], "`--model` '.*': no intact checkpoint under"),
    (["--data", "{tmp}/x.csv"], "`task.data_path` must end in .jsonl or .parquet"),
    (["--samples", "2"], "`--samples` 2 needs `--temperature` > 0"),
    (["--limit", "0"], "`--limit` must be an int >= 1, got 0"),
])
def test_cli_errors_are_one_line(files, run_folder, tmp_path, args, match):
    (tmp_path / "x.csv").write_text("a,b\n")
    base = {"--model": run_folder, "--data": files["vstar"], "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v.replace("{tmp}", str(tmp_path))
    with pytest.raises(SystemExit, match=match) as e:
        eval_main([x for kv in base.items() for x in kv])
    assert str(e.value).startswith("mapo-eval: ") and "\n" not in str(e.value)


def test_a_corrupt_checkpoint_is_named(run_folder, tmp_path):
    import shutil
    ckpts = sorted(p for p in os.listdir(os.path.join(run_folder, "checkpoints"))
                   if p.endswith(".pt"))
    bad = tmp_path / "c.pt"
    shutil.copy(os.path.join(run_folder, "checkpoints", ckpts[-1]), bad)
    shutil.copy(os.path.join(run_folder, "checkpoints", ckpts[-1] + ".sha256"),
                str(bad) + ".sha256")
    with open(bad, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        run_mod.load_policy(str(bad), torch.device("cpu"))


def test_the_system_prompt_is_chosen_by_name(files):
    item = Benchmark(files["vstar"]).items[0]
    image = item.load()
    assert item.prompt(image)[0]["role"] == "system"
    none = item.prompt(image, "none")
    assert [m["role"] for m in none] == ["user"]
    with pytest.raises(ValueError, match="`--system` must be one of \\['records', 'none'\\], "
                                         "got 'chat'"):
        EvalSettings(system="chat").validate()


def test_the_builtin_tasks_held_out_samples_as_a_vstar_file(tmp_path):
    """``make_bench_files.py --builtin-seed``: the task's eval images, its answers as letters
    of the palette, the target's box around its centre."""
    from mapo_fast.tasks.visual_search import VisualSearchTask
    paths = _maker().main(["--out", str(tmp_path), "--n", "4", "--size", "64",
                           "--builtin-seed", "3", "--", "--task.detail", "checker"])
    b = Benchmark(paths[2])
    task = VisualSearchTask(3, detail="checker")
    assert len(b.items) == 4 and not b.skipped
    for i, it in enumerate(b.items):
        s = task.sample("eval", i)
        assert torch.equal(it.load(), s.image)  # PNG: the same pixels
        assert it.options == list(task.colours)
        assert it.options["ABCD".index(it.answer)] == s.answer
        (x1, y1, x2, y2), (_, _, cx, cy) = it.boxes[0], s.objects[0]
        assert x1 < cx < x2 and y1 < cy < y2


def test_an_image_that_fails_to_decode_is_a_skipped_line(run_folder, tmp_path):
    """A truncated PNG passes the header check when the file is read and fails when its
    batch decodes it: the question is a skipped line with its reason, the run goes on."""
    PIL.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    rows = [{"image": name, "text": "Colour?\n(A) red\n(B) blue", "label": "A",
             "question_id": i} for i, name in enumerate(["cut.png", "ok.png"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    eval_main(["--model", run_folder, "--data", str(tmp_path / "d.jsonl"), "--out",
               str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["overall"]["questions"] == 1
    assert report["skipped_records"] == {"not_an_image": 1}
    (tmp_path / "e.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="no question could be evaluated .*not_an_image"):
        eval_main(["--model", run_folder, "--data", str(tmp_path / "e.jsonl"), "--out",
                   str(tmp_path / "p")])


def test_base64_images_are_read_whatever_their_first_characters(tmp_path):
    """A JPEG's base64 starts with ``/9j/``: it is the image, not a path; line breaks in the
    base64 text are allowed."""
    import base64
    import io
    buf = io.BytesIO()
    PIL.new("RGB", (48, 32), (10, 200, 10)).save(buf, format="JPEG")
    text = base64.b64encode(buf.getvalue()).decode()
    assert text.startswith("/9j/")
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    rows = [{"question": "q", "A": "x", "B": "y", "answer": "B", "image": img, "index": i}
            for i, img in enumerate([text, wrapped, "not/an/image.png"])]
    (tmp_path / "hr.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    b = Benchmark(str(tmp_path / "hr.jsonl"))
    assert [it.key for it in b.items] == ["0", "1"] and dict(b.skipped) == {"missing_image": 1}
    assert b.items[0].load().shape == (3, 32, 48) and torch.equal(b.items[0].load(),
                                                                  b.items[1].load())
