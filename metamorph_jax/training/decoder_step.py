"""The diffusion decoder's training objective (the runner's `decoder` stage, objectives.py).

Trained: the token projector and the UNet. Frozen: the VAE (and the vision encoder, whose
tokens arrive in the batch or come from ``token_fn``). Objective: the MSE of the UNet's
output against the schedule's target (the noise, or v; noise_schedule.training_target) at
timesteps drawn uniformly from [0, num_train_timesteps); the whole condition is replaced by
the all-zero context with probability ``cfg_prob`` (classifier-free guidance training).

Batch (a dict, leading batch axis): ``images`` [B,H,W,3] in [-1, 1] (or ``samples``: the
already-encoded latents / pixels the UNet denoises) and ``tokens`` [B, num_tokens, C].
The step's randomness (encoding, timesteps, noise, condition dropout) comes from the rng
the runner passes: fold_in(state rng, step), so a resumed run replays the same draws.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from metamorph_jax import sharding
from metamorph_jax.models.noise_schedule import add_noise, training_target
from metamorph_jax.models.visualizer import Visualizer

TRAINABLE = ("projector", "unet")

# The shared rules plus the convolution axes: conv kernels [kh, kw, in, out] are sharded
# ZeRO-3 style over fsdp on their output channels; image/latent channels (3, 4, 8) and
# the spatial axes of activations stay whole.
DECODER_RULES: tuple = sharding.DEFAULT_RULES + (
    ("conv_in", None), ("conv_out", "fsdp"), ("channels", None), ("image_channels", None),
    ("height", None), ("width", None),
)


def check_same_tree(name: str, given, expected) -> None:
    """Raise naming the first parameter whose path or shape differs."""
    from flax import traverse_util
    got = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(given).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            raise ValueError(f"pretrained {name}: parameter {path!r} is "
                             f"{got.get(path, 'missing')}, the decoder config expects "
                             f"{want.get(path, 'no such parameter')}")


def decoder_loss(model: Visualizer, params, frozen, batch: dict, rng, alphas_cumprod,
                 cfg_prob: float, token_fn: Optional[Callable] = None,
                 prediction_type: str = "epsilon"):
    """The denoising MSE (fp32) and metrics for one batch."""
    variables = {"params": {**params, **frozen}}
    r_encode, r_time, r_noise, r_drop = jax.random.split(rng, 4)
    if "samples" in batch:
        samples = batch["samples"]
    else:
        samples = model.apply(variables, batch["images"], r_encode, method=Visualizer.encode_images)
    samples = jax.lax.stop_gradient(samples).astype(jnp.float32)
    tokens = token_fn(frozen, batch) if token_fn is not None else batch["tokens"]
    tokens = jax.lax.stop_gradient(tokens)

    batch_size = samples.shape[0]
    timesteps = jax.random.randint(r_time, (batch_size,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(r_noise, samples.shape, jnp.float32)
    noisy = add_noise(alphas_cumprod, samples, noise, timesteps)

    context = model.apply(variables, tokens, method=Visualizer.condition)
    drop = jax.random.bernoulli(r_drop, cfg_prob, (batch_size,))
    context = jnp.where(drop[:, None, None], jnp.zeros_like(context), context)
    output = model.apply(variables, noisy, timesteps, context, method=Visualizer.denoise)
    target = training_target(prediction_type, alphas_cumprod, samples, noise, timesteps)
    loss = jnp.mean((output.astype(jnp.float32) - target) ** 2)
    return loss, {"loss": loss, "dropped_fraction": jnp.mean(drop.astype(jnp.float32))}
