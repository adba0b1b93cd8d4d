"""verl: one call, ``register()``, makes ``algorithm.adv_estimator=mapo`` a verl advantage
estimator and replaces verl's fused log-prob module (``FusedLinearForPPO``, used by its actor
when ``use_fused_kernels`` is on) with ``token_logprobs``.

Per-turn data travels the way verl's own extra-data estimators get theirs: the reward function
returns a dict, and its extra keys land in ``non_tensor_batch``. For MAPO that is one key,
``mapo_turns`` (``TURNS_KEY``): a JSON string per sample, ``[[start, end, score], ...]``, one
entry per scored tool turn, ``[start, end)`` in response-token positions and ``score`` its
semantic score (``turns_info`` builds it; ``turns_from_text`` finds the spans in a response's
text). A string, because verl stacks each extra key with ``np.array`` and per-sample lists of
different lengths do not stack.

verl 0.9 hands ``non_tensor_batch`` only to its own ``gdpo`` estimator, so ``register()`` also
wraps ``compute_advantage`` (in ``verl.trainer.ppo.ray_trainer`` and the modules that import
it by name): for ``adv_estimator == "mapo"`` the wrapper calls the estimator with the batch's
``non_tensor_batch``; every other estimator goes to verl's function unchanged.

verl 0.9's default trainer (``trainer.use_v1``) keeps each sample in its TransferQueue, and
its ``PPOTrainer._compute_advantage`` fetches a fixed field list, so ``non_tensor_batch``
holds only ``uid`` there; the reward function's extra keys are in each sample's
``extra_fields["reward_extra_info"]``. verl has no setting to carry another field to that
step, so ``register()`` wraps that method too (the smallest patch): for ``mapo`` it fetches
the batch's ``extra_fields`` by the same keys, in the same order, and hands their
``mapo_turns`` to the ``compute_advantage`` wrapper for the duration of the call.

verl's trainer and workers are separate Ray processes, so ``register()`` in the launching
script does not reach them. verl imports every module named in ``VERL_USE_EXTERNAL_MODULES``
when it is imported, in every process: set it to ``mapo_fast.integrations.verl_worker``
(``WORKER_MODULE``), which calls ``register()`` with the options in the
``MAPO_FAST_VERL_OPTIONS`` environment variable (JSON; ``OPTIONS_ENV``).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..advantage import ADVANTAGE_ESTIMATORS, mapo_advantages
from ..logprobs import token_logprobs
from . import _compat

Tensor = torch.Tensor
#: The estimator registered with verl, under its name in ``ADVANTAGE_ESTIMATORS``.
NAME = ADVANTAGE_ESTIMATORS.get("mapo").name
TURNS_KEY = "mapo_turns"
#: Modules holding verl's ``compute_advantage`` under that name (wrapped when imported).
ADVANTAGE_CALLERS = ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils",
                     "verl.experimental.separation.ray_trainer")
SINGLETONS = ("zero", "reward")
#: The module verl imports in each of its processes (``VERL_USE_EXTERNAL_MODULES``) and the
#: environment variable holding ``register()``'s options there, as a JSON object.
WORKER_MODULE = "mapo_fast.integrations.verl_worker"
OPTIONS_ENV = "MAPO_FAST_VERL_OPTIONS"
#: verl's default (v1) trainer, whose ``PPOTrainer._compute_advantage`` is wrapped.
V1_TRAINER = "verl.trainer.ppo.v1.trainer_base"
#: the v1 batch's turn data while its ``_compute_advantage`` runs (set by the wrapper)
_V1_TURNS: contextvars.ContextVar = contextvars.ContextVar("mapo_v1_turns", default=None)


def turns_info(spans: Sequence[Tuple[int, int]], scores: Sequence[float]) -> Dict[str, str]:
    """``{TURNS_KEY: json}`` for a reward function's returned dict: the scored turns' response-
    token spans ``[start, end)`` and their semantic scores."""
    if len(spans) != len(scores):
        raise ValueError(f"turns_info: {len(spans)} spans but {len(scores)} scores")
    return {TURNS_KEY: json.dumps([[int(a), int(b), float(s)] for (a, b), s in
                                   zip(spans, scores)])}


def turns_from_text(response: str, tokenizer: Any, scores: Sequence[float]) -> Dict[str, str]:
    """``turns_info`` for a response text: the spans of its successful tool turns (call,
    observation and description, as ``TrajectorySpans.token_turn`` assigns tokens) found by
    ``spans_from_text``; exact when the tokenizer re-encodes the decoded response as it was."""
    from ..trajectory import spans_from_text
    ids, spans = spans_from_text(response, tokenizer)
    return turns_info(spans.turn_ranges(len(ids)), scores)


def _bad(b: int, problem: str) -> ValueError:
    return ValueError(f"mapo advantage: non_tensor_batch[{TURNS_KEY!r}][{b}] {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_score(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and \
        not isinstance(x, (bool, np.bool_))


def _sample_turns(b: int, entry: Any, length: int) -> List[Tuple[int, int, float]]:
    """Sample ``b``'s turns, checked: JSON ``[[start, end, score], ...]`` with integer spans
    inside its own ``length`` response tokens, in order and not overlapping, and finite
    numeric scores in [0, 1]; else ``ValueError`` naming the key, the sample and the problem."""
    turns = entry
    if entry is None:
        raise _bad(b, "is missing: the reward function must return it for every sample "
                      "(an empty list '[]' for a sample without scored turns)")
    if isinstance(entry, (str, bytes)):
        try:
            turns = json.loads(entry)
        except (ValueError, RecursionError) as e:
            raise _bad(b, f"is not valid JSON ({str(e)[:80]}): {str(entry)[:80]!r}") from None
    if not isinstance(turns, (list, tuple)):
        raise _bad(b, f"must be a list [[start, end, score], ...], got {type(turns).__name__}")
    out, last = [], 0
    for k, t in enumerate(turns):
        if not isinstance(t, (list, tuple)) or len(t) != 3:
            raise _bad(b, f"turn {k} must be [start, end, score], got {str(t)[:60]}")
        a, z, s = t
        if not (_is_int(a) and _is_int(z)):
            raise _bad(b, f"turn {k} has a non-integer span [{a!r}, {z!r})")
        if not _is_score(s) or not np.isfinite(float(s)) or not 0.0 <= float(s) <= 1.0:
            raise _bad(b, f"turn {k} has score {s!r}: scores are finite numbers in [0, 1]")
        if not 0 <= a < z <= length:
            raise _bad(b, f"turn {k} spans [{a}, {z}), outside the sample's {length} response "
                          "tokens")
        if a < last:
            raise _bad(b, f"turn {k} [{a}, {z}) starts before turn {k - 1} ends ({last}): "
                          "turns are in order and do not overlap")
        out.append((int(a), int(z), float(s)))
        last = z
    return out


def _parse_turns(entries: Any, lengths: Sequence[int]) -> List[List[Tuple[int, int, float]]]:
    """Every sample's checked turns (``_sample_turns``); ``lengths``: each sample's own
    response length (its response mask's extent, not the padded width)."""
    B = len(lengths)
    if entries is None:
        raise ValueError(f"mapo advantage: `non_tensor_batch` has no {TURNS_KEY!r}: the reward "
                         "function must return it (see mapo_fast.integrations.verl.turns_info)")
    if len(entries) != B:
        raise ValueError(f"mapo advantage: non_tensor_batch[{TURNS_KEY!r}] has {len(entries)} "
                         f"entries for {B} samples")
    return [_sample_turns(b, e, n) for b, (e, n) in enumerate(zip(entries, lengths))]


def _response_lengths(response_mask: Tensor) -> List[int]:
    """Each row's response extent: one past its last masked-in token (0 for an empty row)."""
    m = response_mask.detach().to("cpu", torch.bool)
    T = m.shape[1]
    last = T - torch.flip(m, [1]).to(torch.int8).argmax(1)
    return torch.where(m.any(1), last, 0).tolist()


def _verl_norm(config: Any) -> Optional[bool]:
    """verl's ``norm_adv_by_std_in_grpo`` from its algorithm config (an object or a dict)."""
    if config is None:
        return None
    v = config.get("norm_adv_by_std_in_grpo") if isinstance(config, dict) else \
        getattr(config, "norm_adv_by_std_in_grpo", None)
    return None if v is None else bool(v)


def resolve_norm_std(option: Optional[bool], verl_value: Optional[bool]) -> bool:
    """``register(norm_std=...)`` against verl's ``algorithm.norm_adv_by_std_in_grpo``: the one
    given wins (verl's default, True, when neither is); both given and different is an error."""
    if option is not None and verl_value is not None and option != verl_value:
        raise ValueError(f"mapo advantage: register(norm_std={option}) disagrees with verl's "
                         f"algorithm.norm_adv_by_std_in_grpo={verl_value}; set one of them")
    return option if option is not None else (True if verl_value is None else verl_value)


def group_ids(index: Any) -> Tensor:
    """verl's group index (uid strings, or any hashable per sample) as ``[B]`` int64 ids."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)


def mapo_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None,
                   config: Any = None, non_tensor_batch: Optional[Dict[str, Any]] = None, *,
                   semantic_coef: float = 1.0, turn_discount: float = 0.0,
                   norm_std: Optional[bool] = None, singleton: str = "zero",
                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: Optional[bool] = None,
                   **_: Any) -> Tuple[Tensor, Tensor]:
    """verl's advantage-estimator interface over ``mapo_advantages``: returns ``(advantages,
    returns)``, both ``[B, T]`` (masked by ``response_mask``). ``index``: the samples' ``uid``
    (their groups; required, as verl's GRPO requires it). ``singleton``: what a group of one
    sample gets as its outcome part, ``"zero"`` (mapo_fast's) or ``"reward"`` (verl's GRPO:
    ``R / (1 + epsilon)``). ``norm_std``: see ``resolve_norm_std`` (verl's
    ``norm_adv_by_std_in_grpo``, from ``compute_advantage``'s argument or the algorithm config,
    is honoured). Bad turn data is refused (``_sample_turns``)."""
    if singleton not in SINGLETONS:
        raise ValueError(f"mapo advantage: `singleton` must be one of {list(SINGLETONS)}, got "
                         f"{singleton!r}")
    if index is None:
        raise ValueError("mapo advantage: the batch has no `uid` (non_tensor_batch['uid']): "
                         "the groups of G samples per prompt are needed, as for verl's GRPO")
    verl_norm = norm_adv_by_std_in_grpo if norm_adv_by_std_in_grpo is not None else \
        _verl_norm(config)
    norm_std = resolve_norm_std(norm_std, verl_norm)
    B, T = response_mask.shape
    turns = _parse_turns((non_tensor_batch or {}).get(TURNS_KEY),
                         _response_lengths(response_mask))
    K = max([len(t) for t in turns] + [1])
    scores = torch.zeros(B, K, dtype=torch.float32)
    mask = torch.zeros(B, K, dtype=torch.bool)
    token_turn = torch.full((B, T), -1, dtype=torch.int64)
    for b, row in enumerate(turns):
        for k, (a, z, s) in enumerate(row):
            if not 0 <= a < z <= T:
                raise ValueError(f"mapo advantage: {TURNS_KEY}[{b}] turn {k} spans [{a}, {z}), "
                                 f"outside the {T} response tokens")
            scores[b, k], mask[b, k] = s, True
            token_turn[b, a:z] = k
    groups = group_ids(index)
    rewards = token_level_rewards.sum(-1).float().cpu()
    adv = mapo_advantages(rewards, groups, scores, mask, token_turn, algo=NAME,
                          semantic_coef=semantic_coef, norm_std=norm_std, eps=epsilon,
                          turn_discount=turn_discount)
    if singleton == "reward":
        alone = torch.bincount(groups)[groups] == 1
        adv = adv + torch.where(alone, rewards / (1 + epsilon), 0.0)[:, None]
    adv = adv.to(response_mask.device, token_level_rewards.dtype) * response_mask
    return adv, adv


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` interface over ``token_logprobs``: ``forward(hidden_states,
    vocab_weights, input_ids, temperature) -> (log_probs float32, entropy in the hidden
    states' dtype)``, shaped like ``input_ids``. ``chunk_size`` and ``impl_backend`` are
    accepted and unused (the chunking and the kernel are mapo_fast's)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        logp, ent = token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                   temperature=temperature, return_entropy=True)
        return logp.float(), ent.to(hidden_states.dtype)


def _wrap_compute_advantage(original: Any, options: Dict[str, Any]) -> Any:
    if getattr(original, "_mapo_fast", False):
        return original

    def compute_advantage(data, adv_estimator, *args, config=None, **kwargs):
        name = getattr(adv_estimator, "value", adv_estimator)
        if name != NAME:
            return original(data, adv_estimator, *args, config=config, **kwargs)
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask
            data.batch["response_mask"] = compute_response_mask(data)
        # verl's signature: (data, adv_estimator, gamma, lam, num_repeat,
        # norm_adv_by_std_in_grpo, config)
        norm = kwargs.get("norm_adv_by_std_in_grpo", args[3] if len(args) > 3 else None)
        extra = data.non_tensor_batch
        if TURNS_KEY not in extra and _V1_TURNS.get() is not None:  # the v1 trainer's batch
            extra = {**extra, TURNS_KEY: _V1_TURNS.get()}
        adv, ret = mapo_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                  data.non_tensor_batch.get("uid"), config, extra,
                                  norm_adv_by_std_in_grpo=norm, **options)
        data.batch["advantages"], data.batch["returns"] = adv, ret
        return data
    compute_advantage._mapo_fast = True
    compute_advantage.__wrapped__ = original
    return compute_advantage


def _extra_field_dict(value: Any) -> Dict[str, Any]:
    value = getattr(value, "data", value)  # a NonTensorData holds its object in .data
    return value if isinstance(value, dict) else {}


def v1_turns(keys: Sequence[str], extra_fields: Sequence[Any]) -> np.ndarray:
    """The ``mapo_turns`` of a v1 batch, one per key in ``keys`` order, from each sample's
    ``extra_fields["reward_extra_info"]`` (None where absent: the estimator then names the
    sample). Keys are verl's ``{uid}_{session}_{index}``; an agent loop that returns several
    outputs per session is refused, since verl copies the last output's reward information to
    the earlier ones, whose responses the turn spans do not describe."""
    sessions: Dict[str, int] = {}
    for key in keys:
        session = str(key).rsplit("_", 1)[0]
        sessions[session] = sessions.get(session, 0) + 1
    multi = [s for s, n in sessions.items() if n > 1]
    if multi:
        raise NotImplementedError(
            f"mapo advantage: session {multi[0]!r} has {sessions[multi[0]]} agent-loop outputs; "
            "the mapo estimator takes one output per session (one response per sample)")
    if len(extra_fields) != len(keys):
        raise ValueError(f"mapo advantage: {len(extra_fields)} extra_fields for {len(keys)} keys")
    out = np.empty(len(keys), dtype=object)
    for i, value in enumerate(extra_fields):
        out[i] = _extra_field_dict(_extra_field_dict(value).get("reward_extra_info")) \
            .get(TURNS_KEY)
    return out


def _wrap_v1_compute_advantage(original: Any) -> Any:
    if getattr(original, "_mapo_fast", False):
        return original

    @functools.wraps(original)
    def _compute_advantage(self, batch, metrics):
        name = getattr(self.config.algorithm.adv_estimator, "value",
                       self.config.algorithm.adv_estimator)
        if name != NAME:
            return original(self, batch, metrics)
        import transfer_queue as tq
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["extra_fields"])
        extra = data["extra_fields"]
        extra = extra.tolist() if hasattr(extra, "tolist") else list(extra)
        token = _V1_TURNS.set(v1_turns(list(batch.keys), extra))
        try:
            return original(self, batch, metrics)
        finally:
            _V1_TURNS.reset(token)
    _compute_advantage._mapo_fast = True
    _compute_advantage.__wrapped__ = original
    return _compute_advantage


def options_from_env(environ: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The options in ``OPTIONS_ENV`` (a JSON object; empty or unset: none): ``register()``'s
    keyword options, and ``"reward"`` (the recipe's, ``verl_recipe.reward_options``); checked:
    a bad value names the variable and the problem."""
    raw = (os.environ if environ is None else environ).get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{OPTIONS_ENV} is not valid JSON ({e}): {raw[:80]!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object of register() options, got "
                         f"{raw[:80]!r}")
    allowed = tuple(inspect.signature(register).parameters) + ("reward",)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{OPTIONS_ENV}: unknown option(s) {unknown}; valid: {list(allowed)}")
    return options


def register(*, semantic_coef: float = 1.0, turn_discount: float = 0.0,
             norm_std: Optional[bool] = None, singleton: str = "zero",
             fused_kernel: bool = True) -> None:
    """Registers the ``mapo`` advantage estimator with verl (``get_adv_estimator_fn("mapo")``)
    with these options, wraps ``compute_advantage`` so that it receives ``non_tensor_batch``,
    and (``fused_kernel``) replaces ``verl.utils.experimental.torch_functional.
    FusedLinearForPPO`` with ``FusedLinearForPPO`` above. Call it again to change the options.
    ``norm_std`` None follows verl's ``algorithm.norm_adv_by_std_in_grpo``. The installed
    verl is checked first (``_compat.VERL``: its version, every private symbol patched)."""
    if singleton not in SINGLETONS:
        raise ValueError(f"register: `singleton` must be one of {list(SINGLETONS)}, got "
                         f"{singleton!r}")
    if norm_std is not None and not isinstance(norm_std, bool):
        raise ValueError(f"register: `norm_std` must be True, False or None, got {norm_std!r}")
    _compat.check(_compat.VERL, optional=_compat.VERL_OPTIONAL)
    from verl.trainer.ppo import core_algos
    options = dict(semantic_coef=semantic_coef, turn_discount=turn_discount, norm_std=norm_std,
                   singleton=singleton)

    def estimator(token_level_rewards, response_mask, index=None, config=None, **kwargs):
        return mapo_advantage(token_level_rewards, response_mask, index, config,
                              kwargs.pop("non_tensor_batch", None), **options)
    core_algos.ADV_ESTIMATOR_REGISTRY[NAME] = estimator
    _patch_callers(options)
    if fused_kernel:
        from verl.utils.experimental import torch_functional
        torch_functional.FusedLinearForPPO = FusedLinearForPPO


def _unwrapped(fn: Any) -> Any:
    """verl's own function under one of our wrappers (a repeated ``register()``), else
    ``fn`` itself (never a decorator of verl's)."""
    return fn.__wrapped__ if getattr(fn, "_mapo_fast", False) else fn


def _patch_callers(options: Dict[str, Any]) -> None:
    """Wraps ``compute_advantage`` where verl calls it, and the v1 trainer's advantage step."""
    for mod_name in ADVANTAGE_CALLERS:
        try:
            mod = sys.modules.get(mod_name) or importlib.import_module(mod_name)
        except ImportError:  # a part of verl this installation cannot import
            continue
        mod.compute_advantage = _wrap_compute_advantage(_unwrapped(mod.compute_advantage),
                                                        options)
    try:
        v1 = sys.modules.get(V1_TRAINER) or importlib.import_module(V1_TRAINER)
    except ImportError:  # an installation without the v1 trainer's dependencies
        return
    v1.PPOTrainer._compute_advantage = _wrap_v1_compute_advantage(
        _unwrapped(v1.PPOTrainer._compute_advantage))
