"""python -m convert for SD 1.5 (unet/, vae/, or both as sd15): tables, bit-exact round trip,
diffusers reloads what we write, errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from convert import unet as unet_convert
from convert import vae as vae_convert
from convert.__main__ import main as convert_main
from convert.core import ConversionError, hf_to_flax, open_checkpoint
from convert.spec import to_flax as rule_to_flax
from metamorph_jax import pretrained
from metamorph_jax.models.unet import UNet2DConditionModel, UNetConfig
from metamorph_jax.models.vae import VAEConfig
from tests import test_unet, test_vae


def map_state_dict(spec, cfg, state):
    """Maps a state dict through a spec's table (each tensor must match exactly one rule)."""
    rules = spec.rules(cfg)
    shapes = {"/".join(k): tuple(v.shape) for k, v in
              traverse_util.flatten_dict(spec.param_shapes(cfg)).items()}
    out = {}
    for name, tensor in state.items():
        hits = [r for r in rules if r.hf_regex.match(name)]
        assert len(hits) == 1, (name, hits)
        path = hits[0].flax.format(**hits[0].hf_regex.match(name).groupdict())
        assert path in shapes and path not in out, (name, path)
        out[path] = rule_to_flax(hits[0], tensor.detach().numpy(), shapes[path])
        assert out[path].shape == shapes[path], (name, path)
    assert set(out) == set(shapes)
    return out


