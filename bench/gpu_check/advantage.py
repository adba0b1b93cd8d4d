"""The advantage-kernel section."""

from __future__ import annotations

from typing import Dict

import torch

from .common import Sizes

def advantage_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """The advantage kernel against the torch path (float32, 1e-5) with turn discounts and
    invalid turns, and both timed."""
    from mapo_fast.kernels import advantage as K
    from mapo_fast.kernels import advantage_ref as R
    B, G, T, turns = sz.advantage
    g = torch.Generator(device=dev).manual_seed(3)
    rewards = torch.rand(B, generator=g, device=dev)
    seg = torch.arange(B, device=dev) // G
    sem = torch.rand(B, turns, generator=g, device=dev)
    valid = torch.rand(B, turns, generator=g, device=dev) > 0.2
    token_turn = torch.randint(-1, turns, (B, T), generator=g, device=dev)
    token_turn = torch.where(valid.gather(1, token_turn.clamp_min(0)), token_turn, -1)
    kw = dict(coef=0.5, norm_std=True, eps=1e-6, loo=False, discount=0.7)
    n_groups = B // G
    got = K.advantages(rewards, seg, n_groups, sem, valid, token_turn, max_group=G, **kw)
    want = R.advantages(rewards, seg, n_groups, sem, valid, token_turn, **kw)[0]
    err = float((got - want).abs().max())
    return {"sizes": dict(sequences=B, group=G, tokens=T, turns=turns), "max_abs_err": err,
            "tolerance": 1e-5, "ok": err <= 1e-5,
            "ms": {"triton": measure(lambda: K.advantages(rewards, seg, n_groups, sem, valid,
                                                          token_turn, max_group=G, **kw)),
                   "torch_path": measure(lambda: R.advantages(rewards, seg, n_groups, sem,
                                                              valid, token_turn, **kw))}}
