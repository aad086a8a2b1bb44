"""Stable Diffusion AutoencoderKL (encoder, diagonal Gaussian, decoder) in Flax, NHWC.

Images in [-1, 1]; ``encode_latents`` / ``decode_latents`` apply the latent scaling
factor (0.18215 for SD 1.5) the way diffusers' pipelines do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models.diffusion_blocks import (
    IMAGE_AXES, Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, conv,
    norm_silu_conv_out)
from metamorph_jax.models.hf_config import check_fields

Dtype = Any

_FIXED_VAE_FIELDS = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# force_upcast is a pipeline hint about fp16; it changes nothing in the modules.
_IGNORED_VAE_FIELDS = ("force_upcast",)
_VAE_EPS = 1e-6  # diffusers builds every VAE norm with eps 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL (field names as in diffusers' config.json)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate("<VAEConfig>")

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        for name, kind in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            value = getattr(self, name)
            if len(value) != n or any(v != kind for v in value):
                raise BadInput(f"{source}: field {name!r} must be {n} x {kind!r}, got {value!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise BadInput(f"{source}: block_out_channels {c} not divisible by "
                               f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_hf(cls, raw: dict, source: str = "<vae config>") -> "VAEConfig":
        """From a diffusers AutoencoderKL config dict; `source` names the file in errors."""
        raw = dict(raw)
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise BadInput(f"{source}: _class_name {raw['_class_name']!r} is not AutoencoderKL")
        known = [f.name for f in dataclasses.fields(cls)]
        check_fields(raw, source, known, _FIXED_VAE_FIELDS, _IGNORED_VAE_FIELDS)
        if isinstance(raw.get("sample_size"), (list, tuple)):
            raise BadInput(f"{source}: non-square sample_size is not supported")
        try:
            return cls(**{k: raw[k] for k in known if k in raw})
        except ValueError as e:
            raise BadInput(str(e).replace("<VAEConfig>", source)) from None

    def to_hf(self) -> dict:
        """A config dict diffusers' AutoencoderKL accepts."""
        out = {k: (list(v) if isinstance(v, tuple) else v)
               for k, v in dataclasses.asdict(self).items()}
        out.update({k: v for k, v in _FIXED_VAE_FIELDS.items() if v is not None})
        out["_class_name"] = "AutoencoderKL"
        return out


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, single-head spatial attention, resnet."""

    channels: int
    num_groups: int
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        res = dict(num_groups=self.num_groups, epsilon=_VAE_EPS, use_temb=False, **kw)
        x = resnet_cls(self.channels, name="resnets_0", **res)(x)
        # diffusers: heads = channels // attention_head_dim with attention_head_dim = channels.
        x = SpatialSelfAttention(self.num_groups, _VAE_EPS, head_dim=self.channels,
                                 implementation=self.attention_impl, platform=self.platform,
                                 name="attentions_0", **kw)(x)
        return resnet_cls(self.channels, name="resnets_1", **res)(x)


class ResampleBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional down/upsampler."""

    channels: int
    num_layers: int
    num_groups: int
    kind: str  # "down" | "up"
    resample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        for j in range(self.num_layers):
            x = resnet_cls(self.channels, self.num_groups, _VAE_EPS, use_temb=False,
                           name=f"resnets_{j}", **kw)(x)
        if self.resample:
            if self.kind == "down":
                # The VAE encoder uses padding 0: torch pads right/bottom by one.
                x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
            else:
                x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,3] -> moments-to-be [B,h,w,2*latent] (before quant_conv)."""

    config: VAEConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(x)
        for i, channels in enumerate(cfg.block_out_channels):
            x = ResampleBlock(channels, cfg.layers_per_block, cfg.norm_num_groups, "down",
                              resample=i < n - 1, remat=self.remat, name=f"down_blocks_{i}",
                              **kw)(x)
        x = VAEMidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, remat=self.remat,
                        attention_impl=self.attention_impl, platform=self.platform,
                        name="mid_block", **kw)(x)
        return norm_silu_conv_out(x, 2 * cfg.latent_channels, cfg.norm_num_groups, _VAE_EPS, **kw)


class Decoder(nn.Module):
    """Latent [B,h,w,latent] (after post_quant_conv) -> image [B,H,W,3]."""

    config: VAEConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        rev = cfg.block_out_channels[::-1]
        x = conv(rev[0], 3, "conv_in", **kw)(z)
        x = VAEMidBlock(rev[0], cfg.norm_num_groups, remat=self.remat,
                        attention_impl=self.attention_impl, platform=self.platform,
                        name="mid_block", **kw)(x)
        for i, channels in enumerate(rev):
            x = ResampleBlock(channels, cfg.layers_per_block + 1, cfg.norm_num_groups, "up",
                              resample=i < n - 1, remat=self.remat, name=f"up_blocks_{i}", **kw)(x)
        return norm_silu_conv_out(x, cfg.out_channels, cfg.norm_num_groups, _VAE_EPS, **kw)


class AutoencoderKL(nn.Module):
    """encode -> (mean, logvar); decode(z) -> image. NHWC, images in [-1, 1].

    ``__call__`` (used for init) runs encode then decode of the mean.
    """

    config: VAEConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sub = dict(config=self.config, remat=self.remat, attention_impl=self.attention_impl,
                   platform=self.platform, **kw)
        latent = self.config.latent_channels
        self.encoder = Encoder(**sub)
        self.decoder = Decoder(**sub)
        self.quant_conv = conv(2 * latent, 1, "quant_conv", padding=((0, 0), (0, 0)),
                               out_axis="image_channels", **kw)
        self.post_quant_conv = conv(latent, 1, "post_quant_conv", padding=((0, 0), (0, 0)),
                                    out_axis="image_channels", **kw)

    def encode(self, images):
        """images [B,H,W,C] -> (mean, logvar) of the posterior, logvar clipped to [-30, 20]."""
        x = nn.with_logical_constraint(images.astype(self.dtype), IMAGE_AXES)
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents [B,h,w,latent] -> images [B,H,W,C]."""
        z = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(z)

    def encode_latents(self, images, rng: Optional[jax.Array] = None):
        """Scaled latents for the UNet: a posterior sample (the mean if rng is None) times
        scaling_factor."""
        mean, logvar = self.encode(images)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return z * self.config.scaling_factor

    def decode_latents(self, latents):
        """Images from scaled latents (divides by scaling_factor first)."""
        return self.decode(latents / self.config.scaling_factor)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)
