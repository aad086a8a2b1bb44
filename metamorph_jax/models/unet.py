"""Stable Diffusion 1.5 UNet2DConditionModel in Flax (NHWC inside).

Architecture as diffusers defines it: conv_in, sinusoidal timestep embedding ->
TimestepEmbedding MLP, down blocks (ResNet blocks + spatial transformers with self-
and cross-attention, strided-conv downsamplers), a cross-attention mid block, up
blocks fed by the skip connections (nearest upsampling + conv), GroupNorm, SiLU,
conv_out. Any size, from a tiny test model to SD 1.5; ``UNetConfig.from_hf`` reads
a diffusers ``unet/config.json``'s dict.

Note diffusers' historical naming: SD 1.5's ``attention_head_dim`` is really the
*number of heads* per block (head width = channels // heads); we keep that meaning.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models.hf_config import check_fields
from metamorph_jax.models.diffusion_blocks import (
    IMAGE_AXES, Downsample2D, ResnetBlock2D, Transformer2D, Upsample2D, conv, dense,
    norm_silu_conv_out)

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config fields we accept only at the value SD 1.x uses (anything else would need
# modules we do not build). Fields not listed here and not dataclass fields are errors too.
_FIXED_UNET_FIELDS = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "act_fn": "silu",
    "only_cross_attention": False,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "dropout": 0.0,
}
# Accepted for any value; they change nothing in fp32 math we implement.
_IGNORED_UNET_FIELDS = ("upcast_attention",)


def _per_block(value, n: int, name: str, source: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise BadInput(f"{source}: field {name!r} has {len(value)} entries, expected {n}")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet2DConditionModel (field names as in diffusers' config.json)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: tuple = (8, 8, 8, 8)  # heads per block (diffusers' naming)
    use_linear_projection: bool = False

    def __post_init__(self):
        # Normalise lists from JSON into tuples so the config stays hashable.
        for name in ("down_block_types", "up_block_types", "block_out_channels",
                     "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,) * len(self.block_out_channels)
            object.__setattr__(self, name, tuple(value))
        self.validate("<UNetConfig>")

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "attention_head_dim"):
            if len(getattr(self, name)) != n:
                raise BadInput(f"{source}: field {name!r} needs {n} entries (one per block)")
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise BadInput(f"{source}: down_block_types entry {t!r} not supported "
                               f"({DOWN_BLOCKS})")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise BadInput(f"{source}: up_block_types entry {t!r} not supported "
                               f"({UP_BLOCKS})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise BadInput(f"{source}: block_out_channels {c} not divisible by "
                               f"norm_num_groups={self.norm_num_groups}")
        for c, h in zip(self.block_out_channels, self.attention_head_dim):
            if c % h:
                raise BadInput(f"{source}: block_out_channels {c} not divisible by "
                               f"attention_head_dim (heads) {h}")

    @classmethod
    def from_hf(cls, raw: dict, source: str = "<unet config>") -> "UNetConfig":
        """From a diffusers UNet2DConditionModel config dict (config.json's contents);
        `source` names the file in error messages."""
        raw = dict(raw)
        if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise BadInput(f"{source}: _class_name {raw['_class_name']!r} is not "
                           "UNet2DConditionModel")
        known = [f.name for f in dataclasses.fields(cls)]
        check_fields(raw, source, known, _FIXED_UNET_FIELDS, _IGNORED_UNET_FIELDS)
        kwargs = {k: raw[k] for k in known if k in raw}
        for name in ("layers_per_block", "cross_attention_dim"):
            if isinstance(kwargs.get(name), (list, tuple)):
                raise BadInput(f"{source}: per-block {name!r} is not supported (one int only)")
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        if "attention_head_dim" in kwargs:
            kwargs["attention_head_dim"] = _per_block(kwargs["attention_head_dim"], n,
                                                      "attention_head_dim", source)
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            raise BadInput(f"{source}: non-square sample_size is not supported")
        try:
            config = cls(**kwargs)
        except ValueError as e:
            raise BadInput(str(e).replace("<UNetConfig>", source)) from None
        return config

    def to_hf(self) -> dict:
        """A config dict diffusers' UNet2DConditionModel accepts."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        out.update({k: v for k, v in _FIXED_UNET_FIELDS.items() if v is not None})
        out["_class_name"] = "UNet2DConditionModel"
        return out


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, "linear_1", axes=("embed", "mlp"), **kw)(x)
        return dense(self.features, "linear_2", axes=("mlp", "embed"), **kw)(nn.silu(x))


