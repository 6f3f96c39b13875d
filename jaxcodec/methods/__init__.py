"""Methods plug into the training loop by name: `config.method` selects one from this registry."""

from jaxcodec.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def get_method(config) -> Method:
    """Instantiates the method named by `config.method` for `config.stage`."""
    from jaxcodec.methods import hfd  # noqa: F401  (registers itself)

    if config.method not in _REGISTRY:
        raise ValueError(f"unknown method {config.method!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[config.method](config)


__all__ = ["Method", "get_method", "register"]
