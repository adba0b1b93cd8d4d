"""The trainer's process-group helpers (``trainer/distributed.py``) without several GPUs: the
device a collective's tensors live on follows the backend (NCCL refuses CPU tensors), each
rank's current CUDA device is its ``LOCAL_RANK`` before the group is joined, and the sums and
means are right over a real one-process gloo group. The two-rank run is in test_trainer."""

import pytest
import torch
import torch.distributed as dist

from mapo_fast.trainer import distributed as D


@pytest.mark.parametrize("backend, device", [("nccl", torch.device("cuda", 3)),
                                             ("gloo", torch.device("cpu"))])
def test_collectives_run_on_the_backend_device(monkeypatch, backend, device):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert D.DistContext(rank=3, world=4, local_rank=3).reduce_device() == device


def test_reductions_hand_their_tensors_on_the_backend_device(monkeypatch):
    """What ``mean`` and ``sum`` give ``all_reduce``: float64 on ``reduce_device`` (a fake
    collective doubles the values, as two equal ranks would)."""
    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append((t.device, t.dtype))
        t.mul_(2)

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ctx = D.DistContext(rank=0, world=2, local_rank=0)
    assert ctx.mean({"a": 1.5, "b": 4, "name": "x"}) == {"a": 1.5, "b": 4.0, "name": "x"}
    assert ctx.sum(2.5) == 5.0
    assert seen == [(torch.device("cpu"), torch.float64)] * 2


def test_local_rank_is_the_current_cuda_device_before_the_group(monkeypatch):
    """``from_env`` on CUDA: ``set_device(LOCAL_RANK)`` runs before ``init_process_group``."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    ctx = D.DistContext.from_env("cuda")
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert (ctx.rank, ctx.world, ctx.local_rank) == (1, 2, 1)


def test_one_process_gloo_group(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        ctx = D.DistContext(rank=0, world=1, local_rank=0)
        assert ctx.reduce_device() == torch.device("cpu")
        assert ctx._all_reduce([1.0, 2.5]) == [1.0, 2.5]
    finally:
        dist.destroy_process_group()
