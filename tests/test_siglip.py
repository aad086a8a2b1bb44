"""SigLIP vision tower against transformers' SiglipVisionModel (eager attention, fp32).

Tolerance: max |diff| <= 1e-4 on every output. Weights are moved with the converter's
name table (convert/siglip.py), so these tests also check the table's transforms.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipVisionConfig
from transformers import SiglipVisionModel as HFSiglipVisionModel

from convert.siglip import SPEC
from metamorph_jax.config_io import read_config
from metamorph_jax.models import siglip
from convert.core import state_dict_to_flax

TOLERANCE = 1e-4


def tiny_hf_config(**changes) -> SiglipVisionConfig:
    fields = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  image_size=33, patch_size=5, attn_implementation="eager")  # 33 = 6*5 + 3, like 384 = 27*14 + 6
    fields.update(changes)
    return SiglipVisionConfig(**fields)


def make_torch_model(hf_config: SiglipVisionConfig, seed: int = 0) -> HFSiglipVisionModel:
    torch.manual_seed(seed)
    model = HFSiglipVisionModel(hf_config).eval()
    # HF initialises biases to ~0 and norms to 1; perturb everything so each tensor matters.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def params_from_torch(model: HFSiglipVisionModel, config: siglip.SiglipConfig) -> dict:
    """The converter's table applied in memory: torch state_dict -> Flax params."""
    params = state_dict_to_flax(SPEC, config, model.state_dict())
    return jax.tree.map(jnp.asarray, params)


def random_images(batch, height, width, channels=3, seed=0) -> np.ndarray:
    """NCHW float32 images for torch; transpose to NHWC for ours."""
    return np.random.default_rng(seed).standard_normal((batch, channels, height, width)).astype(np.float32)


def nhwc(images: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(images.transpose(0, 2, 3, 1))


def run(config: siglip.SiglipConfig, params, images, method=None, **kwargs):
    """Jitted apply (op-by-op dispatch is far slower than one compile on CPU)."""
    model = siglip.SiglipVisionModel(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method, **kwargs))(params, images)


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


@pytest.fixture(scope="module")
def torch_tiny():
    return make_torch_model(tiny_hf_config())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_parity_every_output(torch_tiny, scan_layers):
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict(), scan_layers=scan_layers)
    params = params_from_torch(torch_tiny, config)
    images = random_images(2, 33, 33)
    with torch.no_grad():
        expected = torch_tiny(torch.from_numpy(images), output_hidden_states=True)
    ours = run(config, params, nhwc(images), output_hidden_states=True)
    assert max_diff(ours["last_hidden_state"], expected.last_hidden_state) <= TOLERANCE
    assert max_diff(ours["pooler_output"], expected.pooler_output) <= TOLERANCE
    assert ours["hidden_states"].shape[0] == len(expected.hidden_states) == 4
    for index, hidden in enumerate(expected.hidden_states):
        assert max_diff(ours["hidden_states"][index], hidden) <= TOLERANCE, f"hidden state {index}"
    assert max_diff(ours["pre_norm_state"], expected.hidden_states[-1]) <= TOLERANCE


def test_parity_without_head_and_exact_gelu():
    model = make_torch_model(tiny_hf_config(vision_use_head=False, hidden_act="gelu", num_hidden_layers=2,
                                            image_size=16, patch_size=4, num_channels=2), seed=1)
    config = siglip.SiglipConfig.from_hf(model.config.to_dict())
    assert not config.use_head and config.hidden_act == "gelu"
    params = params_from_torch(model, config)
    assert "head" not in params
    images = random_images(3, 16, 16, channels=2, seed=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
    ours = run(config, params, nhwc(images))
    assert "pooler_output" not in ours
    assert max_diff(ours["last_hidden_state"], expected.last_hidden_state) <= TOLERANCE


def test_parity_interpolated_position_embeddings(torch_tiny):
    """Another resolution (non-square too): bicubic position-embedding resize as transformers."""
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict())
    params = params_from_torch(torch_tiny, config)
    model = siglip.SiglipVisionModel(config)
    for height, width in [(45, 35), (20, 20)]:
        images = random_images(2, height, width, seed=height)
        with torch.no_grad():
            expected = torch_tiny(torch.from_numpy(images), interpolate_pos_encoding=True)
        ours = run(config, params, nhwc(images), interpolate_pos_encoding=True)
        assert max_diff(ours["last_hidden_state"], expected.last_hidden_state) <= TOLERANCE
        assert max_diff(ours["pooler_output"], expected.pooler_output) <= TOLERANCE
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.apply({"params": params}, nhwc(random_images(1, 45, 35)))


