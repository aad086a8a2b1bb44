"""Building blocks shared by the Stable Diffusion UNet and VAE (NHWC layout).

Submodule names follow diffusers' attribute names (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out_0``, ``ff/net_0/proj`` ...) so that the
checkpoint converter is a table of name patterns. Norms and softmax run in fp32;
everything else in the configured compute dtype.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.models.layers import dot_product_attention, layer_norm

Dtype = Any

# Logical axis names for the image tensors flowing through the UNet / VAE.
IMAGE_AXES = ("batch", "height", "width", "channels")
TOKEN_AXES = ("batch", "length", "embed")


def conv(features: int, kernel: int, name: str, *, stride: int = 1, padding=None,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         out_axis: str = "conv_out") -> nn.Conv:
    """A 2-D convolution with torch-style symmetric padding (kernel // 2 unless given).

    out_axis: logical name of the output-channel axis; convs that emit image or latent
    channels (3, 4, 8: too few to shard) use "image_channels", which rules leave alone."""
    if padding is None:
        pad = kernel // 2
        padding = ((pad, pad), (pad, pad))
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
        name=name,
    )


def dense(features: int, name: str, *, use_bias: bool = True, axes=("embed", "mlp"),
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis of NHWC input, in fp32.

    Statistics are per-channel sums over H*W first, then summed within each group: on
    CPU this is several times faster than reducing over (H*W, C/G) at once (the flax
    GroupNorm path). Two-pass variance, as torch computes it. Params: scale, bias.
    """

    num_groups: int
    epsilon: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, channels = x.shape[0], x.shape[-1]
        groups = self.num_groups
        if channels % groups:
            raise ValueError(f"GroupNorm {self.name}: {channels} channels are not divisible by "
                             f"norm_num_groups={groups}")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("channels",)),
                           (channels,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("channels",)),
                          (channels,), self.param_dtype)
        per_group = channels // groups
        flat = x.astype(jnp.float32).reshape(batch, -1, channels)
        count = flat.shape[1] * per_group

        def group_mean(values):  # [B, HW, C] -> per-group mean broadcast back to [B, 1, C]
            sums = jnp.sum(values, axis=1).reshape(batch, groups, per_group).sum(-1)
            return jnp.repeat(sums / count, per_group, axis=1)[:, None, :]

        centred = flat - group_mean(flat)
        inv = jax.lax.rsqrt(group_mean(centred * centred) + self.epsilon)
        out = centred * inv * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.reshape(x.shape)


def group_norm(num_groups: int, epsilon: float, name: str, param_dtype: Dtype):
    """A GroupNorm whose params sit directly at ``name`` (scale, bias)."""
    return GroupNorm(num_groups, epsilon, param_dtype, name=name)


