"""Schedule, DDIM and PNDM parity with diffusers' schedulers of the same config."""
import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline

from metamorph_jax.inference import diffusion as D
from metamorph_jax.models.noise_schedule import NoiseSchedule, add_noise, training_target

# SD 1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear",
    beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, trained_betas=None, clip_sample=False,
)


def torch_scheduler(cls, config):
    allowed = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in allowed})


def eps_torch(x, t):
    """A smooth stand-in denoiser, written identically in torch and jax."""
    return 0.9 * torch.tanh(0.7 * x + torch.sin(t.float() / 100.0).view(-1, 1, 1, 1))


def eps_jax(x, t):
    return 0.9 * jnp.tanh(0.7 * x + jnp.sin(t.astype(jnp.float32) / 100.0)[:, None, None, None])


def test_training_schedule_and_add_noise_match_ddpm():
    schedule = NoiseSchedule.from_hf(SD15_SCHEDULER)
    ddpm = torch_scheduler(DDPMScheduler, SD15_SCHEDULER)
    np.testing.assert_allclose(schedule.alphas_cumprod(), ddpm.alphas_cumprod.numpy(),
                               rtol=0, atol=1e-6)
    rs = np.random.RandomState(0)
    clean = rs.randn(4, 3, 8, 8).astype(np.float32)
    noise = rs.randn(4, 3, 8, 8).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    ref = ddpm.add_noise(torch.tensor(clean), torch.tensor(noise), torch.tensor(t)).numpy()
    got = add_noise(schedule.alphas_cumprod(), jnp.asarray(clean), jnp.asarray(noise),
                      jnp.asarray(t))
    assert np.abs(np.asarray(got) - ref).max() <= 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [7, 50])
def test_timesteps_match(spacing, num_steps):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
    schedule = NoiseSchedule.from_hf(config)
    ddim = torch_scheduler(DDIMScheduler, config)
    ddim.set_timesteps(num_steps)
    np.testing.assert_array_equal(schedule.inference_timesteps(num_steps), ddim.timesteps.numpy())
    pndm = torch_scheduler(PNDMScheduler, config)
    pndm.set_timesteps(num_steps)
    np.testing.assert_array_equal(D.plms_plan(schedule, num_steps).model_t, pndm.timesteps.numpy())


def _trajectory(scheduler, x0, num_steps):
    """diffusers' loop; returns every intermediate sample and the model timesteps."""
    scheduler.set_timesteps(num_steps)
    x = torch.tensor(x0)
    states = []
    for t in scheduler.timesteps:
        x = scheduler.step(eps_torch(x, t.repeat(x.shape[0])), t, x).prev_sample
        states.append(x.numpy().copy())
    return states


@pytest.mark.parametrize("num_steps", [10, 50])
def test_pndm_every_step_and_whole_trajectory(num_steps):
    schedule = NoiseSchedule.from_hf(SD15_SCHEDULER)
    x0 = np.random.RandomState(1).randn(2, 4, 4, 3).astype(np.float32)
    ref = _trajectory(torch_scheduler(PNDMScheduler, SD15_SCHEDULER), x0, num_steps)

    # Step by step from our own state, compared after every step (scale-relative 1e-6).
    plan = D.plms_plan(schedule, num_steps)
    acp, final = schedule.alphas_cumprod(), schedule.final_alpha_cumprod()
    x = jnp.asarray(x0)
    state = (x, x, jnp.zeros((3,) + x.shape))
    step = jax.jit(lambda s, e, row: D.plms_step(acp, final, s, e, row))
    for k in range(len(plan.model_t)):
        row = tuple(jnp.asarray(a[k]) for a in (plan.model_t, plan.t, plan.prev_t, plan.weights,
                                                plan.push, plan.restart))
        eps = eps_jax(state[0], jnp.full((2,), plan.model_t[k]))
        state = step(state, eps, row)
        scale = max(1.0, np.abs(ref[k]).max())
        assert np.abs(np.asarray(state[0]) - ref[k]).max() <= 2e-6 * scale, k

    # The whole scanned trajectory.
    out = jax.jit(lambda z: D.pndm_sample(eps_jax, z, schedule, num_steps))(jnp.asarray(x0))
    assert np.abs(np.asarray(out) - ref[-1]).max() <= 2e-6 * max(1.0, np.abs(ref[-1]).max())


