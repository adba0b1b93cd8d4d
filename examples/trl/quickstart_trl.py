"""Quickstart: MAPO in TRL. ``MAPOGRPOTrainer`` is TRL's ``GRPOTrainer`` with MAPO's advantage:
the zoom tool runs in TRL's own tool loop (``ZoomEnvironment``) and ``MAPOTurnScores`` scores
each description against the crop it describes. Runs as is on CPU after ``pip install -e
".[trl]"``, with a tiny Qwen2.5-VL and CLIP built in code by ``tiny_vl.py`` (beside this file);
``train_zoom_mapo.py`` shows the same with a real checkpoint and CLIP folder."""

import datasets
import torch
from trl import GRPOConfig
from trl.chat_template_utils import qwen3_vl_chat_template

import tiny_vl
from mapo_fast.integrations.trl import MAPOGRPOTrainer, MAPOTurnScores, ZoomEnvironment
from mapo_fast.rewards import CLIPVerifier

folder = "tiny-qwen2.5-vl"                       # or your Qwen2.5-VL checkpoint folder
tiny_vl.save_tiny_vl(folder)
# TRL parses tool calls only in a chat template it knows (not Qwen2.5-VL's own)
processor = tiny_vl.processor(folder, qwen3_vl_chat_template)
rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": q}]}],
         "image": tiny_vl.image(i)} for i, q in enumerate(tiny_vl.QUESTIONS)]
tiny_vl.warm_start_tool_use(folder, processor, rows)   # a random model never calls a tool
verifier = CLIPVerifier(*tiny_vl.tiny_clip(["a red square", "blue dots", "a sign"]))


def answer_reward(completions, **kwargs):        # the outcome reward: one float per sample
    return [float("<answer>red</answer>" in str(c[-1]["content"])) for c in completions]


args = GRPOConfig(output_dir="runs/trl-quickstart", per_device_train_batch_size=8,
                  num_generations=4, max_completion_length=160, max_steps=2,
                  logging_steps=1, learning_rate=1e-3, use_cpu=not torch.cuda.is_available(),
                  report_to="none", save_strategy="no")
trainer = MAPOGRPOTrainer(model=folder, processing_class=processor, reward_funcs=answer_reward,
                          args=args, train_dataset=datasets.Dataset.from_list(rows),
                          environment_factory=ZoomEnvironment.factory(processor),
                          semantic_scores_fn=MAPOTurnScores(verifier, processor))
trainer.train()
last = [h for h in trainer.state.log_history if "loss" in h][-1]
print(f"tool calls per completion {last['tools/call_frequency']:.2f}, crops scored "
      f"{last['mapo/scored']:.0f}, semantic score {last['mapo/score_mean']:.3f}")
