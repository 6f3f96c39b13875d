"""Analysis / synthesis transforms of learned image codecs (Ballé/Minnen hyperprior family)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.nn import layers

_PEDESTAL = 2.0**-18


def _nonneg(p: jax.Array, minimum: float = 0.0) -> jax.Array:
    """Maps a parameter to a value ≥ minimum through a squared, lower-bounded reparameterisation.

    Squaring keeps relative updates even near zero; the straight-through lower bound keeps the
    parameter from getting stuck at the bound.
    """
    bound = (minimum + _PEDESTAL**2) ** 0.5
    p = p + jax.lax.stop_gradient(jnp.maximum(p, bound) - p)
    return p * p - _PEDESTAL**2


class GDN(nn.Module):
    """Generalised divisive normalisation, y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²), or its inverse."""

    inverse: bool = False
    beta_min: float = 1e-6
    gamma_init: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        beta_p = self.param(
            "beta",
            layers.partitioned(lambda k, s: jnp.sqrt(jnp.ones(s) + _PEDESTAL**2), ("conv_out",)),
            (c,),
        )
        # gamma[i, j] weighs input channel j in output i's norm: a 1×1 kernel (out, in).
        gamma_p = self.param(
            "gamma",
            layers.partitioned(
                lambda k, s: jnp.sqrt(self.gamma_init * jnp.eye(c) + _PEDESTAL**2),
                ("conv_out", "conv_in"),
            ),
            (c, c),
        )
        beta = _nonneg(beta_p, self.beta_min)
        gamma = _nonneg(gamma_p)
        norm = jnp.sqrt(beta + jnp.einsum("...j,ij->...i", x * x, gamma))
        return x * norm if self.inverse else x / norm


def _conv(features: int, kernel: int, stride: int, name: str | None = None) -> nn.Conv:
    return layers.conv(features, kernel, stride=stride, padding="SAME", name=name)


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """[N, H, W, C·b²] → [N, H·b, W·b, C] (pixel shuffle)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, block, block, c // (block * block))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, c // (block * block))


