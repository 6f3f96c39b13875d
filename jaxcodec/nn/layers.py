"""Conv / Dense / norm factories shared by the UNet, VAE and control adapter.

They exist so that every parameter carries logical-axis names (mapped to mesh axes by rules in
the config) and every layer honours the same compute/param dtypes, without repeating the
boilerplate at each call site.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = jnp.dtype

# Logical axis names used on parameters. Mapping rules to mesh axes live in the training config.
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
# Activation axes (NHWC feature maps and token sequences).
ACT_NHWC = ("batch", "height", "width", "embed")
ACT_TOKENS = ("batch", "length", "embed")


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] | None = None,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A 2-D convolution laid out like torch's Conv2d (symmetric padding k//2 by default)."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(kernel_init, CONV_KERNEL_AXES),
        bias_init=_init(nn.initializers.zeros, CONV_BIAS_AXES),
        name=name,
    )


def dense(
    features: int,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A linear layer whose kernel (in, out) carries the logical axes ``axes``."""
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(kernel_init, axes),
        bias_init=_init(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def group_norm(
    num_groups: int,
    eps: float,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    """torch.nn.GroupNorm semantics (exact two-pass variance, needed for 1e-4 parity)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_init(nn.initializers.ones, ("norm",)),
        bias_init=_init(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def layer_norm(
    eps: float,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_init(nn.initializers.ones, ("norm",)),
        bias_init=_init(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def constrain(x: jnp.ndarray, axes: tuple[str | None, ...]) -> jnp.ndarray:
    """Logical sharding constraint on an activation (a no-op without axis rules in scope)."""
    return nn.with_logical_constraint(x, axes)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DtypeNames:
    """Config mixin: `dtype` / `param_dtype` are stored as names (JSON-friendly) and read as
    jnp dtypes through `compute_dtype` / `params_dtype`."""

    dtype: str
    param_dtype: str

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]
