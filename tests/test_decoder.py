"""The visualiser: projector parity, the runner's decoder stage step (loss falls, samples
match their targets), sharded step equals the single-device step, frozen VAE and SigLIP,
pretrained UNet weights, schedule, the SD 1.5 config."""
import importlib.util
import inspect
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from tqdm.auto import tqdm

from metamorph_jax import pretrained, tiny
from metamorph_jax.inference import diffusion as D
from metamorph_jax.models import siglip
from metamorph_jax.sharding import make_mesh
from metamorph_jax.models.visualizer import VisualizerConfig, TokenProjector, Visualizer
from metamorph_jax.training import objectives, optim
from metamorph_jax.training import state as state_lib
from metamorph_jax.training import steps as steps_lib

REPO = Path(__file__).resolve().parents[1]


def fast_key(seed):
    """An RBG key: init compiles several times faster than with threefry on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP folder whose tokens fit decoder_tiny (4 tokens of width 16)."""
    folder = tmp_path_factory.mktemp("siglip") / "siglip"
    config = tiny.tiny_siglip_config(hidden_size=16, intermediate_size=32, image_size=8)
    params = nn.unbox(siglip.init_params(config, fast_key(7)))
    pretrained.save_pretrained(folder, "siglip", config.to_dict(), jax.tree.map(np.asarray, params))
    return folder


def decoder_objective(stage, siglip_dir, **init):
    stage.init.vision_dir = str(siglip_dir)
    for field, value in init.items():
        stage.init[field] = value
    return objectives.build(stage, "decoder", None)


def new_state(objective, tx, mesh):
    """The runner's train state for `objective` (random projector + UNet), on `mesh`."""
    boxed = state_lib.abstract_state(*objective.boxed_parts(), tx)
    shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
    trainable, frozen = objective.load_parts(shardings.trainable, shardings.frozen)
    return state_lib.init_state(trainable, frozen, tx, state_lib.rng_data(0), shardings,
                                mesh), shardings


def jit_step(objective, tx, schedule, mesh, shardings):
    train = steps_lib.make_train_step(objective, tx, schedule, False)
    step = steps_lib.jit_train_step(train, mesh, shardings, objective.rules,
                                    {"images": 5, "tokens": 4})
    return lambda state, batch: step(state, steps_lib.global_batch(
        {k: np.asarray(v)[None] for k, v in batch.items()}, mesh, objective.rules))


def single_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def synthetic_images(n=4, size=8):
    """Four clearly different pictures in [-1, 1]: square, disk, bar, cross, in four colours."""
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    masks = [(xx < 0.5) & (yy < 0.5), (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1,
             np.abs(yy - 0.75) < 0.12, (np.abs(xx - 0.5) < 0.1) | (np.abs(yy - 0.3) < 0.1)]
    colours = [(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1)]
    images = np.full((n, size, size, 3), -1.0, np.float32)
    for i in range(n):
        images[i][masks[i]] = colours[i]
    return images


def test_projector_matches_torch_and_pads_with_zeros():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 24), torch.nn.LayerNorm(24)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {"fc1": {"kernel": sd["0.weight"].T, "bias": sd["0.bias"]},
              "norm1": {"scale": sd["1.weight"], "bias": sd["1.bias"]},
              "fc2": {"kernel": sd["3.weight"].T, "bias": sd["3.bias"]},
              "norm2": {"scale": sd["4.weight"], "bias": sd["4.bias"]}}
    tokens = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32)
    out = TokenProjector(32, 24).apply({"params": params}, jnp.asarray(tokens))
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).numpy()
    assert np.abs(np.asarray(out) - want).max() <= 1e-4

    cfg = load_config("decoder_tiny").stages.decoder
    model = Visualizer(VisualizerConfig.from_dict(cfg.model.to_dict()))
    params = nn.unbox(jax.jit(model.init)(fast_key(0), jnp.zeros((1, 8, 8, 3)),
                                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4, 16))))["params"]
    tokens = jnp.ones((2, 4, 16))
    context = model.apply({"params": params}, tokens, method=Visualizer.condition)
    assert context.shape == (2, 6, 32)
    assert float(jnp.abs(context[:, 4:]).max()) == 0.0
    assert float(jnp.abs(context[:, :4]).max()) > 0.1
    with pytest.raises(ValueError, match=r"tokens must be \[B, 4, 16\]"):
        model.apply({"params": params}, jnp.ones((2, 5, 16)), method=Visualizer.condition)


