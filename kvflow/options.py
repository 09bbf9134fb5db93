"""What a config field is made of (shared by every options section: kvflow/config.py, kvflow/cluster/options.py):
its default and help text for the command line, and the checks that give a ValueError naming the field."""
from __future__ import annotations

from dataclasses import field


def opt(default, help: str, choices=None, **cli):
    """A config field with what the command line needs to offer it: help, choices, and CLI hints
    (`flag`: another flag name, `gib`: given in GiB on the command line, `cli_default`)."""
    return field(default=default, metadata={"help": help, "choices": choices, **cli})


def check_positive(obj, name: str, optional: bool = False, allow_zero: bool = False) -> None:
    """`obj.name` is a positive (or, with allow_zero, non-negative) integer, or None when optional."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")


def check_number(obj, name: str, optional: bool = False, allow_zero: bool = False) -> None:
    """`obj.name` is a finite positive (or, with allow_zero, non-negative) number, or None when optional."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < float("inf") or \
            value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} number, got {value!r}")
