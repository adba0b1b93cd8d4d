"""Trajectories to the padded tensors of one policy forward: token ids, masks, the sampler's
log-probs, each token's tool turn, and the vision tower's input for every image the tokens hold
(prompt images, then each turn's crop): the rollout's own (``Trajectory.vision_inputs``), or
made here for trajectories that lack them, crops from the trajectory's crops without cutting
them again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..trajectory import Trajectory, token_turns

Tensor = torch.Tensor


@dataclass
class PolicyBatch:
    """``input_ids``/``attention_mask``/``loss_mask``/``old_logprobs``/``token_turn [B, T]``
    (right-padded; ``token_turn`` -1 off tool turns), ``pixel_values [P, C]`` and
    ``image_grid_thw [I, 3]`` of all images in row order, ``image_rows [I]`` (each image's
    row), ``group_ids [B]``."""
    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    old_logprobs: Tensor
    token_turn: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    image_rows: Tensor
    group_ids: Tensor

    def select(self, rows: List[int]) -> "PolicyBatch":
        """The sub-batch of ``rows`` (a micro-batch), trimmed to its longest row; its images'
        patches are sliced out, not cut again."""
        idx = torch.tensor(rows, dtype=torch.int64)
        T = int(self.attention_mask[idx].sum(1).max())
        keep = torch.isin(self.image_rows, idx)
        counts = self.image_grid_thw.prod(1)
        starts = torch.cumsum(counts, 0) - counts
        patch_idx = torch.cat([torch.arange(int(a), int(a + n)) for a, n, k in
                               zip(starts, counts, keep) if k] or [torch.empty(0, dtype=torch.int64)])
        remap = {r: i for i, r in enumerate(rows)}
        return PolicyBatch(*(x[idx, :T] for x in (self.input_ids, self.attention_mask,
                                                   self.loss_mask, self.old_logprobs,
                                                   self.token_turn)),
                           self.pixel_values[patch_idx], self.image_grid_thw[keep],
                           torch.tensor([remap[int(r)] for r in self.image_rows[keep]],
                                        dtype=torch.int64),
                           self.group_ids[idx])


def collate(trajectories: Sequence[Trajectory], images: Sequence[Sequence[Tensor]],
            adapter, pad_id: int) -> PolicyBatch:
    """``images[b]``: the original images of trajectory ``b``'s prompt (uint8 ``[3, H, W]``);
    ``adapter``: the engine's ``VisionAdapter`` (same patch layout and pixel bounds as the
    rollout)."""
    if len(images) != len(trajectories):
        raise ValueError(f"collate: {len(trajectories)} trajectories but {len(images)} image "
                         "lists")
    B = len(trajectories)
    T = max(len(t.token_ids) for t in trajectories)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    attn = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.float32)
    old = torch.zeros(B, T, dtype=torch.float32)
    inputs: List[Tuple[Tensor, Tuple[int, int, int]]] = []
    owner: List[int] = []
    for b, (t, ims) in enumerate(zip(trajectories, images)):
        n = len(t.token_ids)
        ids[b, :n] = torch.tensor(t.token_ids)
        attn[b, :n] = 1
        mask[b, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        old[b, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
        mine = vision_inputs(t, ims, adapter)
        inputs += mine
        owner += [b] * len(mine)
    turn = token_turns([t.spans for t in trajectories], [len(t.token_ids) for t in trajectories],
                       pad_to=T)
    width = 3 * adapter.temporal_patch_size * adapter.patch_size ** 2
    pixel_values = torch.cat([pv.reshape(-1, width) for pv, _ in inputs]) if inputs else \
        torch.empty(0, width)
    grid = torch.tensor([list(g) for _, g in inputs], dtype=torch.int64).reshape(-1, 3)
    return PolicyBatch(ids, attn, mask, old, turn, pixel_values, grid,
                       torch.tensor(owner, dtype=torch.int64),
                       torch.tensor([t.group_id for t in trajectories]))


def vision_inputs(t: Trajectory, images: Sequence[Tensor], adapter
                  ) -> List[Tuple[Tensor, Tuple[int, int, int]]]:
    """``(pixel_values, grid)`` of each image trajectory ``t`` holds, in token order: the
    rollout's (``t.vision_inputs``) when it kept them; else the prompt ``images`` resized by
    the adapter and each successful turn's crop (``t.crops``) laid out as patches as it is."""
    if t.vision_inputs:
        return list(t.vision_inputs)
    crops = [t.crops[turn.crop_index] for turn in t.spans.turns if turn.ok]
    out = adapter.split_patches(*adapter.full_patches(list(images)))
    if crops:
        out += adapter.split_patches(*adapter.crop_patches(crops))
    return out
