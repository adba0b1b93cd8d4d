"""The KV pool's size (num_blocks, else memory_budget_mb, else a fraction of free memory) and
its memory on CPU: zeros everywhere, committed only where written."""

import os
import resource

import pytest
import torch

from mapo_fast.rollout import kv_pool
from mapo_fast.rollout.engine import RolloutEngine
from test_rollout_engine import model  # noqa: F401  (the tiny Qwen2 fixture)

CPU = torch.device("cpu")


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_the_size_takes_num_blocks_then_the_budget_then_the_fraction(monkeypatch):
    monkeypatch.setattr(kv_pool, "free_memory_bytes", lambda device: 1000 * 2 ** 20)
    assert kv_pool.pool_blocks(7, 1.0, 0.5, 2 ** 20, CPU) == 7
    assert kv_pool.pool_blocks(None, 3.5, 0.5, 2 ** 20, CPU) == 3
    assert kv_pool.pool_blocks(None, None, 0.5, 2 ** 20, CPU) == 500
    assert kv_pool.pool_blocks(None, None, 0.25, 2 ** 20, CPU) == 250


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_fraction=0), "`memory_fraction` must be a finite number in \\(0, 1\\], got 0"),
    (dict(memory_fraction=1.5), "`memory_fraction` .* got 1.5"),
    (dict(memory_fraction=float("nan")), "`memory_fraction` .* got nan"),
    (dict(memory_fraction=True), "`memory_fraction` .* got True"),
    (dict(memory_budget_mb="64"), "`memory_budget_mb` must be a finite number > 0, got '64'"),
    (dict(memory_fraction=1e-30), "`memory_fraction` 1e-30 of the .* MiB free on cpu holds no "
                                  "KV block"),
    (dict(memory_budget_mb=2 ** 40), "`memory_budget_mb` 1099511627776 asks for a .* MiB KV "
                                     "pool, more than this machine's .* MiB of memory"),
    (dict(num_blocks=2 ** 50), "`num_blocks` 1125899906842624 asks for a .* MiB KV pool, more "
                               "than this machine's"),
])
def test_bad_sizes_are_refused_naming_the_argument(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutEngine(model, None, **kwargs)


def test_free_memory_is_read_on_cpu_and_refused_elsewhere():
    free = kv_pool.free_memory_bytes(CPU)
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(ValueError, match="cannot read the free memory of a `meta` device; give "
                                         "`memory_budget_mb` or `num_blocks`"):
        kv_pool.free_memory_bytes(torch.device("meta"))


def test_the_default_pool_is_a_fraction_of_what_is_free(model, monkeypatch):
    monkeypatch.setattr(kv_pool, "free_memory_bytes", lambda device: 64 * 2 ** 20)
    eng = RolloutEngine(model, None)
    assert eng.num_blocks == (32 * 2 ** 20) // eng.block_bytes
    eng = RolloutEngine(model, None, memory_fraction=0.25)
    assert eng.num_blocks == (16 * 2 ** 20) // eng.block_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_cpu_pool_reads_zeros_and_holds_each_layer_apart(dtype):
    shape = (5, 4, 2, 3)
    k, v = kv_pool.allocate(3, shape, dtype, CPU)
    assert len(k) == len(v) == 3
    for t in k + v:
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    for i, t in enumerate(k + v):
        t.fill_(i + 1)
    for i, t in enumerate(k + v):          # no two layers share memory
        assert torch.equal(t, torch.full(shape, i + 1, dtype=dtype))


def test_a_large_cpu_pool_costs_resident_memory_only_where_written():
    shape = (2048, 16, 8, 64)              # 64 MiB per tensor, 1 GiB for 8 layers of k and v
    before = rss_bytes()
    k, v = kv_pool.allocate(8, shape, torch.float32, CPU)
    assert rss_bytes() - before < 32 * 2 ** 20
    k[3][100:110].normal_()                # ten blocks written: about 320 KiB
    assert rss_bytes() - before < 32 * 2 ** 20
    assert torch.count_nonzero(k[3][:100]) == 0 and torch.count_nonzero(v[3]) == 0
    del k, v                               # the views keep the map alive, and only they do


def test_an_engine_with_the_default_pool_rolls_out_as_one_with_a_small_pool(model):
    small = RolloutEngine(model, None, num_blocks=64)
    default = RolloutEngine(model, None)
    assert default.num_blocks > 64
    prompt = list(range(1, 20))
    a = small.generate([prompt], group_size=3, max_new_tokens=10, temperature=1.0, seed=3)
    b = default.generate([prompt], group_size=3, max_new_tokens=10, temperature=1.0, seed=3)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.logprobs for t in a] == [t.logprobs for t in b]