@pytest.mark.slow
def test_the_decoder_stage_starts_from_converted_unet_weights(tmp_path, siglip_dir):
    """A `convert` UNet folder slots into the stage's initial params; a wrong shape is named;
    a VAE folder for a pixel-space decoder is refused."""
    stage = load_config("decoder_tiny").stages.decoder
    objective = decoder_objective(stage, siglip_dir)
    trainable, _ = objective.boxed_parts()
    unet = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), nn.unbox(trainable["unet"]))
    pretrained.save_pretrained(tmp_path / "unet", "unet", {}, unet)
    loaded = decoder_objective(stage, siglip_dir, unet_dir=str(tmp_path / "unet"))
    mesh = single_mesh()
    state, _ = new_state(loaded, optax.sgd(0.1), mesh)
    assert float(state.trainable["unet"]["conv_in"]["kernel"][0, 0, 0, 0]) == 0.5
    assert set(state.frozen) == {"siglip"}
    bad = dict(unet, conv_in={"kernel": np.zeros((3, 3, 3, 7)), "bias": np.zeros(7)})
    pretrained.save_pretrained(tmp_path / "bad", "unet", {}, bad)
    with pytest.raises(ValueError, match="conv_in/bias"):
        new_state(decoder_objective(stage, siglip_dir, unet_dir=str(tmp_path / "bad")),
                  optax.sgd(0.1), mesh)
    with pytest.raises(ValueError, match="pixel-space"):
        new_state(decoder_objective(stage, siglip_dir, unet_dir="",
                                    vae_dir=str(tmp_path / "unet")), optax.sgd(0.1), mesh)


def authors_multiplier(step: int) -> float:
    """The decoder's lr multiplier as facebookresearch/metamorph visualization/train.py
    defines it (restated here from its rule, independently of optim.py): log warm-up to
    1 over the first quarter of 16000 steps, then linear down to 0 at 16000, 0 after."""
    end, warm = 16000, 16000 // 4
    if step >= end:
        return 0.0
    if step >= warm:
        return (end - step) / (end - warm)
    return math.log(step + 1) / math.log(warm + 1)


def test_log_warmup_linear_decay_is_the_authors_rule():
    peak = 1e-5
    lr = optim.log_warmup_linear_decay(peak, warmup_steps=4000, decay_end_step=16000)
    steps = np.arange(0, 17001)
    ours = np.asarray(jax.jit(lr)(steps), np.float64)
    reference = peak * np.array([authors_multiplier(int(s)) for s in steps])
    # float32 arithmetic on our side; the reference is float64
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-12)


def test_lr_of_each_update_matches_torch_lambdalr():
    """optax counts updates from 0 as torch's LambdaLR does when stepped after each
    optimizer step (the authors' loop): update k uses multiplier(k), the first one 0."""
    peak, n = 1e-5, 16002
    weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.SGD([weight], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=authors_multiplier)
    torch_lrs = []
    for _ in range(n):
        torch_lrs.append(opt.param_groups[0]["lr"])  # what this update uses
        weight.grad = torch.ones((), dtype=torch.float64)
        opt.step()
        sched.step()
    tx = optax.sgd(optim.log_warmup_linear_decay(peak, warmup_steps=4000, decay_end_step=16000))

    def update(state, _):
        step, state = tx.update(jnp.ones(()), state)
        return state, -step

    _, optax_lrs = jax.jit(lambda s: jax.lax.scan(update, s, None, length=n))(tx.init(jnp.zeros(())))
    assert torch_lrs[0] == 0.0 and float(optax_lrs[0]) == 0.0
    np.testing.assert_allclose(np.asarray(optax_lrs, np.float64), torch_lrs, rtol=2e-6, atol=1e-12)


@pytest.mark.slow
def test_tiny_pixel_decoder_learns_its_targets(siglip_dir):
    """Loss falls, and each condition's samples look like its own target more than others."""
    config = load_config("decoder_tiny")
    stage = config.stages.decoder
    objective = decoder_objective(stage, siglip_dir)
    model = objective.model
    assert model.config.pixel_space
    tx, lr_fn = optim.build_optimizer(stage.optim, stage.steps)
    images = synthetic_images()
    tokens = np.random.RandomState(0).randn(4, 4, 16).astype(np.float32)
    copies = stage.data.batch_size // 4
    batch = {"images": np.concatenate([images] * copies),
             "tokens": np.concatenate([tokens] * copies)}
    mesh = single_mesh()
    state, shardings = new_state(objective, tx, mesh)
    step = jit_step(objective, tx, lr_fn, mesh, shardings)
    losses = []
    for _ in tqdm(range(stage.steps), desc="tiny decoder", leave=False):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    losses = np.array([float(x) for x in losses])
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < 0.2 * losses[:10].mean(), (losses[:10], losses[-20:])

    noise = jax.random.normal(jax.random.PRNGKey(3), (4, *model.config.sample_shape))
    sample = jax.jit(lambda p, t, z: D.visualize(
        model, p, t, z, objective.noise, stage.sample.num_steps, stage.sample.guidance_scale,
        stage.sample.sampler))
    out = np.clip(np.asarray(sample(state.trainable, jnp.asarray(tokens), noise)), -1, 1)
    distance = ((out[:, None] - images[None]) ** 2).mean(axis=(2, 3, 4))  # [sample, target]
    assert np.all(np.argmin(distance, axis=1) == np.arange(4)), distance


