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

import rollout_image as R  # noqa: E402
import rollout_peers as P  # noqa: E402
import rollout_workloads as W  # noqa: E402
from rollout_measure import ENGINE  # noqa: E402

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
    runner = W.FixedObservation(["first", "second"])
    sessions = [ToolSession(), ToolSession(), ToolSession()]
    sessions[2].calls = 1
    got = runner.run(["a", "b", "c"], [None] * 3, sessions)
    assert [r.text for r in got] == ["first", "first", "second"]


def test_vllm_gets_the_engines_inputs():
    # what rollout_vllm.py is given is what RolloutEngine runs: the same prompt ids and groups,
    # turns of the same lengths, and the observation ids the engine inserts (its template)
    cfg, tok = W.SCALES["quick"], W.make_tokenizer()
    specs = {w["name"]: w for w in P.vllm_specs(cfg, tok)}
    prompts, obs = W.workload(cfg)
    multi = specs["multi_turn"]
    assert multi["prompts"] == prompts == specs["single_turn"]["prompts"]
    assert multi["group"] == cfg["group"]
    assert [r["new"] for r in multi["rounds"]] == [cfg["new"]] * (cfg["turns"] + 1)
    for r, o in zip(multi["rounds"], obs):
        assert r["obs"] == tok(W.OBS_TEMPLATE.format(tok.decode(o)),
                               add_special_tokens=False)["input_ids"]
        assert len(r["obs"]) == cfg["obs"] + 2
    assert "obs" not in multi["rounds"][-1] and specs["single_turn"]["rounds"] == [
        {"new": cfg["new"]}]
    p_prompts, _ = W.prefill_inputs(cfg)
    assert specs["prefill"]["prompts"] == p_prompts
    assert specs["prefill"]["group"] == cfg["prefill"]["group"]


def test_vllm_rows_are_checked_against_the_engines_output_tokens(monkeypatch):
    from harness import CaseResult
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    out = {"vllm": "0.0", "startup_s": 50.0, "threads": 2, "env": env, "workloads": {
        k: {"wall_s": [2.0, 3.0, 2.5], "output_tokens": 128, "prompt_tokens": 900,
            "cached_tokens": 100, "computed_tokens": 800, "sequences": 4}
        for k in ("multi_turn", "single_turn", "prefill")}}
    monkeypatch.setattr(P, "run_vllm", lambda *a: out)
    results = [{"cases": [CaseResult(ENGINE, [1.0], None, extra={"output_tokens": n})]}
               for n in (128, 128, 0, 64)]
    info = P.add_vllm(results, "python", None, None, None, 3)
    assert info == {"vllm": "0.0", "vllm_startup_s": 50.0, "vllm_threads": 2, "vllm_env": {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}}
    rows = [wl["cases"][-1] for wl in results]
    assert [r.name for r in rows] == ["vLLM 0.0 (CPU build)"] * 2 + [ENGINE,
                                                                      "vLLM 0.0 (CPU build)"]
    assert [rows[i].extra["same_output_tokens"] for i in (0, 1, 3)] == [True, True, False]
    assert rows[0].times_ms == [2000.0, 3000.0, 2500.0] and rows[0].median_ms == 2500.0
    assert "computed 800, cached 100" in rows[0].notes


def test_cpu_lists_as_vllm_reads_them():
    assert P.cpu_list([1, 0]) == "0-1"
    assert P.cpu_list([0, 1, 2, 5]) == "0-2,5"
    assert P.cpu_list([0, 2, 4, 5]) == "0,2,4-5"
    assert P.cpu_list([3]) == "3"


def test_vllm_runs_as_its_cpu_documentation_advises(tmp_path, monkeypatch):
    # threads bound one per core (the first cores this process may use); TCMalloc (the
    # machine's) and Intel OpenMP (vLLM's environment's) preloaded ahead of what was there;
    # without TCMalloc, glibc with RolloutEngine's settings
    from mapo_fast.rollout import cpu_malloc
    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: {4, 2, 3, 7})
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    lib = tmp_path / "b" / P.TCMALLOC
    venv = tmp_path / "venv"
    for f in (lib, venv / "lib" / P.IOMP):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert P.find_tcmalloc(dirs) == str(lib) and P.find_tcmalloc(dirs[:1]) is None
    python = str(venv / "bin" / "python")
    preload = P.preload_libraries(python, dirs)
    assert preload == [str(lib), str(venv / "lib" / P.IOMP)]
    assert P.preload_libraries(str(tmp_path / "x" / "bin" / "python"), dirs[:1]) == []
    assert P.vllm_environment(3, preload) == {
        "OMP_NUM_THREADS": "3", "VLLM_CPU_OMP_THREADS_BIND": "2-4",
        "LD_PRELOAD": f"{lib}:{venv / 'lib' / P.IOMP}:/other.so"}
    monkeypatch.setattr(cpu_malloc, "environment", lambda: {"MALLOC_TRIM_THRESHOLD_": "9"})
    monkeypatch.delenv("LD_PRELOAD")
    assert P.vllm_environment(2, []) == {"OMP_NUM_THREADS": "2",
                                         "VLLM_CPU_OMP_THREADS_BIND": "2-3",
                                         "MALLOC_TRIM_THRESHOLD_": "9"}


def test_each_vllm_run_starts_from_an_empty_prefix_cache(monkeypatch):
    # rollout_vllm.run_workload (vLLM's side) with a stand-in LLM: the cache is emptied
    # before the run, round 1 asks for G samples, later rounds re-submit each history
    import types

    import rollout_vllm as V

    class Params:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Out:
        def __init__(self, prompt, n, new):
            self.prompt_token_ids = prompt
            self.outputs = [types.SimpleNamespace(token_ids=[9] * new) for _ in range(n)]

    class LLM:
        def __init__(self):
            self.calls = []

        def reset_prefix_cache(self):
            self.calls.append("reset")

        def get_metrics(self):
            return []

        def generate(self, prompts, params, use_tqdm):
            self.calls.append([p["prompt_token_ids"] for p in prompts])
            return [Out(p["prompt_token_ids"], params.n, params.max_tokens) for p in prompts]
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=Params))
    llm = LLM()
    w = {"prompts": [[1, 2]], "group": 2, "rounds": [{"new": 2, "obs": [5]}, {"new": 1}]}
    r = V.run_workload(llm, w)
    assert llm.calls == ["reset", [[1, 2]], [[1, 2, 9, 9, 5]] * 2]
    assert r["sequences"] == 2 and r["wall_s"] >= 0


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