class SubpixelConv(nn.Module):
    """Upsampling by a convolution to b² phases and a pixel shuffle.

    A k×k stride-b transposed convolution is a ceil(k/b)×ceil(k/b) convolution per output
    phase, so this spans the same functions; it replaces `nn.ConvTranspose` because XLA:CPU
    computes the transposed convolution's gradient some 20× slower.
    """

    features: int
    kernel: int = 5
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = -(-self.kernel // self.stride)
        y = layers.conv(self.features * self.stride**2, k, padding="SAME")(x)
        return depth_to_space(y, self.stride)


def _deconv(features: int, kernel: int, stride: int) -> SubpixelConv:
    return SubpixelConv(features, kernel, stride)


class AnalysisTransform(nn.Module):
    """g_a: image → y at 1/16 resolution (four stride-2 convolutions with GDN)."""

    N: int
    M: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(3):
            x = GDN()(_conv(self.N, 5, 2)(x))
        return _conv(self.M, 5, 2)(x)


class SynthesisTransform(nn.Module):
    """g_s: y_hat → image, mirroring g_a with inverse GDN."""

    N: int
    out_channels: int = 3

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        for _ in range(3):
            y = GDN(inverse=True)(_deconv(self.N, 5, 2)(y))
        return _deconv(self.out_channels, 5, 2)(y)


class HyperAnalysis(nn.Module):
    """h_a: y → z at 1/4 of y's resolution."""

    N: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        x = nn.leaky_relu(_conv(self.N, 3, 1)(y))
        x = nn.leaky_relu(_conv(self.N, 5, 2)(x))
        return _conv(self.N, 5, 2)(x)


class HyperSynthesis(nn.Module):
    """h_s: z_hat → entropy parameters of y (2M channels: scales and means)."""

    N: int
    M: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.leaky_relu(_deconv(self.M, 5, 2)(z))
        x = nn.leaky_relu(_deconv(self.M * 3 // 2, 5, 2)(x))
        return _conv(self.M * 2, 3, 1)(x)


# ---------------------------------------------------------------------------------------------
# Residual blocks of latent compressors (CompressAI's layout as RDEIC and DiffCR use it).
# Each block also lists its layers for the fixed-point export (`fixed_point`), so the entropy
# parameters computed from a hyper-synthesis made of these blocks are bit-exact on the host.
# ---------------------------------------------------------------------------------------------


def pixel_shuffle(x: jax.Array, block: int) -> jax.Array:
    """torch's ``PixelShuffle`` in NHWC: input channel ``c·b² + i·b + j`` goes to output
    channel ``c`` at sub-pixel (i, j) (``depth_to_space`` orders the channels the other way)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, c // (block * block), block, block)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(n, h * block, w * block, c // (block * block))


def _tconv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """torch-style conv (symmetric padding k//2, so a torch model's weights apply unchanged)
    with logical axes on its parameters."""
    return layers.conv(features, kernel, stride=stride, name=name)


def _fp_conv(params: dict, name: str, stride: int = 1) -> dict:
    from jaxcodec.entropy import fixedpoint

    p = params[name]
    return fixedpoint.conv_layer(np.asarray(p["kernel"]), np.asarray(p["bias"]), stride)


def _fp_net(*layers_: dict) -> dict:
    return {f"{i:03d}": layer for i, layer in enumerate(layers_)}


class ResidualBlock(nn.Module):
    """conv3×3 → leaky ReLU → conv3×3 → leaky ReLU, plus the input (1×1 ``skip`` conv when the
    width changes). RDEIC's / CompressAI's ``ResidualBlock`` (slope 0.01 twice)."""

    features: int
    slope: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.leaky_relu(_tconv(self.features, 3, name="conv1")(x), self.slope)
        h = nn.leaky_relu(_tconv(self.features, 3, name="conv2")(h), self.slope)
        skip = _tconv(self.features, 1, name="skip")(x) if x.shape[-1] != self.features else x
        return h + skip

    @staticmethod
    def fixed_point(params: dict, slope: float = 0.01) -> dict:
        from jaxcodec.entropy import fixedpoint as fp

        main = _fp_net(
            _fp_conv(params, "conv1"),
            fp.act_layer("leaky_relu", slope),
            _fp_conv(params, "conv2"),
            fp.act_layer("leaky_relu", slope),
        )
        skip = _fp_net(_fp_conv(params, "skip")) if "skip" in params else None
        return fp.residual_layer(main, skip)


class ResidualBlockWithStride(nn.Module):
    """Downsampling residual block: stride-2 conv3×3 → leaky(0.01) → conv3×3 → leaky(0.1), plus
    a stride-2 1×1 ``skip`` (RDEIC's variant: no GDN, a second slope of 0.1)."""

    features: int
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.leaky_relu(_tconv(self.features, 3, self.stride, name="conv1")(x), 0.01)
        h = nn.leaky_relu(_tconv(self.features, 3, name="conv2")(h), 0.1)
        return h + _tconv(self.features, 1, self.stride, name="skip")(x)


class ResidualBlockUpsample(nn.Module):
    """Upsampling residual block: 1×1 conv + pixel shuffle (``subpel_conv``) → leaky(0.01) →
    conv3×3 → leaky(0.1), plus a second 1×1 sub-pixel ``skip`` (RDEIC's variant: no IGDN)."""

    features: int
    upsample: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        r, f = self.upsample, self.features
        h = pixel_shuffle(_tconv(f * r * r, 1, name="subpel_conv")(x), r)
        h = nn.leaky_relu(h, 0.01)
        h = nn.leaky_relu(_tconv(f, 3, name="conv")(h), 0.1)
        return h + pixel_shuffle(_tconv(f * r * r, 1, name="skip")(x), r)

    @staticmethod
    def fixed_point(params: dict, upsample: int = 2) -> dict:
        from jaxcodec.entropy import fixedpoint as fp

        main = _fp_net(
            _fp_conv(params, "subpel_conv"),
            fp.pixel_shuffle_layer(upsample),
            fp.act_layer("leaky_relu", 0.01),
            _fp_conv(params, "conv"),
            fp.act_layer("leaky_relu", 0.1),
        )
        skip = _fp_net(_fp_conv(params, "skip"), fp.pixel_shuffle_layer(upsample))
        return fp.residual_layer(main, skip)


# ---------------------------------------------------------------------------------------------
# ELIC-style blocks (He et al. 2022, as ResULIC's ``model/compressor.py`` lays them out).
# ---------------------------------------------------------------------------------------------


def gelu(x: jax.Array) -> jax.Array:
    """torch's ``nn.GELU()`` (the erf form; flax's default is the tanh approximation)."""
    return nn.gelu(x, approximate=False)


class ResidualBottleneck(nn.Module):
    """x + conv1×1(N/2) → GELU → conv3×3(N/2) → GELU → conv1×1(N): ELIC's residual bottleneck
    (``branch.0``, ``branch.2``, ``branch.4`` in the official state dict)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu(_tconv(self.features // 2, 1, name="conv1")(x))
        h = gelu(_tconv(self.features // 2, 3, name="conv2")(h))
        return x + _tconv(self.features, 1, name="conv3")(h)


def transposed_as_subpixel(kernel, bias, stride: int, padding: int, output_padding: int):
    """torch ``ConvTranspose2d(k, stride, padding, output_padding)`` with ``k + output_padding
    - 2·padding == stride`` (output = stride × input) as one stride-1 convolution to stride²
    phases and a `depth_to_space`: output pixel ``s·m + r`` of a 1-D transposed convolution is
    ``Σ_d x[m + d]·w[r + padding − s·d]``, so phase r is a correlation over the input offsets d
    with the taps ``w[r + padding − s·d]`` (zero where that index leaves the kernel).

    ``kernel``: [k, k, in, out] (torch's (in, out, k, k) moved to the end), ``bias``: [out] →
    (kernel [t, t, in, s²·out] in `depth_to_space` channel order, bias [s²·out], the padding
    (lo, hi) of the t-tap convolution). Works on numpy and jax arrays (exact: a gather)."""
    k, s, p = int(np.shape(kernel)[0]), int(stride), int(padding)
    if k + int(output_padding) - 2 * p != s:
        raise ValueError(f"ConvTranspose2d(k={k}, s={s}, p={p}, op={output_padding}) is not ×{s}")
    d_lo, d_hi = -((k - 1 - p) // s), (s - 1 + p) // s  # ceil((p - k + 1) / s), floor
    taps = np.arange(d_lo, d_hi + 1)
    index = np.arange(s)[None, :] + p - s * taps[:, None]  # [taps, phase] → kernel index
    valid = (index >= 0) & (index < k)
    index = np.where(valid, index, 0)
    # K[th, tw, in, rh, rw, out] = w[index[th, rh], index[tw, rw], in, out] where both valid.
    w = kernel[index[:, None, :, None], index[None, :, None, :]]  # [th, tw, rh, rw, in, out]
    mask = (valid[:, None, :, None] & valid[None, :, None, :])[..., None, None]
    w = w * mask
    t, cin, cout = len(taps), np.shape(kernel)[2], np.shape(kernel)[3]
    w = w.transpose(0, 1, 4, 2, 3, 5).reshape(t, t, cin, s * s * cout)
    b = bias[None, :] * np.ones((s * s, 1), np.float32)
    return w, b.reshape(s * s * cout), (-d_lo, d_hi)


class ConvTranspose(nn.Module):
    """A transposed convolution with torch's ``ConvTranspose2d`` semantics (padding,
    output_padding) and parameters ``kernel`` [k, k, in, out], ``bias`` [out].

    Computed as `transposed_as_subpixel`'s convolution + `depth_to_space` (XLA:CPU takes the
    gradient of a transposed convolution some 20× slower than of a plain one); the same
    rearrangement exports it to a fixed-point network (`fixed_point`)."""

    features: int
    kernel_size: int = 5
    stride: int = 2
    padding: int = 2
    output_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            layers.partitioned(nn.initializers.lecun_normal(), layers.CONV_KERNEL_AXES),
            (k, k, x.shape[-1], self.features),
        )
        bias = self.param(
            "bias",
            layers.partitioned(nn.initializers.zeros, layers.CONV_BIAS_AXES),
            (self.features,),
        )
        w, b, pad = transposed_as_subpixel(
            kernel, bias, self.stride, self.padding, self.output_padding
        )
        y = jax.lax.conv_general_dilated(
            x, w.astype(x.dtype), (1, 1), (pad, pad), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = y + b.astype(x.dtype)
        return depth_to_space(y, self.stride) if self.stride > 1 else y

    @staticmethod
    def fixed_point(
        params: dict, stride: int = 2, padding: int = 2, output_padding: int = 1
    ) -> dict:
        """The same layer as an integer conv (+ depth_to_space): a `fixedpoint` sub-network."""
        from jaxcodec.entropy import fixedpoint

        w, b, pad = transposed_as_subpixel(
            np.asarray(params["kernel"], np.float64),
            np.asarray(params["bias"], np.float64),
            stride,
            padding,
            output_padding,
        )
        if pad[0] != pad[1]:
            raise ValueError(f"integer networks pad symmetrically ('SAME'), not {pad}")
        layers_ = [fixedpoint.conv_layer(w, b, 1)]
        if stride > 1:
            layers_.append(
                {
                    "kind": np.array(fixedpoint.KIND_CODES["depth_to_space"], np.int32),
                    "block": np.array(stride, np.int32),
                }
            )
        return _fp_net(*layers_)
