"""A registry of named, pluggable classes (scheduling policies, length predictors, ...).

`modules` maps every name to the module that registers it (`@registry.register(name)`), so a name can be
offered (config choices, --help) without importing its module; `get(name)` imports it on first use.
No torch.
"""
from __future__ import annotations

import importlib


class Registry:
    def __init__(self, field: str, modules: dict[str, str]):
        self.field = field                 # the option that names a member (for error messages)
        self.modules = modules
        self.classes: dict[str, type] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def __iter__(self):
        return iter(self.modules)

    def register(self, name: str):
        def wrap(cls):
            cls.name = name
            self.classes[name] = cls
            return cls
        return wrap

    def get(self, name: str) -> type:
        """The class registered as `name`; ValueError naming the field for an unknown one."""
        if name not in self.modules:
            raise ValueError(f"{self.field} must be one of {', '.join(self.modules)}, got {name!r}")
        importlib.import_module(self.modules[name])
        return self.classes[name]
