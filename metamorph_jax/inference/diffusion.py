"""DDIM / PNDM (PLMS) samplers and classifier-free guidance.

The noise schedule they walk is models/noise_schedule.py's (also what decoder training
draws from), and so is what the model predicts (epsilon or v; guidance mixes either).
The samplers reproduce diffusers' DDIMScheduler and PNDMScheduler (``skip_prk_steps=True``,
SD 1.5's default) step for step; each whole trajectory runs as one ``jax.lax.scan`` so it
jits. PNDM divides by sqrt(abar_t), so a zero-terminal-SNR schedule samples with DDIM.

Host-side pieces (timestep lists, per-step coefficient tables) are numpy; the
per-step math is jnp.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models.noise_schedule import NoiseSchedule
from metamorph_jax.models.visualizer import Visualizer


def guided_epsilon(eps_fn: Callable, sample, timestep, context, guidance_scale: float):
    """Classifier-free guidance against the all-zero condition.

    Runs eps_fn once on the batch [uncond; cond] and returns
    eps_u + guidance_scale * (eps_c - eps_u). The same for a v model (what diffusers'
    pipelines do): the mix is linear in the model output. A scale of exactly 1 (a Python
    number) runs the conditional half alone.
    """
    t = jnp.asarray(timestep)
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
        # The mix is then the conditional prediction alone: skip the unconditional half.
        return eps_fn(sample, jnp.broadcast_to(t, (sample.shape[0],)) if t.ndim == 0 else t,
                      context)
    batch = sample.shape[0]
    both = jnp.concatenate([sample, sample], axis=0)
    ctx = jnp.concatenate([jnp.zeros_like(context), context], axis=0)
    t = jnp.broadcast_to(t, (2 * batch,)) if t.ndim == 0 else jnp.concatenate([t, t])
    eps = eps_fn(both, t, ctx)
    eps_u, eps_c = eps[:batch], eps[batch:]
    return eps_u + guidance_scale * (eps_c - eps_u)


# --------------------------------------------------------------------------- DDIM
def ddim_step(alphas_cumprod, final_alpha_cumprod, model_output, timestep, prev_timestep, sample,
              eta: float = 0.0, noise=None, prediction_type: str = "epsilon"):
    """One DDIM update x_t -> x_prev, as diffusers' DDIMScheduler.step."""
    acp = jnp.asarray(alphas_cumprod)
    a_t = acp[timestep]
    a_prev = jnp.where(prev_timestep >= 0, acp[jnp.maximum(prev_timestep, 0)], final_alpha_cumprod)
    b_t = 1.0 - a_t
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - b_t ** 0.5 * eps) / a_t ** 0.5
    elif prediction_type == "v_prediction":
        x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
        eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    else:
        raise ValueError(f"ddim_step: prediction_type {prediction_type!r} not supported")
    variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
    std = eta * variance ** 0.5
    direction = (1.0 - a_prev - std ** 2) ** 0.5 * eps
    prev = a_prev ** 0.5 * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        prev = prev + std * noise
    return prev


def ddim_sample(eps_fn: Callable, noise, schedule: NoiseSchedule, num_steps: int,
                eta: float = 0.0, rng: Optional[jax.Array] = None):
    """Run a whole DDIM trajectory from noise; eps_fn(x, t[B]) -> eps. Returns x_0."""
    ts = schedule.inference_timesteps(num_steps)
    prev = ts - schedule.num_train_timesteps // num_steps
    acp = schedule.alphas_cumprod()
    final = schedule.final_alpha_cumprod()
    if eta > 0 and rng is None:
        raise ValueError("ddim_sample: eta > 0 needs rng")
    keys = jax.random.split(rng, num_steps) if eta > 0 else jnp.zeros((num_steps, 2), jnp.uint32)

    def body(x, inputs):
        t, p, key = inputs
        eps = eps_fn(x, jnp.broadcast_to(t, (x.shape[0],)))
        z = jax.random.normal(key, x.shape, x.dtype) if eta > 0 else None
        return ddim_step(acp, final, eps, t, p, x, eta, z,
                         schedule.prediction_type).astype(x.dtype), None

    x, _ = jax.lax.scan(body, noise, (jnp.asarray(ts), jnp.asarray(prev), keys))
    return x


# --------------------------------------------------------------------------- PNDM
def pndm_prev_sample(alphas_cumprod, final_alpha_cumprod, model_output, timestep, prev_timestep,
                     sample, prediction_type: str = "epsilon"):
    """PNDM's x_t -> x_prev transfer (formula 9 of the PNDM paper), as diffusers computes it
    (a v output is turned into epsilon at the transfer's start, as there)."""
    acp = jnp.asarray(alphas_cumprod)
    a_t = acp[timestep]
    a_prev = jnp.where(prev_timestep >= 0, acp[jnp.maximum(prev_timestep, 0)], final_alpha_cumprod)
    b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
    if prediction_type == "v_prediction":
        model_output = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    elif prediction_type != "epsilon":
        raise ValueError(f"pndm_prev_sample: prediction_type {prediction_type!r} not supported")
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
    return sample_coeff * sample - (a_prev - a_t) * model_output / denom