def latent_tiny_config():
    """decoder_tiny with a tiny VAE in front: the UNet denoises 4-channel latents."""
    config = load_config("decoder_tiny").stages.decoder
    config.model.image_size = 8
    config.model.unet.in_channels = 4
    config.model.unet.out_channels = 4
    config.cfg_prob = 0.5
    # One VAE level (no downsampling) keeps the compile short; latents stay 8x8.
    config.model.vae = dict(in_channels=3, out_channels=3, block_out_channels=(8,),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=8, down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",))
    return config


@pytest.mark.slow
def test_sharded_latent_step_equals_single_device_step_and_keeps_vae_frozen(siglip_dir):
    """The step over a state sharded on a (data=2, fsdp=2, tensor=2) mesh computes what the
    single-device step computes; the VAE and SigLIP are frozen, the projector and UNet move."""
    objective = decoder_objective(latent_tiny_config(), siglip_dir)
    assert objective.model.config.sample_shape == (8, 8, 4)
    # plain SGD: the update shows any gradient difference directly; the lr as a schedule,
    # whose count the step reads for the lr it logs (optim.schedule_count)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    rs = np.random.RandomState(0)
    batch = {"images": rs.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
             "tokens": rs.randn(8, 4, 16).astype(np.float32)}

    mesh = single_mesh()
    state, shardings = new_state(objective, tx, mesh)
    assert set(state.trainable) == {"projector", "unet"}
    assert set(state.frozen) == {"vae", "siglip"}
    before = jax.device_get(state)
    single, single_metrics = jit_step(objective, tx, schedule, mesh, shardings)(state, batch)
    single = jax.device_get(single)
    assert np.isfinite(float(single_metrics["loss"]))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                                  before.frozen, single.frozen)
    assert all(jax.tree_util.tree_leaves(same))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                   single.trainable, before.trainable)
    assert max(jax.tree_util.tree_leaves(moved["unet"])) > 1e-3
    assert max(jax.tree_util.tree_leaves(moved["projector"])) > 0

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    sharded_state, shardings = new_state(objective, tx, mesh)  # DECODER_RULES
    kernel = sharded_state.trainable["unet"]["conv_in"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    q_kernel = sharded_state.trainable["unet"]["down_blocks_0"]["attentions_0"][
        "transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    new_state_8, metrics = jit_step(objective, tx, schedule, mesh, shardings)(sharded_state, batch)
    assert abs(float(metrics["loss"]) - float(single_metrics["loss"])) <= 1e-5
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                   new_state_8.trainable, single.trainable)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    assert int(new_state_8.step) == 1


def test_sd15_config_builds_the_paper_model():
    config = load_config("decoder_sd15")
    stage = config.stages.decoder
    cfg = VisualizerConfig.from_dict(stage.model.to_dict())
    assert cfg.sample_shape == (64, 64, 4)
    assert cfg.unet.cross_attention_dim == 768 and cfg.context_length == 77
    # defaults: the authors' code; `reference`: the paper's text (kept, unused)
    assert (stage.optim.lr, stage.optim.warmup, stage.optim.decay_end_step, stage.cfg_prob) == \
        (1e-5, 4000, 16000, 0.8)
    assert (stage.reference.paper_lr, stage.reference.paper_warmup,
            stage.reference.paper_decay_end_step, stage.reference.paper_cfg_prob) == \
        (1.1e-5, 2000, 14000, 0.7)
    lr = optim.make_schedule(stage.optim, stage.steps)
    steps = [0, 1, 1000, 3999, 4000, 10000, 15999, 16000, stage.steps - 1]
    np.testing.assert_allclose([float(lr(s)) for s in steps],
                               [1e-5 * authors_multiplier(s) for s in steps], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_decoder_loss_is_the_mse_against_diffusers_noising_and_target(siglip_dir,
                                                                      prediction_type):
    """decoder_loss (cfg_prob 0) = mean((UNet(x_t, t, context) - target)^2), with x_t and the
    target (the noise, or v) computed by diffusers' DDPMScheduler from the same draws: the
    documented split of the step's rng into (encode, timesteps, noise, dropout)."""
    from diffusers import DDPMScheduler
    from metamorph_jax.models.noise_schedule import NoiseSchedule
    from metamorph_jax.training.decoder_step import decoder_loss

    stage = load_config("decoder_tiny").stages.decoder
    if prediction_type == "v_prediction":
        stage.noise.update(dict(prediction_type=prediction_type, rescale_betas_zero_snr=True))
    objective = decoder_objective(stage, siglip_dir)
    schedule = objective.noise
    model = objective.model
    params = nn.unbox(model.init(fast_key(1), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1, 4, 16)))["params"])
    rs = np.random.RandomState(3)
    images = rs.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
    tokens = rs.randn(6, 4, 16).astype(np.float32)
    rng = jax.random.key(11)
    loss, _ = decoder_loss(model, params, {}, {"images": jnp.asarray(images),
                                               "tokens": jnp.asarray(tokens)},
                           rng, jnp.asarray(schedule.alphas_cumprod()), 0.0,
                           prediction_type=schedule.prediction_type)

    _, r_time, r_noise, _ = jax.random.split(rng, 4)
    t = np.asarray(jax.random.randint(r_time, (6,), 0, 1000))
    noise = np.asarray(jax.random.normal(r_noise, images.shape, jnp.float32))
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    ddpm = DDPMScheduler(**{k: v for k, v in dict(stage.noise).items() if k in accepted})
    nchw = lambda a: torch.tensor(a).permute(0, 3, 1, 2)
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
    noisy = nhwc(ddpm.add_noise(nchw(images), nchw(noise), torch.tensor(t)))
    target = (nhwc(ddpm.get_velocity(nchw(images), nchw(noise), torch.tensor(t)))
              if prediction_type == "v_prediction" else noise)
    variables = {"params": params}
    context = model.apply(variables, jnp.asarray(tokens), method=Visualizer.condition)
    output = model.apply(variables, jnp.asarray(noisy), jnp.asarray(t), context,
                         method=Visualizer.denoise)
    want = float(np.mean((np.asarray(output) - target) ** 2))
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_token_grid_feeds_each_token_to_its_cell():
    """token_grid: token k (row-major) fills grid cell k of the UNet's extra input channels;
    the all-zero (unconditional) context adds all-zero channels; the sample keeps the
    image's channels."""
    from metamorph_jax.models.visualizer import token_grid_map
    tokens = jnp.eye(4)[None] * jnp.arange(1.0, 5.0)[None, :, None]   # token k = (k+1) e_k
    grid = np.asarray(token_grid_map(tokens, (8, 8)))
    for k, (rows, cols) in enumerate([(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                                      (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]):
        want = np.zeros((4, 4, 4)); want[..., k] = k + 1
        np.testing.assert_array_equal(grid[0, rows, cols], want)

    base = load_config("decoder_tiny").stages.decoder.model.to_dict()
    unet = {**base["unet"], "in_channels": 3 + base["unet"]["cross_attention_dim"]}
    cfg = VisualizerConfig.from_dict({**base, "unet": unet, "token_grid": True})
    assert cfg.sample_shape == (8, 8, 3) and cfg.image_channels == 3
    model = Visualizer(cfg)
    rs = np.random.RandomState(4)
    tokens = jnp.asarray(rs.randn(2, 4, 16).astype(np.float32))
    x = jnp.asarray(rs.randn(2, 8, 8, 3).astype(np.float32))
    t = jnp.array([10, 500])
    params = nn.unbox(model.init(fast_key(2), x[:1], t[:1], tokens[:1])["params"])
    assert params["unet"]["conv_in"]["kernel"].shape[2] == 3 + 32
    variables = {"params": params}
    context = model.apply(variables, tokens, method=Visualizer.condition)
    zero = jnp.zeros_like(context)
    out_zero = model.apply(variables, x, t, zero, method=Visualizer.denoise)
    from metamorph_jax.models.unet import UNet2DConditionModel
    plain = UNet2DConditionModel(cfg.unet).apply({"params": params["unet"]},
                             jnp.concatenate([x, jnp.zeros((2, 8, 8, 32))], -1), t, zero)
    np.testing.assert_allclose(out_zero, plain, atol=1e-6)
    # The condition reaches the UNet through the grid as well as through cross-attention.
    out = model.apply(variables, x, t, context, method=Visualizer.denoise)
    assert float(jnp.abs(out - out_zero).max()) > 1e-3
    with pytest.raises(ValueError, match="unet.in_channels"):
        VisualizerConfig.from_dict({**base, "token_grid": True})
    with pytest.raises(ValueError, match="square num_tokens"):
        VisualizerConfig.from_dict({**base, "unet": unet, "token_grid": True, "num_tokens": 3})
