import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. This must be set before
# triton.jit decorates anything, i.e. before mapo_fast.kernels' Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--compile-full", action="store_true",
                     help="also compile every Triton kernel configuration (minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile_full: the full compile matrix "
                                       "(run with --compile-full)")


def pytest_collection_modifyitems(config, items):
    import pytest
    if config.getoption("--compile-full"):
        return
    skip = pytest.mark.skip(reason="the full compile matrix runs with --compile-full")
    for item in items:
        if "compile_full" in item.keywords:
            item.add_marker(skip)



@pytest.fixture
def pack_tiny_linears(monkeypatch):
    """Every layer of the tiny test models packed for oneDNN (``cpu_linear``'s default path on
    CPU): by default layers under ``MIN_PACKED_WEIGHT`` elements keep torch's path, which would
    leave these models' layers all on it."""
    from mapo_fast.kernels import packed_linear_cpu
    monkeypatch.setattr(packed_linear_cpu, "MIN_PACKED_WEIGHT", 0)


@pytest.fixture(params=["eager", "static"])
def each_decode_mode(request, monkeypatch):
    """Runs a test once per CPU decode path: every ``RolloutEngine`` it builds gets
    ``decode_mode`` (unless the test passes its own); ``static`` pads decode steps to the
    capture sizes on static buffers, the bookkeeping of the CUDA graph path."""
    from mapo_fast.rollout.engine import RolloutEngine
    init = RolloutEngine.__init__

    def with_mode(self, *args, **kwargs):
        init(self, *args, **{"decode_mode": request.param, **kwargs})
    monkeypatch.setattr(RolloutEngine, "__init__", with_mode)
    return request.param
