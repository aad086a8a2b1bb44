"""The visualiser: SigLIP visual tokens -> UNet condition -> (latents ->) pixels.

Projector: Linear(C -> 2048) -> LayerNorm -> ReLU -> Linear(2048 -> cross_attention_dim)
-> LayerNorm; its ``num_tokens`` outputs are zero-padded to ``context_length`` (77, the
CLIP text length SD 1.5 was trained with) and become the UNet's encoder_hidden_states.
With a VAE the UNet denoises scaled latents (SD 1.5); without one (``vae=None``) it
denoises pixels directly, for small worlds such as the built-in Shapes data.

The classifier-free "unconditional" input is the all-zero context (after projection and
padding), both when training drops the condition and when sampling guides against it.

``token_grid`` (off in the paper's SD 1.5 model) is for small pixel-space worlds: the
projected tokens, laid out on their square grid (row-major, SigLIP's patch order) and
upsampled to the sample's size, are concatenated to the UNet's input channels (so
``unet.in_channels`` = image channels + cross_attention_dim). Cross-attention alone tells a
small convolutional UNet what is in the picture but not where: neither its keys (the
tokens) nor its queries (pixels) carry an absolute position, and the 16-token Shapes
decoder trained that way barely used its condition (x0 error 0.187 with the true tokens
against 0.193 without them at t=900). The all-zero context gives an all-zero grid, so
guidance is unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models.diffusion_blocks import TOKEN_AXES, dense
from metamorph_jax.models.layers import layer_norm
from metamorph_jax.models.unet import UNet2DConditionModel, UNetConfig
from metamorph_jax.models.vae import AutoencoderKL, VAEConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VisualizerConfig:
    """Visualiser architecture. vae=None means pixel space (UNet in/out = image channels)."""

    unet: UNetConfig
    vae: Optional[VAEConfig] = None
    token_dim: int = 1152          # SigLIP so400m width
    projector_hidden: int = 2048
    num_tokens: int = 64
    context_length: int = 77
    image_size: int = 512
    token_grid: bool = False

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.vae, dict):
            object.__setattr__(self, "vae", VAEConfig(**self.vae))
        if self.context_length < self.num_tokens:
            raise BadInput(f"VisualizerConfig: context_length {self.context_length} < "
                           f"num_tokens {self.num_tokens}")
        if self.token_grid:
            side = math.isqrt(self.num_tokens)
            if side * side != self.num_tokens:
                raise BadInput(f"VisualizerConfig: token_grid needs a square num_tokens, got "
                               f"{self.num_tokens}")
            if self.vae is not None:
                raise BadInput("VisualizerConfig: token_grid is for pixel-space decoders "
                               "(vae=None)")
            want = self.unet.out_channels + self.unet.cross_attention_dim
            if self.unet.in_channels != want:
                raise BadInput(f"VisualizerConfig: with token_grid, unet.in_channels "
                               f"({self.unet.in_channels}) must be unet.out_channels + "
                               f"unet.cross_attention_dim ({want})")
        if self.vae is not None:
            if self.unet.in_channels != self.vae.latent_channels:
                raise BadInput(f"VisualizerConfig: unet.in_channels {self.unet.in_channels} != "
                               f"vae.latent_channels {self.vae.latent_channels}")
            down = 2 ** (len(self.vae.block_out_channels) - 1)
            if self.image_size % down:
                raise BadInput(f"VisualizerConfig: image_size {self.image_size} is not a multiple "
                               f"of the VAE's downsampling factor {down}")

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def image_channels(self) -> int:
        """Channels of the images the visualiser makes."""
        if self.vae is not None:
            return self.vae.in_channels
        return self.unet.out_channels if self.token_grid else self.unet.in_channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of what the UNet denoises."""
        if self.vae is None:
            return (self.image_size, self.image_size, self.image_channels)
        size = self.image_size // 2 ** (len(self.vae.block_out_channels) - 1)
        return (size, size, self.vae.latent_channels)

    @classmethod
    def from_dict(cls, d) -> "VisualizerConfig":
        """From a plain (or ml_collections) dict: unet / vae sub-dicts use diffusers' names."""
        d = dict(d)
        unet = UNetConfig.from_hf(dict(d.pop("unet")))
        vae = d.pop("vae", None)
        vae = VAEConfig.from_hf(dict(vae)) if vae else None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BadInput(f"decoder config: unknown field(s) {sorted(unknown)}")
        return cls(unet=unet, vae=vae, **d)


