"""Rate conditioning: one compressor for every rate point, steered by a rate control q ∈ [0, 1].

q maps log-linearly onto the method's λ range, λ(q) = λ_min·(λ_max/λ_min)^q. In training q is
drawn per example (uniform, so λ is log-uniform) and the loss weighs each example's distortion
by its own λ; the compressor is conditioned on q at the four places a latent changes hands:

    y ──forward_y(q)──▶ quantised & entropy-coded ──inverse_y(q)──▶ g_s
    z ──forward_z(q)──▶ quantised & entropy-coded ──inverse_z(q)──▶ h_s (integer network)

Two conditionings (`RateConfig.kind`), measured against each other in
`benchmarks/variable_rate.py`:
- ``"gain"`` — Cui et al. 2021 ("Asymmetric Gained Deep Image Compression with Continuous Rate
  Adaptation"): per channel gain / inverse-gain vectors at `anchors` values of q, interpolated
  exponentially (linearly in log-gain) in between;
- ``"affine"`` — a λ embedding (sinusoidal features of q → MLP) whose heads give a per-channel
  log-scale and shift at each place (an affine modulation, as in conditional-convolution and
  SFT variable-rate codecs, here at the latents so the analysis transform does not depend on q).
Both start from the same prior: y and z scaled by sqrt(λ(q)/λ_mid), the high-rate optimum of a
uniform quantiser's step for an MSE weight λ.

Files name q by its index on a grid of `levels` values (`q = index / (levels − 1)`), stored in
the header (`jaxcodec.entropy.container`, field ``rate``). The only conditioning the integer
entropy-parameter networks see is `inverse_z` on the decoded hyper latent; it is applied in
integer arithmetic from a table with one integer scale (2^-16 grid) and shift (2^-12 grid) per
channel and grid index, built once with the other entropy tables (`z_inverse_tables`), so the
encoder and the decoder feed h_s the same integers at every q a file can name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import fixedpoint

KINDS = ("gain", "affine")
LEVELS = 256  # grid of q a file can name
SCALE_BITS = 16  # integer inverse-z scales on the 2^-16 grid
MAX_LOG_SCALE = 8 * float(np.log(2.0))  # every scale within [2^-8, 2^8]
MAX_SHIFT = 64.0  # |shift| bound (latent units)
MAX_LEVELS = 1 << 16  # the header field is 16 bits
QUALITY_MAX = 100.0  # `--quality` runs over [0, 100]


@dataclasses.dataclass(frozen=True)
class RateConfig:
    """The rate control of a conditioned compressor (config: `model.rate` / `compressor.rate`)."""

    lmbda_min: float
    lmbda_max: float
    kind: str = "gain"
    anchors: int = 8  # "gain": gain vectors at this many evenly spaced q
    embed: int = 64  # "affine": width of the λ embedding
    levels: int = LEVELS
    default_quality: float = 50.0  # the q files get unless told otherwise

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rate kind {self.kind!r}: use one of {KINDS}")
        if not 0 < self.lmbda_min < self.lmbda_max:
            raise ValueError(
                f"rate needs 0 < lmbda_min < lmbda_max, got {self.lmbda_min}, {self.lmbda_max}"
            )
        if self.anchors < 2 or self.embed < 1:
            raise ValueError("rate needs anchors >= 2 and embed >= 1")
        if not 2 <= self.levels <= MAX_LEVELS:
            raise ValueError(f"rate levels must be in [2, {MAX_LEVELS}], got {self.levels}")
        if not 0 <= self.default_quality <= QUALITY_MAX:
            raise ValueError(f"default_quality must be in [0, 100], got {self.default_quality}")

    @classmethod
    def from_config(cls, rate) -> RateConfig | None:
        """`config.model.rate` (a ConfigDict or dict; absent or None: a fixed-rate model)."""
        if rate is None:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(rate.to_dict() if hasattr(rate, "to_dict") else rate)
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown rate field(s) {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**values)

    # --- q, its grid, λ and the user's quality ------------------------------------------------

    def lmbda(self, q):
        """λ(q) = λ_min·(λ_max/λ_min)^q (numpy or JAX)."""
        return self.lmbda_min * (self.lmbda_max / self.lmbda_min) ** q

    def q_of_lmbda(self, lmbda: float) -> float:
        return float(np.log(lmbda / self.lmbda_min) / np.log(self.lmbda_max / self.lmbda_min))

    def q(self, index: int) -> float:
        """The q of a grid index (what the header stores)."""
        return self.check_index(index) / (self.levels - 1)

    def check_index(self, index) -> int:
        if int(index) != index or not 0 <= int(index) < self.levels:
            raise ValueError(f"rate index {index} outside this model's grid [0, {self.levels - 1}]")
        return int(index)

    def index_of_quality(self, quality: float) -> int:
        """`--quality Q` (0 … 100, linear in q: log-linear in λ) → grid index."""
        if not 0 <= quality <= QUALITY_MAX or not np.isfinite(quality):
            raise ValueError(f"quality {quality} outside [0, {QUALITY_MAX:g}]")
        return int(np.floor(quality / QUALITY_MAX * (self.levels - 1) + 0.5))

    def quality_of_index(self, index: int) -> float:
        return QUALITY_MAX * self.q(index)

    @property
    def default_index(self) -> int:
        return self.index_of_quality(self.default_quality)

    def sample_q(self, key: jax.Array, batch: int) -> jax.Array:
        """Training draws q ~ U[0, 1] per example (λ log-uniform over the range)."""
        return jax.random.uniform(key, (batch,), jnp.float32)

    def prior_log_scale(self, q: jax.Array) -> jax.Array:
        """log sqrt(λ(q)/λ_mid): the initial forward scale of y and z (negated for inverses)."""
        return 0.5 * (q - 0.5) * float(np.log(self.lmbda_max / self.lmbda_min))


def interpolate_setting(points, lmbda: float) -> float:
    """A decode setting known at the fixed-rate points ((λ, value), ...) at another λ:
    piecewise linear in log λ, constant beyond the ends (e.g. RDEIC's sampler steps per λ_r)."""
    pts = sorted((float(np.log(lam)), float(v)) for lam, v in points)
    xs, vs = zip(*pts, strict=True)
    return float(np.interp(np.log(lmbda), xs, vs))


# Sites of the modulation, each with (which latent, sign of the prior).
_SITES = {
    "forward_y": ("y", 1.0),
    "inverse_y": ("y", -1.0),
    "forward_z": ("z", 1.0),
    "inverse_z": ("z", -1.0),
}


class RateConditioning(nn.Module):
    """Per-channel scale (and, for "affine", shift) of y and z as a function of q [B]."""

    config: RateConfig
    y_channels: int
    z_channels: int

    def setup(self):
        c = self.config
        channels = {"y": self.y_channels, "z": self.z_channels}
        if c.kind == "gain":
            anchors_q = jnp.linspace(0.0, 1.0, c.anchors)
            self.log_gains = {
                site: self.param(
                    f"log_gain_{site}",
                    lambda key, shape, sign=sign: jnp.broadcast_to(
                        sign * c.prior_log_scale(anchors_q)[:, None], shape
                    ),
                    (c.anchors, channels[latent]),
                )
                for site, (latent, sign) in _SITES.items()
            }
        else:
            self.embed_0 = nn.Dense(c.embed)
            self.embed_1 = nn.Dense(c.embed)
            zeros = nn.initializers.zeros
            self.heads = {
                site: nn.Dense(2 * channels[latent], kernel_init=zeros, name=f"head_{site}")
                for site, (latent, _) in _SITES.items()
            }

    def embedding(self, q: jax.Array) -> jax.Array:
        """λ embedding: sinusoidal features of q (8 octaves) → 2-layer MLP."""
        freqs = jnp.pi * 2.0 ** jnp.arange(8, dtype=jnp.float32)
        f = q[:, None] * freqs[None]
        h = jnp.concatenate([q[:, None], jnp.sin(f), jnp.cos(f)], axis=-1)
        return nn.silu(self.embed_1(nn.silu(self.embed_0(h))))

    def modulation(self, site: str, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(scale, shift) [B, C] of a site at q [B]."""
        q = jnp.asarray(q, jnp.float32).reshape(-1)
        c = self.config
        _, sign = _SITES[site]
        if c.kind == "gain":
            gains = self.log_gains[site]
            t = jnp.clip(q, 0.0, 1.0) * (c.anchors - 1)
            i = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, c.anchors - 2)
            w = (t - i)[:, None]
            log_scale = (1.0 - w) * gains[i] + w * gains[i + 1]
            shift = jnp.zeros_like(log_scale)
        else:
            out = self.heads[site](self.embedding(q))
            delta, shift = jnp.split(out, 2, axis=-1)
            log_scale = sign * c.prior_log_scale(q)[:, None] + delta
            shift = jnp.clip(shift, -MAX_SHIFT, MAX_SHIFT)
        return jnp.exp(jnp.clip(log_scale, -MAX_LOG_SCALE, MAX_LOG_SCALE)), shift

    def __call__(self, x: jax.Array, q: jax.Array, site: str) -> jax.Array:
        """x [B, h, w, C] modulated at `site` ('forward_y', 'inverse_y', 'forward_z',
        'inverse_z')."""
        scale, shift = self.modulation(site, q)
        return x * scale[:, None, None, :] + shift[:, None, None, :]

    def init_all(self, y: jax.Array, z: jax.Array, q: jax.Array):
        """Touches every site (initialisation)."""
        return [self(y if s.endswith("_y") else z, q, s) for s in _SITES]

    def inverse_z_grid(self) -> tuple[jax.Array, jax.Array]:
        """inverse_z's (scale, shift) [levels, C] at every grid q (for the integer table)."""
        q = jnp.arange(self.config.levels, dtype=jnp.float32) / (self.config.levels - 1)
        return self.modulation("inverse_z", q)


# ---------------------------------------------------------------------------------------------
# The integer side: inverse_z as a table, applied exactly on the host
# ---------------------------------------------------------------------------------------------


def z_inverse_tables(scale: np.ndarray, shift: np.ndarray) -> dict[str, np.ndarray]:
    """Integer inverse_z per grid index: scale on 2^-16, shift on 2^-12 (int32 [levels, C])."""
    scale = np.asarray(scale, np.float64)
    shift = np.asarray(shift, np.float64)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise fixedpoint.FixedPointOverflow("non-finite rate modulation")
    s = np.round(scale * (1 << SCALE_BITS)).astype(np.int64)
    b = fixedpoint.to_fixed(np.clip(shift, -MAX_SHIFT, MAX_SHIFT))
    return {"z_scale": s.astype(np.int32), "z_shift": b.astype(np.int32)}


def check_tables(tables: dict, levels: int, channels: int) -> None:
    """Refuses tables whose integer product could leave int64 or that do not fit the model."""
    s, b = np.asarray(tables["z_scale"]), np.asarray(tables["z_shift"])
    if s.shape != (levels, channels) or b.shape != (levels, channels):
        raise ValueError(f"rate tables of shape {s.shape} for {levels} levels x {channels}")
    if s.min() < 0 or s.max() > 1 << (SCALE_BITS + 9) or np.abs(b).max() > fixedpoint.ACT_LIMIT:
        raise fixedpoint.FixedPointOverflow("rate table out of range")


def inverse_z(tables: dict, z_hat_q: np.ndarray, index: int) -> np.ndarray:
    """ẑ on the 2^-12 grid [..., C] → round(ẑ·S / 2^16) + B (halves up), exactly, in int64."""
    s = np.asarray(tables["z_scale"][index], np.int64)
    b = np.asarray(tables["z_shift"][index], np.int64)
    z = np.clip(np.asarray(z_hat_q, np.int64), -fixedpoint.ACT_LIMIT, fixedpoint.ACT_LIMIT)
    return ((z * s + (1 << (SCALE_BITS - 1))) >> SCALE_BITS) + b
