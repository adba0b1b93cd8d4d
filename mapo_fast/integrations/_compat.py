"""What each framework integration relies on, in one place: the versions it is tested against
and the private symbols it reads or patches. ``check(FRAMEWORK)`` runs when ``register()`` is
called or the trainer is built: a version outside the tested range is a ``UserWarning`` naming
the installed and the supported versions, and a missing private symbol (the next release moved
it) is an ``ImportError`` naming it, before anything is patched.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Framework:
    """``name``: the distribution; ``tested``: ``(lowest, below)``, the versions the
    integration's tests ran against (``lowest <= v < below``); ``private``: every non-public
    symbol the integration touches, ``"module:attr.attr"``, with what it does with it."""
    name: str
    tested: Tuple[str, str]
    private: Tuple[Tuple[str, str], ...]


VERL = Framework("verl", ("0.9.1", "0.10"), (
    ("verl.trainer.ppo.core_algos:ADV_ESTIMATOR_REGISTRY",
     "the `mapo` estimator is added to it (verl's registry, written directly: its "
     "register_adv_est decorator refuses re-registration with new options)"),
    ("verl.trainer.ppo.ray_trainer:compute_advantage",
     "wrapped so that the `mapo` estimator receives non_tensor_batch"),
    ("verl.trainer.ppo.v1.utils:compute_advantage", "wrapped likewise (the v1 trainer)"),
    ("verl.experimental.separation.ray_trainer:compute_advantage",
     "wrapped likewise (the separation trainer)"),
    ("verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
     "wrapped so that, for `mapo`, the batch's extra_fields (the reward function's "
     "mapo_turns) reach compute_advantage (the default v1 trainer)"),
    ("verl.experimental.reward_loop.reward_manager:register",
     "registers the `mapo` reward manager (verl_recipe.MAPORewardManager, a RewardManagerBase)"),
    ("verl.tools.base_tool:BaseTool", "subclassed by verl_recipe.ZoomInTool"),
    ("verl.utils.experimental.torch_functional:FusedLinearForPPO",
     "replaced by mapo_fast's fused log-prob module (use_fused_kernels)"),
))

#: parts of verl an installation may lack (the v1 trainer needs verl's ``verl-core`` extra,
#: TransferQueue): skipped when their module cannot be imported, checked when it can
VERL_OPTIONAL = ("verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
                 "verl.experimental.separation.ray_trainer:compute_advantage")

TRL = Framework("trl", ("1.16.0", "1.17"), (
    ("trl:GRPOTrainer._compute_loss", "overridden: the policy loss is mapo_loss; its metrics "
     "go into the trainer's `_metrics` (an instance attribute, not checked here)"),
    ("trl:GRPOTrainer._get_per_token_logps_and_entropies",
     "called with a stand-in for the model, so that TRL itself builds the model inputs "
     "(pixel values, grids, mm_token_type_ids, ...); its keyword parameters are the "
     "multimodal keys forwarded"),
    ("trl:GRPOTrainer._generate_and_score_completions",
     "extended: its batch (advantages, masks, old log-probs, model inputs) is what the loss "
     "reads; with semantic_scores_fn its advantages become per-token"),
))


def installed_version(name: str) -> str:
    return importlib.metadata.version(name)


def _lookup(spec: str) -> str:
    """``"found"``, ``"no module"`` (its module cannot be imported) or ``"no symbol"``."""
    module, _, attrs = spec.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return "no module"
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            return "no symbol"
        obj = getattr(obj, attr)
    return "found"


def _tuple(version: str) -> Tuple[int, ...]:
    """The release numbers of a version string (``"0.9.1.dev0"`` -> ``(0, 9, 1)``)."""
    out = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check(fw: Framework, optional: Tuple[str, ...] = ()) -> str:
    """The installed version of ``fw``, after checking it: outside the tested range, a
    ``UserWarning``; a private symbol missing, an ``ImportError`` naming it and what it was
    for (those in ``optional``, parts of the framework an installation may lack, only when
    their module imports and the symbol is not there)."""
    try:
        version = installed_version(fw.name)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"mapo_fast.integrations: {fw.name} is not installed (tested with "
                          f"{fw.name} >= {fw.tested[0]}, < {fw.tested[1]})") from None
    lo, hi = fw.tested
    if not _tuple(lo) <= _tuple(version) < _tuple(hi):
        warnings.warn(f"mapo_fast.integrations: {fw.name} {version} is installed; the "
                      f"integration is tested with {fw.name} >= {lo}, < {hi}. Its private "
                      "symbols were found, but their behaviour may differ.", UserWarning,
                      stacklevel=3)
    for spec, purpose in fw.private:
        found = _lookup(spec)
        if found == "no symbol" or (found == "no module" and spec not in optional):
            raise ImportError(f"mapo_fast.integrations: {fw.name} {version} has no `{spec}` "
                              f"(used: {purpose}); the integration supports {fw.name} >= {lo}, "
                              f"< {hi}")
    return version
