"""The MAPO recipe in verl (verl 0.9.1's pinned environment, CPU):

- ``examples/verl/run_qwen2_5_vl_mapo.sh``'s overrides compose with verl's own trainer
  configuration (hydra: every key exists), its reward-manager and algorithm sections convert to
  verl's dataclasses, its tool file loads through verl's tool loader and its options parse;
- the zoom tool, loaded by verl's ``initialize_tools_from_config``, answers as ``ToolRunner``;
- the ``mapo`` reward manager, called concurrently per sample as verl's reward loop calls it,
  scores every sample's turns in one verifier call, returns verl's reward dict with
  ``mapo_turns`` equal to ``TurnScorer``'s, which the ``mapo`` estimator then reads.
"""

import asyncio
import json
import os
import re
import types

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("PIL")

from mapo_fast.integrations import verl as mv  # noqa: E402
from mapo_fast.integrations import verl_recipe as rec  # noqa: E402
from mapo_fast.integrations.recipe import TurnScorer, image_tensor, pil_image  # noqa: E402
from mapo_fast.rewards.verifier import SemanticVerifier  # noqa: E402
from mapo_fast.tasks.tokenizer import build_tokenizer  # noqa: E402
from mapo_fast.tools.ops import smart_resize  # noqa: E402
from mapo_fast.tools.protocol import (ToolContext, ToolRunner, ToolSession,  # noqa: E402
                                      format_tool_call)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "verl", "run_qwen2_5_vl_mapo.sh")
SMOKE = os.path.join(ROOT, "examples", "verl", "smoke_1gpu.sh")
RESIZE = dict(min_pixels=28 * 28, max_pixels=56 * 56)
OPTIONS = json.dumps({"reward": {"verifier": "unused", **RESIZE}})