@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_whole_trajectory(num_steps):
    schedule = NoiseSchedule.from_hf(SD15_SCHEDULER)
    x0 = np.random.RandomState(2).randn(2, 4, 4, 3).astype(np.float32)
    ref = _trajectory(torch_scheduler(DDIMScheduler, SD15_SCHEDULER), x0, num_steps)
    out = jax.jit(lambda z: D.ddim_sample(eps_jax, z, schedule, num_steps))(jnp.asarray(x0))
    assert np.abs(np.asarray(out) - ref[-1]).max() <= 2e-6 * max(1.0, np.abs(ref[-1]).max())

    # One stochastic (eta = 1) step with given noise.
    ddim = torch_scheduler(DDIMScheduler, SD15_SCHEDULER)
    ddim.set_timesteps(num_steps)
    t = ddim.timesteps[3]
    x = torch.tensor(x0)
    z = torch.tensor(np.random.RandomState(3).randn(*x0.shape).astype(np.float32))
    e = eps_torch(x, t.repeat(2))
    want = ddim.step(e, t, x, eta=1.0, variance_noise=z).prev_sample.numpy()
    prev_t = int(t) - 1000 // num_steps
    got = D.ddim_step(schedule.alphas_cumprod(), schedule.final_alpha_cumprod(),
                      jnp.asarray(e.numpy()), int(t), prev_t, jnp.asarray(x0), eta=1.0,
                      noise=jnp.asarray(z.numpy()))
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


