"""AutoencoderKL parity with diffusers on tiny random configs (fp32, max |diff| <= 1e-4)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from metamorph_jax.models.vae import AutoencoderKL, VAEConfig
from tests.test_unet import diffusers_to_flax

TOL = 1e-4

TINY = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
TINY_B = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2,
    latent_channels=3, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
SD15 = dict(
    _class_name="AutoencoderKL", _diffusers_version="0.6.0", act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=512,
)


def random_torch_vae(config, seed=0):
    torch.manual_seed(seed)
    model = TorchVAE(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["two_levels", "three_levels"])
def test_vae_encoder_and_decoder_parity(config):
    torch_model = random_torch_vae(config)
    cfg = VAEConfig.from_hf(dict(torch_model.config))
    model = AutoencoderKL(cfg)
    params = diffusers_to_flax(torch_model.state_dict())
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    want = jax.tree_util.tree_map(lambda a: a.shape, flax.linen.meta.unbox(shapes["params"]))
    assert want == jax.tree_util.tree_map(lambda a: a.shape, params)

    rs = np.random.RandomState(0)
    images = rs.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    latents = rs.randn(2, cfg.latent_channels, 16 // factor, 16 // factor).astype(np.float32)
    with torch.no_grad():
        posterior = torch_model.encode(torch.tensor(images)).latent_dist
        ref_decoded = torch_model.decode(torch.tensor(latents)).sample.numpy()
    variables = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderKL.encode))(
        variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    decoded = jax.jit(lambda v, z: model.apply(v, z, method=AutoencoderKL.decode))(
        variables, jnp.asarray(latents.transpose(0, 2, 3, 1)))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    assert np.abs(nchw(mean) - posterior.mean.numpy()).max() <= TOL
    assert np.abs(nchw(logvar) - posterior.logvar.numpy()).max() <= TOL
    assert np.abs(nchw(decoded) - ref_decoded).max() <= TOL

    # Scaled latents: the mean times the scaling factor, and decode_latents undoes it.
    scaled = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderKL.encode_latents))(
        variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(mean) * cfg.scaling_factor,
                               rtol=1e-6, atol=1e-6)
    back = jax.jit(lambda v, z: model.apply(v, z, method=AutoencoderKL.decode_latents))(
        variables, jnp.asarray(latents.transpose(0, 2, 3, 1)) * cfg.scaling_factor)
    assert np.abs(nchw(back) - ref_decoded).max() <= TOL


def test_sd15_vae_parameter_tree_matches_diffusers():
    with torch.device("meta"):
        torch_model = TorchVAE(**{k: v for k, v in SD15.items() if not k.startswith("_")})
    model = AutoencoderKL(VAEConfig.from_hf(SD15))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(shapes["params"]), sep="/")
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == sum(
        p.numel() for p in torch_model.parameters())
    assert len(flat) == len(torch_model.state_dict())


def test_vae_config_errors_name_the_field():
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_hf({**SD15, "use_quant_conv": False})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_hf({**SD15, "down_block_types": ["DownEncoderBlock2D"] * 3})
    cfg = VAEConfig.from_hf(SD15)
    assert cfg.scaling_factor == pytest.approx(0.18215)
    with torch.device("meta"):
        rebuilt = TorchVAE.from_config(cfg.to_hf())
    assert VAEConfig.from_hf(dict(rebuilt.config)) == cfg
