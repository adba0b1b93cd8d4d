"""Quickstart: multi-turn rollouts of a vision-language policy with the zoom tool, on a paged KV
pool shared by each group. Runs as is on CPU in seconds (a tiny Qwen2.5-VL built in code)."""

import torch

import mapo_fast
from mapo_fast.tasks.tokenizer import build_tokenizer
from mapo_fast.trainer.config import ModelConfig
from mapo_fast.trainer.model import tiny_vl_model

tokenizer = build_tokenizer(["What colour is the square? <answer>red</answer>"] * 8,
                            vocab_size=400)
model = tiny_vl_model(ModelConfig(hidden_size=64, intermediate_size=64, vision_hidden_size=32),
                      tokenizer, seed=0)
image = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)      # uint8 [3, H, W]
chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                     {"type": "text", "text": "What colour is the square?"}]}]

# the KV pool: half the free memory; on CPU only the blocks rollouts write become resident
engine = mapo_fast.RolloutEngine(model, tokenizer)
trajs = engine.generate([chat], group_size=4, max_new_tokens=32, temperature=1.0,
                        tools=mapo_fast.ToolRunner(), max_turns=3, seed=0)
for t in trajs:  # token_ids, logprobs, loss_mask, spans.turns (call, crop, description), crops
    print(f"{len(t.token_ids)} tokens, {int(sum(t.loss_mask))} generated, "
          f"{len(t.spans.turns)} tool turns, {len(t.crops)} crops")