def test_resize_position_embedding_regrids_a_checkpoint(torch_tiny):
    """Re-gridding the table once gives the same model as interpolating at run time."""
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict())
    params = params_from_torch(torch_tiny, config)
    table = params["embeddings"]["position_embedding"]
    regridded = siglip.resize_position_embedding(table, (8, 8))
    assert regridded.shape == (64, config.hidden_size)
    big = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict(), image_size=40)
    big_params = jax.tree.map(lambda x: x, params)
    big_params["embeddings"] = dict(params["embeddings"], position_embedding=regridded)
    images = nhwc(random_images(1, 40, 40, seed=5))
    ours = run(big, big_params, images)
    runtime = run(config, params, images, interpolate_pos_encoding=True)
    np.testing.assert_allclose(ours["last_hidden_state"], runtime["last_hidden_state"], atol=1e-6)


@pytest.mark.parametrize("layer, tokens", [(-1, 4), (-2, 9), (0, 1)])
def test_visual_tokens_match_torch_pipeline(torch_tiny, layer, tokens):
    """hidden_states[layer] (before post-LN) -> torch bilinear resize -> F.normalize."""
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict(), visual_token_layer=layer,
                                         num_visual_tokens=tokens)
    params = params_from_torch(torch_tiny, config)
    images = random_images(2, 33, 33, seed=3)
    with torch.no_grad():
        hidden = torch_tiny(torch.from_numpy(images), output_hidden_states=True).hidden_states[layer]
        grid = hidden.reshape(2, 6, 6, -1).permute(0, 3, 1, 2)
        side = int(tokens**0.5)
        resized = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
        expected = F.normalize(resized.permute(0, 2, 3, 1).reshape(2, tokens, -1), dim=-1)
    ours = run(config, params, nhwc(images), method=siglip.SiglipVisionModel.visual_tokens)
    assert ours.shape == (2, tokens, 32) and ours.dtype == jnp.float32
    assert max_diff(ours, expected) <= TOLERANCE


def test_remat_does_not_change_math():
    small = make_torch_model(tiny_hf_config(num_hidden_layers=2, image_size=12, patch_size=4, vision_use_head=False))
    base = siglip.SiglipConfig.from_hf(small.config.to_dict())
    params = params_from_torch(small, base)
    images = nhwc(random_images(2, 12, 12, seed=4))

    def loss_and_grad(config):
        def loss(p):
            out = siglip.SiglipVisionModel(config).apply({"params": p}, images)
            return jnp.sum(out["last_hidden_state"] ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    reference_loss, reference_grad = loss_and_grad(base)
    value, grad = loss_and_grad(base.replace(remat_policy="full"))
    np.testing.assert_allclose(value, reference_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, reference_grad)


def test_bf16_compute_stays_close(torch_tiny):
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict())
    params = params_from_torch(torch_tiny, config)
    images = nhwc(random_images(2, 33, 33, seed=6))
    fp32 = run(config, params, images)
    bf16_config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict(), dtype="bfloat16")
    bf16 = run(bf16_config, params, images)
    assert bf16["last_hidden_state"].dtype == jnp.bfloat16
    assert bf16["pooler_output"].dtype == jnp.bfloat16
    # Measured max |fp32 - bf16| / max |fp32|: last_hidden_state 0.037 / 3.21 = 1.15%,
    # pooler_output 0.022 / 2.16 = 1.03%, visual tokens 0.0052 / 0.63 = 0.83% (up to
    # 1.15% over other weight and image seeds; outputs are stored in bf16, whose step is
    # 2^-8 = 0.39% relative); bound: 3% of each output's scale.
    def relative_error(ours, reference):
        reference = np.asarray(reference, np.float32)
        return np.abs(np.asarray(ours, np.float32) - reference).max() / np.abs(reference).max()

    for key in ("last_hidden_state", "pooler_output"):
        assert relative_error(bf16[key], fp32[key]) < 0.03, key
    tokens = run(bf16_config, params, images, method=siglip.SiglipVisionModel.visual_tokens)
    assert tokens.dtype == jnp.float32
    fp32_tokens = run(config, params, images, method=siglip.SiglipVisionModel.visual_tokens)
    assert relative_error(tokens, fp32_tokens) < 0.03


