"""Choosing between the fused and chunked CUDA paths: the environment, deterministic mode, the
measured choice and its caches, through ``PathChooser`` with a fake timer (no GPU here)."""

import json

import pytest
import torch

import mapo_fast
from mapo_fast import loss_path as LP
from cases import make_case


def key(tokens=1024):
    return LP.PathKey("90", "bfloat16", 3584, 152064, LP.token_bucket(tokens), "-")


class FakeTimer:
    """Each runner returns its name; the timer charges ``cost[name]`` ms per call."""

    def __init__(self, cost):
        self.cost, self.calls = cost, []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        return self.cost[name]


def runners(log):
    def run(name):
        log.append(name)
        return name
    return {p: (lambda p=p: run(p)) for p in ("fused", "chunked")}


@pytest.mark.parametrize("cost, want", [({"fused": 5.0, "chunked": 2.0}, "chunked"),
                                        ({"fused": 1.0, "chunked": 2.0}, "fused")])
def test_chooser_takes_the_faster_path_once_per_key(cost, want):
    timer, log = FakeTimer(cost), []
    ch = LP.PathChooser(timer=timer)
    assert ch.choose(key(), runners(log)) == want
    # one compiling run, then TRIALS timed runs, per path
    assert log.count("fused") == log.count("chunked") == 1 + LP.TRIALS
    assert ch.timings[str(key())] == cost
    log.clear()
    assert ch.choose(key(1000), runners(log)) == want and log == []  # same bucket: cached
    assert ch.choose(key(1025), runners(log)) == want and log  # next bucket: measured


def test_chooser_skips_chunked_when_its_workspace_does_not_fit():
    log = []
    ch = LP.PathChooser(timer=FakeTimer({"fused": 9.0, "chunked": 1.0}))
    assert ch.choose(key(), runners(log), chunked_fits=False) == "fused"
    assert log == []


def test_chooser_cache_file_round_trip(tmp_path):
    f = tmp_path / "paths.json"
    ch = LP.PathChooser(timer=FakeTimer({"fused": 3.0, "chunked": 1.0}), cache_file=str(f))
    ch.choose(key(), runners([]))
    assert json.loads(f.read_text()) == {str(key()): "chunked"}
    log = []
    again = LP.PathChooser(timer=FakeTimer({"fused": 0.0, "chunked": 9.0}), cache_file=str(f))
    assert again.choose(key(), runners(log)) == "chunked" and log == []


def test_token_bucket():
    assert [LP.token_bucket(n) for n in (1, 2, 3, 1024, 1025)] == [1, 2, 4, 1024, 2048]


def test_environment_choice_is_validated(monkeypatch):
    monkeypatch.setenv(LP.ENV, "fastest")
    with pytest.raises(ValueError, match="MAPO_FAST_LOSS_PATH.*'fastest'"):
        LP.requested()
    monkeypatch.setenv(LP.ENV, "fused")
    assert LP.requested() == "fused"
    monkeypatch.setenv(LP.DETERMINISTIC_ENV, "1")
    assert LP.requested() == "chunked"


def test_deterministic_algorithms_take_the_chunked_path(monkeypatch):
    monkeypatch.delenv(LP.ENV, raising=False)
    torch.use_deterministic_algorithms(True)
    try:
        assert LP.requested() == "chunked"
    finally:
        torch.use_deterministic_algorithms(False)
    assert LP.requested() == "auto"


def test_cpu_loss_reports_the_torch_path(monkeypatch):
    """On CPU nothing changes: the torch path, whatever MAPO_FAST_LOSS_PATH says."""
    monkeypatch.setenv(LP.ENV, "chunked")
    monkeypatch.delenv("MAPO_FAST_BACKEND", raising=False)
    case = make_case(dtype=torch.float32, seed=1)
    _, met = mapo_fast.mapo_loss(case["hidden"], case["weight"], case["targets"],
                                 case["advantages"], case["mask"])
    assert met.path == "torch" and all(torch.is_tensor(v) for v in met.values())
    # rebuilt from its items, as accelerate's float32 conversion of mixed-precision outputs
    # rebuilds mappings (type(m)({...})): the items are kept
    again = type(met)({k: v.float() for k, v in met.items()})
    assert dict(again) == dict(met) and again.path is None


def _rank_with_its_own_cache(rank, world, port, tmp, out):
    """One gloo rank: rank 0's cache file says chunked; rank 1's has nothing and measures
    fused as faster. Both must take rank 0's choice (and not hang)."""
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        f = os.path.join(tmp, f"cache{rank}.json")
        if rank == 0:
            with open(f, "w") as fh:
                json.dump({str(key()): "chunked"}, fh)
        ch = LP.PathChooser(timer=FakeTimer({"fused": 1.0, "chunked": 9.0}), cache_file=f)
        got = [ch.choose(key(), runners([])), ch.choose(key(), runners([]))]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(got, fh)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_with_different_cache_files_agree_on_rank_zeros_choice(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_with_its_own_cache,
                         args=(r, 2, port, str(tmp_path), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)  # a rank left waiting in the broadcast would hang here
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert alive == [False, False] and [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == ["chunked", "chunked"]