class UNetBlock(nn.Module):
    """One down or up block: (resnet [+ transformer]) x num_layers [+ down/upsampler].

    Up blocks consume one skip tensor per resnet (concatenated on channels, hidden first).
    Returns (x, outputs) where outputs are the states a down block hands to the skips.
    """

    config: UNetConfig
    channels: int
    heads: int
    num_layers: int
    cross_attention: bool
    kind: str  # "down" | "up"
    resample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x, temb, context, skips=()):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        skips = list(skips)
        outputs = []
        for j in range(self.num_layers):
            if self.kind == "up":
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet_cls(self.channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}",
                           **kw)(x, temb)
            if self.cross_attention:
                x = Transformer2D(self.heads, self.channels // self.heads, cfg.norm_num_groups,
                                  use_linear_projection=cfg.use_linear_projection, remat=self.remat,
                                  implementation=self.attention_impl, platform=self.platform,
                                  name=f"attentions_{j}", **kw)(x, context)
            outputs.append(x)
        if self.resample:
            if self.kind == "down":
                x = Downsample2D(self.channels, cfg.downsample_padding, name="downsamplers_0",
                                 **kw)(x)
                outputs.append(x)
            else:
                x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x, outputs


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    config: UNetConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        channels = cfg.block_out_channels[-1]
        heads = cfg.attention_head_dim[-1]
        res = dict(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps,
                   output_scale_factor=cfg.mid_block_scale_factor, **kw)
        x = resnet_cls(channels, name="resnets_0", **res)(x, temb)
        x = Transformer2D(heads, channels // heads, cfg.norm_num_groups,
                          use_linear_projection=cfg.use_linear_projection, remat=self.remat,
                          implementation=self.attention_impl, platform=self.platform,
                          name="attentions_0", **kw)(x, context)
        return resnet_cls(channels, name="resnets_1", **res)(x, temb)


class UNet2DConditionModel(nn.Module):
    """sample [B,H,W,C_in] (NHWC), timesteps [B] or scalar, context [B,L,D] -> [B,H,W,C_out].

    ``remat`` rematerialises every ResNet and transformer block (activation memory for
    compute); ``attention_impl`` and ``platform`` (the devices it is compiled for,
    sharding.mesh_platform; None: jax.default_backend()) pick the attention kernel
    (layers.dot_product_attention).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(config=cfg, remat=self.remat, attention_impl=self.attention_impl,
                   platform=self.platform, **kw)
        n_blocks = len(cfg.block_out_channels)
        factor = 2 ** (n_blocks - 1)
        if sample.ndim != 4 or sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"UNet: sample must be [B,H,W,C] with H, W multiples of {factor}; "
                             f"got shape {sample.shape}")
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet: encoder_hidden_states width {encoder_hidden_states.shape[-1]} "
                             f"!= cross_attention_dim {cfg.cross_attention_dim}")
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, (sample.shape[0],))

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        x = nn.with_logical_constraint(sample.astype(self.dtype), IMAGE_AXES)

        t_sin = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
        temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, name="time_embedding", **kw)(
            t_sin.astype(self.dtype))

        x = conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(x)
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, outs = UNetBlock(channels=cfg.block_out_channels[i], heads=cfg.attention_head_dim[i],
                                num_layers=cfg.layers_per_block,
                                cross_attention=block_type == "CrossAttnDownBlock2D", kind="down",
                                resample=i < n_blocks - 1, name=f"down_blocks_{i}", **blk)(
                                    x, temb, context)
            skips.extend(outs)

        x = MidBlock(name="mid_block", **blk)(x, temb, context)

        rev_channels = cfg.block_out_channels[::-1]
        rev_heads = cfg.attention_head_dim[::-1]
        per_up = cfg.layers_per_block + 1
        for i, block_type in enumerate(cfg.up_block_types):
            block_skips = skips[-per_up:]
            skips = skips[:-per_up]
            x, _ = UNetBlock(channels=rev_channels[i], heads=rev_heads[i], num_layers=per_up,
                             cross_attention=block_type == "CrossAttnUpBlock2D", kind="up",
                             resample=i < n_blocks - 1, name=f"up_blocks_{i}", **blk)(
                                 x, temb, context, block_skips)

        x = norm_silu_conv_out(x, cfg.out_channels, cfg.norm_num_groups, cfg.norm_eps, **kw)
        return nn.with_logical_constraint(x, IMAGE_AXES)
