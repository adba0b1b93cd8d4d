"""One process of ``test_recipe.py``'s two-process check of ``MAPOTurnScores``: started by
``torch.distributed.run`` (gloo, CPU), it scores its share of the batch ``test_recipe.batch``
makes (rows ``[rank * B, (rank + 1) * B)``, the split TRL makes) with every process's scores
gathered, and saves its advantages to ``<out>/rank<r>.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_recipe  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        batch, fn = test_recipe.split_batch(rank, world)
        torch.save(fn(batch), Path(out) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
