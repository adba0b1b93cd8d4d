"""Synthetic tool-use rollouts with a known ground truth, for measuring advantage estimators.

Each trajectory has two tool turns (tokens 0-3 and 4-7) and an answer (tokens 8-9). A crop
hits the object the description names with probability ``1 - miss_rate``; on a hit the turn's
tokens are 'right place' actions ``{0, 1, 2}``, on a miss ``{3, 4, 5}``. The answer is right with
probability 0.8 / 0.5 / 0.2 for 2 / 1 / 0 hits (sparse, noisy outcome). The semantic score of
a turn is ~0.8 on a hit and ~0.2 on a miss (the description names an object the crop does not
show); with ``informative=False`` it is pure noise instead (a control). Hidden states are a
fixed context vector for tool-turn and answer positions plus noise, as a policy's states at
those positions would be.
"""

from __future__ import annotations

from typing import Dict

import torch


def synthetic_tool_rollouts(seed: int, *, n_groups: int = 16, group_size: int = 8,
                            hidden_size: int = 16, vocab: int = 12, miss_rate: float = 0.5,
                            informative: bool = True,
                            dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Returns ``hidden [B,10,H]``, ``weight [V,H]``, ``targets``/``mask [B,10]``,
    ``rewards [B]``, ``group_ids [B]``, ``scores``/``turn_mask [B,2]``, ``token_turn [B,10]``
    and ``hits [B,2]``, with ``B = n_groups * group_size``."""
    if vocab < 7:
        raise ValueError(f"synthetic_tool_rollouts: `vocab` must be >= 7, got {vocab}")
    g = torch.Generator().manual_seed(seed)
    B, T, H = n_groups * group_size, 10, hidden_size
    group_ids = torch.arange(n_groups).repeat_interleave(group_size)
    hits = torch.rand(B, 2, generator=g) >= miss_rate
    targets = torch.randint(6, vocab, (B, T), generator=g)
    for k in range(2):
        good = torch.randint(0, 3, (B, 4), generator=g)
        bad = torch.randint(3, 6, (B, 4), generator=g)
        targets[:, 4 * k:4 * k + 4] = torch.where(hits[:, k:k + 1], good, bad)
    p_right = torch.tensor([0.2, 0.5, 0.8])[hits.sum(1)]
    rewards = (torch.rand(B, generator=g) < p_right).to(dtype)
    noise = 0.05 * torch.randn(B, 2, generator=g, dtype=dtype)
    if informative:
        scores = torch.where(hits, 0.8, 0.2).to(dtype) + noise
    else:
        scores = torch.rand(B, 2, generator=g, dtype=dtype)
    context = torch.randn(2, H, generator=g, dtype=dtype)
    kind = torch.tensor([0] * 8 + [1] * 2)
    hidden = context[kind].expand(B, T, H) + 0.3 * torch.randn(B, T, H, generator=g, dtype=dtype)
    return dict(hidden=hidden, weight=0.1 * torch.randn(vocab, H, generator=g, dtype=dtype),
                targets=targets, mask=torch.ones(B, T), rewards=rewards, group_ids=group_ids,
                scores=scores, turn_mask=torch.ones(B, 2, dtype=torch.bool),
                token_turn=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, -1, -1]).expand(B, T).clone(),
                hits=hits)
