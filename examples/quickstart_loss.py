"""Quickstart: the drop-in loss on a group of rollouts. One ``PolicyNumerics`` defines the
distribution the engine samples from and the loss trains (temperature, logit map, banned
tokens), so the first on-policy ratio is 1 up to float32 rounding. Runs as is on CPU (a tiny
Qwen2 built in code)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import mapo_fast

torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2))
numerics = mapo_fast.PolicyNumerics(temperature=0.7, top_p=0.9,
                                    **mapo_fast.PolicyNumerics.logit_map_of(model))
engine = mapo_fast.RolloutEngine(model, None)     # KV pool: half the free memory
prompt = list(range(1, 17))                              # token ids (or a chat, or a string)
trajs = engine.generate([prompt], group_size=4, max_new_tokens=12, seed=0,
                        **numerics.sampling_kwargs())

P = len(prompt)
ids = torch.tensor([t.token_ids for t in trajs])         # [B, P + R]
responses = ids[:, P:]                                   # [B, R] the sampled tokens
old = torch.tensor([t.logprobs[P:] for t in trajs])      # [B, R] the sampler's log-probs
mask = torch.tensor([t.loss_mask[P:] for t in trajs], dtype=torch.float32)
rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])             # one outcome reward per sample
advantages = mapo_fast.mapo_advantages(rewards, torch.zeros(4, dtype=torch.long), algo="grpo")

hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1:-1]   # t predicts t + 1
loss, metrics = mapo_fast.mapo_loss(hidden, model.lm_head.weight, responses, advantages, mask,
                                    old_logprobs=old, clip_low=0.2, clip_high=0.28,
                                    loss_agg="token-mean", **numerics.loss_kwargs())
loss.backward()                                          # no [tokens x vocab] logits formed
print(f"loss {loss.item():+.5f}, |grad| of the head {model.lm_head.weight.grad.norm():.4f}, "
      f"ratio mean {metrics['ratio_mean'].item():.6f}")
