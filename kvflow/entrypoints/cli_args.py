"""The engine's command-line flags, generated from the config fields (kvflow/config.py).

`add_engine_args(parser)` adds one argument group per config section and one flag per field: `--` and the
field's name with dashes (or the field's `flag` hint), its type from the annotation (`X | None`: optional),
its default (or `cli_default`), choices and help. A `gib` field is given in GiB on the command line and
converted to bytes by `engine_kwargs(args)`, which returns the flat field names that
`EngineConfig.from_kwargs` and `LLM` take. A new engine option is therefore one field in config.py.

This module does not import torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

from kvflow.config import SECTIONS

GIB = 1 << 30

# GiB flags that accept 0 (the others must be positive)
GIB_ALLOW_ZERO = {"swap_space_bytes"}

# bool fields: a further flag that sets the field to False (kept for the command lines and docs using it)
NEGATIVE_ALIASES = {"enable_prefix_caching": "--no-prefix-caching"}

_TYPES = (int, float, str, bool)


class _Explicit:
    """Records which engine flags were given on the command line: with --preset, only those override it."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        given = getattr(namespace, "_explicit_engine_flags", None) or set()
        given.add(self.dest)
        setattr(namespace, "_explicit_engine_flags", given)


class _Store(_Explicit, argparse._StoreAction):
    pass


class _Bool(_Explicit, argparse.BooleanOptionalAction):
    pass


class _StoreFalse(_Explicit, argparse._StoreFalseAction):
    pass


class CLIError(Exception):
    """A user error found by the CLI itself (reported like an argparse error)."""


@dataclasses.dataclass
class EngineFlag:
    """How one config field appears on the command line."""
    field: dataclasses.Field
    flag: str            # "--max-num-seqs"
    dest: str            # the attribute of the parsed arguments: "max_num_seqs"
    type: type           # int | float | str | bool (float for a GiB field)
    optional: bool       # the annotation is `X | None`

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def gib(self) -> bool:
        return bool(self.field.metadata.get("gib"))

    @property
    def cli_default(self):
        md = self.field.metadata
        if "cli_default" in md:
            return md["cli_default"]
        if self.gib and self.field.default is not None:
            return self.field.default / GIB
        return self.field.default


def engine_flags() -> list[tuple[str, list[EngineFlag]]]:
    """(section name, its fields' flags) for every section of EngineConfig, in declaration order."""
    out = []
    for name, sec in SECTIONS.items():
        hints = typing.get_type_hints(sec)          # the annotations are strings (postponed evaluation)
        out.append((name, [_flag(f, hints[f.name]) for f in dataclasses.fields(sec)]))
    return out


def _flag(f: dataclasses.Field, annotation) -> EngineFlag:
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if base not in _TYPES or (optional and len(args) != 2):
        raise TypeError(f"config field {f.name}: the command line cannot offer a {annotation} field")
    if f.metadata.get("gib"):
        if base is not int:
            raise TypeError(f"config field {f.name}: a gib field must be an int (bytes)")
        base = float
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return EngineFlag(f, flag, flag[2:].replace("-", "_"), base, optional)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One argument group per config section, one flag per field; --preset; and -v/--verbose."""
    from kvflow.presets import PRESETS
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="set the engine options the way a runtime of the survey does (orca, vllm, sarathi, "
                             "sglang, fastserve; kvflow: the defaults); flags given explicitly override it")
    for section, flags in engine_flags():
        group = parser.add_argument_group(f"engine: {section}")
        for fl in flags:
            md = fl.field.metadata
            default = fl.cli_default
            help = md.get("help", "")
            if default is not None and "default" not in help:      # unless the help tells it already
                help += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
            kw = dict(dest=fl.dest, default=default, help=help.replace("%", "%%"))
            metavar = md.get("metavar") or ("GIB" if fl.gib else "DIR" if fl.name.endswith("_dir") else None)
            if metavar:
                kw["metavar"] = metavar
            if fl.type is bool:
                group.add_argument(fl.flag, action=_Bool, **kw)
                alias = NEGATIVE_ALIASES.get(fl.name)
                if alias:
                    group.add_argument(alias, dest=fl.dest, action=_StoreFalse, default=argparse.SUPPRESS,
                                       help=f"same as --no-{fl.flag[2:]}")
            else:
                group.add_argument(fl.flag, action=_Store, type=fl.type, choices=md.get("choices"), **kw)
    parser.add_argument("-v", "--verbose", action="store_true", help="log kvflow's info messages to stderr")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine's options from parsed arguments, by field name (bytes for GiB flags), for
    `EngineConfig.from_kwargs(**kw)` and `LLM(**kw)`. With --preset, only the flags given explicitly (they
    override the preset's options), and `preset`. Raises CLIError for a bad GiB value."""
    preset = getattr(args, "preset", None)
    given = getattr(args, "_explicit_engine_flags", None) or set()
    kw = {} if preset is None else {"preset": preset}
    for _, flags in engine_flags():
        for fl in flags:
            if preset is not None and fl.dest not in given:
                continue
            value = getattr(args, fl.dest)
            if "cli_default" in fl.field.metadata and value == fl.field.metadata["cli_default"]:
                value = fl.field.default         # e.g. --seed: unset on the command line, 0 for the engine
            elif fl.gib and value is not None:
                value = gib(fl.flag, value, allow_zero=fl.name in GIB_ALLOW_ZERO)
            kw[fl.name] = value
    return kw


def gib(option: str, value: float, allow_zero: bool = False) -> int:
    """`value` GiB in bytes; CLIError naming `option` unless it is positive (or zero, with allow_zero)."""
    if not math.isfinite(value) or not (value > 0 or (allow_zero and value == 0)):
        raise CLIError(f"{option} must be a {'non-negative' if allow_zero else 'positive'} number of GiB, got {value}")
    return int(value * GIB)
