"""Methods plug into the loop by name: `config.method` names a module that registers one.

A short name (`hfd`) is the module `jaxcodec.methods.hfd`; a dotted name is imported as given,
so a method can live outside the package (tests, user code) and register itself.
"""

import importlib

from jaxcodec.methods.base import (
    BitstreamCoder,
    Method,
    Pretrained,
    StageStart,
    Variables,
)

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def get_method(config) -> Method:
    """Instantiates the method named by `config.method` for `config.stage`."""
    name = config.method
    if name not in _REGISTRY:
        module = name if "." in name else f"jaxcodec.methods.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(exc.name or ""):
                raise  # the module exists but something it imports does not
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](config)


__all__ = [
    "BitstreamCoder",
    "Method",
    "Pretrained",
    "StageStart",
    "Variables",
    "get_method",
    "register",
]