def save_state(folder, model, state):
    """config.json + one safetensors file holding `state` (which may be altered)."""
    from safetensors.torch import save_file
    folder.mkdir()
    model.save_config(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("config", [test_unet.TINY, test_unet.TINY_B],
                         ids=["conv_proj", "linear_proj"])
def test_unet_table_matches_independent_mapping(config):
    torch_model = test_unet.random_torch_model(config)
    cfg = UNetConfig.from_hf(dict(torch_model.config))
    got = map_state_dict(unet_convert.SPEC, cfg, torch_model.state_dict())
    want = flat(test_unet.diffusers_to_flax(torch_model.state_dict()))
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_vae_table_matches_independent_mapping():
    torch_model = test_vae.random_torch_vae(test_vae.TINY_B)
    cfg = VAEConfig.from_hf(dict(torch_model.config))
    got = map_state_dict(vae_convert.SPEC, cfg, torch_model.state_dict())
    want = flat(test_unet.diffusers_to_flax(torch_model.state_dict()))
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_sd15_tables_cover_the_full_size_models():
    """Every SD 1.5 tensor name (meta device, no memory) matches exactly one Flax path."""
    for spec, torch_cls, hf in ((unet_convert.SPEC, TorchUNet, test_unet.SD15),
                                (vae_convert.SPEC, TorchVAE, test_vae.SD15)):
        with torch.device("meta"):
            model = torch_cls(**{k: v for k, v in hf.items() if not k.startswith("_")})
        cfg = spec.config_from_hf(hf)
        rules = spec.rules(cfg)
        shapes = {"/".join(k): v.shape for k, v in
                  traverse_util.flatten_dict(spec.param_shapes(cfg)).items()}
        produced = set()
        for name in model.state_dict():
            hits = [r for r in rules if r.hf_regex.match(name)]
            assert len(hits) == 1, (name, hits)
            path = hits[0].flax.format(**hits[0].hf_regex.match(name).groupdict())
            assert path in shapes, (name, path)
            produced.add(path)
        assert produced == set(shapes)


def save_sd_folder(root, dtype=torch.float32):
    """A tiny diffusers SD folder with unet/ and vae/ (safetensors)."""
    unet = test_unet.random_torch_model(test_unet.TINY).to(dtype)
    vae = test_vae.random_torch_vae(test_vae.TINY).to(dtype)
    unet.save_pretrained(str(root / "unet"))
    vae.save_pretrained(str(root / "vae"))
    return unet, vae


def read_all(folder):
    loaders, _ = open_checkpoint(folder)
    return {name: np.array(load()) for name, load in loaders.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sd15_round_trip_is_bit_exact_and_diffusers_reloads(tmp_path, dtype):
    unet, vae = save_sd_folder(tmp_path / "sd", dtype)
    assert convert_main(["to-flax", "sd15", str(tmp_path / "sd"), str(tmp_path / "flax")]) == 0
    assert convert_main(["to-hf", "sd15", str(tmp_path / "flax"), str(tmp_path / "back")]) == 0
    for part in ("unet", "vae"):
        original, back = read_all(tmp_path / "sd" / part), read_all(tmp_path / "back" / part)
        assert set(original) == set(back)
        for name in original:
            assert original[name].dtype == back[name].dtype, name
            assert original[name].tobytes() == back[name].tobytes(), name
        assert (tmp_path / "back" / part / "diffusion_pytorch_model.safetensors").exists()

    back = tmp_path / "back"
    reloaded_unet = TorchUNet.from_pretrained(str(back / "unet"), torch_dtype=dtype).eval()
    reloaded_vae = TorchVAE.from_pretrained(str(back / "vae"), torch_dtype=dtype).eval()
    rs = np.random.RandomState(0)
    x = torch.tensor(rs.randn(1, 4, 16, 16).astype(np.float32)).to(dtype)
    ctx = torch.tensor(rs.randn(1, 5, 24).astype(np.float32)).to(dtype)
    with torch.no_grad():
        assert torch.equal(reloaded_unet(x, 10, ctx).sample, unet(x, 10, ctx).sample)
        img = torch.tensor(rs.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)).to(dtype)
        assert torch.equal(reloaded_vae.encode(img).latent_dist.mean,
                           vae.encode(img).latent_dist.mean)

    if dtype == torch.float32:
        # The converted Orbax UNet computes what diffusers computes.
        saved = pretrained.read_model_config(tmp_path / "flax" / "unet")
        assert saved["model"] == "unet"
        cfg = UNetConfig(**saved["config"])
        params = pretrained.load_params(tmp_path / "flax" / "unet")
        out = jax.jit(UNet2DConditionModel(cfg).apply)(
            {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.array([10]),
            jnp.asarray(ctx.numpy()))
        with torch.no_grad():
            ref = unet(x, 10, ctx).sample.numpy()
        assert np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max() <= 1e-4


def test_unet_and_vae_alone(tmp_path):
    save_sd_folder(tmp_path / "sd")
    for part in ("unet", "vae"):
        assert convert_main(["to-flax", part, str(tmp_path / "sd" / part),
                             str(tmp_path / f"{part}_flax")]) == 0
        assert pretrained.read_model_config(tmp_path / f"{part}_flax")["model"] == part
        assert convert_main(["to-hf", part, str(tmp_path / f"{part}_flax"),
                             str(tmp_path / f"{part}_back")]) == 0
        original, back = read_all(tmp_path / "sd" / part), read_all(tmp_path / f"{part}_back")
        assert all(original[n].tobytes() == back[n].tobytes() for n in original)
    # A VAE folder is not a UNet: the error names the file.
    assert convert_main(["to-flax", "unet", str(tmp_path / "sd" / "vae"),
                         str(tmp_path / "wrong")]) == 2


def test_errors_name_the_tensor(tmp_path):
    unet = test_unet.random_torch_model(test_unet.TINY)
    state = dict(unet.state_dict())
    conv1 = "down_blocks.0.resnets.0.conv1.weight"
    state[conv1] = state[conv1][:, :4]
    save_state(tmp_path / "shape", unet, state)
    with pytest.raises(ConversionError, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight"):
        hf_to_flax(unet_convert.SPEC, tmp_path / "shape", tmp_path / "o1", progress=False)
    state = dict(unet.state_dict())
    del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_state(tmp_path / "missing", unet, state)
    with pytest.raises(ConversionError,
                       match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"):
        hf_to_flax(unet_convert.SPEC, tmp_path / "missing", tmp_path / "o2", progress=False)
    state = dict(unet.state_dict())
    state["add_embedding.linear_1.weight"] = torch.zeros(2, 2)
    save_state(tmp_path / "extra", unet, state)
    with pytest.raises(ConversionError, match="add_embedding"):
        hf_to_flax(unet_convert.SPEC, tmp_path / "extra", tmp_path / "o3", progress=False)
    # Unsupported config values are refused naming the file and the field.
    (tmp_path / "cfg").mkdir()
    bad = {**dict(unet.config), "resnet_time_scale_shift": "scale_shift"}
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match=r"config\.json.*resnet_time_scale_shift"):
        hf_to_flax(unet_convert.SPEC, tmp_path / "cfg", tmp_path / "o4", progress=False)
    # Pickles are refused unless asked for.
    (tmp_path / "u").mkdir()
    unet.save_config(str(tmp_path / "u"))
    torch.save(unet.state_dict(), tmp_path / "u" / "diffusion_pytorch_model.bin")
    assert convert_main(["to-flax", "unet", str(tmp_path / "u"), str(tmp_path / "o")]) == 2
    assert convert_main(["to-flax", "unet", str(tmp_path / "u"), str(tmp_path / "o"),
                         "--allow-pickle"]) == 0
