"""pytest-benchmark form of the loss benchmark, at the quick scale:
``pytest bench/ --benchmark-only`` (not part of the test suite)."""

import pytest
import torch

import bench_loss

B, T, H, V, DTYPE = bench_loss.SCALES["quick"][0]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def inputs():
    return bench_loss.make_inputs(B, T, H, V, DTYPE, DEVICE)


@pytest.mark.parametrize("case", ["naive torch", "liger (eager)", "liger (compiled)",
                                  "mapo_fast", "matmul floor"])
def test_loss_forward_backward(benchmark, inputs, case):
    fns = {name: fn for name, fn, _ in bench_loss.cases(inputs, DEVICE)}
    if case not in fns:
        pytest.skip(f"{case} is not installed")

    def reset():
        inputs["hidden"].grad = None
        inputs["weight"].grad = None

    benchmark.pedantic(fns[case], setup=reset, rounds=5, warmup_rounds=1)
