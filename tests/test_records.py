"""The real-data loader: good records load, and every bad one (path outside the root, a
symlink leaving it, a missing file, a file that is not an image, an image over the pixel limit,
no answer, a broken JSON line) is skipped with its counted reason, never raising."""

import json
import os

import pytest
import torch

from mapo_fast.tasks.records import RecordsTask, read_records

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    img = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8).numpy()
    PIL.fromarray(img).save(root / "imgs" / "ok.png")
    PIL.fromarray(img).save(tmp_path / "outside.png")
    PIL.new("RGB", (300, 300)).save(root / "imgs" / "big.png")
    (root / "imgs" / "fake.png").write_text("not an image")
    os.symlink(tmp_path / "outside.png", root / "imgs" / "link.png")
    rows = [
        {"image": "imgs/ok.png", "question": "What colour?", "answer": "red"},
        {"image": "../outside.png", "question": "q", "answer": "a"},
        {"image": "imgs/link.png", "question": "q", "answer": "a"},
        {"image": "/etc/passwd", "question": "q", "answer": "a"},
        {"image": "imgs/missing.png", "question": "q", "answer": "a"},
        {"image": "imgs/fake.png", "question": "q", "answer": "a"},
        {"image": "imgs/big.png", "question": "q", "answer": "a"},
        {"images": ["imgs/ok.png"], "problem": "<image>Which one?", "solution": "B"},
        {"image": "imgs/ok.png", "question": "q"},
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    return path, img


def test_bad_records_are_skipped_counted_and_never_raise(dataset):
    path, img = dataset
    task = RecordsTask(str(path), seed=0, max_image_pixels=50_000, eval_size=1)
    task.splits = {"train": list(range(len(task.records))), "eval": [0]}
    got = task.batch("train", 0, 4)
    assert [s.answer for s in got] == ["red", "B", "red", "B"]  # cycles over the good ones
    assert got[1].question == "Which one?"
    assert torch.equal(got[0].image, torch.from_numpy(img).permute(2, 0, 1))
    assert dict(task.skipped) == {"outside_root": 3, "missing_image": 1, "not_an_image": 1,
                                  "too_many_pixels": 1, "no_answer": 1, "bad_record": 1}
    assert task.batch("train", 9, 1)[0].answer == "red"  # bad records are not retried
    assert sum(task.skipped.values()) == 8


def test_a_split_without_any_usable_record_is_named(dataset, tmp_path):
    path, _ = dataset
    task = RecordsTask(str(path), seed=0, eval_size=1)
    task.splits = {"train": [1, 4], "eval": [0]}
    with pytest.raises(ValueError, match="every record of the 'train' split is unusable"):
        task.batch("train", 0, 1)


def test_file_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="`task.data_path` .* is not a file"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="must end in .jsonl or .parquet"):
        read_records(str(tmp_path / "x.csv"))


def test_each_line_is_decoded_on_its_own(tmp_path):
    """A UTF-8 byte-order mark, a line that is not UTF-8, a line nested too deeply, a NUL in an
    image path and an <image>-only question each spoil one record at most."""
    root = tmp_path
    PIL.new("RGB", (20, 20)).save(root / "ok.png")
    good = json.dumps({"image": "ok.png", "question": "What?", "answer": "a"}).encode()
    lines = [b"\xef\xbb\xbf" + good,                        # BOM on the first line
             b'{"image": "ok.png", "question": "\xff\xfe", "answer": "a"}',  # not UTF-8
             b"[" * 100_000 + b"]" * 100_000,                # nested too deeply
             json.dumps({"image": "ok\u0000.png", "question": "q", "answer": "a"}).encode(),
             json.dumps({"image": "ok.png", "question": "<image>", "answer": "a"}).encode(),
             good]
    path = root / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    recs = read_records(str(path))
    assert len(recs) == 6 and recs[0]["question"] == "What?" and recs[5] == recs[0]
    assert "not UTF-8" in recs[1]["__error__"] and "too deeply" in recs[2]["__error__"]
    task = RecordsTask(str(path), seed=0, eval_size=1)
    task.splits = {"train": list(range(6)), "eval": task.splits["eval"]}
    assert [s.index for s in task.batch("train", 0, 2)] == [0, 5]
    assert task.skipped["bad_record"] == 2 and task.skipped["bad_image_path"] == 1
    assert task.skipped["no_question"] == 1


