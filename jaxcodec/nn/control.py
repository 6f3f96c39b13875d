"""ControlNet-XS-style control adapter on a frozen UNet (RDEIC's and ResULIC's control path).

Structure (Zavadski et al. 2023, as diffusers' ``ControlNetXSAdapter`` / ``UNetControlNetXSModel``
lay it out): a narrow copy of the UNet's encoder and middle (``size_ratio`` × the base widths,
attention heads of ``head_channels``) runs in lock-step with the frozen UNet. Before every
sub-block the base feature is sent to the control branch (``base_to_ctrl``, zero 1×1 conv,
concatenated); after it the control feature is added back (``ctrl_to_base``, zero 1×1 conv).
The decoder receives control skips through ``up_connections``. All connections start at zero,
so at initialisation the controlled UNet *is* the frozen UNet.

Hint: ``hint_mode='concat'`` (jaxcodec, RDEIC): the control ``conv_in`` sees
``concat(x_t, hint)`` where the hint is a feature map at latent resolution (e.g. 256 channels
at H/8). ``hint_mode='embedding'`` (diffusers): an image-space condition goes through
``controlnet_cond_embedding`` (strided convs, zero-initialised output) and is added after
``conv_in`` — this mode loads diffusers ``ControlNetXSAdapter`` checkpoints.

Two wirings of the same parts (``ControlAdapterConfig``):

- ``base_to_control=True`` (ControlNet-XS, diffusers): the control branch also *reads* the base
  (``base_to_ctrl`` concatenations), and shares the base's time embedding.
- ``base_to_control=True`` + ``time_embedding='own'`` (ResULIC's official ``CDDM``): both
  directions — the base's output of every encoder sub-block is sent through a zero 1×1 conv
  (``enc_zero_convs_in``) and concatenated to the control stream before the next sub-block (and
  the middle block), as ControlNet-XS does — with the control branch's own time embedding and
  hint ``concat(x_t, z_c)``. :meth:`ControlAdapterConfig.resulic` is that layout; its
  parameter paths are RDEIC's plus ``base_to_ctrl`` convs.
- ``base_to_control=False`` + ``time_embedding='own'`` (RDEIC's official ``ControlModule``): the
  control branch is an independent narrow UNet encoder+middle with its own time-embedding MLP;
  it only *writes* into the base through the zero convs (encoder outputs, middle, decoder
  inputs). Reading the 1280-channel base features is what makes the diffusers adapter of SD 2.1
  2.6× larger (52.9 M vs RDEIC's 20.1 M + 4.5 M zero convs): its resnets see
  ``control + base`` channels. :meth:`ControlAdapterConfig.rdeic` is RDEIC's layout.

Parameters live under ``{'unet': ..., 'adapter': ...}``; :func:`param_labels` /
:func:`trainable_mask` give optax the frozen/trainable partition.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers
from jaxcodec.nn.attention import Transformer2D
from jaxcodec.nn.resnet import Downsample2D, ResnetBlock2D, TimestepEmbedding, timestep_embedding
from jaxcodec.nn.unet import UNet, UNetConfig, UNetMidBlock


def largest_group_count(channels: int, max_groups: int = 32) -> int:
    """The largest group count ≤ ``max_groups`` dividing ``channels`` (odd adapter widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


@dataclasses.dataclass(frozen=True)
class ControlAdapterConfig:
    """Widths and hint wiring of the adapter; the base UNet's config supplies the rest."""

    size_ratio: float | None = 0.2
    block_out_channels: tuple[int, ...] | None = None  # overrides size_ratio
    head_channels: int | None = 16  # heads = width // head_channels ...
    num_attention_heads: tuple[int, ...] | None = None  # ... unless given explicitly
    hint_mode: str = "concat"  # 'concat' | 'embedding'
    hint_channels: int = 256  # 'concat' mode: channels of the latent-resolution hint
    conditioning_channels: int = 3  # 'embedding' mode: channels of the image-space condition
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    max_norm_num_groups: int = 32
    # ControlNet-XS reads the base before every sub-block; RDEIC's ControlModule does not.
    base_to_control: bool = True
    # 'base': the control branch uses the base UNet's time embedding (ControlNet-XS);
    # 'own': it has its own time-embedding MLP on the same sinusoidal features (RDEIC).
    time_embedding: str = "base"
    # GroupNorm eps of the control middle block's resnets (diffusers: 1e-6, LDM/RDEIC: 1e-5).
    mid_resnet_eps: float = 1e-6

    def __post_init__(self):
        if self.hint_mode not in ("concat", "embedding"):
            raise ValueError(f"hint_mode must be 'concat' or 'embedding', got {self.hint_mode!r}")
        if (self.size_ratio is None) == (self.block_out_channels is None):
            raise ValueError("give exactly one of size_ratio and block_out_channels")
        if self.time_embedding not in ("base", "own"):
            raise ValueError(f"time_embedding must be 'base' or 'own', got {self.time_embedding!r}")

    @classmethod
    def rdeic(
        cls, size_ratio: float = 0.2, head_channels: int = 16, hint_channels: int = 256
    ) -> ControlAdapterConfig:
        """RDEIC's ``ControlModule`` + zero convs (official ``NoiseEstimator``): no base→control
        reads, own time embedding, LDM's GroupNorm eps in the middle block."""
        return cls(
            size_ratio=size_ratio,
            head_channels=head_channels,
            hint_mode="concat",
            hint_channels=hint_channels,
            base_to_control=False,
            time_embedding="own",
            mid_resnet_eps=1e-5,
        )

    @classmethod
    def resulic(
        cls, size_ratio: float = 0.2, head_channels: int = 16, hint_channels: int = 4
    ) -> ControlAdapterConfig:
        """ResULIC's ``CDDM`` (official ``ControlModule`` + zero convs both ways): reads the
        base before every sub-block, own time embedding, hint z_c, LDM's GroupNorm eps."""
        return dataclasses.replace(
            cls.rdeic(size_ratio, head_channels, hint_channels), base_to_control=True
        )

    def widths(self, base: UNetConfig) -> tuple[int, ...]:
        if self.block_out_channels is not None:
            return tuple(self.block_out_channels)
        return tuple(int(b * self.size_ratio) for b in base.block_out_channels)

    def heads(self, base: UNetConfig) -> tuple[int, ...]:
        if self.num_attention_heads is not None:
            return tuple(self.num_attention_heads)
        return tuple(max(1, w // self.head_channels) for w in self.widths(base))

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> ControlAdapterConfig:
        """From a diffusers ``ControlNetXSAdapter`` config.json (always 'embedding' mode)."""
        if config.get("learn_time_embedding", False):
            raise ValueError("learn_time_embedding=True adapters are not supported")
        if config.get("conditioning_channel_order", "rgb") != "rgb":
            raise ValueError("only conditioning_channel_order='rgb' is supported")
        heads = config.get("num_attention_heads", 4)
        n = len(config["block_out_channels"])
        heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * n
        return cls(
            size_ratio=None,
            block_out_channels=tuple(config["block_out_channels"]),
            head_channels=None,
            num_attention_heads=heads,
            hint_mode="embedding",
            conditioning_channels=config.get("conditioning_channels", 3),
            conditioning_embedding_out_channels=tuple(
                config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
            ),
            max_norm_num_groups=config.get("max_norm_num_groups", 32),
        )


def _zero_conv(features: int, kw: dict) -> nn.Conv:
    """ControlNet's zero connection: a 1×1 conv whose kernel and bias start at 0."""
    return layers.conv(features, 1, zero_init=True, **kw)


class ConditioningEmbedding(nn.Module):
    """diffusers ``ControlNetConditioningEmbedding``: conv, (conv, strided conv)×, zero conv."""

    out_channels: int
    channels: tuple[int, ...]
    kw: Any = None

    @nn.compact
    def __call__(self, cond):
        kw = self.kw or {}
        h = nn.silu(layers.conv(self.channels[0], 3, name="conv_in", **kw)(cond))
        k = 0
        for c_in, c_out in zip(self.channels[:-1], self.channels[1:], strict=True):
            h = nn.silu(layers.conv(c_in, 3, name=f"blocks_{k}", **kw)(h))
            h = nn.silu(layers.conv(c_out, 3, stride=2, name=f"blocks_{k + 1}", **kw)(h))
            k += 2
        return layers.conv(self.out_channels, 3, zero_init=True, name="conv_out", **kw)(h)


class AdapterDownBlock(nn.Module):
    """One encoder level of the control branch with its connections to and from the base."""

    base_in: int
    base_out: int
    ctrl_in: int
    ctrl_out: int
    num_layers: int
    has_attention: bool
    heads: int
    add_downsample: bool
    base: UNetConfig
    max_groups: int = 32
    transformer_layers: int = 1
    base_to_control: bool = True

    def setup(self):
        c = self.base
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        Res = layers.remat(ResnetBlock2D, c.remat, "resnet")
        Tr = layers.remat(Transformer2D, c.remat, "attention")
        b2c, c2b, resnets, attentions = [], [], [], []
        for i in range(self.num_layers):
            base_in = self.base_in if i == 0 else self.base_out
            ctrl_in = self.ctrl_in if i == 0 else self.ctrl_out
            read = base_in if self.base_to_control else 0  # channels read from the base
            if read:
                b2c.append(_zero_conv(base_in, kw))
            resnets.append(
                Res(
                    self.ctrl_out,
                    groups=largest_group_count(ctrl_in + read, self.max_groups),
                    groups_out=largest_group_count(self.ctrl_out, self.max_groups),
                    eps=1e-5,
                    **kw,
                )
            )
            if self.has_attention:
                attentions.append(
                    Tr(
                        self.heads,
                        self.ctrl_out // self.heads,
                        self.transformer_layers,
                        largest_group_count(self.ctrl_out, self.max_groups),
                        c.cross_attention_dim is not None,
                        c.use_linear_projection,
                        c.attention_impl,
                        **kw,
                    )
                )
            c2b.append(_zero_conv(self.base_out, kw))
        if self.add_downsample:
            if self.base_to_control:
                b2c.append(_zero_conv(self.base_out, kw))
            c2b.append(_zero_conv(self.base_out, kw))
            self.downsamplers = Downsample2D(self.ctrl_out, 1, **kw)
        if self.base_to_control:
            self.base_to_ctrl = b2c
        self.ctrl_to_base = c2b
        self.resnets = resnets
        if self.has_attention:
            self.attentions = attentions

    def __call__(self, *args, **kwargs):
        raise TypeError("AdapterDownBlock is driven step by step by ControlledUNet")


class AdapterMidBlock(nn.Module):
    base_channels: int
    ctrl_channels: int
    heads: int
    base: UNetConfig
    max_groups: int = 32
    base_to_control: bool = True
    resnet_eps: float = 1e-6

    def setup(self):
        c = self.base
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        read = self.base_channels if self.base_to_control else 0
        g = largest_group_count(
            math.gcd(self.ctrl_channels, self.ctrl_channels + read), self.max_groups
        )
        if self.base_to_control:
            self.base_to_ctrl = _zero_conv(self.base_channels, kw)
        self.midblock = UNetMidBlock(
            self.ctrl_channels,
            self.heads,
            c.transformer_layers[-1],
            c.cross_attention_dim is not None,
            c,
            groups=g,
            groups_out=g,
            resnet_eps=self.resnet_eps,
        )
        self.ctrl_to_base = _zero_conv(self.base_channels, kw)

    def __call__(self, h_base, h_ctrl, base_mid, temb, context, scale, temb_ctrl=None):
        if self.base_to_control:
            h_ctrl = jnp.concatenate([h_ctrl, self.base_to_ctrl(h_base)], axis=-1)
        h_base = base_mid(h_base, temb, context)
        h_ctrl = self.midblock(h_ctrl, temb if temb_ctrl is None else temb_ctrl, context)
        return h_base + self.ctrl_to_base(h_ctrl) * scale, h_ctrl


class UpConnection(nn.Module):
    """Zero convs adding the control skips to the base decoder's inputs (one per resnet)."""

    base_channels: tuple[int, ...]
    kw: Any = None

    def setup(self):
        self.ctrl_to_base = [
            _zero_conv(ch, self.kw or {}) for i, ch in enumerate(self.base_channels)
        ]

    def __call__(self, i, skip, scale):
        return self.ctrl_to_base[i](skip) * scale


class ControlAdapter(nn.Module):
    """The trainable half. Names follow diffusers' ``ControlNetXSAdapter``."""

    base: UNetConfig
    config: ControlAdapterConfig

    def setup(self):
        c, a = self.base, self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        widths, heads = a.widths(c), a.heads(c)
        if len(widths) != len(c.block_out_channels) or len(heads) != len(widths):
            raise ValueError("adapter widths/heads need one entry per UNet level")
        if c.mid_block_type is None:
            raise ValueError("ControlNet-XS needs a UNet with a mid block")
        g = a.max_norm_num_groups
        if a.time_embedding == "own":
            self.time_embedding = TimestepEmbedding(c.time_embed_dim, **kw)
        if a.hint_mode == "embedding":
            self.controlnet_cond_embedding = ConditioningEmbedding(
                widths[0], a.conditioning_embedding_out_channels, kw
            )
        self.conv_in = layers.conv(widths[0], 3, **kw)
        self.control_to_base_for_conv_in = _zero_conv(c.block_out_channels[0], kw)
        base_boc, n = c.block_out_channels, len(widths)
        self.down_blocks = [
            AdapterDownBlock(
                base_boc[max(i - 1, 0)],
                base_boc[i],
                widths[max(i - 1, 0)],
                widths[i],
                c.layers_per_block,
                c.down_block_types[i] == "CrossAttnDownBlock2D",
                heads[i],
                i < n - 1,
                c,
                g,
                c.transformer_layers[i],
                a.base_to_control,
            )
            for i in range(n)
        ]
        # diffusers builds the middle with its default cap of 32 groups, not max_norm_num_groups.
        self.mid_block = AdapterMidBlock(
            base_boc[-1], widths[-1], heads[-1], c, 32, a.base_to_control, a.mid_resnet_eps
        )
        # Decoder: level i (from the bottom) has layers_per_block + 1 resnets; resnet j's input
        # width is the previous level's output for j == 0, this level's otherwise.
        rev = list(reversed(base_boc))
        self.up_connections = [
            UpConnection(
                tuple(
                    rev[max(i - 1, 0)] if j == 0 else rev[i] for j in range(c.layers_per_block + 1)
                ),
                kw,
            )
            for i in range(n)
        ]

    def embed_time(self, timesteps, batch: int):
        """The control branch's own time embedding (``time_embedding='own'``), on the base
        UNet's sinusoidal features (RDEIC: 320 → 1280 → 1280)."""
        c = self.base
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(emb.astype(c.compute_dtype))

    def embed_hint(self, sample, hint):
        """The control branch's stem: conv_in on concat(x_t, hint), or conv_in + embedding."""
        if self.config.hint_mode == "concat":
            x = sample if hint is None else jnp.concatenate([sample, hint.astype(sample.dtype)], -1)
            return self.conv_in(x)
        h = self.conv_in(sample)
        if hint is not None:
            h = h + self.controlnet_cond_embedding(hint.astype(sample.dtype))
        return h

    def __call__(self, *args, **kwargs):
        raise TypeError("ControlAdapter is driven step by step by ControlledUNet")


class ControlledUNet(nn.Module):
    """Frozen ``unet`` + trainable ``adapter``, run in lock-step (ControlNet-XS)."""

    unet_config: UNetConfig
    adapter_config: ControlAdapterConfig = ControlAdapterConfig()

    def setup(self):
        self.unet = UNet(self.unet_config)
        self.adapter = ControlAdapter(self.unet_config, self.adapter_config)

    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray,
        encoder_hidden_states: jnp.ndarray | None,
        hint: jnp.ndarray | None,
        conditioning_scale: float | jnp.ndarray = 1.0,
    ) -> jnp.ndarray:
        """ε (or v) prediction of the controlled UNet; NHWC like :class:`UNet`."""
        c = self.unet_config
        unet, adapter, s = self.unet, self.adapter, conditioning_scale
        context = encoder_hidden_states
        sample = sample.astype(c.compute_dtype)
        temb = unet.embed_time(timesteps, sample.shape[0])
        own_time = self.adapter_config.time_embedding == "own"
        temb_c = adapter.embed_time(timesteps, sample.shape[0]) if own_time else temb
        read = self.adapter_config.base_to_control

        h_base = unet.conv_in(sample)
        h_ctrl = adapter.embed_hint(sample, hint)
        h_base = h_base + adapter.control_to_base_for_conv_in(h_ctrl) * s
        hs_base, hs_ctrl = [h_base], [h_ctrl]

        for base_block, ctrl_block in zip(unet.down_blocks, adapter.down_blocks, strict=True):
            for j in range(c.layers_per_block):
                if read:
                    h_ctrl = jnp.concatenate([h_ctrl, ctrl_block.base_to_ctrl[j](h_base)], -1)
                h_base = base_block.resnets[j](h_base, temb)
                if base_block.has_attention:
                    h_base = base_block.attentions[j](h_base, context)
                h_ctrl = ctrl_block.resnets[j](h_ctrl, temb_c)
                if ctrl_block.has_attention:
                    h_ctrl = ctrl_block.attentions[j](h_ctrl, context)
                h_base = h_base + ctrl_block.ctrl_to_base[j](h_ctrl) * s
                hs_base.append(h_base)
                hs_ctrl.append(h_ctrl)
            if base_block.add_downsample:
                if read:
                    h_ctrl = jnp.concatenate([h_ctrl, ctrl_block.base_to_ctrl[-1](h_base)], -1)
                h_base = base_block.downsamplers[0](h_base)
                h_ctrl = ctrl_block.downsamplers(h_ctrl)
                h_base = h_base + ctrl_block.ctrl_to_base[-1](h_ctrl) * s
                hs_base.append(h_base)
                hs_ctrl.append(h_ctrl)

        h_base, h_ctrl = adapter.mid_block(h_base, h_ctrl, unet.mid_block, temb, context, s, temb_c)

        h = h_base
        for base_block, connection in zip(unet.up_blocks, adapter.up_connections, strict=True):
            n = base_block.num_layers
            skips_b, skips_c = hs_base[-n:], hs_ctrl[-n:]
            hs_base, hs_ctrl = hs_base[:-n], hs_ctrl[:-n]
            for j in range(n):
                h = h + connection(j, skips_c[-1 - j], s)
                h = base_block.subblock(j, h, skips_b[-1 - j], temb, context)
            if base_block.add_upsample:
                h = base_block.upsamplers[0](h, hs_base[-1].shape[1:3])
        return unet.output(h)


# ----------------------------------------------------------------------------- partition


def param_labels(params) -> dict:
    """optax ``multi_transform`` labels: ``'frozen'`` for the SD UNet, ``'trainable'`` else."""
    return {
        k: jax.tree.map(lambda _, k=k: "frozen" if k == "unet" else "trainable", v)
        for k, v in params.items()
    }


def trainable_mask(params) -> dict:
    """Boolean mask (True = trainable adapter parameter) for ``optax.masked``."""
    return jax.tree.map(lambda label: label == "trainable", param_labels(params))


def controlled_param_shapes(unet_config: UNetConfig, adapter_config: ControlAdapterConfig):
    """Parameter shapes of a :class:`ControlledUNet` via ``jax.eval_shape``."""
    side = 2 ** (len(unet_config.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, unet_config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = None
    if unet_config.cross_attention_dim is not None:
        ctx = jax.ShapeDtypeStruct((1, 1, unet_config.cross_attention_dim), jnp.float32)
    if adapter_config.hint_mode == "concat":
        hint = jax.ShapeDtypeStruct((1, side, side, adapter_config.hint_channels), jnp.float32)
    else:
        n = len(adapter_config.conditioning_embedding_out_channels) - 1
        hint = jax.ShapeDtypeStruct(
            (1, side * 2**n, side * 2**n, adapter_config.conditioning_channels), jnp.float32
        )
    module = ControlledUNet(unet_config, adapter_config)
    init = lambda *a: module.init(jax.random.key(0), *a)
    return jax.eval_shape(init, x, t, ctx, hint)["params"]
