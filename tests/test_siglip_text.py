"""SigLIP text tower against transformers' SiglipTextModel (eager attention, fp32), and the
dual encoder's logits against SiglipModel's.

Tolerance: max |diff| <= 1e-4 (the vision tower's, tests/test_siglip.py; the measured
error is ~1e-6, logits 3e-6). Weights move with the converter's name table (convert/siglip_text.py),
so the table's transforms are checked too.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel as HFSiglipModel
from transformers import SiglipTextConfig as HFTextConfig
from transformers import SiglipTextModel as HFTextModel

from convert import siglip as convert_siglip
from convert import siglip_text as convert_text
from convert.core import state_dict_to_flax
from metamorph_jax.models import siglip, siglip_text

TOLERANCE = 1e-4


def tiny_text_config(**changes) -> HFTextConfig:
    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=12, projection_size=24,
                  pad_token_id=1, bos_token_id=2, eos_token_id=3, attn_implementation="eager")
    fields.update(changes)
    return HFTextConfig(**fields)


def perturbed(model):
    """HF initialises biases to 0 and norms to 1: perturb everything so each tensor matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def random_ids(batch, length, vocab, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int64)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_text_tower_matches_transformers(scan_layers):
    torch.manual_seed(0)
    torch_model = perturbed(HFTextModel(tiny_text_config()))
    config = siglip_text.SiglipTextConfig.from_hf(torch_model.config.to_dict(),
                                                  scan_layers=scan_layers)
    assert config.output_size == 24 and config.max_position_embeddings == 12
    params = jax.tree.map(jnp.asarray, state_dict_to_flax(convert_text.SPEC, config,
                                                          torch_model.state_dict()))
    ids = random_ids(3, 12, 50)
    ids[:, 9:] = 1   # padded to the full length with the pad token, as SigLIP's tokenizer does
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids))
    ours = jax.jit(lambda p, x: siglip_text.SiglipTextModel(config).apply({"params": p}, x))(
        params, jnp.asarray(ids, jnp.int32))
    for key in ("last_hidden_state", "pooler_output"):
        diff = np.abs(np.asarray(ours[key]) - getattr(theirs, key).numpy()).max()
        assert diff <= TOLERANCE, (key, diff)
    # the pooled output is the last position's state through the head, pads included
    head = params["head"]
    expected = np.asarray(ours["last_hidden_state"])[:, -1] @ np.asarray(head["kernel"]) \
        + np.asarray(head["bias"])
    np.testing.assert_allclose(np.asarray(ours["pooler_output"]), expected, atol=1e-5)


def test_shorter_inputs_use_the_first_positions():
    torch.manual_seed(0)
    torch_model = perturbed(HFTextModel(tiny_text_config()))
    config = siglip_text.SiglipTextConfig.from_hf(torch_model.config.to_dict())
    params = state_dict_to_flax(convert_text.SPEC, config, torch_model.state_dict())
    ids = random_ids(2, 5, 50, seed=3)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    ours = jax.jit(lambda p, x: siglip_text.SiglipTextModel(config).apply({"params": p}, x))(
        params, jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(ours["pooler_output"]) - theirs).max() <= TOLERANCE
    with pytest.raises(ValueError, match="max_position_embeddings=12"):
        siglip_text.SiglipTextModel(config).apply({"params": params},
                                                  jnp.zeros((1, 13), jnp.int32))


@pytest.mark.slow   # ~35 s on the shared 2 cores
def test_dual_encoder_logits_match_siglip_model():
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, patch_size=4)
    text = tiny_text_config(hidden_size=32, projection_size=24).to_dict()
    hf_config = HFSiglipConfig(text_config=text, vision_config=vision)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    torch_model = perturbed(HFSiglipModel(hf_config))
    with torch.no_grad():
        torch_model.logit_scale.fill_(math.log(10.0))
        torch_model.logit_bias.fill_(-10.0)
    vision_config = siglip.SiglipConfig.from_hf(hf_config.to_dict())
    text_config = siglip_text.SiglipTextConfig.from_hf(hf_config.to_dict())
    state = torch_model.state_dict()
    params = {
        "vision_model": state_dict_to_flax(convert_siglip.SPEC, vision_config,
                                           {k: v for k, v in state.items()
                                            if k.startswith("vision_model.")}),
        "text_model": state_dict_to_flax(convert_text.SPEC, text_config,
                                         {k: v for k, v in state.items()
                                          if k.startswith("text_model.")}),
        "logit_scale": np.full((1,), math.log(10.0), np.float32),
        "logit_bias": np.full((1,), -10.0, np.float32),
    }
    # default initial values are the paper's (t' = log 10, b = -10)
    model = siglip_text.SiglipDualEncoder(vision_config, text_config)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    ids = random_ids(3, 12, 50, seed=5)
    init = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                        jnp.zeros((1, 12), jnp.int32))["params"])
    assert float(init["logit_scale"][0]) == pytest.approx(math.log(10.0))
    assert float(init["logit_bias"][0]) == -10.0
    ours = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
        params, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids),
                             pixel_values=torch.from_numpy(images))
    for ours_key, theirs_key in (("logits", "logits_per_image"),
                                 ("image_embeds", "image_embeds"),
                                 ("text_embeds", "text_embeds")):
        diff = np.abs(np.asarray(ours[ours_key]) - getattr(theirs, theirs_key).numpy()).max()
        assert diff <= TOLERANCE, (ours_key, diff)


def test_config_round_trips_and_names_bad_fields():
    config = siglip_text.SiglipTextConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2)
    assert siglip_text.SiglipTextConfig.from_dict(config.to_dict()) == config
    assert siglip_text.SiglipTextConfig.from_hf(config.to_hf()).to_hf() == config.to_hf()
    with pytest.raises(ValueError, match="cfg.json: .*hidden_size=30 is not divisible"):
        siglip_text.SiglipTextConfig.from_hf({"hidden_size": 30, "num_attention_heads": 4},
                                             source="cfg.json")
    with pytest.raises(ValueError, match="unknown SiglipTextConfig fields: \\['width'\\]"):
        siglip_text.SiglipTextConfig.from_dict({"width": 3})