def test_a_bomb_header_is_too_many_pixels(tmp_path):
    big = PIL.new("1", (20000, 20000))   # 400 MP in a few KB: over PIL's own bomb limit
    big.save(tmp_path / "bomb.png")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "bomb.png", "question": "q", "answer": "a"}) + "\n"
        + json.dumps({"image": "ok.png", "question": "q", "answer": "a"}) + "\n")
    PIL.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    task = RecordsTask(str(tmp_path / "d.jsonl"), seed=0, eval_size=1,
                       max_image_pixels=10 ** 12)   # our limit off: PIL's check answers
    task.splits = {"train": [0, 1], "eval": [1]}
    assert [s.index for s in task.batch("train", 0, 1)] == [1]
    assert dict(task.skipped) == {"too_many_pixels": 1}


def test_the_eval_split_is_drawn_from_usable_records(tmp_path):
    PIL.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rows = [{"image": "missing.png", "question": "q", "answer": "a"}] * 8 + \
        [{"image": "ok.png", "question": "q", "answer": "a"}] * 2
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for seed in range(5):
        task = RecordsTask(str(tmp_path / "d.jsonl"), seed=seed, eval_size=2)
        assert sorted(task.splits["eval"]) == [8, 9]
        assert len(task.batch("eval", 0, 2)) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no record is usable"):
        RecordsTask(str(tmp_path / "bad.jsonl"), seed=0)


def test_answers_that_are_not_text_or_numbers_are_skipped_with_their_line(tmp_path, caplog):
    """An answer that is an object, a list, a boolean or NaN is skipped with a reason (not
    trained on as its Python text); each skipped record is logged once, with its line."""
    import logging
    PIL.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    answers = ["a", {"x": 1}, ["left"], True, 3, float("nan"), 2.5]
    lines = [json.dumps({"image": "ok.png", "question": "q", "answer": a}) for a in answers]
    lines.insert(3, "")  # a blank line: the record lines are 1, 2, 3, 5, 6, 7, 8
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    task = RecordsTask(str(path), seed=0, eval_size=1)
    task.splits = {"train": list(range(7)), "eval": task.splits["eval"]}
    with caplog.at_level(logging.WARNING, logger="mapo_fast.records"):
        got = task.batch("train", 0, 6)
    assert [s.answer for s in got] == ["a", "3", "2.5", "a", "3", "2.5"]
    assert task.skipped["bad_answer"] == 4
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == 4  # once each, though the batch cycled past them twice
    for line, kind in ((2, "dict"), (3, "list"), (5, "bool"), (7, "float 'nan'")):
        assert any(f"line {line} of d.jsonl" in m and kind in m for m in logged), logged


def test_questions_longer_than_the_model_can_read_are_skipped(tmp_path, caplog):
    """``bound_questions``: a question over the bound is skipped with its line (counted once),
    and the held-out split is drawn again from records within it."""
    import logging
    PIL.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    questions = ["a b c d e f g h", "short", "a b c", "x " * 50, "fine one"]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"image": "ok.png", "question": q, "answer": "y"})
                              for q in questions) + "\n")
    task = RecordsTask(str(path), seed=0, eval_size=2)
    assert len(task.splits["eval"]) == 1 and task.question_limit is None
    with caplog.at_level(logging.WARNING, logger="mapo_fast.records"):
        task.bound_questions(lambda text: len(text.split()), 3)
        got = task.batch("train", 0, 6) + task.batch("eval", 0, 1)
    assert {s.question for s in got} == {"short", "a b c", "fine one"}
    assert all(len(task.records[i]["question"].split()) <= 3 for i in task.splits["eval"])
    assert task.skipped["question_too_long"] == 2
    logged = [r.getMessage() for r in caplog.records if "question_too_long" in r.getMessage()
              or "takes" in r.getMessage()]
    assert sorted(int(m.split("line ")[1].split()[0]) for m in logged) == [1, 4]
    assert "the question takes 50 tokens, more than the 3 the model can read" in " ".join(logged)
    for most in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"`most` must be an int >= 1, got {most!r}"):
            task.bound_questions(len, most)
