"""``mapo-train``'s arguments and ``--config`` files to a validated ``TrainConfig``.

Command-line convention: ``--key value`` (or ``--key=value``), nested keys dotted
(``--rollout.group_size 8``); ``--config FILE.yaml`` loads a file first, and the overrides
apply on top of it in order. Booleans accept ``true/false/1/0/yes/no``; ``none`` clears an
optional value; a bare ``--resume`` means ``--resume true``. Every problem is one
``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Optional, Sequence

from .._checks import REPR_CHARS, ConfigError, short_repr
from .config import TrainConfig, reference


def _fields(obj: Any) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` (from YAML or the command line) as the field's type, or ``ConfigError``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config: `{key}` cannot be none (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: `{key}` must be {base.__name__}, got "
                          f"{short_repr(value)}") from None
    raise ConfigError(f"config: `{key}` has an unsupported type")


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Sets a dotted ``key``; unknown keys and wrong types raise ``ConfigError``."""
    obj, parts = cfg, key.split(".")
    hints_owner = obj
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            where = ".".join(parts[:i])
            known = sorted(fields)
            close = difflib.get_close_matches(part, known, n=1)
            # a bare leaf name given at the top level (`lr`): the dotted keys that end in it
            dotted = [k for k, *_ in reference(cfg) if k.endswith("." + part)] if i == 0 \
                else []
            hint = f"; did you mean `{'.'.join(parts[:i] + close)}`?" if close else ""
            if dotted and not close:
                hint = f"; did you mean {' or '.join(f'`{k}`' for k in dotted)}?"
            raise ConfigError(f"config: unknown key `{key[:REPR_CHARS]}`{hint} (keys of "
                              f"`{where or 'the top level'}`: {', '.join(known)})")
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config: unknown key `{key[:REPR_CHARS]}`: "
                                  f"`{'.'.join(parts[:i + 1])[:REPR_CHARS]}` "
                                  "has no sub-keys")
            obj = getattr(obj, part)
            continue
        hints_owner = obj
        if dataclasses.is_dataclass(getattr(obj, part)):
            if not isinstance(value, dict):
                raise ConfigError(f"config: `{key}` is a section; give its keys "
                                  f"({', '.join(sorted(_fields(getattr(obj, part))))})")
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(f"config: the keys of `{key}` must be strings, got "
                                      f"{short_repr(k)}")
                set_key(cfg, f"{key}.{k}", v)
            return
        hint = typing.get_type_hints(type(hints_owner))[part]
        setattr(obj, part, _coerce(key, value, hint))


def load_yaml(path: str) -> Dict[str, Any]:
    """The mapping of a ``--config`` file; any problem is one ``ConfigError`` line (the file's
    text must be UTF-8 YAML whose keys are strings)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read `--config` file {short_repr(path)}: "
                          f"{e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: `--config` file {short_repr(path)} is not UTF-8 text (byte "
                          f"{e.start})") from None
    except (yaml.YAMLError, RecursionError) as e:
        first = " ".join(str(e).split())[:REPR_CHARS]
        raise ConfigError(f"config: `--config` file {short_repr(path)} is not valid YAML: "
                          f"{first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: `--config` file {short_repr(path)} must hold a mapping of "
                          f"keys, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config: `--config` file {short_repr(path)}: keys must be strings, "
                          f"got {short_repr(bad[0])}")
    return data


def parse_args(argv: Sequence[str], base: Optional[TrainConfig] = None) -> TrainConfig:
    """``mapo-train`` arguments (see the module doc) to a validated ``TrainConfig``."""
    cfg = base if base is not None else TrainConfig()
    pairs: List[tuple] = []
    i, argv = 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"config: expected `--key value`, got {short_repr(arg)} (keys are "
                              "dotted, e.g. --rollout.group_size 8)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key == "resume" and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"config: `--{key[:REPR_CHARS]}` needs a value")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1
    for key, value in pairs:
        if key == "config":
            for k, v in load_yaml(value).items():
                set_key(cfg, k, v)
    for key, value in pairs:
        if key != "config":
            set_key(cfg, key, value)
    return cfg.validate()
