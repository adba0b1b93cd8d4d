"""The rollout benchmark compares equal work: on its image workload (scaled down), the naive
HF loop (PIL + HF processor + generate on the whole history each turn) and RolloutEngine
produce the same tokens under greedy decoding, with the scripted calls all succeeding; and the
text workload's fixed tool runner answers every call of a batch."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_rollout  # noqa: E402
import rollout_image as R  # noqa: E402

CFG = dict(prompts=2, group=2, image=112, crop=56, turns=2, new=40, layers=1, hidden=64,
           vision_hidden=32, vision_layers=1, min_pixels=56 * 56, max_pixels=1280 * 28 * 28)


def test_image_workload_naive_and_engine_agree_under_greedy():
    tok = R.make_tokenizer(CFG)
    model = R.make_model(CFG, tok, torch.device("cpu")).double()
    images = R.make_images(CFG)
    want, counts = R.naive(model, tok, images, CFG, temperature=0.0)
    trajs, eng = R.ours(model, tok, images, CFG, temperature=0.0, block_size=16)
    assert [t.token_ids for t in trajs] == want
    for t in trajs:
        assert len(t.spans.turns) == CFG["turns"] and all(turn.ok for turn in t.spans.turns)
        assert [turn.box[1:] for turn in t.spans.turns] == [tuple(map(float, b)) for b in
                                                            R.crop_boxes(CFG)]
        assert sum(t.loss_mask) == CFG["new"] * (CFG["turns"] + 1)
    # the engine: each prompt image once per group, each crop once; the naive loop re-encodes
    # every image of the history each turn and re-prefills the history
    assert eng.stats["vision_images"] == CFG["prompts"] * (1 + CFG["group"] * CFG["turns"])
    assert counts["vision_patches"] > eng.stats["vision_patches"]
    assert counts["prefill_tokens"] > 2 * eng.stats["prefill_tokens"]


def test_fixed_observation_runner_answers_each_call():
    from mapo_fast.tools import ToolSession
    runner = bench_rollout._FixedObservation(["first", "second"])
    sessions = [ToolSession(), ToolSession(), ToolSession()]
    sessions[2].calls = 1
    got = runner.run(["a", "b", "c"], [None] * 3, sessions)
    assert [r.text for r in got] == ["first", "first", "second"]
