"""XLA's persistent compilation cache for the commands that decode (`jaxcodec compress`,
`decompress`, `evaluate`): one compilation per model and image size, not per call.

Kept below both `cli` and `evaluate`, which each switch it on when they start.
"""

import os


def enable_compilation_cache() -> str | None:
    """Keeps XLA's compiled decoders on disk between calls (one compilation per model and
    image size, not per call): `JAXCODEC_COMPILATION_CACHE` names the folder (default
    ~/.cache/jaxcodec/xla), `0` or an empty value turns it off; JAX's own
    `JAX_COMPILATION_CACHE_DIR`, when set, wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = os.environ.get(
        "JAXCODEC_COMPILATION_CACHE", os.path.join("~", ".cache", "jaxcodec", "xla")
    )
    if path in ("", "0"):
        return None
    import jax

    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
