"""mapo_fast in verl's processes (verl 0.9.1's pinned environment, with a real local Ray
cluster on CPU):

- a worker started the way verl starts its workers (``RayWorkerGroup`` over a
  ``RayResourcePool``, verl's runtime environment) has the ``mapo`` estimator and the swapped
  fused kernel when ``VERL_USE_EXTERNAL_MODULES`` names ``mapo_fast.integrations.verl_worker``,
  with the options of ``MAPO_FAST_VERL_OPTIONS``; without it, a worker has neither, even though
  the launching process called ``register()``;
- the default (v1) trainer's own ``PPOTrainer._compute_advantage``, on a batch stored in a
  TransferQueue as verl's agent loop stores it, writes ``mapo_advantage``'s advantages; verl's
  method unwrapped stops for want of the turn data.
"""

import json
import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("verl")
tq = pytest.importorskip("transfer_queue")

from mapo_fast.integrations import verl as mv  # noqa: E402

OPTIONS = {"semantic_coef": 0.5, "turn_discount": 0.1}
#: a group of two samples, each with one scored turn: (token_level_rewards, response_mask,
#: uids, non_tensor_batch)
PROBE = (torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.ones(2, 2),
         np.array(["a", "a"], dtype=object),
         {mv.TURNS_KEY: np.array(["[[0, 1, 1.0]]", "[[0, 1, 0.0]]"], dtype=object)})


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster started as verl's ``run_ppo`` starts it (verl's runtime environment,
    plus the two variables a user sets), and a TransferQueue on it."""
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
    env = get_ppo_ray_runtime_env()
    env.setdefault("env_vars", {}).update({"VERL_USE_EXTERNAL_MODULES": mv.WORKER_MODULE,
                                           mv.OPTIONS_ENV: json.dumps(OPTIONS),
                                           # the workers unpickle this module's probe class
                                           "PYTHONPATH": os.path.dirname(__file__)})
    # logical CPUs: the TransferQueue controller and storage unit each hold one
    ray.init(num_cpus=8, runtime_env=env, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield
    tq.close()
    ray.shutdown()


def _probe() -> dict:
    """What a process sees of mapo_fast in verl, after importing verl as a worker does."""
    import os

    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional as tf
    out = {"pid": os.getpid(), "kernel": tf.FusedLinearForPPO.__module__,
           "has_mapo": "mapo" in core_algos.ADV_ESTIMATOR_REGISTRY}
    if out["has_mapo"]:  # with the options it was given
        tlr, mask, uids, extra = PROBE
        adv, _ = core_algos.get_adv_estimator_fn("mapo")(tlr, mask, uids, None,
                                                         non_tensor_batch=extra)
        out["adv"] = adv.tolist()
    return out


def test_a_verl_worker_group_has_the_estimator_and_the_kernel(cluster):
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register
    from verl.single_controller.ray import (RayClassWithInitArgs, RayResourcePool,
                                            RayWorkerGroup)

    class Probe(Worker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def probe(self):
            return _probe()

    pool = RayResourcePool([1], use_gpu=False, max_colocate_count=1)
    group = RayWorkerGroup(pool, RayClassWithInitArgs(cls=ray.remote(Probe)), device_name="cpu")
    (seen,) = group.probe()
    assert seen["pid"] != os.getpid()
    assert seen["has_mapo"] and seen["kernel"] == "mapo_fast.integrations.verl"
    want, _ = mv.mapo_advantage(*PROBE[:3], None, PROBE[3], **OPTIONS)
    torch.testing.assert_close(torch.tensor(seen["adv"]), want)
    default, _ = mv.mapo_advantage(*PROBE[:3], None, PROBE[3])
    assert not torch.allclose(want, default)  # the options made a difference


def test_register_in_the_launching_process_does_not_reach_a_worker(cluster):
    mv.register()
    bare = ray.remote(_probe).options(runtime_env={"env_vars": {"VERL_USE_EXTERNAL_MODULES": ""}})
    seen = ray.get(bare.remote())
    assert not seen["has_mapo"] and seen["kernel"] != "mapo_fast.integrations.verl"


def _store(keys, lens, turns, rewards):
    """Samples put into the TransferQueue as verl's agent loop puts them: one key per output,
    ``{uid}_{session}_{index}``, nested response masks and scores, and the reward function's
    extra information under ``extra_fields["reward_extra_info"]``."""
    from transfer_queue import KVBatchMeta
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    fields, tags = [], []
    for key, n, t, r in zip(keys, lens, turns, rewards):
        rm = torch.zeros(n)
        rm[-1] = r
        info = {} if t is None else {mv.TURNS_KEY: t}
        fields.append({"uid": key.rsplit("_", 2)[0], "response_mask": torch.ones(n, dtype=torch.int64),
                       "rm_scores": rm, "extra_fields": {"reward_extra_info": info}})
        tags.append({"status": "success"})
    tq.kv_batch_put(keys=keys, fields=list_of_dict_to_tensordict(fields), tags=tags,
                    partition_id="train")
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train")


def _v1_step(meta, norm=True):
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    cfg = OmegaConf.create({
        "algorithm": {"adv_estimator": "mapo", "use_kl_in_reward": False, "gamma": 1.0,
                      "lam": 1.0, "norm_adv_by_std_in_grpo": norm},
        "actor_rollout_ref": {"rollout": {"n": 2}}})
    PPOTrainer._compute_advantage(SimpleNamespace(config=cfg), meta, {})
    out = tq.kv_batch_get(keys=meta.keys, partition_id="train", select_fields=["advantages"])
    return [a for a in out["advantages"].unbind(0)]


def test_the_v1_trainers_advantage_step_equals_mapo_advantage(cluster):
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    mv.register(**OPTIONS)
    lens = [5, 3, 6, 4, 7, 2]
    keys = [f"p{i // 2}_{i}_0" for i in range(6)]
    turns = ['[[0, 2, 0.9]]', '[]', '[[1, 3, 0.2], [3, 6, 0.7]]', '[[0, 4, 0.5]]',
             '[[2, 5, 0.1]]', '[]']
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    got = _v1_step(_store(keys, lens, turns, rewards))
    T = max(lens)
    mask = torch.zeros(len(lens), T)
    tlr = torch.zeros(len(lens), T)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        tlr[b, n - 1] = rewards[b]
    want, _ = mv.mapo_advantage(tlr, mask, np.array([k.rsplit("_", 2)[0] for k in keys],
                                                    dtype=object), None,
                                {mv.TURNS_KEY: np.array(turns, dtype=object)}, **OPTIONS)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b], want[b, :n], atol=1e-6, rtol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in got)
    tq.kv_clear(keys, partition_id="train")

    # verl's own method, unwrapped, has no way to deliver the turns
    meta = _store(keys, lens, turns, rewards)
    wrapped = PPOTrainer._compute_advantage
    PPOTrainer._compute_advantage = wrapped.__wrapped__
    try:
        with pytest.raises(ValueError, match="has no 'mapo_turns'"):
            _v1_step(meta)
    finally:
        PPOTrainer._compute_advantage = wrapped
    tq.kv_clear(keys, partition_id="train")


def test_the_v1_step_refuses_missing_turns_and_multi_output_sessions(cluster):
    mv.register()
    keys = ["q0_0_0", "q0_1_0"]
    meta = _store(keys, [3, 3], ["[]", None], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"non_tensor_batch\['mapo_turns'\]\[1\] is missing"):
        _v1_step(meta)
    tq.kv_clear(keys, partition_id="train")
    keys = ["q1_0_0", "q1_0_1", "q1_1_0"]
    meta = _store(keys, [3, 3, 3], ["[]", "[]", "[]"], [1.0, 1.0, 0.0])
    with pytest.raises(NotImplementedError, match="session 'q1_0' has 2 agent-loop outputs"):
        _v1_step(meta)
    tq.kv_clear(keys, partition_id="train")
