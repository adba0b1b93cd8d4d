"""mapo_fast against the released verl (0.9.1, its own pinned environment: `make test` creates
it on first use; skipped where verl is not installed), in float64 on CPU:

- ``mapo_loss`` equals verl's ``compute_policy_loss_vanilla`` + ``agg_loss`` + ``kl_penalty``
  (+ the entropy term of verl's actor) for every aggregation mode, ``token-sum`` and the
  seq-mean-then-factor ``seq-mean-token-sum-norm`` included, loss and every gradient;
- ``register()``: ``get_adv_estimator_fn("mapo")`` gives ``mapo_advantages`` on the same data
  (uid strings as groups, turn spans from the reward function's extra key), ``compute_advantage``
  passes ``non_tensor_batch`` to it and leaves GRPO untouched, the ``singleton="reward"``
  option reproduces verl's GRPO on groups of one;
- the fused log-prob swap: verl's ``FusedLinearForPPO`` name resolves to mapo_fast's, whose
  log-probs, entropies and gradients equal verl's own torch implementation.
"""

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

import mapo_fast  # noqa: E402
from mapo_fast.integrations import verl as mv  # noqa: E402

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
         "seq-mean-token-sum-norm")
KL_TYPES = {"k1": "k1", "k2": "k2", "low_var_kl": "low_var_kl"}  # ours -> verl's name


def actor_config(mode, **kw):
    from verl.workers.config import ActorConfig
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2,
                       loss_agg_mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.28,
                       clip_ratio_c=3.0, **kw)


def case(seed=0, B=5, T=7, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[1] = 0  # a fully masked row
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])[..., 0]
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    return h, w, y, mask, adv, old, ref


