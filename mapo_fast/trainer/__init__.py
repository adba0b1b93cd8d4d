"""The thin trainer: config, the MAPO loop, checkpoints, metrics, distributed wrapping."""

from .config import ConfigError, TrainConfig, parse_args
from .loop import Trainer

__all__ = ["TrainConfig", "ConfigError", "parse_args", "Trainer"]
