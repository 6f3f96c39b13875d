"""Methods plug into the loop by name: `config.method` names a module that registers one.

`hfd` is the module `jaxcodec.methods.hfd`; any other importable module name (tests, user
code) is imported as given and registers its method under that name.
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
    for module in (f"jaxcodec.methods.{name}", name):
        if name in _REGISTRY:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(exc.name or "?"):
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
