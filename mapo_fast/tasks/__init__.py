"""Built-in tasks and synthetic data that need no download."""

from .synthetic import synthetic_tool_rollouts

__all__ = ["synthetic_tool_rollouts"]
