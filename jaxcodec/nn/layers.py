"""Conv / Dense / norm factories shared by the UNet, VAE and control adapter.

They exist so that every parameter carries logical-axis names (mapped to mesh axes by rules in
the config) and every layer honours the same compute/param dtypes, without repeating the
boilerplate at each call site.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype

# Logical axis names used on parameters (maxdiffusion's scheme). The rules mapping them to mesh
# axes live in the config (`config.mesh.logical_axis_rules`, defaults in
# `jaxcodec.configlib.base_config`, where every name is documented).
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
# Activation axes (NHWC feature maps and token sequences).
ACT_NHWC = ("batch", "height", "width", "embed")
ACT_TOKENS = ("batch", "length", "embed")


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


def partitioned(init, axes: tuple[str | None, ...]):
    """An initialiser whose parameter carries the logical axes ``axes`` (for ``self.param``)."""
    return nn.with_logical_partitioning(init, axes)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | str | Sequence[tuple[int, int]] | None = None,
    zero_init: bool = False,
    transpose: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A 2-D convolution laid out like torch's Conv2d (symmetric padding k//2 by default;
    ``padding="SAME"`` is XLA's, as the learned-codec transforms use it). ``transpose``: an
    ``nn.ConvTranspose`` with the same axes."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    cls = nn.ConvTranspose if transpose else nn.Conv
    return cls(
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
    """Logical sharding constraint on an activation.

    A no-op unless axis rules (`nn.logical_axis_rules`) and a mesh (`jax.set_mesh`) are in
    scope, as in the training loop. A dimension the mapped mesh axes do not divide (one
    evaluation image on eight devices) is left unconstrained rather than padded.
    """
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = nn.logical_to_mesh_axes(axes, rules)
    sizes = dict(mesh.shape)
    fitted = []
    for dim, entry in zip(x.shape, spec, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n in sizes)
        n = int(np.prod([sizes[a] for a in names])) if names else 1
        fitted.append(None if n == 1 or dim % n else names if len(names) > 1 else names[0])
    if all(e is None for e in fitted):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*fitted))


# Rematerialisation policies (`remat` fields of the UNet / VAE configs): what a remat'ed block
# keeps from its forward pass for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    "full": None,  # nothing saved: the whole block is recomputed (least memory)
    "dots": jax.checkpoint_policies.checkpoint_dots,  # matmul/conv outputs saved
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_BLOCK_KINDS = ("resnet", "attention")


def remat_policy(spec: bool | str | None, kind: str) -> str | None:
    """The policy name for blocks of ``kind`` ('resnet', 'attention') from a config's ``remat``
    field: False/None/'' (no remat), True ('full'), a policy name for every block, or per block
    kind, e.g. ``'resnet=dots,attention=full'`` (kinds not named are not remat'ed)."""
    if kind not in REMAT_BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; known: {REMAT_BLOCK_KINDS}")
    if spec is None or spec is False or spec == "" or spec == "none":
        return None
    if spec is True:
        return "full"
    if not isinstance(spec, str):
        raise ValueError(f"remat={spec!r}: use a bool, a policy name or 'kind=policy,...'")
    if "=" not in spec:
        policies = {k: spec for k in REMAT_BLOCK_KINDS}
    else:
        policies = {}
        for item in spec.split(","):
            key, sep, value = (p.strip() for p in item.partition("="))
            if not sep or key not in REMAT_BLOCK_KINDS:
                raise ValueError(f"remat item {item!r}: use kind=policy, kinds {REMAT_BLOCK_KINDS}")
            policies[key] = value
    policy = policies.get(kind)
    if policy in (None, "none"):
        return None
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
    return policy


def remat(cls: type[nn.Module], spec: bool | str | None, kind: str) -> type[nn.Module]:
    """``cls`` wrapped in ``nn.remat`` with the policy ``spec`` gives blocks of ``kind``
    (unchanged when that is no remat). Parameter names and values are unaffected."""
    policy = remat_policy(spec, kind)
    if policy is None:
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


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