def verl_actor_loss(h, w, y, mask, adv, old, ref, mode, kl_type, kl_coef, entropy_coef,
                    loss_scale_factor):
    """What verl's actor computes: its policy loss, minus the aggregated entropy times
    entropy_coeff, plus the aggregated kl_penalty times kl_loss_coef."""
    z = h @ w.T
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(-1, y[..., None])[..., 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    cfg = actor_config(mode, loss_scale_factor=loss_scale_factor)
    cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor  # as verl's losses.py
    pg, _ = core_algos.compute_policy_loss_vanilla(old, logp, adv, mask, loss_agg_mode=mode,
                                                   config=cfg)
    agg = dict(loss_agg_mode=mode, loss_scale_factor=loss_scale_factor)
    loss = pg - entropy_coef * core_algos.agg_loss(ent, mask, **agg)
    if kl_coef:
        kl = core_algos.kl_penalty(logp, ref, kl_type)
        loss = loss + kl_coef * core_algos.agg_loss(kl, mask, **agg)
    return loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kl_type", sorted(KL_TYPES))
def test_loss_and_gradients_equal_verl(mode, kl_type):
    h, w, y, mask, adv, old, ref = case(seed=MODES.index(mode))
    kw = dict(kl_coef=0.1, entropy_coef=0.01, loss_scale_factor=64)
    hv, wv = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = verl_actor_loss(hv, wv, y, mask, adv, old, ref, mode, KL_TYPES[kl_type],
                           kw["kl_coef"], kw["entropy_coef"], kw["loss_scale_factor"])
    want.backward()
    hm, wm = h.clone().requires_grad_(), w.clone().requires_grad_()
    got, _ = mapo_fast.mapo_loss(hm, wm, y, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                 loss_agg=mode, kl_type=kl_type, clip_ratio_c=3.0, **kw)
    got.backward()
    # float64 round-off, except seq-mean-token-mean: verl divides each sequence's sum by its
    # token count + 1e-8 (a guard mapo_fast does not need): relative differences ~1e-8 / count
    tol = dict(atol=1e-10, rtol=1e-7) if mode == "seq-mean-token-mean" else \
        dict(atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(hm.grad, hv.grad, **tol)
    torch.testing.assert_close(wm.grad, wv.grad, **tol)


def batch_turns(B, T, seed=0):
    """Per-sample turn spans and scores as a reward function would return them."""
    rng = np.random.default_rng(seed)
    infos = []
    for b in range(B):
        n = int(rng.integers(0, 3))
        edges = sorted(rng.choice(np.arange(1, T), size=2 * n, replace=False).tolist())
        spans = list(zip(edges[::2], edges[1::2]))
        infos.append(mv.turns_info(spans, rng.random(n).tolist())[mv.TURNS_KEY])
    return np.array(infos, dtype=object)


def expected(rewards, uids, turns, T, **kw):
    groups = torch.as_tensor(np.unique(uids, return_inverse=True)[1])
    parsed = [__import__("json").loads(t) for t in turns]
    K = max([len(p) for p in parsed] + [1])
    sem, tm = torch.zeros(len(parsed), K), torch.zeros(len(parsed), K, dtype=torch.bool)
    tt = torch.full((len(parsed), T), -1)
    for b, p in enumerate(parsed):
        for k, (a, z, s) in enumerate(p):
            sem[b, k], tm[b, k] = s, True
            tt[b, a:z] = k
    return mapo_fast.mapo_advantages(rewards.float(), groups, sem, tm, tt, **kw)


def test_registered_estimator_and_compute_advantage():
    from verl.protocol import DataProto
    from verl.trainer.ppo import ray_trainer
    mv.register(semantic_coef=0.5)
    B, T = 8, 12
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(B, generator=g)
    tlr = torch.zeros(B, T)
    tlr[:, -1] = rewards
    mask = torch.ones(B, T)
    mask[:, 10:] = 0
    uids = np.array(["a", "b", "a", "c", "b", "a", "c", "b"], dtype=object)
    turns = batch_turns(B, 10)  # inside each sample's own 10 response tokens
    want = expected(rewards, uids, turns, T, semantic_coef=0.5) * mask
    fn = core_algos.get_adv_estimator_fn("mapo")
    adv, ret = fn(token_level_rewards=tlr, response_mask=mask, index=uids, config=None,
                  non_tensor_batch={mv.TURNS_KEY: turns})
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=1e-6)
    data = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                               non_tensors={"uid": uids, mv.TURNS_KEY: turns})
    out = ray_trainer.compute_advantage(data, adv_estimator="mapo")
    torch.testing.assert_close(out.batch["advantages"], want, atol=1e-6, rtol=1e-6)
    # GRPO still goes to verl's own code, unchanged
    data2 = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                                non_tensors={"uid": uids})
    grpo = ray_trainer.compute_advantage(data2, adv_estimator=core_algos.AdvantageEstimator.GRPO)
    ours = mapo_fast.mapo_advantages(rewards, torch.as_tensor(np.unique(uids, return_inverse=True)[1]),
                                     algo="grpo")
    torch.testing.assert_close(grpo.batch["advantages"], ours[:, None] * mask, atol=1e-6,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="has no 'mapo_turns'"):
        fn(token_level_rewards=tlr, response_mask=mask, index=uids, non_tensor_batch={})


def test_singleton_groups_follow_verl_when_asked():
    """verl's GRPO gives a group of one A = R / (1 + eps); mapo_fast gives 0 unless
    ``singleton="reward"``."""
    B, T = 4, 5
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.6])
    tlr = torch.zeros(B, T)
    tlr[:, -1] = rewards
    mask = torch.ones(B, T)
    uids = np.array(["x", "y", "y", "z"], dtype=object)
    empty = np.array(["[]"] * B, dtype=object)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(tlr, mask, uids)
    ours, _ = mv.mapo_advantage(tlr, mask, uids, None, {mv.TURNS_KEY: empty}, singleton="reward")
    torch.testing.assert_close(ours, verl_adv, atol=1e-6, rtol=1e-5)
    zero, _ = mv.mapo_advantage(tlr, mask, uids, None, {mv.TURNS_KEY: empty})
    assert zero[0].abs().max() == 0 and zero[3].abs().max() == 0