_PLMS_WEIGHTS = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0],
    [1.5, -0.5, 0.0, 0.0],
    [23 / 12, -16 / 12, 5 / 12, 0.0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class PLMSPlan:
    """Per-step tables of a PLMS trajectory (host side, numpy).

    model_t: timestep the model is evaluated at; t / prev_t: the transfer's endpoints;
    weights: multistep weights over (eps_now, eps_-1, eps_-2, eps_-3); push: whether this
    eps enters the history; restart: whether the transfer starts from the saved sample
    (the second, corrector evaluation of the first step).
    """

    model_t: np.ndarray
    t: np.ndarray
    prev_t: np.ndarray
    weights: np.ndarray
    push: np.ndarray
    restart: np.ndarray


def plms_plan(schedule: NoiseSchedule, num_steps: int) -> PLMSPlan:
    """The num_steps + 1 model evaluations of PNDM with skip_prk_steps (diffusers' order)."""
    ts = schedule.inference_timesteps(num_steps)[::-1]  # ascending
    model_t = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)
    ratio = schedule.num_train_timesteps // num_steps
    k = np.arange(len(model_t))
    t = np.where(k == 1, model_t + ratio, model_t)
    prev_t = np.where(k == 1, model_t, model_t - ratio)
    weights = _PLMS_WEIGHTS[np.minimum(k, 4)]
    return PLMSPlan(model_t=model_t, t=t, prev_t=prev_t, weights=weights,
                    push=(k != 1), restart=(k == 1))


def plms_step(alphas_cumprod, final_alpha_cumprod, state, eps, plan_row,
              prediction_type: str = "epsilon"):
    """One PLMS update. state = (sample, saved_sample, history[3, ...]); returns (new_state).
    The multistep mix runs on the model's outputs (eps or v), as in diffusers."""
    sample, saved, history = state
    _, t, prev_t, w, push, restart = plan_row
    combined = w[0] * eps + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
    start = jnp.where(restart, saved, sample)
    new_sample = pndm_prev_sample(alphas_cumprod, final_alpha_cumprod, combined, t, prev_t, start,
                                  prediction_type)
    new_history = jnp.where(push, jnp.concatenate([eps[None], history[:2]], axis=0), history)
    # The first step's input is kept for the corrector evaluation that follows it.
    new_saved = jnp.where(restart, saved, sample)
    return new_sample.astype(sample.dtype), new_saved, new_history


def pndm_sample(eps_fn: Callable, noise, schedule: NoiseSchedule, num_steps: int):
    """Run a whole PNDM (PLMS) trajectory from noise; eps_fn(x, t[B]) -> eps. Returns x_0."""
    if schedule.rescale_betas_zero_snr:
        raise ValueError("sampler 'pndm' cannot walk a zero-terminal-SNR schedule (it divides "
                         "by sqrt(abar_t), 0 at the last timestep): use 'ddim'")
    plan = plms_plan(schedule, num_steps)
    acp = schedule.alphas_cumprod()
    final = schedule.final_alpha_cumprod()
    rows = tuple(jnp.asarray(a) for a in (plan.model_t, plan.t, plan.prev_t, plan.weights,
                                            plan.push, plan.restart))

    def body(state, row):
        x = state[0]
        eps = eps_fn(x, jnp.broadcast_to(row[0], (x.shape[0],)))
        return plms_step(acp, final, state, eps, row, schedule.prediction_type), None

    history = jnp.zeros((3,) + noise.shape, noise.dtype)
    (x, _, _), _ = jax.lax.scan(body, (noise, noise, history), rows)
    return x


def sample_latents(eps_fn: Callable, noise, context, schedule: NoiseSchedule, num_steps: int = 50,
                   guidance_scale: float = 7.5, sampler: str = "pndm",
                   rng: Optional[jax.Array] = None, eta: float = 0.0):
    """Guided sampling: eps_fn(x, t, context) is the denoiser; the unconditional branch uses
    an all-zero context. sampler: "pndm" (SD 1.5 default) or "ddim"."""
    def guided(x, t):
        return guided_epsilon(eps_fn, x, t, context, guidance_scale)

    if sampler == "pndm":
        return pndm_sample(guided, noise, schedule, num_steps)
    if sampler == "ddim":
        return ddim_sample(guided, noise, schedule, num_steps, eta=eta, rng=rng)
    raise ValueError(f"sampler {sampler!r} not supported ('pndm' or 'ddim')")


def default_sampler(schedule: NoiseSchedule) -> str:
    """PNDM (SD 1.5's), or DDIM where PNDM cannot run (a zero-terminal-SNR schedule)."""
    return "ddim" if schedule.rescale_betas_zero_snr else "pndm"


def visualize(model, params, tokens, noise, schedule: NoiseSchedule, num_steps: int = 50,
              guidance_scale: float = 7.5, sampler: str = "pndm"):
    """Visual tokens -> images with a models.visualizer.Visualizer: project the tokens, sample
    with guidance against the all-zero context, decode (VAE or identity). noise has the
    shape of what the UNet denoises ([B, *config.sample_shape])."""
    variables = {"params": params}
    context = model.apply(variables, tokens, method=Visualizer.condition)

    def eps_fn(x, t, ctx):
        return model.apply(variables, x, t, ctx, method=Visualizer.denoise)

    samples = sample_latents(eps_fn, noise, context, schedule, num_steps, guidance_scale, sampler)
    return model.apply(variables, samples, method=Visualizer.decode)