def launch(tmp_path, script, *args):
    """What ``bash script args...`` hands ``python3 -m verl.trainer.main_ppo``: its hydra
    overrides, split and expanded by bash itself, and the two mapo_fast variables of its
    environment. A ``python3`` shim first on ``PATH`` records them instead of starting verl
    (other ``python3`` calls, the smoke script's asset and data steps, are run for real)."""
    import subprocess
    import sys
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    record = tmp_path / "launch.json"
    (shim / "python3").write_text(
        f"#!{sys.executable}\n"
        "import json, os, runpy, sys\n"
        "if sys.argv[1:3] == ['-m', 'verl.trainer.main_ppo']:\n"
        f"    json.dump({{'argv': sys.argv[3:], 'env': {{k: os.environ.get(k) for k in "
        f"('VERL_USE_EXTERNAL_MODULES', 'MAPO_FAST_VERL_OPTIONS')}}}}, open({str(record)!r}, 'w'))\n"
        "else:\n"
        "    sys.argv = sys.argv[1:]\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n")
    (shim / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(record.read_text())
    return out["argv"], out["env"]


def compose_verl(overrides):
    """verl's own trainer configuration with ``overrides`` (unknown keys raise)."""
    import verl
    from hydra import compose, initialize_config_dir
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_the_example_composes_with_verls_own_configuration(tmp_path, monkeypatch):
    from verl.tools.tool_registry import initialize_tools_from_config
    from verl.utils.config import omega_conf_to_dataclass
    overrides, exports = launch(tmp_path, SCRIPT, "/d/train.parquet", "/d/val.parquet",
                                "/m/qwen2_5_vl", "/ckpt/clip")
    assert len(overrides) > 30
    cfg = compose_verl(overrides)
    assert cfg.trainer.use_v1 and cfg.algorithm.adv_estimator == "mapo"
    # both variables reach every Ray worker on every node (ray.init's runtime_env), verbatim
    env_vars = dict(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env_vars == exports
    assert json.loads(env_vars["MAPO_FAST_VERL_OPTIONS"])["reward"]["verifier"] == "/ckpt/clip"
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "tool_agent"
    from verl.trainer.ppo.reward import load_reward_manager
    monkeypatch.setenv(mv.OPTIONS_ENV, OPTIONS)
    mgr = load_reward_manager(cfg, tok(), verifier=Recording())  # as verl's reward loop does
    assert isinstance(mgr, rec.MAPORewardManager)
    res = asyncio.run(mgr.run_single(sample(response_ids(None, None, "red"), image(0), "red")))
    assert res["reward_score"] == 1.0  # verl's default scorer knows no such data source
    assert omega_conf_to_dataclass(cfg.algorithm).norm_adv_by_std_in_grpo
    (tool,) = initialize_tools_from_config(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    assert isinstance(tool, rec.ZoomInTool) and tool.name == "image_zoom_in_tool"
    monkeypatch.setenv(mv.OPTIONS_ENV, exports["MAPO_FAST_VERL_OPTIONS"])
    assert rec.reward_options()["verifier"] == "/ckpt/clip"
    assert mv.options_from_env()["semantic_coef"] == 1.0


def test_the_one_gpu_smoke_run_composes(tmp_path):
    """``examples/verl/smoke_1gpu.sh`` as far as a machine without a GPU takes it: the tiny
    assets made, the data prepared, and the launch it hands verl (the main script's overrides
    plus its own) composing with verl's configuration: one GPU, two steps, small batches, the
    prepared parquet files, the tiny checkpoint and CLIP."""
    work = tmp_path / "smoke"
    overrides, exports = launch(tmp_path, SMOKE, str(work))
    cfg = compose_verl(overrides)
    assert cfg.trainer.n_gpus_per_node == 1 and cfg.trainer.total_training_steps == 2
    assert cfg.data.train_batch_size == 4 and cfg.actor_rollout_ref.rollout.n == 2
    assert cfg.data.train_files == str(work / "train.parquet")
    assert os.path.isfile(cfg.data.train_files) and os.path.isfile(cfg.data.val_files)
    assert cfg.actor_rollout_ref.model.path == str(work / "model")
    assert json.loads(exports["MAPO_FAST_VERL_OPTIONS"])["reward"]["verifier"] == \
        str(work / "clip")


def test_bad_reward_options_are_named(monkeypatch):
    monkeypatch.setenv(mv.OPTIONS_ENV, json.dumps({"reward": {"verfier": "x"}}))
    with pytest.raises(ValueError, match=r"unknown reward option\(s\) \['verfier'\]; valid: "
                                         r"\['verifier'"):
        rec.reward_options()
    monkeypatch.setenv(mv.OPTIONS_ENV, "{}")
    with pytest.raises(ValueError, match="MAPORewardManager: no verifier: set "
                                         "MAPO_FAST_VERL_OPTIONS"):
        rec.MAPORewardManager(None, tok())


@pytest.mark.parametrize("option, cuda, want", [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"),
    ("cuda:1", True, "cuda:1"), ("cuda", False, None), ("tpu", True, None)])
def test_the_verifier_runs_on_the_reward_workers_gpu(option, cuda, want):
    """``"device": "auto"`` (the default) puts the CLIP verifier on the GPU Ray gave the reward
    worker, the CPU where it has none; a CUDA device without CUDA, or an unknown name, is
    refused naming the option."""
    assert rec.REWARD_DEFAULTS["device"] == "auto"
    if want is None:
        with pytest.raises(ValueError, match=r"reward option 'device'"):
            rec.verifier_device(option, cuda_available=cuda)
    else:
        assert rec.verifier_device(option, cuda_available=cuda) == torch.device(want)


def test_the_reward_manager_loads_the_verifier_on_that_device(monkeypatch, tmp_path):
    """``MAPORewardManager`` builds its verifier from the options' folder on ``device``."""
    from test_clip_verifier import tiny_clip
    model, clip_tok = tiny_clip()
    model.save_pretrained(tmp_path)
    clip_tok.save_pretrained(tmp_path)
    monkeypatch.setenv(mv.OPTIONS_ENV, json.dumps(
        {"reward": {"verifier": str(tmp_path), "device": "cpu"}}))
    mgr = rec.MAPORewardManager(None, tok())
    assert mgr.batcher.scorer.verifier.device == torch.device("cpu")


class Recording(SemanticVerifier):
    """Scores a crop by its mean grey level / 255; records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def _score(self, descriptions, crops, regions):
        self.calls.append(list(descriptions))
        return torch.stack([c.float().mean() / 255 for c in crops])


_TOK = {}


def tok():
    if "t" not in _TOK:
        _TOK["t"] = build_tokenizer(
            [format_tool_call("image_zoom_in_tool", {"bbox_2d": [0, 0, 28, 28]}),
             "<description>a red square</description><answer>red</answer>"] * 8,
            vocab_size=360)
    return _TOK["t"]


def image(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 112, 112), generator=g, dtype=torch.uint8)


def test_the_zoom_tool_through_verls_tool_loader(monkeypatch):
    from verl.tools.tool_registry import initialize_tools_from_config
    monkeypatch.delenv(mv.OPTIONS_ENV, raising=False)
    (tool,) = initialize_tools_from_config(os.path.join(os.path.dirname(SCRIPT),
                                                        "zoom_tool.yaml"))
    img = image(0)
    ctx = ToolContext([img], [smart_resize(112, 112, min_pixels=3136, max_pixels=1003520)])
    agent = types.SimpleNamespace(image_data=[pil_image(img)])

    async def run(box):
        iid, _ = await tool.create()
        try:
            return await tool.execute(iid, {"bbox_2d": box}, agent_data=agent)
        finally:
            await tool.release(iid)
    for box in ([0, 0, 56, 56], [10, 20, 100, 90], [-4, 0, 30, 30], [0, 0, 2, 2]):
        response, reward, metrics = asyncio.run(run(box))
        (want,) = ToolRunner().run([format_tool_call("image_zoom_in_tool", {"bbox_2d": box})],
                                   [ctx], [ToolSession()])
        if want.ok:
            assert torch.equal(image_tensor(response.image[0]), want.crop)
        else:
            assert response.text == want.text and metrics["error"] == want.code
    no_image = types.SimpleNamespace(image_data=None)
    response, _, _ = asyncio.run(tool.execute("x", {"bbox_2d": [0, 0, 9, 9]},
                                              agent_data=no_image))
    assert response.text.startswith("Error: the conversation has no image")


IMAGE = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"


def response_ids(box, description, answer):
    text = ""
    if box is not None:
        call = "<tool_call>\n" + json.dumps({"name": "image_zoom_in_tool",
                                             "arguments": {"bbox_2d": box}}) + "\n</tool_call>"
        text = f"{call}<|im_end|>\n<|im_start|>user\n<tool_response>\n{IMAGE}\n" \
               f"</tool_response><|im_end|>\n<|im_start|>assistant\n" \
               f"<description>{description}</description>"
    return tok().encode(text + f"<answer>{answer}</answer><|im_end|>", add_special_tokens=False)


def sample(ids, img, truth, pad=5):
    """One sample as verl's agent loop hands it to the reward loop: prompt and right-padded
    response ids with their attention mask, and the row's fields (``raw_prompt`` holding the
    image)."""
    from tensordict import TensorDict
    from verl.protocol import DataProto
    prompt = torch.tensor(tok().encode("<|im_start|>user\nq<|im_end|>\n",
                                       add_special_tokens=False))
    resp = torch.tensor(ids + [tok().pad_token_id] * pad)
    mask = torch.cat([torch.ones(len(prompt) + len(ids)), torch.zeros(pad)]).long()
    batch = TensorDict({"prompts": prompt[None], "responses": resp[None],
                        "attention_mask": mask[None]}, batch_size=1)
    raw = [{"role": "user", "content": [{"type": "image", "image": pil_image(img)},
                                        {"type": "text", "text": "q"}]}]
    fields = {"raw_prompt": raw, "reward_model": {"ground_truth": truth},
              "data_source": "test", "extra_info": {}}
    nt = {}
    for k, v in fields.items():
        nt[k] = np.empty(1, dtype=object)
        nt[k][0] = v
    return DataProto(batch=batch, non_tensor_batch=nt)


CASES = [([0, 0, 28, 28], "a red square", "red", "red"), (None, None, "blue", "red"),
         ([28, 28, 56, 56], "dots", "blue", "blue"), ([0, 28, 56, 56], "", "red", "red"),
         ([0, 0, 56, 56], "sky", "x", "y"), ([10, 10, 40, 50], "a cat", "cat", "cat")]


def manager(monkeypatch, verifier, compute_score=None):
    monkeypatch.setenv(mv.OPTIONS_ENV, OPTIONS)
    return rec.MAPORewardManager(None, tok(), compute_score, verifier=verifier)


def test_the_reward_manager_scores_concurrent_samples_in_one_verifier_call(monkeypatch):
    verifier = Recording()
    mgr = manager(monkeypatch, verifier)
    ids = [response_ids(box, d, a) for box, d, a, _ in CASES]
    images = [image(i) for i in range(len(CASES))]
    samples = [sample(i, img, truth) for i, img, (*_, truth) in zip(ids, images, CASES)]

    async def all_samples():  # as verl's reward loop: one run_single per sample, concurrently
        return await asyncio.gather(*(mgr.run_single(s) for s in samples))
    results = asyncio.run(all_samples())
    assert mgr.batcher.calls == 1 and len(verifier.calls) == 1
    want = TurnScorer(Recording(), tok(), **RESIZE).score(ids, images)
    for b, (res, (_, _, answer, truth)) in enumerate(zip(results, CASES)):
        assert res["reward_score"] == float(answer == truth)
        info = res["reward_extra_info"]
        assert json.loads(info[mv.TURNS_KEY]) == [list(s) for s in want.turn_spans(b)]
        assert info["mapo_batch"] == len(CASES)
    assert [len(json.loads(r["reward_extra_info"][mv.TURNS_KEY])) for r in results] == \
        [1, 0, 1, 1, 1, 1]
    # what verl then does with it: the `mapo` estimator reads the turns
    T = max(len(i) for i in ids) + 5
    tlr = torch.zeros(len(CASES), T)
    mask = torch.zeros(len(CASES), T)
    for b, (i, r) in enumerate(zip(ids, results)):
        mask[b, :len(i)] = 1
        tlr[b, len(i) - 1] = r["reward_score"]
    turns = np.array([r["reward_extra_info"][mv.TURNS_KEY] for r in results], dtype=object)
    adv, _ = mv.mapo_advantage(tlr, mask, np.array(["a", "a", "a", "b", "b", "b"],
                                                   dtype=object), None, {mv.TURNS_KEY: turns})
    assert torch.isfinite(adv).all() and adv.abs().sum() > 0


def test_the_reward_manager_uses_verls_custom_reward_function(monkeypatch):
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.append((data_source, ground_truth))
        return {"score": 0.25, "acc": 1.0}
    mgr = manager(monkeypatch, Recording(), compute_score)
    res = asyncio.run(mgr.run_single(sample(response_ids([0, 0, 28, 28], "a", "b"), image(0),
                                            "b")))
    assert res["reward_score"] == 0.25 and res["reward_extra_info"]["acc"] == 1.0
    assert seen == [("test", "b")]
    assert mv.TURNS_KEY in res["reward_extra_info"]


def test_the_reward_manager_refuses_a_sample_without_image(monkeypatch):
    mgr = manager(monkeypatch, Recording())
    s = sample(response_ids(None, None, "a"), image(0), "a")
    s.non_tensor_batch["raw_prompt"][0] = [{"role": "user", "content": "no image"}]
    with pytest.raises(ValueError, match="the sample has no image"):
        asyncio.run(mgr.run_single(s))
    assert re.search("raw_prompt", rec.sample_image.__doc__)
