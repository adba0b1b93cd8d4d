"""The static decode path (``rollout/static_decode.py``, the bookkeeping of CUDA graphs) against
eager steps on CPU: the same tokens, log-probs within float32 rounding, padding rows that
touch only the scratch block, block-table buffers that widen, decode steps past the largest
capture size run eagerly, and bad settings named. The capture itself needs a GPU
(the decode-graph section of ``bench/gpu_check``).

Tolerance for log-probs: padding changes the row count of every matmul, which may change
float32 blocking (summation order): 1e-5 on log-probs of a few units."""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("mapo_fast.kernels._block_manager")
from test_rollout_engine import PROMPTS, model  # noqa: E402,F401  (the tiny Qwen2 fixture)

from mapo_fast.rollout.engine import RolloutEngine  # noqa: E402
from mapo_fast.rollout.params import CAPTURE_SIZES, DECODE_MODES, DecodeParams  # noqa: E402
from mapo_fast.rollout.static_decode import MIN_WIDTH  # noqa: E402

pytestmark = pytest.mark.usefixtures("pack_tiny_linears")

#: frequent tokens of the tiny random model: samples stop at different steps, so the batch
#: shrinks through several capture sizes
STOPS = [3, 11, 17, 29, 101, 200]


def generate(model, mode, block_size=16, **kw):
    eng = RolloutEngine(model, None, block_size=block_size, num_blocks=96, decode_mode=mode,
                        **kw)
    trajs = eng.generate(PROMPTS, group_size=3, max_new_tokens=30, temperature=1.0, top_p=0.9,
                         seed=5, stop_token_ids=STOPS)
    return eng, trajs


def test_static_steps_equal_eager_steps_and_pad_only_into_the_scratch_block(model):
    eager, want = generate(model, "eager")
    static, got = generate(model, "static")
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    lengths = {len(t.token_ids) - len(PROMPTS[t.group_id]) for t in got}
    assert len(lengths) > 2, "samples should stop at different steps"
    for a, b in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    s = static.stats
    decode_passes = s["forward_passes"] - s["prefill_passes"]
    assert s["decode_static_passes"] == decode_passes > 0 and s["decode_padding_rows"] > 0
    assert "decode_static_passes" not in eager.stats and eager.runner.static is None
    # every block the allocator hands out holds the same keys and values either way; the
    # padding rows wrote only to the scratch block past them
    n = static.num_blocks
    for ke, ks in zip(eager.k_caches, static.k_caches):
        assert ks.shape[0] == n + 1
        torch.testing.assert_close(ks[:n], ke[:n], rtol=0, atol=1e-5)
    assert bool(static.k_caches[0][n].abs().sum() > 0) and bool(eager.k_caches[0][n].eq(0).all())


def test_buffers_widen_for_long_tables_and_large_steps_run_eagerly(model):
    # 4-token blocks: 39 + 30 tokens need 18 entries, more than the first MIN_WIDTH
    _, want = generate(model, "eager", block_size=4)
    eng, got = generate(model, "static", block_size=4, capture_sizes=(2, 5))
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    assert eng.runner.static.tables.shape[1] >= 2 * MIN_WIDTH
    s = eng.stats
    decode_passes = s["forward_passes"] - s["prefill_passes"]
    # 9 samples: steps of more than 5 rows ran eagerly, the rest padded to 2 or 5
    assert 0 < s["decode_static_passes"] < decode_passes


def test_buckets_are_the_smallest_capture_size_that_holds_the_rows(model):
    eng = RolloutEngine(model, None, num_blocks=8, decode_mode="static", capture_sizes=[3, 8])
    assert [eng.runner.static.bucket(n) for n in (1, 3, 4, 8, 9)] == [3, 3, 8, 8, None]
    assert DecodeParams().capture_sizes == CAPTURE_SIZES and DECODE_MODES[0] == "auto"


@pytest.mark.parametrize("kw, name, bad", [
    (dict(decode_mode="graphs"), "decode_mode", "graphs"),
    (dict(decode_mode="graph"), "decode_mode", "cpu"),  # CUDA only
    (dict(decode_mode="static", capture_sizes=(4, 2)), "capture_sizes", "(4, 2)"),
    (dict(decode_mode="static", capture_sizes=(0, 2)), "capture_sizes", "(0, 2)"),
    (dict(decode_mode="static", capture_sizes=()), "capture_sizes", "()"),
])
def test_bad_decode_settings_are_named(model, kw, name, bad):
    if kw.get("decode_mode") == "graph" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts graph mode")
    with pytest.raises(ValueError, match=rf"`{name}`.*{re.escape(bad)}"):
        RolloutEngine(model, None, num_blocks=8, **kw)


def test_auto_is_eager_off_cuda(model):
    assert RolloutEngine(model, None, num_blocks=8).runner.decode_mode == "eager"


class WeightCasts(TorchDispatchMode):
    """Counts dtype conversions (``aten._to_copy``) whose input is one of ``params``."""

    def __init__(self, params):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_the_captured_forward_casts_live_weights_under_autocast(model):
    """Under a trainer's ``torch.autocast`` the forward that graph mode captures must cast the
    live weights itself: reading autocast's cached copies would bake their addresses into the
    graph, and autocast frees them when its block exits (every later replay would read freed
    or stale weights). Counted on CPU with a dispatch mode: with the cache warm, a plain
    forward casts no weight; the capture context's casts every linear weight."""
    eng = RolloutEngine(model, None, block_size=16, num_blocks=32, decode_mode="static",
                        cpu_linear="torch")
    static = eng.runner.static
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    b = static.sizes[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static.forward(*static._inputs(b))  # fills autocast's weight cache
        with WeightCasts(linears) as cached:
            static.forward(*static._inputs(b))
        with static.capture_context(), WeightCasts(linears) as live:
            static.forward(*static._inputs(b))
        assert static.autocast_setting() == (True, torch.bfloat16)
    assert cached.casts == 0  # what a capture without the context would record
    assert live.casts >= len(linears)
    assert static.autocast_setting()[0] is False


def test_graphs_are_dropped_with_their_pool(model):
    """Widening the block tables (or a new autocast setting) forgets the graphs and their
    memory pool together, so the next capture starts a pool of its own."""
    eng = RolloutEngine(model, None, block_size=16, num_blocks=32, decode_mode="static")
    static = eng.runner.static
    static.graphs[8], static.pool, static.captured_under = (object(), "x"), object(), (True, None)
    static._widen(static.tables.shape[1] + 1)
    assert static.graphs == {} and static.pool is None and static.captured_under is None
