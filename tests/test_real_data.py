"""The real-data path end to end, as a user runs it: a tiny Qwen2.5-VL with its tokenizer and a
tiny CLIP, each saved with save_pretrained to a folder; images made in code, listed in a JSONL
and in a parquet file; `mapo-train --config` on examples/real_data.yaml (paths and sizes
substituted) loads the checkpoint, trains with the CLIP verifier, writes every output, and a
resumed run continues the uninterrupted one exactly. Setup errors on that path are one
`config:` line naming the key."""

import json
import os

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
yaml = pytest.importorskip("yaml")
PIL = pytest.importorskip("PIL.Image")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mapo_fast.cli import train_main  # noqa: E402
from mapo_fast.trainer.config import ModelConfig  # noqa: E402
from test_clip_verifier import tiny_clip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What colour is the square?", "What is written on the sign?",
             "How many dots are there?", "Which shape is red?"]
ANSWERS = ["red", "exit", "three", "circle"]


def _save_policy(folder):
    """A 2-layer Qwen2.5-VL, the BPE it was built for and a Qwen2-VL image processor, saved as
    a local checkpoint folder is laid out (the processor's PIL backend: its video part, which
    wants torchvision, is left out)."""
    from transformers import Qwen2VLImageProcessorPil
    from mapo_fast.tasks.tokenizer import build_tokenizer
    from mapo_fast.trainer.model import tiny_vl_model
    from mapo_fast.tasks.records import SYSTEM
    corpus = [SYSTEM] + QUESTIONS + ANSWERS + ["<description>a red square</description>",
                                               "<answer>red</answer>"] * 4
    tok = build_tokenizer(corpus, vocab_size=320)
    model = tiny_vl_model(ModelConfig(hidden_size=64, intermediate_size=64,
                                      vision_hidden_size=32), tok, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=84 * 84).save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "preprocessor_config.json"))


def _save_clip(folder):
    model, tok = tiny_clip()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _data(folder, n=10):
    """``n`` images (56-84 px sides) and their records, as JSONL and parquet."""
    os.makedirs(os.path.join(folder, "imgs"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        h, w = 56 + 28 * (i % 2), 84 - 28 * (i % 2)
        img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        PIL.fromarray(img).save(os.path.join(folder, "imgs", f"{i}.png"))
        rows.append({"image": f"imgs/{i}.png", "question": QUESTIONS[i % 4],
                     "answer": ANSWERS[i % 4]})
    rows.append({"image": "imgs/missing.png", "question": "q", "answer": "a"})  # skipped
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "train.parquet"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    paths = {k: str(base / k) for k in ("policy", "clip", "data")}
    _save_policy(paths["policy"])
    _save_clip(paths["clip"])
    _data(paths["data"])
    return paths


def _config(assets, tmp_path, data_file):
    """examples/real_data.yaml with local paths and toy sizes."""
    with open(os.path.join(ROOT, "examples", "real_data.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["path"] = assets["policy"]
    cfg["verifier"]["clip_path"] = assets["clip"]
    cfg["task"].update(data_path=os.path.join(assets["data"], data_file),
                       image_root=assets["data"], eval_size=2)
    cfg["rollout"].update(prompts_per_step=2, group_size=2, max_new_tokens=12, max_turns=2,
                          memory_budget_mb=16, min_pixels=28 * 28, max_pixels=84 * 84)
    cfg["optim"].update(micro_batch_size=4, lr=1e-3)
    cfg.update(steps=2, checkpoint_every=1, eval_every=0, grad_var_resamples=2)
    path = tmp_path / f"run-{data_file}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("data_file", ["train.jsonl", "train.parquet"])
def test_mapo_train_on_records_with_a_saved_checkpoint_and_clip(assets, tmp_path, data_file,
                                                                 capsys):
    config = _config(assets, tmp_path, data_file)
    out = str(tmp_path / "run")
    train_main(["--config", config, "--out", out])
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["response_tokens"] > 0
    for name in ("eval.json", "curves.png", "checkpoints/step_000002.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "eval.json")) as f:
        summary = json.load(f)
    assert summary["records"] == 11  # the missing image is skipped if this short run meets it
    assert summary["skipped_records"] in ({}, {"missing_image": 1})
    assert "final" in summary["evals"]
    if data_file == "train.jsonl":  # resume: the third step equals an uninterrupted run's
        full = str(tmp_path / "full")
        train_main(["--config", config, "--out", full, "--steps", "3"])
        train_main(["--config", config, "--out", out, "--steps", "3", "--resume"])

        def same(r):
            return {k: v for k, v in r.items() if not k.startswith("time_")
                    and k != "tokens_per_s"}
        got, want = _records(out), _records(full)
        assert [r["step"] for r in got] == [1, 2, 3]
        assert same(got[2]) == same(want[2])


@pytest.mark.parametrize("override, message", [
    (["--model.path", "none"], "`model.path` must be a local Qwen2.5-VL checkpoint when "
                               "task.name is 'jsonl'"),
    (["--model.path", "{tmp}"], "`model.path`: "),
    (["--verifier.clip_path", "{tmp}"], "`verifier.clip_path`: "),
    (["--task.data_path", "{tmp}/x.parquet"], "`task.data_path`: "),
    (["--task.data_path", "{tmp}/none.jsonl"], "`task.data_path` '"),
])
def test_setup_errors_on_the_real_data_path_are_one_config_line(assets, tmp_path, override,
                                                                 message, capsys):
    """No traceback: an empty checkpoint folder (transformers' OSError), a parquet file that is
    not parquet (pyarrow's ArrowInvalid), a jsonl task without a checkpoint."""
    (tmp_path / "x.parquet").write_text("not parquet")
    config = _config(assets, tmp_path, "train.jsonl")
    args = [a.replace("{tmp}", str(tmp_path)) for a in override]
    with pytest.raises(SystemExit) as e:
        train_main(["--config", config, "--out", str(tmp_path / "o")] + args)
    text = str(e.value)
    assert text.startswith("mapo-train: config: ") and message in text and "\n" not in text
    assert len(text) < 500
    key = message.split("`")[1]
    assert text.count(f"`{key}`") == 1  # the key is named once
