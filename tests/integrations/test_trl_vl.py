"""``MAPOGRPOTrainer`` on a vision-language model, against the released TRL (1.16.0, its
pinned environment): a tiny Qwen2.5-VL loaded from a saved checkpoint, its processor without
the video part (``examples/trl/tiny_vl.py``), prompts with images. The batch is TRL's own, from
``GRPOTrainer._generate_and_score_completions`` (pixel values, image grids,
``mm_token_type_ids``, reference log-probs); on it ``MAPOGRPOTrainer._compute_loss`` equals
``GRPOTrainer._compute_loss``, loss and every parameter's gradient (vision tower included), for
grpo and bnpo, with and without KL. The same comparison without ``mm_token_type_ids`` fails
(M-RoPE positions change), so the parity is not an accident of the batch.
"""

import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("PIL")

from mapo_fast.integrations.trl import MAPOGRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "trl"))
from tiny_vl import QUESTIONS, image, processor, save_tiny_vl  # noqa: E402

CASES = {"grpo": dict(loss_type="grpo"), "grpo+kl": dict(loss_type="grpo", beta=0.04),
         "bnpo": dict(loss_type="bnpo"), "bnpo+kl": dict(loss_type="bnpo", beta=0.04)}


def reward(completions, **kwargs):
    return [float(len(str(c)) % 5) for c in completions]


def rows():
    return [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": q}]}],
             "image": image(i)} for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vl")
    save_tiny_vl(path)
    return str(path)


def vl_trainers(checkpoint, tmp_path, **kw):
    from trl import GRPOConfig, GRPOTrainer
    args = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                max_steps=1, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                seed=0, learning_rate=1e-2, save_strategy="no")
    args.update(kw)
    data = datasets.Dataset.from_list(rows())
    return [cls(model=checkpoint, reward_funcs=reward, processing_class=processor(checkpoint),
                args=GRPOConfig(output_dir=str(tmp_path / name), **args), train_dataset=data)
            for name, cls in (("trl", GRPOTrainer), ("ours", MAPOGRPOTrainer))]


def trl_batch(tr):
    """TRL's own training batch for two prompts x 2 generations, then both policies moved off
    the reference by the same small perturbation (so the KL term and the gradients of every
    part are not trivially zero)."""
    r = rows()
    torch.manual_seed(0)
    tr.model.train()
    return tr._generate_and_score_completions([r[0], r[0], r[1], r[1]])


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def compute(tr, batch):
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    tr.model.zero_grad()
    loss = tr._compute_loss(tr.model, dict(batch))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in tr.model.named_parameters()
                           if p.grad is not None}


