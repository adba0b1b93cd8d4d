"""The rollout runtime: RolloutEngine (batched, group-shared generation over a paged KV cache),
attention over the pages and the KV writes (the block allocator is
mapo_fast.kernels._block_manager, its Python model mapo_fast.kernels.block_manager_ref)."""

from .attention import paged_attention, write_kv
from .engine import RolloutEngine

__all__ = ["RolloutEngine", "paged_attention", "write_kv"]
