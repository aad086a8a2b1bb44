"""UNet2DConditionModel parity with diffusers on tiny random configs (fp32, max |diff| <= 1e-4)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from metamorph_jax.models.diffusion_blocks import Transformer2D
from metamorph_jax.models.unet import UNet2DConditionModel, UNetConfig

TOL = 1e-4

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, attention_head_dim=2, cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# Three levels, per-block heads, linear projections, two layers, 3 input channels.
TINY_B = dict(
    sample_size=16, in_channels=3, out_channels=5, block_out_channels=(16, 32, 32),
    layers_per_block=2, norm_num_groups=8, attention_head_dim=(2, 4, 4), cross_attention_dim=12,
    use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# The SD 1.5 unet/config.json fields.
SD15 = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
)


def diffusers_to_flax(state_dict):
    """Mechanical diffusers -> Flax mapping used to test the model (not the converter):
    'a.0.b.weight' -> a_0/b/kernel, convs OIHW -> HWIO, linears transposed, norms -> scale."""
    out = {}
    for name, value in state_dict.items():
        value = value.detach().numpy()
        parts = name.split(".")
        segs = []
        for p in parts[:-1]:
            if p.isdigit():
                segs[-1] += "_" + p
            else:
                segs.append(p)
        leaf = parts[-1]
        if leaf == "weight":
            if value.ndim == 4:
                value, leaf = value.transpose(2, 3, 1, 0), "kernel"
            elif value.ndim == 2:
                value, leaf = value.T, "kernel"
            else:
                leaf = "scale"
        node = out
        for s in segs:
            node = node.setdefault(s, {})
        node[leaf] = jnp.asarray(value)
    return out


def random_torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():  # perturb norms and zero-initialised biases too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def flax_shapes(model, sample_hw, in_ch, ctx_dim):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *sample_hw, in_ch)),
                            jnp.zeros((1,)), jnp.zeros((1, 3, ctx_dim)))
    return flax.traverse_util.flatten_dict(flax.linen.meta.unbox(shapes["params"]), sep="/")


def check_parity(config, batch=2, ctx_len=7, size=16, attention_impl=None):
    torch_model = random_torch_model(config)
    cfg = UNetConfig.from_hf(dict(torch_model.config))
    model = UNet2DConditionModel(cfg, attention_impl=attention_impl)
    params = diffusers_to_flax(torch_model.state_dict())
    want = {k: v.shape for k, v in flax_shapes(model, (size, size), cfg.in_channels,
                                               cfg.cross_attention_dim).items()}
    got = {k: v.shape for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    assert want == got

    rs = np.random.RandomState(0)
    x = rs.randn(batch, cfg.in_channels, size, size).astype(np.float32)
    ctx = rs.randn(batch, ctx_len, cfg.cross_attention_dim).astype(np.float32)
    t = np.array([3, 777][:batch])
    with torch.no_grad():
        ref = torch_model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), jnp.asarray(ctx))
    diff = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max()
    assert diff <= TOL, diff
    return model, params


@pytest.mark.parametrize("attention_impl", [None, "xla"], ids=["default", "shared_kernel_xla"])
def test_unet_parity_tiny(attention_impl):
    """None is the einsum path on CPU; "xla" goes through layers.dot_product_attention."""
    check_parity(TINY, attention_impl=attention_impl)


def test_unet_parity_three_levels_linear_projection():
    check_parity(TINY_B)


def test_sd15_parameter_tree_matches_diffusers():
    """Every SD 1.5 tensor (built on torch's meta device: no memory) has its Flax twin."""
    with torch.device("meta"):
        torch_model = TorchUNet(**{k: v for k, v in SD15.items() if not k.startswith("_")})
    model = UNet2DConditionModel(UNetConfig.from_hf(SD15))
    want = {k: v.shape for k, v in flax_shapes(model, (64, 64), 4, 768).items()}
    got = {}
    for name, p in torch_model.state_dict().items():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)
        path = "/".join(seg for seg in leaf[0].replace(".", "/").split("/"))
        segs = []
        for s in path.split("/"):
            if s.isdigit():
                segs[-1] += "_" + s
            else:
                segs.append(s)
        if leaf[1] == "weight":
            if len(shape) == 4:
                shape, leaf_name = (shape[2], shape[3], shape[1], shape[0]), "kernel"
            elif len(shape) == 2:
                shape, leaf_name = shape[::-1], "kernel"
            else:
                leaf_name = "scale"
        else:
            leaf_name = leaf[1]
        got["/".join(segs + [leaf_name])] = shape
    assert want == got
    assert sum(int(np.prod(s)) for s in want.values()) == sum(
        p.numel() for p in torch_model.parameters())


def test_unsupported_config_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_hf({**SD15, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="up_block_types"):
        UNetConfig.from_hf({**SD15, "up_block_types": ["UpBlock2D"] + ["AttnUpBlock2D"] * 3})
    with pytest.raises(ValueError, match="some_new_field"):
        UNetConfig.from_hf({**SD15, "some_new_field": 1})
    cfg = UNetConfig.from_hf(SD15)
    assert cfg.attention_head_dim == (8, 8, 8, 8)
    # to_hf round-trips through diffusers' own constructor.
    with torch.device("meta"):
        rebuilt = TorchUNet.from_config(cfg.to_hf())
    assert UNetConfig.from_hf(dict(rebuilt.config)) == cfg


def test_remat_matches_plain_values_and_gradients():
    """remat changes memory, not math: same UNet output, same transformer-block gradients."""
    torch_model = random_torch_model(TINY)
    cfg = UNetConfig.from_hf(dict(torch_model.config))
    params = diffusers_to_flax(torch_model.state_dict())
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(1, 16, 16, 4).astype(np.float32))
    ctx = jnp.asarray(rs.randn(1, 5, 24).astype(np.float32))
    t = jnp.array([100])
    y0 = jax.jit(UNet2DConditionModel(cfg).apply)({"params": params}, x, t, ctx)
    y1 = jax.jit(UNet2DConditionModel(cfg, remat=True).apply)({"params": params}, x, t, ctx)
    assert float(jnp.abs(y0 - y1).max()) <= 1e-6

    block_params = params["down_blocks_0"]["attentions_0"]
    h = jnp.asarray(rs.randn(1, 8, 8, 32).astype(np.float32))

    def loss(p, remat):
        block = Transformer2D(2, 16, 8, remat=remat)
        return jnp.mean(block.apply({"params": p}, h, ctx) ** 2)

    g0 = jax.jit(jax.grad(lambda p: loss(p, False)))(block_params)
    g1 = jax.jit(jax.grad(lambda p: loss(p, True)))(block_params)
    gd = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1)
    assert max(jax.tree_util.tree_leaves(gd)) <= 1e-6


def test_bf16_compute_close_to_fp32():
    torch_model = random_torch_model(TINY)
    cfg = UNetConfig.from_hf(dict(torch_model.config))
    params = diffusers_to_flax(torch_model.state_dict())
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(1, 16, 16, 4).astype(np.float32))
    ctx = jnp.asarray(rs.randn(1, 5, 24).astype(np.float32))
    t = jnp.array([100])
    plain = UNet2DConditionModel(cfg)
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    y32 = jax.jit(plain.apply)({"params": params}, x, t, ctx)
    y16 = jax.jit(bf16.apply)({"params": params}, x, t, ctx)
    assert y16.dtype == jnp.bfloat16
    rel = float(jnp.abs(y16.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    assert rel < 0.05, rel