def norm_silu_conv_out(x, features: int, num_groups: int, epsilon: float, *,
                       dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    """The UNet's and the VAE's tail: GroupNorm "conv_norm_out" (fp32), SiLU, 3x3 "conv_out".

    Call inside a compact module: the two layers become its children.
    """
    x = group_norm(num_groups, epsilon, "conv_norm_out", param_dtype)(
        x.astype(jnp.float32)).astype(dtype)
    return conv(features, 3, "conv_out", out_axis="image_channels", dtype=dtype,
                param_dtype=param_dtype)(nn.silu(x))


def _norm(module: nn.Module, x):
    """Apply an fp32 norm module and return in the input dtype."""
    return module(x.astype(jnp.float32)).astype(x.dtype)


def attention(q, k, v, num_heads: int, implementation: Optional[str] = None,
              platform: Optional[str] = None):
    """Multi-head scaled dot-product attention on [B, T, H*D] projections.

    implementation: anything layers.dot_product_attention takes (None = its automatic
    choice for `platform`: plain einsums on CPU, splash attention on TPU and cuDNN flash
    attention on GPU where they apply). platform: the devices the model is compiled for
    (sharding.mesh_platform; None = jax.default_backend()).
    """
    batch, q_len, width = q.shape
    head_dim = width // num_heads
    split = lambda a: a.reshape(batch, a.shape[1], num_heads, head_dim)  # noqa: E731
    out = dot_product_attention(split(q), split(k), split(v), implementation=implementation,
                                platform=platform)
    return out.reshape(batch, q_len, width)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, SiLU)."""

    out_channels: int
    num_groups: int
    epsilon: float
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(group_norm(self.num_groups, self.epsilon, "norm1", self.param_dtype), x)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        if self.use_temb:
            t = dense(self.out_channels, "time_emb_proj", axes=("mlp", "conv_out"), **kw)(
                nn.silu(temb))
            # Batch-sharded, channels whole: without this, FSDP rules that shard conv_out
            # make XLA replicate the [B, H, W, C] gradient to reduce it.
            t = nn.with_logical_constraint(t, ("batch", "channels"))
            h = h + t[:, None, None, :]
        h = _norm(group_norm(self.num_groups, self.epsilon, "norm2", self.param_dtype), h)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", padding=((0, 0), (0, 0)), **kw)(x)
        out = (x + h) / self.output_scale_factor
        return nn.with_logical_constraint(out, IMAGE_AXES)


class Downsample2D(nn.Module):
    """Strided 3x3 conv; padding 0 means torch's asymmetric (right/bottom) pad of 1."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.padding
        pad = ((p, p), (p, p)) if p > 0 else ((0, 1), (0, 1))
        return conv(self.channels, 3, "conv", stride=2, padding=pad,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Attention(nn.Module):
    """diffusers Attention as used by BasicTransformerBlock: bias-free q/k/v, biased out."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_heads * self.head_dim
        context = x if context is None else context
        q = dense(inner, "to_q", use_bias=False, axes=("embed", "heads"), **kw)(x)
        k = dense(inner, "to_k", use_bias=False, axes=("embed", "heads"), **kw)(context)
        v = dense(inner, "to_v", use_bias=False, axes=("embed", "heads"), **kw)(context)
        out = attention(q, k, v, self.num_heads, self.implementation, self.platform)
        return dense(x.shape[-1], "to_out_0", axes=("heads", "embed"), **kw)(out)


class GEGLU(nn.Module):
    """Linear to 2*inner, split into (hidden, gate), hidden * gelu(gate) (exact GELU)."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(2 * self.inner_dim, "proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: net.0 (GEGLU) -> net.2 (Linear)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
        return dense(dim, "net_2", axes=("mlp", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    num_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim,
                    implementation=self.implementation, platform=self.platform, **kw)
        h = _norm(layer_norm(self.norm_eps, "norm1", self.param_dtype), x)
        x = x + Attention(name="attn1", **attn)(h)
        h = _norm(layer_norm(self.norm_eps, "norm2", self.param_dtype), x)
        x = x + Attention(name="attn2", **attn)(h, context)
        h = _norm(layer_norm(self.norm_eps, "norm3", self.param_dtype), x)
        x = x + FeedForward(name="ff", **kw)(h)
        return nn.with_logical_constraint(x, TOKEN_AXES)


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel (continuous input): GroupNorm, proj_in, blocks,
    proj_out, residual."""

    num_heads: int
    head_dim: int
    num_groups: int
    num_layers: int = 1
    use_linear_projection: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.num_heads * self.head_dim
        residual = x
        h = _norm(group_norm(self.num_groups, 1e-6, "norm", self.param_dtype), x)
        if self.use_linear_projection:
            h = h.reshape(batch, height * width, channels)
            h = dense(inner, "proj_in", axes=("channels", "embed"), **kw)(h)
        else:
            h = conv(inner, 1, "proj_in", padding=((0, 0), (0, 0)), **kw)(h)
            h = h.reshape(batch, height * width, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block_cls(self.num_heads, self.head_dim, implementation=self.implementation,
                          platform=self.platform, name=f"transformer_blocks_{i}",
                          **kw)(h, context)
        if self.use_linear_projection:
            h = dense(channels, "proj_out", axes=("embed", "channels"), **kw)(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = h.reshape(batch, height, width, inner)
            h = conv(channels, 1, "proj_out", padding=((0, 0), (0, 0)), **kw)(h)
        return h + residual


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, biased q/k/v/out over H*W tokens, residual."""

    num_groups: int
    epsilon: float
    head_dim: int
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axes=("channels", "embed"))
        batch, height, width, channels = x.shape
        h = _norm(group_norm(self.num_groups, self.epsilon, "group_norm", self.param_dtype), x)
        h = h.reshape(batch, height * width, channels)
        q = dense(channels, "to_q", **kw)(h)
        k = dense(channels, "to_k", **kw)(h)
        v = dense(channels, "to_v", **kw)(h)
        out = attention(q, k, v, channels // self.head_dim, self.implementation,
                        self.platform)
        out = dense(channels, "to_out_0", dtype=self.dtype, param_dtype=self.param_dtype,
                    axes=("embed", "channels"))(out)
        out = out.reshape(batch, height, width, channels)
        return (out + x) / self.output_scale_factor
