"""VPiT decoding with the batch split over a process's devices (VPiTGenerator(devices=...))
against one-device decoding of the same prompts: token for token, visual vectors to fp32
noise. Runs on the 8 simulated CPU devices of tests/conftest.py."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.models import metamorph
from tests.test_vpit_generate import _pixels, _prompt, _tokens_image
from tests.vpit_helpers import force_image_start_at, tiny_vpit


@pytest.mark.slow
def test_rows_split_over_devices_decode_as_on_one_device():
    tokenizer, config, params = tiny_vpit()
    model = metamorph.MetaMorph(config)
    hook = force_image_start_at(config, [3, 8])
    opened = _prompt(tokenizer, config, "generate an image of a red circle")
    opened = vg.VPiTPrompt(np.append(opened.tokens, config.image_start_id),
                           np.append(opened.image_index, -1))
    # Rows in different modes at the same step: one starts in an image, two have prompt
    # images (pixels through the tower, precomputed tokens), all open images later.
    prompts = [opened,
               _prompt(tokenizer, config, "<image> what is the colour of the shape ?", [_pixels(3)]),
               _prompt(tokenizer, config, "hello"),
               _prompt(tokenizer, config, "<image> <image> move the shape", [_pixels(4), _tokens_image(5)]),
               _prompt(tokenizer, config, "what is it ?")]
    sampling = vg.VPiTSampling(max_new_tokens=10, max_new_images=1)
    devices = jax.devices()
    assert len(devices) == 8
    one = vg.VPiTGenerator(model, params, [tokenizer.eos_token_id], logits_hook=hook)
    split = vg.VPiTGenerator(model, params, [tokenizer.eos_token_id], logits_hook=hook,
                             devices=devices)
    # 5 rows on 8 devices: one row each (3 padding rows); on one device 8 rows too.
    assert split.batch_bucket(5) == 8 and split.batch_bucket(9) == 16 and one.batch_bucket(5) == 8
    cache = split._init_cache(8, 64)
    for leaf in jax.tree.leaves(cache):
        assert leaf.sharding.spec == PartitionSpec("rows") and len(leaf.sharding.device_set) == 8
        assert leaf.addressable_shards[0].data.shape[0] == 1
    expected, got = one.generate(prompts, sampling), split.generate(prompts, sampling)
    for row, (e, g) in enumerate(zip(expected, got)):
        assert g.tokens == e.tokens, row
        assert g.finish_reason == e.finish_reason
        assert g.visual_tokens.shape == e.visual_tokens.shape
        np.testing.assert_allclose(g.visual_tokens, e.visual_tokens, atol=1e-5)
    assert sum(len(g.visual_tokens) for g in got) >= 4   # images were generated
