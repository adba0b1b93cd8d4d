"""The policy: a tiny Qwen2.5-VL built from a config for the built-in task, or a local
checkpoint; and its forward to last-layer hidden states (the fused loss takes those and the LM
head's weight: no logits)."""

from __future__ import annotations

from typing import Any, Tuple

import torch

from .batch import PolicyBatch
from .config import ModelConfig

Tensor = torch.Tensor


def tiny_vl_model(cfg: ModelConfig, tokenizer: Any, *, seed: int = 0,
                  max_positions: int = 2048) -> Any:
    """A Qwen2.5-VL with ``cfg``'s sizes, random weights drawn from ``seed``, whose vocabulary
    and vision markers are ``tokenizer``'s (``max_positions``: the text model's
    ``max_position_embeddings``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..tasks.tokenizer import vision_token_ids
    head_dim = cfg.hidden_size // cfg.heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    eos = tokenizer.eos_token_id
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
                           intermediate_size=2 * cfg.vision_hidden_size,
                           num_heads=max(1, cfg.vision_hidden_size // 32),
                           out_hidden_size=cfg.hidden_size, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[cfg.vision_depth - 1]),
        bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        **vision_token_ids(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    return model


def load_pretrained(path: str, device: torch.device) -> Tuple[Any, Any]:
    """A local Qwen2.5-VL checkpoint and its tokenizer (nothing is downloaded)."""
    import os

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    if not os.path.isdir(path):
        raise ValueError(f"config: `model.path` {path!r} is not a local checkpoint folder")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                               local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device), tokenizer


def policy_hidden(model: Any, batch: PolicyBatch) -> Tensor:
    """Last-layer hidden states ``[B, T, H]`` of the HF model over a collated batch (images
    through its own vision tower, M-RoPE from its own ``get_rope_index``)."""
    dev = next(model.parameters()).device
    ids = batch.input_ids.to(dev)
    out = model.model(input_ids=ids, attention_mask=batch.attention_mask.to(dev),
                      pixel_values=batch.pixel_values.to(dev) if batch.pixel_values.numel()
                      else None,
                      image_grid_thw=batch.image_grid_thw.to(dev) if batch.image_grid_thw.numel()
                      else None,
                      mm_token_type_ids=(ids == model.config.image_token_id).int(),
                      use_cache=False)
    return out.last_hidden_state


class PolicyWithLoss(torch.nn.Module):
    """The policy with its loss computed inside ``forward``: ``fn(hidden [B, T, H], lm_head
    weight [V, H])`` runs there. Under FSDP this module is the root, so its forward gathers
    the LM head for the fused loss and its backward reduces the head's gradient."""

    def __init__(self, policy: Any):
        super().__init__()
        self.policy = policy

    def forward(self, batch: PolicyBatch, fn: Any) -> Any:
        hidden = policy_hidden(self.policy, batch)
        w = self.policy.lm_head.weight
        return fn(hidden, w if w.dtype == hidden.dtype else w.to(hidden.dtype))
