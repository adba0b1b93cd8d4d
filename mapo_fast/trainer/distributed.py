"""More than one process: data-parallel training with FSDP2 (``fully_shard``) under
``torchrun``. Each rank rolls out its share of the step's prompts with a full, unsharded copy of
the policy (refreshed from the shards after every optimizer step, as hybrid RL engines do),
trains its share with sharded parameters, and metrics are averaged over ranks. One process
(no ``WORLD_SIZE``) is the plain case: no copy, no communication."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict

import torch

Tensor = torch.Tensor


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistContext":
        """Joins the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU). On CUDA
        the process's current device is set to its ``LOCAL_RANK`` first, before anything
        touches CUDA: Triton launches, CUDA graphs and NCCL use the current device, which is
        GPU 0 for every rank otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def reduce_device(self) -> torch.device:
        """Where the process group's collectives take their tensors: this rank's GPU for NCCL
        (which refuses CPU tensors), the CPU for gloo."""
        import torch.distributed as dist
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _all_reduce(self, values) -> list:
        """The float64 sum over ranks of each of ``values``, computed on ``reduce_device``."""
        import torch.distributed as dist
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.reduce_device())
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """Averages each (finite or not) value over ranks."""
        if not self.enabled:
            return values
        keys = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
        out = dict(values)
        out.update({k: v / self.world for k, v in zip(keys, self._all_reduce(
            values[k] for k in keys))})
        return out

    def sum(self, x: float) -> float:
        """``x`` summed over ranks."""
        if not self.enabled:
            return x
        return self._all_reduce([x])[0]

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        """Every rank reaches here before any tears its process group down (a rank leaving
        while another still talks to it aborted that one at exit now and then, 2 gloo ranks
        on CPU: "terminate called without an active exception")."""
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    # ---- FSDP2 ---------------------------------------------------------------------------------
    def shard(self, wrapper: Any) -> Any:
        """``fully_shard`` on every decoder layer and vision block of ``wrapper.policy``, then
        on ``wrapper`` (the root, whose forward computes the loss); returns the rollout copy
        of the policy (unsharded), or the policy itself with one process."""
        if not self.enabled:
            return wrapper.policy
        from torch.distributed.fsdp import fully_shard
        replica = copy.deepcopy(wrapper.policy)
        base = wrapper.policy.model
        for layer in list(base.language_model.layers) + list(base.visual.blocks):
            fully_shard(layer)
        fully_shard(wrapper)
        return replica

    def full_state(self, model: Any) -> Dict[str, Tensor]:
        """The full (unsharded) model state on every rank."""
        if not self.enabled:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    def sync_replica(self, wrapper: Any, replica: Any) -> None:
        """Copies the sharded policy's weights (``wrapper.policy``) into the rollout copy."""
        if self.enabled:
            prefix = "policy."
            replica.load_state_dict({k[len(prefix):]: v for k, v in
                                     self.full_state(wrapper).items() if k.startswith(prefix)})

    def checkpoint_state(self, model: Any, opt: Any) -> Dict[str, Any]:
        """Full model and optimizer state (gathered to rank 0 when sharded)."""
        if not self.enabled:
            return {"model": model.state_dict(), "optimizer": opt.state_dict()}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": get_model_state_dict(model, options=opts),
                "optimizer": get_optimizer_state_dict(model, opt, options=opts)}

    def load_state(self, model: Any, opt: Any, state: Dict[str, Any]) -> None:
        if not self.enabled:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=opts)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