class StubUNet(torch.nn.Module):
    """Stands in for the UNet in diffusers' StableDiffusionPipeline: a smooth function of
    the latents, the timestep and the condition (so guidance matters)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w), requires_grad=False)
        self.config = types.SimpleNamespace(in_channels=w.shape[1], sample_size=4,
                                            time_cond_proj_dim=None)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def device(self):
        return self.w.device

    def forward(self, sample, t, encoder_hidden_states, return_dict=False, **_):
        shift = torch.einsum("bld,dc->bc", encoder_hidden_states, self.w)[:, :, None, None]
        return (0.9 * torch.tanh(0.7 * sample + shift + torch.sin(t.float() / 100.0)),)


def stub_eps_jax(w):
    """StubUNet in jax on NHWC latents."""
    def eps_fn(x, t, ctx):
        shift = jnp.einsum("bld,dc->bc", ctx, w)[:, None, None, :]
        return 0.9 * jnp.tanh(0.7 * x + shift + jnp.sin(t.astype(jnp.float32) / 100.0)[:, None, None, None])
    return eps_fn


@pytest.mark.parametrize("guidance_scale", [1.5, 7.5])
def test_guidance_matches_the_diffusers_pipeline(guidance_scale):
    """guided_epsilon against StableDiffusionPipeline's own guidance: the pipeline runs
    with a stub UNet, the all-zero context as negative prompt, and a recording scheduler;
    each step's guided noise prediction it hands the scheduler, and the final latents,
    must be ours."""
    rs = np.random.RandomState(4)
    w = rs.randn(6, 4).astype(np.float32)
    context = rs.randn(2, 5, 6).astype(np.float32)
    noise = rs.randn(2, 4, 4, 4).astype(np.float32)  # NCHW, as diffusers holds latents
    scheduler = torch_scheduler(PNDMScheduler, SD15_SCHEDULER)
    seen = []  # (sample, t, guided noise prediction) as the pipeline passes them
    step = scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.append((sample.numpy().copy(), int(timestep), model_output.numpy().copy()))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = recording_step
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=StubUNet(w),
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = pipe(prompt_embeds=torch.tensor(context),
                         negative_prompt_embeds=torch.zeros(context.shape),
                         latents=torch.tensor(noise), height=32, width=32, num_inference_steps=10,
                         guidance_scale=guidance_scale, output_type="latent").images.numpy()
    assert len(seen) == 11  # PNDM (skip_prk_steps): 10 steps + 1 extra model call

    eps_fn, nhwc = stub_eps_jax(jnp.asarray(w)), (0, 2, 3, 1)
    guided = jax.jit(lambda x, t: D.guided_epsilon(eps_fn, x, t, jnp.asarray(context), guidance_scale))
    # float32 rounding: measured max |ours - diffusers| / max |prediction| 1.1e-6 per step,
    # 2.3e-6 over the trajectory (scale 7.5, whose latents reach 60)
    for sample, t, want in seen:
        got = guided(jnp.asarray(sample.transpose(nhwc)), jnp.array(t))
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0,
                                   atol=4e-6 * float(np.abs(want).max()))
    # the whole trajectory, with our sampler
    ours = D.sample_latents(eps_fn, jnp.asarray(noise.transpose(nhwc)), jnp.asarray(context),
                            D.NoiseSchedule.from_hf(SD15_SCHEDULER), 10, guidance_scale, "pndm")
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), reference, rtol=0,
                               atol=1e-5 * scale)


def test_guidance_scale_one_is_the_conditional_prediction():
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.randn(3, 4, 4, 2).astype(np.float32))
    context = jnp.asarray(rs.randn(3, 5, 6).astype(np.float32))
    eps_fn = stub_eps_jax(jnp.asarray(rs.randn(6, 2).astype(np.float32)))
    t = jnp.array(500)
    cond = eps_fn(x, jnp.full((3,), 500), context)
    uncond = eps_fn(x, jnp.full((3,), 500), jnp.zeros_like(context))
    seen = []

    def recorded(x, t, ctx):
        seen.append(x.shape[0])
        return eps_fn(x, t, ctx)

    np.testing.assert_allclose(D.guided_epsilon(recorded, x, t, context, 1.0), cond, atol=1e-6)
    assert seen == [3]   # scale 1: the unconditional half is not run
    D.guided_epsilon(recorded, x, t, context, 1.5)
    assert seen == [3, 6]
    np.testing.assert_allclose(D.guided_epsilon(eps_fn, x, t, context, 0.0), uncond, atol=1e-6)
    assert float(jnp.abs(cond - uncond).max()) > 1e-2  # the condition matters


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="clip_sample"):
        NoiseSchedule.from_hf({**SD15_SCHEDULER, "clip_sample": True})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_hf({**SD15_SCHEDULER, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="needs prediction_type='v_prediction'"):
        NoiseSchedule.from_hf({**SD15_SCHEDULER, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="skip_prk_steps"):
        NoiseSchedule.from_hf({**SD15_SCHEDULER, "skip_prk_steps": False})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_hf({**SD15_SCHEDULER, "beta_schedule": "squaredcos_cap_v2"})


@pytest.mark.parametrize("sampler", ["pndm", "ddim"])
def test_guided_sampling_at_scale_one_is_the_conditional_trajectory(sampler):
    rs = np.random.RandomState(5)
    noise = jnp.asarray(rs.randn(2, 4, 4, 3).astype(np.float32))
    context = jnp.asarray(rs.randn(2, 3, 3).astype(np.float32))

    def eps_fn(x, t, ctx):
        return eps_jax(x + ctx.mean(axis=1)[:, None, None, :], t)

    schedule = NoiseSchedule.from_hf(SD15_SCHEDULER)
    guided = D.sample_latents(eps_fn, noise, context, schedule, 10, 1.0, sampler)
    plain = (D.pndm_sample if sampler == "pndm" else D.ddim_sample)(
        lambda x, t: eps_fn(x, t, context), noise, schedule, 10)
    scale = max(1.0, float(jnp.abs(plain).max()))
    assert float(jnp.abs(guided - plain).max()) <= 1e-5 * scale
    strong = D.sample_latents(eps_fn, noise, context, schedule, 10, 5.0, sampler)
    assert float(jnp.abs(strong - plain).max()) > 1e-2
    with pytest.raises(ValueError, match="sampler"):
        D.sample_latents(eps_fn, noise, context, schedule, 10, 1.0, "euler")


# --- v prediction and zero terminal SNR (the Shapes decoder's schedule) --------------------
V_ZERO_SNR = {**SD15_SCHEDULER, "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_zero_terminal_snr_schedule_matches_diffusers(beta_schedule):
    config = {**V_ZERO_SNR, "beta_schedule": beta_schedule}
    if beta_schedule == "linear":
        config.update(beta_start=1e-4, beta_end=0.02)
    schedule = NoiseSchedule.from_hf(config)
    ddim = torch_scheduler(DDIMScheduler, config)
    want = ddim.alphas_cumprod.numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod(), want, rtol=0, atol=1e-6)
    assert schedule.alphas_cumprod()[-1] == 0.0 == want[-1]
    # The first abar is kept, every other one moves.
    assert schedule.alphas_cumprod()[0] == pytest.approx(
        NoiseSchedule(**{**schedule.__dict__, "rescale_betas_zero_snr": False,
                         "prediction_type": "epsilon"}).alphas_cumprod()[0], abs=1e-6)


def test_velocity_target_matches_diffusers():
    schedule = NoiseSchedule.from_hf(V_ZERO_SNR)
    ddpm = torch_scheduler(DDPMScheduler, V_ZERO_SNR)
    rs = np.random.RandomState(6)
    clean = rs.randn(5, 3, 4, 4).astype(np.float32)
    noise = rs.randn(5, 3, 4, 4).astype(np.float32)
    t = np.array([0, 10, 500, 998, 999])
    want = ddpm.get_velocity(torch.tensor(clean), torch.tensor(noise), torch.tensor(t)).numpy()
    got = training_target("v_prediction", schedule.alphas_cumprod(), jnp.asarray(clean),
                          jnp.asarray(noise), jnp.asarray(t))
    assert np.abs(np.asarray(got) - want).max() <= 1e-5
    # At zero SNR the velocity is -x_0.
    np.testing.assert_allclose(np.asarray(got)[-1], -clean[-1], atol=1e-6)
    eps = training_target("epsilon", schedule.alphas_cumprod(), jnp.asarray(clean),
                          jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(eps), noise)


@pytest.mark.parametrize("spacing,zero_snr", [("trailing", True), ("leading", False)])
def test_ddim_v_prediction_trajectory_matches_diffusers(spacing, zero_snr):
    config = {**V_ZERO_SNR, "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr}
    schedule = NoiseSchedule.from_hf(config)
    x0 = np.random.RandomState(7).randn(2, 4, 4, 3).astype(np.float32)
    ref = _trajectory(torch_scheduler(DDIMScheduler, config), x0, 10)
    out = jax.jit(lambda z: D.ddim_sample(eps_jax, z, schedule, 10))(jnp.asarray(x0))
    assert np.all(np.isfinite(ref[-1]))
    # Measured: 2.7e-6 at scale 1.25 (fp32 round-off over 10 steps).
    assert np.abs(np.asarray(out) - ref[-1]).max() <= 1e-5 * max(1.0, np.abs(ref[-1]).max())
    # The model output is read as v: the epsilon reading of the same outputs differs.
    as_eps = D.ddim_sample(eps_jax, jnp.asarray(x0),
                           NoiseSchedule.from_hf({**SD15_SCHEDULER, "timestep_spacing": spacing}),
                           10)
    assert float(jnp.abs(as_eps - out).max()) > 1e-2


def test_pndm_v_prediction_trajectory_matches_diffusers():
    config = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
    schedule = NoiseSchedule.from_hf(config)
    x0 = np.random.RandomState(8).randn(2, 4, 4, 3).astype(np.float32)
    ref = _trajectory(torch_scheduler(PNDMScheduler, config), x0, 10)
    out = jax.jit(lambda z: D.pndm_sample(eps_jax, z, schedule, 10))(jnp.asarray(x0))
    assert np.abs(np.asarray(out) - ref[-1]).max() <= 2e-6 * max(1.0, np.abs(ref[-1]).max())


def test_pndm_refuses_a_zero_terminal_snr_schedule_and_ddim_is_its_default():
    schedule = NoiseSchedule.from_hf(V_ZERO_SNR)
    assert D.default_sampler(schedule) == "ddim"
    assert D.default_sampler(NoiseSchedule.from_hf(SD15_SCHEDULER)) == "pndm"
    with pytest.raises(ValueError, match="zero-terminal-SNR.*use 'ddim'"):
        D.pndm_sample(eps_jax, jnp.zeros((1, 4, 4, 3)), schedule, 10)
