"""The visualiser: SigLIP visual tokens -> UNet condition -> (latents ->) pixels.

Projector: Linear(C -> 2048) -> LayerNorm -> ReLU -> Linear(2048 -> cross_attention_dim)
-> LayerNorm; its ``num_tokens`` outputs are zero-padded to ``context_length`` (77, the
CLIP text length SD 1.5 was trained with) and become the UNet's encoder_hidden_states.
With a VAE the UNet denoises scaled latents (SD 1.5); without one (``vae=None``) it
denoises pixels directly, for small worlds such as the built-in Shapes data.

The classifier-free "unconditional" input is the all-zero context (after projection and
padding), both when training drops the condition and when sampling guides against it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

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

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.vae, dict):
            object.__setattr__(self, "vae", VAEConfig(**self.vae))
        if self.context_length < self.num_tokens:
            raise ValueError(f"VisualizerConfig: context_length {self.context_length} < "
                             f"num_tokens {self.num_tokens}")
        if self.vae is not None:
            if self.unet.in_channels != self.vae.latent_channels:
                raise ValueError(f"VisualizerConfig: unet.in_channels {self.unet.in_channels} != "
                                 f"vae.latent_channels {self.vae.latent_channels}")
            down = 2 ** (len(self.vae.block_out_channels) - 1)
            if self.image_size % down:
                raise ValueError(f"VisualizerConfig: image_size {self.image_size} is not a multiple "
                                 f"of the VAE's downsampling factor {down}")

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of what the UNet denoises."""
        if self.vae is None:
            return (self.image_size, self.image_size, self.unet.in_channels)
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
            raise ValueError(f"decoder config: unknown field(s) {sorted(unknown)}")
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

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.projector = TokenProjector(cfg.projector_hidden, cfg.unet.cross_attention_dim, **kw)
        self.unet = UNet2DConditionModel(cfg.unet, remat=self.remat,
                                         attention_impl=self.attention_impl, **kw)
        if cfg.vae is not None:
            self.vae = AutoencoderKL(cfg.vae, remat=self.remat,
                                     attention_impl=self.attention_impl, **kw)

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
        """Predicted noise for noisy samples (latents or pixels) at timesteps."""
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
