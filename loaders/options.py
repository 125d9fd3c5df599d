"""Typed dataclass configs with nested sections, ``[PRESET] --section.key=value`` command lines and
``--help``: the parser of every fastclr command (fastclr.config holds the entry points' configs; the
loaders' own tools, e.g. ``python -m loaders.preview``, use it for their ``--data.*`` options).

    cfg = parse(PretrainConfig, sys.argv[1:], presets.PRETRAIN, prog="pretrain.py")
    # argv: [PRESET] [--optim.lr=4.8] [--run.out_dir runs/x] [--help]

Rules (one-line errors for everything a user can get wrong):
* an unknown key is an error that suggests the closest field (``--optim.lrr`` -> ``--optim.lr``);
* values are converted to the field's declared type: int -> float allowed, ``none`` for Optional,
  bools as true/false/1/0/yes/no, tuples as comma lists; a wrong type names the field and the type;
* fields with ``choices`` accept only those, fields with a range (``option(..., gt=0)``) only values in it;
* presets only assign fields, through the same checked setter as the command line;
* derived values (the scaled learning rate, steps per epoch) are computed where used, never written
  back into the config: the JSON dump is exactly what the user asked for.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import field
from typing import Any, Dict, List, Optional, Tuple

from .sources.files import atomic_write_text


class ConfigError(ValueError):
    """A user error in the config or command line; its message is one line."""


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def option(default, help, choices=None, *, ge=None, gt=None, le=None, lt=None, applies=None):
    """A config field: its default, a one-line help (shown by --help), and optionally the allowed
    values (``choices``) or a numeric range (``ge``/``gt``/``le``/``lt``), which the config parser
    checks for every value it sets (command line, preset, saved config), before any heavy work.

    ``applies``: when the option means something only with another option's value, that condition,
    ``(key, values)`` (the other option is one of ``values``), ``(key, predicate, text)``, or a function
    of the whole config returning None (it applies) or why not. Typed on the command line where the
    condition does not hold (and the other option exists in that command's config), the option is
    refused in one line: an option never silently does nothing."""
    meta = {"help": help}
    if applies is not None:
        meta["applies"] = applies if callable(applies) else tuple(applies)
    if choices:
        meta["choices"] = tuple(choices)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    return field(default=default, metadata=meta)


def bounds_text(bounds) -> str:
    """``{"gt": 0, "le": 1}`` -> ``"> 0 and <= 1"``."""
    return " and ".join(f"{_BOUND_TEXT[k]} {v}" for k, v in bounds.items())


def out_of_bounds(value, bounds) -> bool:
    """Whether a number breaks ``bounds`` (NaN breaks every bound)."""
    ok = {"ge": lambda b: value >= b, "gt": lambda b: value > b, "le": lambda b: value <= b,
          "lt": lambda b: value < b}
    return not all(ok[k](b) for k, b in bounds.items())


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or none"
    if origin in (tuple, Tuple):
        return "comma list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Convert ``value`` (a CLI string or a Python value from a preset/JSON) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        try:
            return _coerce(value, args[0], key)
        except ConfigError:
            raise ConfigError(f"--{key}: expected {_type_name(tp)}, got {value!r}") from None
    if origin in (tuple, Tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        if len(items) != len(args):
            raise ConfigError(f"--{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)  # int -> float allowed
            if not math.isfinite(v):
                raise ValueError
            return v
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {'a finite ' if tp is float else ''}{_type_name(tp)}, "
                          f"got {value!r}") from None
    raise ConfigError(f"--{key}: unsupported field type {tp}")


def _fields(obj_or_cls, prefix: str = "") -> List[Tuple[str, dataclasses.Field, Any]]:
    """Flattened (dotted key, field, type) for every leaf field."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp))
    return out


def keys(cfg_or_cls) -> List[str]:
    return [k for k, _, _ in _fields(cfg_or_cls)]


def set_value(cfg, key: str, value: Any) -> None:
    """Set dotted ``key`` on ``cfg`` with type coercion, choices and unknown-key checks."""
    table = {k: (f, tp) for k, f, tp in _fields(cfg)}
    if key not in table:
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.5)
        if not close:  # maybe the section was right but the leaf name was mistyped, or vice versa
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in table if k.rsplit(".", 1)[-1] == leaf][:1]
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list of options"
        raise ConfigError(f"unknown option --{key}{hint}")
    f, tp = table[key]
    v = _coerce(value, tp, key)
    choices = f.metadata.get("choices")
    if choices and v is not None and v not in choices:
        raise ConfigError(f"--{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    bounds = f.metadata.get("bounds")
    if bounds and v is not None and any(out_of_bounds(x, bounds) for x in (v if isinstance(v, tuple) else (v,))):
        each = "each value " if isinstance(v, tuple) else ""
        raise ConfigError(f"--{key}: {each}must be {bounds_text(bounds)}, got {_fmt(v)}")
    obj = cfg
    *path, leaf = key.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, v)


