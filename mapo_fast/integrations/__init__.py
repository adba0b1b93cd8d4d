"""Drop-in use from the RL frameworks users train with: ``mapo_fast.integrations.verl``
(``register()``: the ``mapo`` advantage estimator and the fused log-prob kernel). Each module
imports its framework only when called; the framework is not a dependency of mapo_fast."""
