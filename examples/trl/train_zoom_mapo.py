"""MAPO in TRL: a Qwen2.5-VL policy zooms into its image with the zoom tool (``ZoomEnvironment``
in TRL's own multi-turn tool loop), describes each crop in ``<description>...</description>``,
answers in ``<answer>...</answer>``, and is trained by ``MAPOGRPOTrainer`` with
``MAPOTurnScores``: a CLIP verifier scores every description against the crop it describes,
and those scores, group-normalised, are added to TRL's outcome advantage on each turn's tokens.

Install: ``pip install torch`` then ``pip install -e ".[trl]"`` (TRL 1.16, the release the
integration is tested with; ``datasets`` comes with it).

Runs as is on CPU (a few minutes on 2 cores) with a tiny Qwen2.5-VL built in code, first taught
to call the zoom tool (``tiny_vl.py``: a random model never does), and a tiny random CLIP::

    python examples/trl/train_zoom_mapo.py --steps 4 --out runs/trl-mapo

With a real checkpoint and verifier (local folders; the dataset: rows with an ``image`` and a
``prompt`` in chat format)::

    python examples/trl/train_zoom_mapo.py --model /ckpt/Qwen2.5-VL-3B-Instruct \\
        --verifier /ckpt/clip-vit-base-patch32 --steps 200 --bf16

The chat template: TRL renders and parses tool calls only with a template it knows, and it
refuses Qwen2.5-VL's own ("does not support tool calling"). This script gives the processor
TRL's ``qwen3_vl_chat_template`` (same ``<|im_start|>`` format, tool calls TRL can parse).
Prints one line per step and a summary (steps, tool calls per completion, crops scored, mean
semantic score), and writes them to ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def answer_reward(completions, **kwargs):
    """1 when the last message answers ``red`` (the tiny task's answer), else 0."""
    return [float("<answer>red</answer>" in str(c[-1]["content"])) for c in completions]


def tiny_setup(folder: Path):
    """The tiny policy (saved to ``folder``, taught tool use), its processor with TRL's chat
    template, the dataset rows and a tiny random CLIP verifier."""
    from trl.chat_template_utils import qwen3_vl_chat_template

    import tiny_vl
    from mapo_fast.rewards.clip import CLIPVerifier
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": q}]}],
             "image": tiny_vl.image(i)} for i, q in enumerate(tiny_vl.QUESTIONS)]
    tiny_vl.save_tiny_vl(folder)
    proc = tiny_vl.processor(folder, qwen3_vl_chat_template)
    print("teaching the tiny policy to call the zoom tool ...", flush=True)
    tiny_vl.warm_start_tool_use(folder, proc, rows)
    clip = tiny_vl.tiny_clip(["a red square", "blue dots", "a sign", "red", "blue", "square",
                              "dots"])
    return str(folder), proc, rows, CLIPVerifier(*clip)


def real_setup(model: str, verifier: str, data: str):
    """A local Qwen2.5-VL checkpoint with its own processor (TRL's chat template), a local CLIP
    folder, and a JSONL dataset (``image``: a path, ``prompt``: chat messages)."""
    from PIL import Image
    from transformers import AutoProcessor
    from trl.chat_template_utils import qwen3_vl_chat_template

    from mapo_fast.rewards.clip import CLIPVerifier
    proc = AutoProcessor.from_pretrained(model, local_files_only=True)
    proc.chat_template = qwen3_vl_chat_template
    rows = []
    for line in Path(data).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append(dict(row, image=Image.open(row["image"]).convert("RGB")))
    return model, proc, rows, CLIPVerifier.from_pretrained(verifier)


def train(model, proc, rows, verifier, *, steps: int, out: Path, bf16: bool = False,
          semantic_coef: float = 1.0) -> dict:
    """``steps`` MAPO steps in TRL; returns the summary (also written to ``out``)."""
    import datasets
    from trl import GRPOConfig

    from mapo_fast.integrations.trl import MAPOGRPOTrainer, MAPOTurnScores, ZoomEnvironment
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=160, max_steps=steps, logging_steps=1,
                      report_to="none", use_cpu=not torch.cuda.is_available(), bf16=bf16,
                      seed=0, learning_rate=1e-3, save_strategy="no", loss_type="bnpo",
                      beta=0.04, temperature=1.0)
    scores = MAPOTurnScores(verifier, proc, semantic_coef=semantic_coef)
    trainer = MAPOGRPOTrainer(model=model, reward_funcs=answer_reward, args=args,
                              processing_class=proc,
                              train_dataset=datasets.Dataset.from_list(rows),
                              environment_factory=ZoomEnvironment.factory(proc),
                              semantic_scores_fn=scores)
    torch.manual_seed(0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for i, h in enumerate(logs, 1):
        print(f"step {i}: loss {h['loss']:+.4f}, reward {h.get('reward', 0):.3f}, tool calls "
              f"per completion {h['tools/call_frequency']:.2f}, failed calls "
              f"{h['tools/failure_frequency']:.2f}, crops scored {h['mapo/scored']:.0f}, "
              f"semantic score {h['mapo/score_mean']:.3f}", flush=True)
    summary = {"steps": len(logs),
               "tool_calls_per_completion": [h["tools/call_frequency"] for h in logs],
               "failed_call_fraction": [h["tools/failure_frequency"] for h in logs],
               "crops_scored": [h["mapo/scored"] for h in logs],
               "semantic_score": [h["mapo/score_mean"] for h in logs],
               "loss": [h["loss"] for h in logs], "reward": [h.get("reward") for h in logs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    p.add_argument("--out", type=Path, default=Path("runs/trl-mapo"),
                   help="output folder (default runs/trl-mapo)")
    p.add_argument("--model", default=None,
                   help="a local Qwen2.5-VL checkpoint folder (default: the tiny one)")
    p.add_argument("--verifier", default=None, help="a local CLIP folder (with --model)")
    p.add_argument("--data", default=None, help="a JSONL dataset (with --model)")
    p.add_argument("--semantic-coef", type=float, default=1.0,
                   help="weight of the semantic term (0: GRPO's advantage)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (a GPU)")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.model is not None and (a.verifier is None or a.data is None):
        p.error("--model needs --verifier and --data")
    if a.model is None:
        with tempfile.TemporaryDirectory() as folder:
            setup = tiny_setup(Path(folder))
            return train(*setup, steps=a.steps, out=a.out, bf16=a.bf16,
                         semantic_coef=a.semantic_coef)
    return train(*real_setup(a.model, a.verifier, a.data), steps=a.steps, out=a.out,
                 bf16=a.bf16, semantic_coef=a.semantic_coef)


if __name__ == "__main__":
    summary = main()
    print(f"summary: {summary['steps']} steps, tool calls per completion "
          f"{summary['tool_calls_per_completion']}, crops scored {summary['crops_scored']}, "
          f"semantic score {summary['semantic_score']}")