def worst_relative(got, want):
    return max(float((got[k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
               for k, g in want.items())


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_vl_loss_and_every_gradient_equal_trl_on_trls_batch(checkpoint, tmp_path, case):
    ref, ours = vl_trainers(checkpoint, tmp_path, **case)
    batch = trl_batch(ref)
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= batch.keys()
    assert ("ref_per_token_logps" in batch) == bool(case.get("beta"))
    for tr in (ref, ours):
        perturb(tr.model)
    (l_ref, g_ref), (l_ours, g_ours) = compute(ref, batch), compute(ours, batch)
    assert g_ours.keys() == g_ref.keys()
    assert any(k.startswith("model.visual") for k in g_ref)  # the vision tower is trained
    # float32 throughout: one more rounding order (the fused head) than TRL's
    torch.testing.assert_close(l_ours, l_ref, atol=1e-6, rtol=1e-5)
    for k, g in g_ref.items():
        torch.testing.assert_close(g_ours[k], g, atol=1e-6, rtol=1e-4, msg=k)
    print(f"{case}: loss {float(l_ref):.6g}, |diff| {abs(float(l_ours - l_ref)):.2e}, worst relative gradient "
          f"error {worst_relative(g_ours, g_ref):.2e}")


def test_without_mm_token_type_ids_the_gradients_differ(checkpoint, tmp_path):
    """The control: dropping ``mm_token_type_ids`` (what the integration did before it
    forwarded TRL's own inputs) moves the gradients by more than the tolerance above."""
    ref, ours = vl_trainers(checkpoint, tmp_path, loss_type="bnpo", beta=0.04)
    batch = trl_batch(ref)
    for tr in (ref, ours):
        perturb(tr.model)
    _, g_ref = compute(ref, batch)
    _, g_ours = compute(ours, {k: v for k, v in batch.items() if k != "mm_token_type_ids"})
    worst = worst_relative(g_ours, g_ref)
    print(f"without mm_token_type_ids: worst relative gradient error {worst:.2e}")
    assert worst > 1e-2


def test_a_batch_key_trl_does_not_forward_is_refused(checkpoint, tmp_path):
    ref, ours = vl_trainers(checkpoint, tmp_path, loss_type="grpo")
    batch = dict(trl_batch(ref), pixel_values_videos=torch.zeros(1))
    with pytest.raises(NotImplementedError, match=r"TRL's batch holds \['pixel_values_videos'\]"):
        compute(ours, batch)


# --- the MAPO recipe in TRL's own multi-turn loop --------------------------------------------

@pytest.fixture(scope="module")
def tool_user(tmp_path_factory):
    """A checkpoint taught to call the zoom tool and then describe the crop one of two ways,
    and its processor with TRL's own Qwen-VL chat template (TRL parses tool calls with it)."""
    from trl.chat_template_utils import qwen3_vl_chat_template

    from tiny_vl import warm_start_tool_use
    path = tmp_path_factory.mktemp("tool_user")
    save_tiny_vl(path)
    proc = processor(path, qwen3_vl_chat_template)
    warm_start_tool_use(path, proc, rows())
    return str(path), proc


def answer_reward(completions, **kwargs):
    return [float("<answer>red</answer>" in str(c[-1]["content"])) for c in completions]


def verifier():
    from mapo_fast.rewards.clip import CLIPVerifier
    from test_clip_verifier import tiny_clip
    return CLIPVerifier(*tiny_clip())


def tool_trainer(cls, tool_user, tmp_path, name, **kw):
    from trl import GRPOConfig

    from mapo_fast.integrations.trl import ZoomEnvironment
    path, proc = tool_user
    args = GRPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=160, max_steps=2,
                      logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0,
                      learning_rate=1e-3, save_strategy="no", loss_type="bnpo", beta=0.04,
                      temperature=1.0)
    return cls(model=path, reward_funcs=answer_reward, args=args, processing_class=proc,
               train_dataset=datasets.Dataset.from_list(rows()),
               environment_factory=ZoomEnvironment.factory(proc), **kw)


def test_mapo_trains_a_vl_tool_user_with_trls_generation(tool_user, tmp_path):
    """Two training steps with TRL's generation and tool loop: zoom calls run, their crops
    enter the forward, each turn's score reaches the loss as per-token advantages."""
    import time

    from mapo_fast.integrations.trl import MAPOTurnScores
    scores = MAPOTurnScores(verifier(), tool_user[1])
    tr = tool_trainer(MAPOGRPOTrainer, tool_user, tmp_path, "mapo", semantic_scores_fn=scores)
    seen = []
    original = tr._compute_loss

    def spy(model, inputs):
        seen.append({k: inputs[k] for k in ("advantages", "num_images", "completion_mask")})
        return original(model, inputs)
    tr._compute_loss = spy
    torch.manual_seed(0)
    start = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - start
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    calls = [h["tools/call_frequency"] for h in logs]
    crops = [h["mapo/crops"] for h in logs]
    score = [h["mapo/score_mean"] for h in logs]
    assert min(calls) > 0 and min(crops) > 0 and min(h["mapo/scored"] for h in logs) > 0
    # the crops are in the forward: a completion's images are its prompt image and its crops
    assert any(n > 1 for s in seen for n in s["num_images"])
    # per-token advantages, differing within a completion where a scored turn's tokens are
    assert all(s["advantages"].dim() == 2 for s in seen)
    varies = [(row[m.bool()].max() - row[m.bool()].min()) > 1e-6
              for s in seen for row, m in zip(s["advantages"], s["completion_mask"])]
    assert any(varies)
    print(f"TRL VL e2e: {len(logs)} steps, tool calls per completion {calls}, crops {crops}, "
          f"mean semantic score {score}, wall {wall:.1f} s")


def test_with_semantic_coef_0_the_run_equals_grpo_trainer(tool_user, tmp_path):
    """The same tool-use run, semantic_coef=0: MAPO's advantage is GRPO's, so the logged loss
    and grad norm equal plain ``GRPOTrainer``'s step for step."""
    from trl import GRPOTrainer

    from mapo_fast.integrations.trl import MAPOTurnScores
    logs = {}
    for name, cls, kw in (
            ("trl", GRPOTrainer, {}),
            ("ours", MAPOGRPOTrainer,
             dict(semantic_scores_fn=MAPOTurnScores(verifier(), tool_user[1],
                                                    semantic_coef=0.0)))):
        tr = tool_trainer(cls, tool_user, tmp_path, name, **kw)
        torch.manual_seed(0)
        tr.train()
        logs[name] = [(h["loss"], h["grad_norm"], h["tools/call_frequency"])
                      for h in tr.state.log_history if "loss" in h]
    assert len(logs["trl"]) == 2 and min(c for _, _, c in logs["trl"]) > 0
    torch.testing.assert_close(torch.tensor(logs["ours"]), torch.tensor(logs["trl"]),
                               atol=1e-5, rtol=1e-4)


def test_a_round_of_failed_calls_counts_failures_and_does_not_crash(tool_user, tmp_path):
    """Every zoom call refused (``max_calls=0``): TRL counts each as a failed call (the
    environment raises ``ZoomToolError``; the model is shown the error text), and with the PIL
    image processor's numpy grids TRL 1.16 crashes in such a round unless the processor returns
    tensors (``tensor_image_fields``, which ``ZoomEnvironment.factory`` applies): the control
    without it reproduces the crash."""
    import functools

    from trl import GRPOConfig, GRPOTrainer

    from mapo_fast.integrations.trl import ZoomEnvironment, _resize_of

    def trainer(name, factory, proc):
        # room for the tool response after the call (a shorter budget ends the loop first)
        args = GRPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=160, max_steps=1,
                          logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0,
                          learning_rate=1e-3, save_strategy="no")
        return GRPOTrainer(model=tool_user[0], reward_funcs=answer_reward, args=args,
                           processing_class=proc,
                           train_dataset=datasets.Dataset.from_list(rows()),
                           environment_factory=factory)
    from trl.chat_template_utils import qwen3_vl_chat_template
    plain = processor(tool_user[0], qwen3_vl_chat_template)
    unguarded = functools.partial(ZoomEnvironment, max_calls=0, **_resize_of(plain))
    torch.manual_seed(0)
    with pytest.raises(AttributeError, match="'list' object has no attribute 'prod'"):
        trainer("unguarded", unguarded, plain).train()
    guarded = processor(tool_user[0], qwen3_vl_chat_template)
    tr = trainer("guarded", ZoomEnvironment.factory(guarded, max_calls=0), guarded)
    torch.manual_seed(0)
    tr.train()
    (log,) = [h for h in tr.state.log_history if "loss" in h]
    assert log["tools/call_frequency"] > 0 and log["tools/failure_frequency"] == 1.0


def test_the_trl_example_trains(tmp_path):
    """``examples/trl/train_zoom_mapo.py`` as a user runs it (its own process, the tiny model
    it builds): two steps, zoom calls made, crops scored, semantic scores logged."""
    import json
    import subprocess
    import sys as _sys
    script = Path(__file__).resolve().parents[2] / "examples" / "trl" / "train_zoom_mapo.py"
    proc = subprocess.run([_sys.executable, str(script), "--steps", "2", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert min(metrics["tool_calls_per_completion"]) > 0 and min(metrics["crops_scored"]) > 0
    assert all(0.0 <= s <= 1.0 for s in metrics["semantic_score"])
    print(proc.stdout.strip().splitlines()[-1])


def test_the_readme_trl_quickstart_runs_as_written(tmp_path):
    """``examples/trl/quickstart_trl.py`` (the README shows it whole: tests/test_examples.py)
    in its own process from an empty directory: it trains two steps with zoom calls made and
    crops scored."""
    import re
    import subprocess
    import sys as _sys
    script = Path(__file__).resolve().parents[2] / "examples" / "trl" / "quickstart_trl.py"
    proc = subprocess.run([_sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"tool calls per completion (\d+\.\d+), crops scored (\d+), semantic "
                     r"score (\d\.\d+)", line)
    assert m and float(m[1]) > 0 and int(m[2]) > 0 and 0 <= float(m[3]) <= 1, line
