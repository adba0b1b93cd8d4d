"""Imported by verl in each of its processes (the trainer's task runner, the actor, rollout and
reward workers) when ``VERL_USE_EXTERNAL_MODULES=mapo_fast.integrations.verl_worker`` is set in
their environment (verl's own setting for user code: ``verl/__init__.py`` imports the modules it
names). It calls ``mapo_fast.integrations.verl.register()`` with the options in
``MAPO_FAST_VERL_OPTIONS`` (a JSON object, e.g. ``{"semantic_coef": 0.5}``), so that the
``mapo`` estimator and the fused log-prob kernel exist where verl calls them, and registers the
``mapo`` reward manager (``verl_recipe``; its options under ``"reward"``).

A single-node run inherits the variables from the launching shell; on a Ray cluster pass them
with ``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=...`` (see
``examples/verl/``).
"""

from . import verl_recipe  # noqa: F401  (registers the `mapo` reward manager with verl)
from .verl import options_from_env, register

register(**{k: v for k, v in options_from_env().items() if k != "reward"})
