"""Generated visual tokens -> pixels -> PNG files, with a trained visualiser.

The visualiser (models/visualizer.py) projects the 64 visual tokens to a UNet context and
samples with classifier-free guidance against the all-zero context (inference/diffusion.py);
SD 1.5's default is PNDM with 50 steps, and the paper tried guidance scales 6.0 to 12.5
(7.5 here by default). A pixel-space visualiser (the Shapes world's tiny decoder) samples
pixels directly; a latent one decodes its latents with the VAE.

Images are rendered in batches padded to a power of two, so a session compiles the sampler
once per batch bucket.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.data import images as images_lib
from metamorph_jax.inference.diffusion import default_sampler, visualize
from metamorph_jax.models.noise_schedule import NoiseSchedule
from metamorph_jax.models.visualizer import Visualizer

SAMPLERS = ("pndm", "ddim")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    sampler: str | None = None   # None: the schedule's (diffusion.default_sampler)
    num_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    max_batch: int = 8     # images per sampler call

    def __post_init__(self):
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if self.num_steps < 1 or self.max_batch < 1:
            raise ValueError(f"num_steps ({self.num_steps}) and max_batch ({self.max_batch}) "
                             "must be at least 1")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in (about) [-1, 1] -> uint8, clipped."""
    return images_lib.denormalize(np.clip(np.asarray(images, np.float32), -1.0, 1.0))


class ImageRenderer:
    """Visual tokens [n, V, C] -> uint8 images [n, H, W, 3] with one visualiser."""

    def __init__(self, model: Visualizer, params, schedule: NoiseSchedule,
                 render: RenderConfig = RenderConfig()):
        self.model = model
        self.params = params
        self.schedule = schedule
        if render.sampler is None:
            render = dataclasses.replace(render, sampler=default_sampler(schedule))
        self.render_config = render
        self.trace_count = 0

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.model.config.num_tokens, self.model.config.token_dim)

    @partial(jax.jit, static_argnums=(0,))
    def _sample(self, params, tokens, noise):
        self.trace_count += 1
        rc = self.render_config
        return visualize(self.model, params, tokens, noise, self.schedule, rc.num_steps,
                         rc.guidance_scale, rc.sampler)

    def render(self, visual_tokens: np.ndarray, noise_ids: Sequence[int] | None = None
               ) -> np.ndarray:
        """[n, V, C] -> uint8 [n, H, W, 3]. Image i's noise comes from (seed, noise_ids[i])
        (default: i), so an image does not depend on how the render batch was cut; callers
        that render a list in pieces (caption images, split across processes) pass each
        image's index in the whole list."""
        visual_tokens = np.asarray(visual_tokens, np.float32)
        if visual_tokens.ndim != 3 or visual_tokens.shape[1:] != self.token_shape:
            raise ValueError(f"visual tokens of shape {visual_tokens.shape}; this visualiser "
                             f"takes [n, {self.token_shape[0]}, {self.token_shape[1]}]")
        count = len(visual_tokens)
        noise_ids = range(count) if noise_ids is None else [int(i) for i in noise_ids]
        if len(noise_ids) != count:
            raise ValueError(f"{count} images but {len(noise_ids)} noise ids")
        shape = self.model.config.sample_shape
        key = jax.random.key(self.render_config.seed)
        noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape))
                          for i in noise_ids]) if count else np.zeros((0, *shape), np.float32)
        out = []
        step = self.render_config.max_batch
        for begin in range(0, count, step):
            part = visual_tokens[begin:begin + step]
            size = len(part)
            bucket = min(step, 1 << (size - 1).bit_length())
            tokens = np.zeros((bucket, *self.token_shape), np.float32)
            tokens[:size] = part
            batch_noise = np.zeros((bucket, *shape), np.float32)
            batch_noise[:size] = noise[begin:begin + size]
            images = self._sample(self.params, jnp.asarray(tokens), jnp.asarray(batch_noise))
            out.append(to_uint8(np.asarray(images)[:size]))
        if not out:
            size = self.model.config.image_size
            return np.zeros((0, size, size, 3), np.uint8)
        return np.concatenate(out)

    def save(self, visual_tokens: np.ndarray, paths: Sequence[str | Path],
             noise_ids: Sequence[int] | None = None) -> list[str]:
        """Renders (noise_ids: see render) and writes one PNG per image; returns the paths
        written."""
        if len(paths) != len(visual_tokens):
            raise ValueError(f"{len(visual_tokens)} images but {len(paths)} paths")
        pixels = self.render(visual_tokens, noise_ids)
        for image, path in zip(pixels, paths):
            images_lib.save_png(image, path)
        return [str(p) for p in paths]
