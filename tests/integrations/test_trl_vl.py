"""``MAPOGRPOTrainer`` on a vision-language model, against the released TRL (1.16.0, its
pinned environment): a tiny Qwen2.5-VL loaded from a saved checkpoint, its processor without
the video part (``vl_assets``), prompts with images. The batch is TRL's own, from
``GRPOTrainer._generate_and_score_completions`` (pixel values, image grids,
``mm_token_type_ids``, reference log-probs); on it ``MAPOGRPOTrainer._compute_loss`` equals
``GRPOTrainer._compute_loss``, loss and every parameter's gradient (vision tower included), for
grpo and bnpo, with and without KL. The same comparison without ``mm_token_type_ids`` fails
(M-RoPE positions change), so the parity is not an accident of the batch.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("PIL")

from mapo_fast.integrations.trl import MAPOGRPOTrainer  # noqa: E402
from vl_assets import QUESTIONS, image, processor, save_tiny_vl  # noqa: E402

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
    assert worst_relative(g_ours, g_ref) > 1e-2


def test_a_batch_key_trl_does_not_forward_is_refused(checkpoint, tmp_path):
    ref, ours = vl_trainers(checkpoint, tmp_path, loss_type="grpo")
    batch = dict(trl_batch(ref), pixel_values_videos=torch.zeros(1))
    with pytest.raises(NotImplementedError, match=r"TRL's batch holds \['pixel_values_videos'\]"):
        compute(ours, batch)
