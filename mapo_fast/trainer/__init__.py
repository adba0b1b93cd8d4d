"""The thin trainer: config (schema ``config``, checks ``validation``, reading ``parsing``), the
MAPO loop, checkpoints, metrics, distributed wrapping."""

from .._checks import ConfigError
from .config import TrainConfig
from .parsing import parse_args
from .loop import Trainer
from .metrics import GAP_KEYS, gap_metrics

__all__ = ["TrainConfig", "ConfigError", "parse_args", "Trainer", "GAP_KEYS", "gap_metrics"]
