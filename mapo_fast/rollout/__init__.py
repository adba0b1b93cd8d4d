"""The rollout runtime's building blocks: attention over a paged KV cache and the KV writes
(the block allocator is mapo_fast.kernels._block_manager, its Python model
mapo_fast.kernels.block_manager_ref)."""

from .attention import paged_attention, write_kv

__all__ = ["paged_attention", "write_kv"]
