"""The rollout runtime: RolloutEngine (engine.py: generate = a loop over step(): schedule,
run, postprocess) and its parts, one idea per file: params (validated settings), sequence
(prompts and samples, and the records the parts pass each other), scheduler (owns the block allocator, mapo_fast.kernels._block_manager;
its Python model is mapo_fast.kernels.block_manager_ref), model_runner (KV pool, attention hook,
forward), cpu_malloc (glibc's malloc thresholds on CPU), sampler, tool_turns (stop rules,
tool calls, observations), multimodal (chat prompts, vision tower, M-RoPE), attention (paged
attention and KV writes)."""

from .attention import paged_attention, write_kv
from .engine import RolloutEngine
from .params import SamplingParams, SchedulerParams, ToolParams
from .scheduler import Scheduler

__all__ = ["RolloutEngine", "SamplingParams", "ToolParams", "SchedulerParams", "Scheduler",
           "paged_attention", "write_kv"]
