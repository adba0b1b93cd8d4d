"""The made-up inputs of ``smoke_1gpu.sh`` (no download): in ``WORKDIR``, a tiny Qwen2.5-VL
checkpoint with its processor (``model/``: the model, its tokenizer with Qwen's chat template,
a Qwen2-VL image processor config), a tiny random CLIP (``clip/``), and 8 questions about
images of colour blocks (``questions.jsonl``, ``images/``) for ``prepare_data.py``.

    python examples/verl/make_smoke_assets.py runs/verl-smoke

The policy is random: the run checks that verl, vLLM, the zoom tool, the ``mapo`` reward
manager and estimator and the fused log-prob kernel work together on one GPU, not that it
learns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trl"))

#: Qwen2.5-VL's chat template, cut to what verl renders here: messages with text and image
#: parts, tool messages as Qwen wraps them, and the generation prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}\n</tool_response>{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTIONS = [("What colour is the top left block?", "red"),
             ("What colour is the bottom right block?", "blue"),
             ("Is there a green block?", "yes"), ("How many red blocks are there?", "2")]


def make(workdir: Path, n_images: int = 8) -> dict:
    """Writes the checkpoint, the CLIP folder, the images and the questions; returns paths."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    import tiny_vl
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, clip_dir, image_dir = workdir / "model", workdir / "clip", workdir / "images"
    tiny_vl.save_tiny_vl(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1003520).save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    clip, clip_tok = tiny_vl.tiny_clip(["red", "blue", "green", "block", "top", "left",
                                        "a red block"])
    clip.save_pretrained(clip_dir)
    clip_tok.save_pretrained(clip_dir)
    image_dir.mkdir(exist_ok=True)
    lines = []
    for i in range(n_images):
        path = image_dir / f"{i}.png"
        tiny_vl.image(i, size=112).save(path)
        q, a = QUESTIONS[i % len(QUESTIONS)]
        lines.append(json.dumps({"image": f"images/{i}.png", "question": q, "answer": a,
                                 "id": f"smoke-{i}", "data_source": "smoke"}))
    questions = workdir / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return {"model": str(model_dir), "clip": str(clip_dir), "questions": str(questions)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path, help="where to write the assets")
    out = make(p.parse_args(argv).workdir)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
