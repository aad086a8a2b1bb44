"""The DDPM noise schedule shared by decoder training and sampling.

Betas on a "scaled_linear" (or "linear") grid over ``num_train_timesteps``, optionally
rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
Steps are Flawed"), what the model predicts (epsilon, as SD 1.5, or v), the sampler settings
a diffusers scheduler_config.json holds (timestep spacing, offset), q(x_t | x_0), and the
training target. The samplers themselves are inference/diffusion.py.

Why v and zero terminal SNR exist here: SD 1.5's latent schedule leaves sqrt(abar)=0.068 at
t=999, so sampling starts from a sample that still holds the image's low frequencies, and an
epsilon model's x0 estimate there divides its error by 0.068. A small pixel-space decoder
(the Shapes recipe) trained that way paints colour casts; v-prediction on a zero-SNR schedule
has a bounded x0 error at every t (x0 = -v at the last step).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models.hf_config import check_fields

_SCHEDULE_IGNORED = ("clip_sample", "clip_sample_range", "skip_prk_steps", "trained_betas",
                     "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                     "variance_type", "timestep_type")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """DDPM noise schedule plus the sampler settings SD 1.5's scheduler_config.json holds."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise BadInput(f"NoiseSchedule: beta_schedule {self.beta_schedule!r} not supported "
                           "('scaled_linear' or 'linear')")
        if self.prediction_type not in PREDICTION_TYPES:
            raise BadInput(f"NoiseSchedule: prediction_type {self.prediction_type!r} not "
                           f"supported {PREDICTION_TYPES}")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # At abar_T = 0 the sample is pure noise: an epsilon model says nothing of x0.
            raise BadInput("NoiseSchedule: rescale_betas_zero_snr=True needs "
                           "prediction_type='v_prediction' (epsilon cannot give x0 at zero "
                           "SNR)")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise BadInput(f"NoiseSchedule: timestep_spacing {self.timestep_spacing!r} not "
                           "supported")

    @classmethod
    def from_hf(cls, raw: dict, source: str = "<scheduler config>") -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict; `source` names the file in errors.

        ``clip_sample`` and ``thresholding`` must be off (as in SD 1.5); DDPM-sampler-only
        fields (variance_type, clip ranges) are ignored."""
        raw = dict(raw)
        for key in ("clip_sample", "thresholding"):
            if raw.get(key):
                raise BadInput(f"{source}: field {key!r}={raw[key]!r} is not supported "
                               "(only False)")
        if raw.get("skip_prk_steps") is False:
            raise BadInput(f"{source}: field 'skip_prk_steps'=False is not supported (PNDM "
                           "here is PLMS only, as SD 1.5 runs it)")
        if raw.get("trained_betas") is not None:
            raise BadInput(f"{source}: field 'trained_betas' is not supported")
        known = [f.name for f in dataclasses.fields(cls)]
        check_fields(raw, source, known, {}, _SCHEDULE_IGNORED)
        try:
            return cls(**{k: raw[k] for k in known if k in raw})
        except ValueError as e:
            raise BadInput(str(e).replace("NoiseSchedule", source)) from None

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            grid = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32)
            betas = grid.astype(np.float32) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """cumprod(1 - beta) in fp32, [num_train_timesteps]."""
        return np.cumprod(1.0 - self.betas(), dtype=np.float32)

    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])

    def inference_timesteps(self, num_steps: int) -> np.ndarray:
        """The descending timesteps of a num_steps trajectory (diffusers' spacing rules)."""
        n = self.num_train_timesteps
        if not 0 < num_steps <= n:
            raise BadInput(f"num_steps={num_steps} must be in [1, {n}]")
        if self.timestep_spacing == "leading":
            ts = np.arange(num_steps) * (n // num_steps) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / num_steps))[::-1].astype(np.int64) - 1
        else:
            ts = np.linspace(0, n - 1, num_steps).round()
        return ts.astype(np.int64)[::-1].copy()


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(abar) so its last value is 0 and its first unchanged (Lin et al.
    2023, Algorithm 1), in fp32 as diffusers' rescale_zero_terminal_snr."""
    root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def add_noise(alphas_cumprod, clean, noise, timesteps):
    """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, timesteps [B] integer."""
    abar = jnp.asarray(alphas_cumprod)[timesteps].astype(jnp.float32)
    shape = (-1,) + (1,) * (clean.ndim - 1)
    a = jnp.sqrt(abar).reshape(shape)
    s = jnp.sqrt(1.0 - abar).reshape(shape)
    return (a * clean.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(clean.dtype)


def training_target(prediction_type: str, alphas_cumprod, clean, noise, timesteps):
    """What the denoiser learns to output at x_t = add_noise(clean, noise, t): the noise
    ("epsilon") or the velocity sqrt(abar) eps - sqrt(1 - abar) x_0 ("v_prediction")."""
    if prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type {prediction_type!r} not supported {PREDICTION_TYPES}")
    abar = jnp.asarray(alphas_cumprod)[timesteps].astype(jnp.float32)
    shape = (-1,) + (1,) * (clean.ndim - 1)
    return (jnp.sqrt(abar).reshape(shape) * noise.astype(jnp.float32)
            - jnp.sqrt(1.0 - abar).reshape(shape) * clean.astype(jnp.float32))
