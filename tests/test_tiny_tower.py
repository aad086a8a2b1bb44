"""The main job's random SigLIP tower (tiny.zero_background_patches, assets.tower): white
patches embed to zero, checked against a numpy patch embedding, and bad tower fields fail
before anything is written."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from metamorph_jax import tiny
from metamorph_jax.data import images, shapes
from metamorph_jax.models import siglip


def _tower(zero_background: bool):
    config = tiny.tiny_siglip_config(image_size=32, patch_size=4, num_visual_tokens=16)
    params = jax.tree.map(np.asarray, nn.unbox(siglip.init_params(config, jax.random.key(2))))
    if zero_background:
        params = tiny.zero_background_patches(params, config.patch_size)
    return config, params


def test_zero_background_bias_embeds_patches_as_their_difference_from_white():
    config, params = _tower(True)
    model = siglip.SiglipVisionModel(config)
    scene = (shapes.Shape("circle", "red", "large", 4), shapes.Shape("square", "blue", "small", 0))
    pixels = images.normalize(shapes.render_scene(scene, 32)).astype(np.float32)
    embedded = np.asarray(model.apply({"params": params}, pixels[None],
                                      method=lambda m, x: m.embeddings(x)))[0]
    # numpy: each 4x4 patch's (pixels - white) times the kernel, plus the position table
    p = config.patch_size
    kernel = params["embeddings"]["patch_embedding"]["kernel"]
    patches = (pixels - 1.0).reshape(8, p, 8, p, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    expected = patches @ kernel.reshape(-1, config.hidden_size) \
        + params["embeddings"]["position_embedding"]
    np.testing.assert_allclose(embedded, expected, atol=1e-5)
    white_cells = np.all(patches == 0.0, axis=1)
    assert white_cells.any() and not white_cells.all()


def test_zero_background_tokens_of_different_scenes_are_less_parallel_than_default():
    a = images.normalize(shapes.render_scene((shapes.Shape("circle", "red", "large", 0),), 32))
    b = images.normalize(shapes.render_scene((shapes.Shape("triangle", "green", "small", 8),), 32))
    batch = np.stack([a, b]).astype(np.float32)
    cosines = {}
    for zero in (False, True):
        config, params = _tower(zero)
        model = siglip.SiglipVisionModel(config)
        tokens = np.asarray(model.apply({"params": params}, batch, method=model.visual_tokens))
        assert tokens.shape == (2, 16, config.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)
        cosines[zero] = float(np.sum(tokens[0] * tokens[1], axis=-1).mean())
    assert cosines[True] < cosines[False] - 0.1, cosines


@pytest.mark.parametrize("tower, field", [
    (dict(num_visual_tokens=5), "assets.tower"),
    (dict(no_such_field=1), "assets.tower"),
    (dict(zero_background="yes"), "assets.tower.zero_background"),
])
def test_a_bad_tower_field_fails_naming_it_before_anything_is_written(tmp_path, tower, field):
    assets = ConfigDict(dict(kind="tiny_shapes", root=str(tmp_path / "assets"), image_size=16,
                             train=4, validation=2, test=0, clips=1, seed=0, tower=tower))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny.ensure_assets(assets)
    assert not (tmp_path / "assets").exists()