def test_fused_kernel_swap_equals_verl_torch_implementation():
    from verl.utils.experimental import torch_functional as tf
    verl_impl = tf.FusedLinearForPPO
    mv.register()
    assert tf.FusedLinearForPPO is mv.FusedLinearForPPO
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 9, 32, generator=g, dtype=torch.float64)
    w = torch.randn(70, 32, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, 70, (3, 9), generator=g)
    res = {}
    for name, module in (("verl", verl_impl(chunk_size=4)), ("ours", tf.FusedLinearForPPO())):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = module(hh, ww, y, temperature=0.7)
        (logp.sum() + 0.3 * ent.sum()).backward()
        res[name] = (logp, ent, hh.grad, ww.grad)
    for a, b, what in zip(res["ours"], res["verl"], ("logp", "entropy", "d_hidden", "d_weight")):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=what)


def test_kernel_swap_through_verls_patched_model_forward():
    """verl's own fused-kernel forward (``patch_forward_with_backends``, torch backend) on a
    tiny Qwen2: after ``register()`` it runs mapo_fast's module, with the same log-probs,
    entropies and parameter gradients as before."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils.experimental import torch_functional as tf
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).double()
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    original = tf.FusedLinearForPPO
    res = {}
    for name in ("verl", "ours"):
        tf.FusedLinearForPPO = original if name == "verl" else mv.FusedLinearForPPO
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), temperature=0.8,
                    return_dict=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        res[name] = (out.log_probs.detach(), out.entropy.detach(),
                     {k: p.grad.clone() for k, p in model.named_parameters()})
    mv.register()  # leaves mapo_fast's module in place, as a user's call would
    assert tf.FusedLinearForPPO is mv.FusedLinearForPPO
    torch.testing.assert_close(res["ours"][0], res["verl"][0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(res["ours"][1], res["verl"][1], atol=1e-10, rtol=1e-10)
    for k, g in res["verl"][2].items():
        torch.testing.assert_close(res["ours"][2][k], g, atol=1e-10, rtol=1e-8, msg=k)


def _call(turns, uids=("a", "a"), T=8, length=6, **kw):
    mask = torch.zeros(2, T)
    mask[:, :length] = 1
    tlr = torch.zeros(2, T)
    tlr[0, length - 1] = 1.0
    return mv.mapo_advantage(tlr, mask, None if uids is None else np.array(uids, dtype=object),
                             None, {mv.TURNS_KEY: np.array(turns, dtype=object)}, **kw)


@pytest.mark.parametrize("turns, message", [
    (['[[0, 2, 0.5]', "[]"], r"\['mapo_turns'\]\[0\] is not valid JSON"),
    (["[]", '{"a": 1}'], r"\[1\] must be a list"),
    (["[[0, 7, 0.5]]", "[]"], r"\[0\] turn 0 spans \[0, 7\), outside the sample's 6 response"),
    (["[[3, 5, 0.5], [1, 2, 0.1]]", "[]"], r"\[0\] turn 1 \[1, 2\) starts before turn 0 ends"),
    (["[[0, 3, 0.5], [2, 4, 0.1]]", "[]"], r"turn 1 \[2, 4\) starts before turn 0 ends"),
    (["[]", "[[0, 2, 1.5]]"], r"\[1\] turn 0 has score 1.5"),
    (["[]", "[[0, 2, -0.2]]"], r"turn 0 has score -0.2"),
    (["[]", '[[0, 2, "0.5"]]'], r"turn 0 has score '0.5'"),
    (["[]", "[[0, 2, true]]"], r"turn 0 has score True"),
    (["[]", '[[0, 2, NaN]]'], r"turn 0 has score nan"),
    (["[]", "[[0.5, 2, 0.1]]"], r"turn 0 has a non-integer span"),
    (["[]", "[[0, 2]]"], r"turn 0 must be \[start, end, score\]"),
])
def test_bad_turn_data_is_refused_naming_the_key_the_sample_and_the_problem(turns, message):
    with pytest.raises(ValueError, match=message):
        _call(turns)


def test_a_batch_without_uid_is_refused_like_verls_grpo():
    with pytest.raises(ValueError, match="the batch has no `uid`"):
        _call(["[]", "[]"], uids=None)
    with pytest.raises((AssertionError, ValueError, TypeError, KeyError)):
        core_algos.compute_grpo_outcome_advantage(torch.zeros(2, 4), torch.ones(2, 4), None)


def test_norm_adv_by_std_in_grpo_is_honoured():
    """verl's algorithm.norm_adv_by_std_in_grpo reaches the estimator (through compute_advantage's
    argument or the config): False gives Dr.GRPO's centred advantages; a register() option that
    disagrees with it is refused."""
    from verl.protocol import DataProto
    from verl.trainer.ppo import ray_trainer
    mv.register()
    turns = ["[[0, 2, 0.9]]", "[[0, 2, 0.1]]"]
    tlr = torch.tensor([[0.0, 1.0, 0, 0], [0.0, 0.0, 0, 0]])
    mask = torch.ones(2, 4)
    uids = np.array(["a", "a"], dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                               non_tensors={"uid": uids,
                                            mv.TURNS_KEY: np.array(turns, dtype=object)})
    centred = ray_trainer.compute_advantage(data, adv_estimator="mapo",
                                            norm_adv_by_std_in_grpo=False).batch["advantages"]
    assert abs(float(centred[0, 3]) - 0.5) < 1e-6  # outcome only: R - mean = 0.5, not / std
    scaled = ray_trainer.compute_advantage(data, adv_estimator="mapo").batch["advantages"]
    assert float(scaled[0, 3]) > 0.6
    fn = core_algos.get_adv_estimator_fn("mapo")
    by_config, _ = fn(token_level_rewards=tlr, response_mask=mask, index=uids,
                      config={"norm_adv_by_std_in_grpo": False},
                      non_tensor_batch={mv.TURNS_KEY: np.array(turns, dtype=object)})
    torch.testing.assert_close(by_config, centred)
    mv.register(norm_std=True)
    with pytest.raises(ValueError, match="disagrees with verl's "
                                         "algorithm.norm_adv_by_std_in_grpo=False"):
        ray_trainer.compute_advantage(data, adv_estimator="mapo", norm_adv_by_std_in_grpo=False)
    mv.register()


def test_the_compatibility_check_names_versions_and_missing_symbols(monkeypatch):
    from mapo_fast.integrations import _compat
    assert _compat.check(_compat.VERL) == "0.9.1"
    monkeypatch.setattr(_compat, "installed_version", lambda name: "0.11.0")
    with pytest.warns(UserWarning, match=r"verl 0.11.0 is installed; the integration is tested "
                                         r"with verl >= 0.9.1, < 0.10"):
        _compat.check(_compat.VERL)
    gone = _compat.Framework("verl", ("0.9.1", "0.10"),
                             (("verl.trainer.ppo.core_algos:no_such_symbol", "a test"),))
    with pytest.raises(ImportError, match="has no `verl.trainer.ppo.core_algos:no_such_symbol`"):
        _compat.check(gone)


@pytest.mark.parametrize("raw, message", [
    ("{bad", "MAPO_FAST_VERL_OPTIONS is not valid JSON"),
    ("[1, 2]", "MAPO_FAST_VERL_OPTIONS must be a JSON object"),
    ('{"semantic_coeff": 1}', r"unknown option\(s\) \['semantic_coeff'\]; valid: "
                              r"\['semantic_coef', 'turn_discount'"),
])
def test_worker_options_from_the_environment_are_checked(raw, message):
    assert mv.options_from_env({mv.OPTIONS_ENV: ""}) == {}
    assert mv.options_from_env({mv.OPTIONS_ENV: '{"semantic_coef": 0.5}'}) == \
        {"semantic_coef": 0.5}
    with pytest.raises(ValueError, match=message):
        mv.options_from_env({mv.OPTIONS_ENV: raw})


def test_the_v1_turns_come_from_each_samples_reward_extra_info():
    keys = ["u_0_0", "u_1_0", "v_0_0"]
    extra = [{"reward_extra_info": {mv.TURNS_KEY: "[[0, 1, 0.5]]"}},
             {"reward_extra_info": {}}, {"reward_extra_info": {mv.TURNS_KEY: "[]"}}]
    assert mv.v1_turns(keys, extra).tolist() == ["[[0, 1, 0.5]]", None, "[]"]
    with pytest.raises(NotImplementedError, match="session 'u_0' has 2 agent-loop outputs"):
        mv.v1_turns(["u_0_0", "u_0_1"], extra[:2])
