"""Rendering generated visual tokens (inference/render.py) with a tiny pixel-space
visualiser: the sampler's images, uint8, independent of how the batch is cut."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.inference.diffusion import visualize
from metamorph_jax.inference.render import ImageRenderer, RenderConfig, to_uint8
from metamorph_jax.models.noise_schedule import NoiseSchedule
from metamorph_jax.models.visualizer import Visualizer, VisualizerConfig
from tests.vpit_helpers import NOISE, TOKENS_PER_IMAGE, VISION_WIDTH, tiny_visualizer_fields


@pytest.mark.slow
def test_batches_of_any_cut_give_the_sampler_s_images():
    config = VisualizerConfig.from_dict(tiny_visualizer_fields())
    model = Visualizer(config)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                 jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1, TOKENS_PER_IMAGE, VISION_WIDTH))))["params"]
    schedule = NoiseSchedule(**NOISE)
    tokens = np.random.default_rng(0).standard_normal((3, TOKENS_PER_IMAGE, VISION_WIDTH))
    rule = RenderConfig("ddim", 3, 2.0, seed=5, max_batch=2)
    cut = ImageRenderer(model, params, schedule, rule).render(tokens)
    whole = ImageRenderer(model, params, schedule,
                          RenderConfig("ddim", 3, 2.0, seed=5, max_batch=4)).render(tokens)
    assert cut.shape == (3, 8, 8, 3) and cut.dtype == np.uint8
    # Batch shapes may change XLA's float rounding: at most one grey level apart.
    np.testing.assert_allclose(cut.astype(int), whole.astype(int), atol=1)
    # Image 2 by hand: its noise from (seed, 2), the guided DDIM trajectory, then uint8.
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(5), 2), (8, 8, 3))
    expected = visualize(model, params, jnp.asarray(tokens[2:3], jnp.float32), noise[None],
                         schedule, 3, 2.0, "ddim")
    np.testing.assert_allclose(cut[2].astype(int), to_uint8(np.asarray(expected))[0].astype(int),
                               atol=1)
    # Rendered alone with its index in the list (as caption images are): the same image.
    alone = ImageRenderer(model, params, schedule, rule).render(tokens[2:3], noise_ids=[2])
    np.testing.assert_allclose(alone[0].astype(int), cut[2].astype(int), atol=1)
    with pytest.raises(ValueError, match=r"takes \[n, 4, 24\]"):
        ImageRenderer(model, params, schedule, rule).render(tokens[:, :2])


def test_the_default_sampler_follows_the_schedule():
    """RenderConfig() leaves the sampler to the schedule: PNDM (SD 1.5's), or DDIM for a
    zero-terminal-SNR schedule, which PNDM cannot walk."""
    config = VisualizerConfig.from_dict(tiny_visualizer_fields())
    model = Visualizer(config)
    zero_snr = NoiseSchedule(**{**NOISE, "prediction_type": "v_prediction",
                                "rescale_betas_zero_snr": True})
    assert ImageRenderer(model, {}, NoiseSchedule(**NOISE)).render_config.sampler == "pndm"
    assert ImageRenderer(model, {}, zero_snr).render_config.sampler == "ddim"
    assert ImageRenderer(model, {}, zero_snr, RenderConfig("pndm")).render_config.sampler == "pndm"
