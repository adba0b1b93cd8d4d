"""The thin trainer: config (schema ``config``, checks ``validation``, reading ``parsing``), a
run built once (``build``), the MAPO loop, checkpoints, metrics, distributed wrapping."""

from .._checks import ConfigError
from .build import RunParts
from .config import TrainConfig
from .loop import Trainer
from .metrics import GAP_KEYS, gap_metrics
from .parsing import parse_args

__all__ = ["TrainConfig", "ConfigError", "parse_args", "Trainer", "RunParts", "GAP_KEYS",
           "gap_metrics"]