def owner_class(cls, key: str):
    """The dataclass that declares the leaf field of dotted ``key`` (``cls``'s section type)."""
    hints_cls = cls
    *path, _ = key.split(".")
    for p in path:
        hints_cls = _hints(hints_cls)[p]
    return hints_cls


def applies(cfg, key: str) -> Optional[str]:
    """None when option ``key`` takes effect in ``cfg`` (no condition, or its condition holds, or the
    other option is not part of this config); else why not, in words."""
    table = {k: f for k, f, _ in _fields(cfg)}
    cond = table[key].metadata.get("applies")
    if callable(cond):
        return cond(cfg)
    if not cond or cond[0] not in table:
        return None
    other = get_value(cfg, cond[0])
    if callable(cond[1]):
        ok, text = cond[1](other), cond[2]
    else:
        ok, text = other in cond[1], "=" + "|".join(map(str, cond[1]))
    return None if ok else f"applies only with --{cond[0]}{text} (here {_fmt(other)})"


def get_value(cfg, key: str) -> Any:
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def apply_preset(cfg, name: str, presets: Dict[str, Dict[str, Any]]) -> None:
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(sorted(presets))})")
    for k, v in presets[name].items():
        set_value(cfg, k, v)


def help_text(cls, presets: Dict[str, Dict[str, Any]], prog: str, description: str = "") -> str:
    lines = [f"usage: {prog} [PRESET] [--section.key=value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    if presets:
        lines.append("presets (a preset only assigns fields; later --key=value overrides win):")
        for name, p in presets.items():
            lines.append(f"  {name:<24} {len(p)} fields, e.g. " + ", ".join(f"{k}={v}" for k, v in list(p.items())[:3]))
        lines.append("")
    lines.append("options (default in brackets):")
    default = cls()
    section = None
    for key, f, tp in _fields(cls):
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"  [{sec or 'general'}]")
        d = get_value(default, key)
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        extra += f" [{bounds_text(bounds)}]" if bounds else ""
        lines.append(f"    --{key}={_fmt(d)!s:<14} {f.metadata.get('help', '')} ({_type_name(tp)}){extra}")
    lines += ["", "Values: bools true/false/1/0, none for optional fields, tuples as a,b. "
              "Unknown options are errors."]
    return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return v


class HelpRequested(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def parse_into(cfg, argv: List[str], presets: Dict[str, Dict[str, Any]], prog: str = "fastclr", description: str = ""):
    """Apply ``[PRESET] [--k=v | --k v ...]`` to ``cfg`` in place and return it.
    Raises HelpRequested(text) for -h/--help, ConfigError for bad input."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        raise HelpRequested(help_text(type(cfg), presets, prog, description))
    if argv and not argv[0].startswith("-"):
        apply_preset(cfg, argv.pop(0), presets)
    typed = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"unexpected argument {a!r}: options look like --section.key=value "
                              f"(a preset name may only come first)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            k = a[2:]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{k}: missing value (write --{k}=VALUE)")
            v = argv[i + 1]
            i += 2
        set_value(cfg, k, v)
        typed.append(k)
    for k in dict.fromkeys(typed):  # after every value is in: a later option may be the condition
        why = applies(cfg, k)
        if why is not None:
            raise ConfigError(f"--{k} {why}")
    return cfg


def parse(cls, argv: Optional[List[str]] = None, presets: Optional[Dict[str, Dict[str, Any]]] = None,
          prog: str = "fastclr", description: str = ""):
    """CLI entry: returns a config, or prints help / a one-line error and exits (0 / 2)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return parse_into(cls(), argv, presets or {}, prog, description)
    except HelpRequested as h:
        try:
            print(h.text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: Dict[str, Any], strict: bool = True):
    """Rebuild a config from ``to_dict`` output (e.g. a checkpoint's config). Unknown keys are errors
    when ``strict``, else ignored (reading a checkpoint written by another version)."""
    cfg = cls()
    flat = flatten(d)
    known = set(keys(cls))
    for k, v in flat.items():
        if k not in known and not strict:
            continue
        set_value(cfg, k, v)
    return cfg


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: a nested config dict by dotted key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_json(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
