"""The thin trainer: config, the MAPO loop, checkpoints, metrics, distributed wrapping."""

from .config import ConfigError, TrainConfig, parse_args
from .loop import Trainer
from .metrics import GAP_KEYS, gap_metrics

__all__ = ["TrainConfig", "ConfigError", "parse_args", "Trainer", "GAP_KEYS", "gap_metrics"]
