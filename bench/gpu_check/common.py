"""What the sections share: the sizes (real and toy), the timer (``harness.measure``), the
relative error, the rollout sections' model and prompts, and the greedy comparisons."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from harness import measure


@dataclass(frozen=True)
class Sizes:
    """Each section's sizes (``REAL`` on a GPU, ``TOY`` under the interpreter)."""
    loss: tuple          # tokens N, hidden H, vocabulary V
    paged: tuple         # batch, context, heads, kv_heads, head_dim, page
    prefill: tuple       # sequences, new queries each (a chunked-prefill batch, paged sizes)
    crops: tuple         # boxes, images, image side, output side
    advantage: tuple     # sequences, group size, tokens, turns
    rollout: dict        # Qwen2 config
    prompts: tuple       # prompts, prompt tokens, group size, new tokens


REAL = Sizes(loss=(16384, 3584, 152064), paged=(256, 8192, 28, 4, 128, 16), prefill=(8, 512),
             crops=(64, 4, 4096, 448), advantage=(4096, 8, 2048, 4),
             rollout=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
             prompts=(16, 256, 8, 256))
TOY = Sizes(loss=(40, 48, 160), paged=(3, 80, 6, 2, 32, 16), prefill=(2, 17),
            crops=(3, 2, 96, 28),
            advantage=(24, 4, 40, 3),
            rollout=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
            prompts=(2, 20, 2, 6))


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``repeats`` calls after one warm-up (``harness.measure``, no
    peak-memory call)."""
    def median_ms(fn: Callable[[], object]) -> float:
        return measure("", fn, device, repeats=repeats, warmup=1, peak_memory=False).median_ms
    return median_ms


def time_once(device: torch.device, fn: Callable[[], object]) -> float:
    """Milliseconds of one call (``harness.measure``: synchronised on a GPU)."""
    return measure("", fn, device, repeats=1, warmup=0, peak_memory=False).median_ms


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    got, want = got.double(), want.double()
    top = float(want.abs().max()) if want.numel() else 0.0
    return float((got - want).abs().max()) / top if top else float((got - want).abs().max())


def prompt_workload(sz: Sizes, vocab: int, stride: int) -> tuple:
    """The rollout sections' prompts (``sz.prompts``: count and length; token ids made from
    ``stride``) and the KV blocks of 16 tokens their groups need, twice over."""
    n_prompts, plen, group, new = sz.prompts
    prompts = [[(stride * i + j) % (vocab - 1) + 1 for j in range(plen)]
               for i in range(n_prompts)]
    return prompts, 2 * -(-n_prompts * group * (plen + new) // 16)


def rollout_setup(sz: Sizes, dev: torch.device):
    """The rollout sections' random-weight Qwen2 (bf16 on GPU), prompts and engine settings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    allocator = "cpp" if importlib.util.find_spec("mapo_fast.kernels._block_manager") \
        else "python"
    torch.manual_seed(4)
    cfg = Qwen2Config(max_position_embeddings=4096, **sz.rollout)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Qwen2ForCausalLM(cfg).to(dev, dtype).eval()
    n_prompts, plen, group, new = sz.prompts
    prompts, blocks = prompt_workload(sz, cfg.vocab_size, stride=7)
    sizes = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6, prompts=n_prompts,
                 prompt_tokens=plen, group=group, new_tokens=new)
    return model, prompts, dict(block_size=16, num_blocks=blocks, allocator=allocator), sizes


def greedy_check(model, prompts: List[List[int]], new: int, allocator: str) -> Dict:
    """Greedy tokens of ``RolloutEngine`` against the eager torch path (Hugging Face's
    ``generate``) on a float32 copy of the same model, TF32 off: equal, or the first
    ``(prompt, position)`` where they differ."""
    import copy

    from mapo_fast.rollout.engine import RolloutEngine
    model32 = copy.deepcopy(model).float()
    dev = next(model32.parameters()).device
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        blocks = 2 * -(-len(prompts) * (len(prompts[0]) + new) // 16)
        eng = RolloutEngine(model32, None, block_size=16, num_blocks=blocks, allocator=allocator)
        ours = [t.token_ids[len(p):] for t, p in zip(
            eng.generate(prompts, max_new_tokens=new, temperature=0.0), prompts)]
        with torch.no_grad():
            ref = model32.generate(torch.tensor(prompts, device=dev), do_sample=False,
                                   max_new_tokens=new, min_new_tokens=new,
                                   pad_token_id=0)[:, len(prompts[0]):].tolist()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diverge = first_divergence(ours, ref)
    return {"equal": diverge is None, "first_divergence": diverge}


def first_divergence(ours: List[List[int]], ref: List[List[int]]) -> Optional[List[int]]:
    """The first ``[sequence, position]`` where two lists of token lists differ (a shorter
    list differs where it ends), or None."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        for j, (x, y) in enumerate(zip(list(a), list(b))):
            if x != y:
                return [i, j]
        if len(a) != len(b):
            return [i, min(len(a), len(b))]
    return None
