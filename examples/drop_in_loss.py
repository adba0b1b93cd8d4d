"""The drop-in loss on a Hugging Face causal LM: hidden states from the base model, the LM
head's weight to the fused loss, no logits. Runs as is on a tiny Qwen2 built from a config
(no download): ``python examples/drop_in_loss.py``."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import mapo_fast


def main(steps: int = 3, seed: int = 0) -> list:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, P, R = 4, 8, 16                               # sequences, prompt and response tokens
    ids = torch.randint(0, cfg.vocab_size, (B, P + R))
    response_mask = torch.ones(B, R)
    response_mask[1, 10:] = 0                        # a shorter response
    advantages = torch.randn(B)                      # one per sequence (e.g. mapo_advantages)
    with torch.no_grad():                            # the sampler's log-probs
        h = model.model(input_ids=ids).last_hidden_state[:, P - 1:-1]
        old = mapo_fast.token_logprobs(h, model.lm_head.weight, ids[:, P:])
    losses = []
    for _ in range(steps):
        # position t predicts token t + 1: take the states before each response token
        hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1:-1]
        loss, metrics = mapo_fast.mapo_loss(hidden, model.lm_head.weight, ids[:, P:],
                                            advantages, response_mask, old_logprobs=old,
                                            clip_ratio_c=3.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"loss {loss.item():+.4f}  entropy {metrics['entropy'].item():.3f}  "
              f"ratio_max {metrics['ratio_max'].item():.3f}  "
              f"clipfrac {metrics['pg_clipfrac'].item():.3f}")
    return losses


if __name__ == "__main__":
    main()
