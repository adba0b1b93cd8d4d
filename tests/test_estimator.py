"""The paired estimator-variance measurement at fixed weights (``mapo_fast.trainer.estimator``)
on the built-in task at toy size: the gradients are the training loss's on the trainer's own
rollout batches, GRPO's and MAPO's on the same trajectories (identical with semantic_coef 0),
fresh batches differ, and nothing of the trainer changes."""

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from mapo_fast.trainer import Trainer, parse_args  # noqa: E402
from mapo_fast.trainer.estimator import (FIRST_STEP, estimator_gradients,  # noqa: E402
                                         estimator_variance, variance_params)
from mapo_fast.trainer.metrics import StepTimer  # noqa: E402
from mapo_fast.advantage import mapo_advantages  # noqa: E402
from test_trainer import TOY  # noqa: E402


def trainer(tmp_path, *extra):
    t = Trainer(parse_args(["--out", str(tmp_path), "--steps", "1", *TOY,
                            "--warm_start.steps", "20", "--rollout.prompts_per_step", "3",
                            *extra]), progress=False)
    t.warm_start()
    return t


def test_paired_gradients_at_fixed_weights(tmp_path):
    t = trainer(tmp_path)
    params = variance_params(t.model)
    assert any(n.endswith("lm_head.weight") for n in params)
    assert all("visual" not in n for n in params)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    grads = estimator_gradients(t, 3)
    P = sum(p.numel() for p in params.values())
    assert grads["grpo"].shape == grads["mapo"].shape == (3, P)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and t.step == 0
    assert all(p.grad is None for p in t.model.parameters())
    assert not torch.allclose(grads["grpo"][0], grads["grpo"][1])  # fresh batches
    # batch 1's GRPO gradient is the training loss's gradient on that batch
    ro = t.collect(FIRST_STEP + 1, StepTimer())
    adv = mapo_advantages(ro.rewards, ro.batch.group_ids, ro.scores, ro.turn_mask,
                          ro.batch.token_turn, algo="grpo")
    t.optimizer.zero_grad(set_to_none=True)
    t.backward(ro.batch, adv)
    want = torch.cat([p.grad.reshape(-1).double() for p in params.values()])
    t.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads["grpo"][1], want, atol=1e-12, rtol=1e-9)
    with pytest.raises(ValueError, match=r"`n_batches` must be an int >= 3, got 2"):
        estimator_gradients(t, 2)
    with pytest.raises(ValueError, match=r"`algos` must be drawn from \['mapo', 'grpo'\], "
                                         r"got 'ppo'"):
        estimator_gradients(t, 3, ("ppo",))


def test_with_semantic_coef_0_mapo_is_grpo_batch_for_batch(tmp_path):
    t = trainer(tmp_path, "--loss.semantic_coef", "0")
    out = estimator_variance(t, 3, n_boot=50)
    assert out["mapo"]["var_ratio"] == 1.0
    assert out["mapo"]["var_ratio_lo"] == out["mapo"]["var_ratio_hi"] == 1.0
    assert out["grpo"]["trace_var"] > 0
