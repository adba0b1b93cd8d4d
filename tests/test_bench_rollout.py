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


def test_vllm_gets_the_engines_inputs():
    # what rollout_vllm.py is given is what RolloutEngine runs: the same prompt ids and groups,
    # turns of the same lengths, and the observation ids the engine inserts (its template)
    cfg, tok = bench_rollout.SCALES["quick"], bench_rollout.make_tokenizer()
    specs = {w["name"]: w for w in bench_rollout.vllm_specs(cfg, tok)}
    prompts, obs = bench_rollout.workload(cfg)
    multi = specs["multi_turn"]
    assert multi["prompts"] == prompts == specs["single_turn"]["prompts"]
    assert multi["group"] == cfg["group"]
    assert [r["new"] for r in multi["rounds"]] == [cfg["new"]] * (cfg["turns"] + 1)
    for r, o in zip(multi["rounds"], obs):
        assert r["obs"] == tok(bench_rollout.OBS_TEMPLATE.format(tok.decode(o)),
                               add_special_tokens=False)["input_ids"]
        assert len(r["obs"]) == cfg["obs"] + 2
    assert "obs" not in multi["rounds"][-1] and specs["single_turn"]["rounds"] == [
        {"new": cfg["new"]}]
    p_prompts, _ = bench_rollout.prefill_inputs(cfg)
    assert specs["prefill"]["prompts"] == p_prompts
    assert specs["prefill"]["group"] == cfg["prefill"]["group"]


def test_vllm_rows_are_checked_against_the_engines_output_tokens(monkeypatch):
    from harness import CaseResult
    out = {"vllm": "0.0", "startup_s": 50.0, "threads": 2,
           "malloc_env": {"MALLOC_TRIM_THRESHOLD_": "1"}, "workloads": {
        k: {"wall_s": 2.0, "output_tokens": 128, "prompt_tokens": 900, "cached_tokens": 100,
            "computed_tokens": 800, "sequences": 4}
        for k in ("multi_turn", "single_turn", "prefill")}}
    monkeypatch.setattr(bench_rollout, "run_vllm", lambda *a: out)
    results = [{"cases": [CaseResult(bench_rollout.ENGINE, [1.0], None,
                                     extra={"output_tokens": n})]} for n in (128, 128, 0, 64)]
    info = bench_rollout.add_vllm(results, "python", None, None, None)
    assert info == {"vllm": "0.0", "vllm_startup_s": 50.0, "vllm_threads": 2,
                    "vllm_malloc_env": {"MALLOC_TRIM_THRESHOLD_": "1"}}
    rows = [wl["cases"][-1] for wl in results]
    assert [r.name for r in rows] == ["vLLM 0.0 (CPU build)"] * 2 + [bench_rollout.ENGINE,
                                                                      "vLLM 0.0 (CPU build)"]
    assert [rows[i].extra["same_output_tokens"] for i in (0, 1, 3)] == [True, True, False]
    assert rows[0].times_ms == [2000.0] and "computed 800, cached 100" in rows[0].notes


def test_the_step_profile_accounts_for_every_step():
    # bench/profile_rollout.py at toy size: decode and prefill steps apart, each part's
    # exclusive time adding up to the step's (the hooks nest, nothing counted twice), the
    # attention and the LM head seen with their operators
    import profile_rollout as P
    from mapo_fast.rollout import model_runner, sampler
    before = (model_runner.run_paged_attention, sampler.Sampler.__call__)
    res = P.profile("quick", "multi_turn")
    assert (model_runner.run_paged_attention, sampler.Sampler.__call__) == before  # restored
    assert set(res["kinds"]) == {"decode", "prefill"}
    for kind in res["kinds"].values():
        parts = kind["parts"]
        assert abs(sum(p["share"] for p in parts.values()) - 1.0) < 0.02
        assert parts["attention"]["ops_per_step"] > 0 and parts["lm head"]["ops_per_step"] >= 1
        assert set(parts) <= set(P.PARTS)
    assert res["kinds"]["decode"]["steps"] > res["kinds"]["prefill"]["steps"]
    assert "| attention |" in P.markdown([res])