class TokenProjector(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm (LayerNorms in fp32)."""

    hidden: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.hidden, "fc1", axes=("embed", "mlp"), **kw)(tokens.astype(self.dtype))
        x = layer_norm(1e-5, "norm1", self.param_dtype, "mlp")(x.astype(jnp.float32))
        x = nn.relu(x).astype(self.dtype)
        x = dense(self.out_dim, "fc2", axes=("mlp", "embed"), **kw)(x)
        x = layer_norm(1e-5, "norm2", self.param_dtype)(x.astype(jnp.float32))
        return x.astype(self.dtype)


class Visualizer(nn.Module):
    """Projector + UNet (+ frozen VAE). Params: {'projector', 'unet'[, 'vae']}.

    Entry points (use ``method=``): ``condition(tokens)``, ``denoise(x, t, context)``,
    ``encode_images(images, rng)``, ``decode(samples)``. ``__call__`` touches all of them
    (for init).
    """

    config: VisualizerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    # the devices it is compiled for (sharding.mesh_platform; None: jax.default_backend()):
    # picks the attention kernels, as LlamaConfig.platform does. Not saved.
    platform: Optional[str] = None

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.projector = TokenProjector(cfg.projector_hidden, cfg.unet.cross_attention_dim, **kw)
        self.unet = UNet2DConditionModel(cfg.unet, remat=self.remat,
                                         attention_impl=self.attention_impl,
                                         platform=self.platform, **kw)
        if cfg.vae is not None:
            self.vae = AutoencoderKL(cfg.vae, remat=self.remat,
                                     attention_impl=self.attention_impl,
                                     platform=self.platform, **kw)

    def condition(self, tokens):
        """Visual tokens [B, num_tokens, token_dim] -> UNet context [B, context_length, D]."""
        cfg = self.config
        if tokens.shape[1:] != (cfg.num_tokens, cfg.token_dim):
            raise ValueError(f"Visualizer: tokens must be [B, {cfg.num_tokens}, {cfg.token_dim}], "
                             f"got {tokens.shape}")
        context = self.projector(tokens)
        pad = cfg.context_length - cfg.num_tokens
        context = jnp.pad(context, ((0, 0), (0, pad), (0, 0)))
        return nn.with_logical_constraint(context, TOKEN_AXES)

    def denoise(self, samples, timesteps, context):
        """The UNet's prediction (noise or v) for noisy samples (latents or pixels)."""
        if self.config.token_grid:
            samples = jnp.concatenate(
                [samples, token_grid_map(context[:, :self.config.num_tokens], samples.shape[1:3])
                 .astype(samples.dtype)], axis=-1)
        return self.unet(samples, timesteps, context)

    def encode_images(self, images, rng=None):
        """Images [B,H,W,3] in [-1,1] -> what the UNet denoises (scaled latents or pixels)."""
        if self.config.vae is None:
            return images
        return self.vae.encode_latents(images, rng)

    def decode(self, samples):
        """What the UNet denoised -> images in (about) [-1, 1]."""
        if self.config.vae is None:
            return samples
        return self.vae.decode_latents(samples)

    def __call__(self, images, timesteps, tokens):
        samples = self.encode_images(images)
        eps = self.denoise(samples, timesteps, self.condition(tokens))
        return self.decode(eps)


def token_grid_map(tokens, size: tuple[int, int]):
    """[B, side*side, D] row-major tokens -> [B, H, W, D]: each token fills its grid cell."""
    batch, count, width = tokens.shape
    side = math.isqrt(count)
    grid = tokens.reshape(batch, side, side, width)
    return jax.image.resize(grid, (batch, *size, width), "nearest")