def test_params_carry_logical_axis_names():
    config = siglip.SiglipConfig.from_hf(tiny_hf_config().to_dict())
    boxed = jax.eval_shape(lambda rng: siglip.init_params(config, rng), jax.random.key(0))
    specs = flatten_dict(nn.get_partition_spec(boxed))
    specs = {path: tuple(spec) for path, spec in specs.items()}
    assert specs[("encoder", "layers", "self_attn", "q_proj", "kernel")] == ("layers", "embed", "heads", "head_dim")
    assert specs[("encoder", "layers", "mlp", "fc2", "kernel")] == ("layers", "mlp", "embed")
    assert specs[("embeddings", "position_embedding")] == ("positions", "embed")
    assert specs[("head", "attention", "in_proj_kernel")] == ("embed", None, "heads", "head_dim")
    unboxed = flatten_dict(siglip.param_shapes(config))
    assert unboxed[("encoder", "layers", "self_attn", "q_proj", "kernel")].shape == (3, 32, 4, 8)
    # Every parameter is annotated.
    assert set(specs) == set(unboxed)


def test_so400m_shapes_match_transformers():
    """MetaMorph's tower, from a full SiglipModel config.json: same parameter count as transformers."""
    hf_full = HFSiglipConfig(vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                num_attention_heads=16, image_size=384, patch_size=14))
    config = siglip.SiglipConfig.from_hf(hf_full.to_dict())
    assert (config.grid_size, config.num_patches) == (27, 729)
    with torch.device("meta"):
        reference = HFSiglipVisionModel(hf_full.vision_config)
    expected = sum(p.numel() for p in reference.parameters())
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(siglip.param_shapes(config)))
    assert ours == expected


def test_from_hf_names_the_file_and_bad_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 64,
                                "num_attention_heads": 4, "intermediate_size": 128}))
    config = siglip.SiglipConfig.from_hf(*read_config(tmp_path))
    # Omitted fields take transformers' defaults, not our So400m defaults.
    assert (config.image_size, config.patch_size, config.num_hidden_layers) == (224, 16, 12)
    assert siglip.SiglipConfig.from_hf(config.to_hf()) == config

    path.write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'hidden_act'='relu'"):
        siglip.SiglipConfig.from_hf(*read_config(path))
    path.write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 30,
                                "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"config\.json: hidden_size=30 is not divisible"):
        siglip.SiglipConfig.from_hf(*read_config(path))
    path.write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type'"):
        siglip.SiglipConfig.from_hf(*read_config(path))
    with pytest.raises(ValueError, match=r"field 'vision_config.hidden_act'='relu'"):
        siglip.SiglipConfig.from_hf({"model_type": "siglip", "vision_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="num_visual_tokens=60 is not a square"):
        siglip.SiglipConfig(num_visual_tokens=60)


def test_channels_mismatch_is_an_error(torch_tiny):
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict())
    params = params_from_torch(torch_tiny, config)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        siglip.SiglipVisionModel(config).apply({"params": params}, jnp.zeros((1, 3, 33, 33)))


def test_sharded_forward_on_8_devices_matches(torch_tiny):
    """Logical axis names map onto a (data, tensor) mesh; sharded params and activations
    give the single-device numbers."""
    config = siglip.SiglipConfig.from_hf(torch_tiny.config.to_dict())
    params = params_from_torch(torch_tiny, config)
    images = nhwc(random_images(4, 33, 33, seed=7))
    expected = run(config, params, images)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("embed", None))
    boxed = jax.eval_shape(lambda rng: siglip.init_params(config, rng), jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    assert tuple(sharded_params["encoder"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec) == (None, None, "tensor")
    model = siglip.SiglipVisionModel(config)

    @jax.jit
    def forward(p, x):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": p}, x)

    with jax.set_mesh(mesh):
        ours = forward(sharded_params, jax.device_put(images, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec("data"))))
    np.testing.assert_allclose(ours["pooler_output"], expected["pooler_output"], atol=1e-5)
    np.testing.assert_allclose(ours["last_hidden_state"], expected["last_hidden_state"], atol=1e-5)
