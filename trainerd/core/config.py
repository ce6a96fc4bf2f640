"""Typed configuration: one YAML file, loaded and validated all at once (the schema: settings.py).

Stdlib + pyyaml only: the supervisor, the CLI and the worker all load the same schema, so the
settings file the supervisor hands a worker is checked by exactly the rules an operator's
config is. Every problem is collected with its key path and raised once as ``ConfigError``;
unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from trainerd.core.modelref import resolve_setting
from trainerd.core.settings import SECTIONS, Settings

__all__ = [
    "ConfigError",
    "load",
    "from_dict",
    "parse_size",
    "to_dict",
]


class ConfigError(ValueError):
    """Raised with every problem found, one ``path: reason`` per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_MULT = {
    None: 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}


def parse_size(value: Any) -> int:
    """``12GiB`` / ``512MB`` / ``1048576`` -> bytes. Raises ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 12GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_MULT[unit])
    raise ValueError(f"must be a size like 12GiB or a number of bytes, got {value!r}")


def _convert(path: str, value: Any, kind: str, kw: dict[str, Any], problems: list[str]) -> Any:
    def bad(msg: str) -> None:
        problems.append(f"{path}: {msg}")

    if kind == "str":
        if not isinstance(value, str):
            return bad(f"must be a string, got {value!r}")
        if kw.get("nonempty") and not value.strip():
            return bad("must not be empty")
        return value
    if kind == "choice":
        if value not in kw["choices"]:
            return bad(f"must be one of {', '.join(kw['choices'])}, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            return bad(f"must be true or false, got {value!r}")
        return value
    if kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return bad(f"must be a list of names, got {value!r}")
        if kw.get("nonempty") and not value:
            return bad("must not be empty")
        return list(value)
    if kind == "bool_or_auto":
        if value == "auto" or isinstance(value, bool):
            return value
        return bad(f"must be true, false or auto, got {value!r}")
    if kind == "float_or_auto":
        if value == "auto":
            return value
        kind = "float"
    if kind in ("size", "size_or_auto"):
        if kind == "size_or_auto" and value == "auto":
            return value
        try:
            value = parse_size(value)
        except ValueError as e:
            return bad(str(e))
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return bad(f"must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad(f"must be a number, got {value!r}")
        value = float(value)
    lo, hi = kw.get("min"), kw.get("max")
    if lo is not None:
        if kw.get("exclusive_min") and not value > lo:
            return bad(f"must be > {lo}, got {value}")
        if not kw.get("exclusive_min") and value < lo:
            return bad(f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        return bad(f"must be <= {hi}, got {value}")
    return value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<top>'}: must be a mapping, got {type(data).__name__}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            problems.append(f"{path}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Settings")):
            sub_cls = SECTIONS[name]
            kwargs[name] = _build(sub_cls, data[name], path, problems)
            continue
        kind, kw = f.metadata["check"]
        n_before = len(problems)
        value = _convert(path, data[name], kind, kw, problems)
        if len(problems) == n_before:
            kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(s: Settings, problems: list[str]) -> None:
    if s.eval.holdout_min > s.eval.holdout_max:
        problems.append(f"eval.holdout_min: must be <= eval.holdout_max ({s.eval.holdout_max}), "
                        f"got {s.eval.holdout_min}")
    if s.train.nnodes > 1 and not s.train.rdzv_endpoint:
        problems.append("train.rdzv_endpoint: needed with train.nnodes > 1 (HOST:PORT every node's torchrun joins)")
    if s.eval.early_stopping_patience and not s.eval.every_steps:
        problems.append("eval.early_stopping_patience: needs eval.every_steps > 0 (evaluations to count)")
    if s.memory.soft >= s.memory.hard:
        problems.append(f"memory.soft: must be below memory.hard ({s.memory.hard}), got {s.memory.soft}")
    if s.retry.backoff_max_s < s.retry.backoff_s:
        problems.append(
            f"retry.backoff_max_s: must be >= retry.backoff_s ({s.retry.backoff_s}), got {s.retry.backoff_max_s}"
        )


def from_dict(data: Any, *, source: str | None = None, base_dir: Path | None = None) -> Settings:
    """Validate a mapping into Settings; relative paths resolve against ``base_dir``."""
    problems: list[str] = []
    settings = _build(Settings, data, "", problems)
    _cross_checks(settings, problems)
    if problems:
        raise ConfigError(problems, source)
    if base_dir is not None:
        settings.root = str((base_dir / os.path.expanduser(settings.root)).resolve())
        settings.model.path = resolve_setting(settings.model.path, base_dir)  # a folder, or a hub id
        hook = settings.publish.hook
        if hook and "/" in hook[0] and not os.path.isabs(os.path.expanduser(hook[0])):
            hook[0] = str((base_dir / hook[0]).resolve())  # a relative script path: next to the config
    return settings


def load(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Settings:
    """Load a YAML (or JSON) config file. Relative paths in it are relative to the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror or e}"], str(p)) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text: {e}"], str(p)) from e
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML: {getattr(e, 'problem', None) or e}"], str(p)) from e
    if overrides:
        data = _merge(data if isinstance(data, dict) else {}, overrides)
    return from_dict(data, source=str(p), base_dir=p.resolve().parent)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def dump_json(settings: Settings, path: str | os.PathLike[str]) -> None:
    """Write settings as JSON atomically (tmp + fsync + rename): a worker never reads half."""
    from trainerd.core.fsutil import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(to_dict(settings), indent=2, sort_keys=True).encode())
