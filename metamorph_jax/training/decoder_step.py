"""The diffusion decoder's training objective and jitted step (one more stage for the runner).

Trained: the token projector and the UNet. Frozen: the VAE (and the vision encoder, whose
tokens arrive in the batch or come from ``token_fn``). Objective: epsilon-prediction MSE at
timesteps drawn uniformly from [0, num_train_timesteps); the whole condition is replaced by
the all-zero context with probability ``cfg_prob`` (classifier-free guidance training).

Batch (a dict, leading batch axis): ``images`` [B,H,W,3] in [-1, 1] (or ``samples``: the
already-encoded latents / pixels the UNet denoises) and ``tokens`` [B, num_tokens, C].
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from metamorph_jax import sharding
from metamorph_jax.models.noise_schedule import NoiseSchedule, add_noise
from metamorph_jax.models.visualizer import Visualizer

TRAINABLE = ("projector", "unet")

# The shared rules plus the convolution axes: conv kernels [kh, kw, in, out] are sharded
# ZeRO-3 style over fsdp on their output channels; image/latent channels (3, 4, 8) and
# the spatial axes of activations stay whole.
DECODER_RULES: tuple = sharding.DEFAULT_RULES + (
    ("conv_in", None), ("conv_out", "fsdp"), ("channels", None), ("image_channels", None),
    ("height", None), ("width", None),
)


@struct.dataclass
class DecoderTrainState:
    step: jax.Array
    params: Any      # {'projector', 'unet'}: trained
    frozen: Any      # {'vae'} (and anything else token_fn needs): never updated
    opt_state: Any


def _dummy_inputs(model: Visualizer):
    cfg = model.config
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.unet.out_channels
                        if cfg.vae is None else cfg.vae.in_channels), jnp.float32)
    tokens = jnp.zeros((1, cfg.num_tokens, cfg.token_dim), jnp.float32)
    return images, jnp.zeros((1,), jnp.int32), tokens


def _boxed_init(model: Visualizer, tx: optax.GradientTransformation):
    def init(rng):
        params = model.init(rng, *_dummy_inputs(model))["params"]
        trainable = {k: params[k] for k in TRAINABLE}
        frozen = {k: v for k, v in params.items() if k not in TRAINABLE}
        return DecoderTrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                                 opt_state=tx.init(trainable))
    return init


def state_shardings(model: Visualizer, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DECODER_RULES):
    """NamedShardings of the train state on mesh, from logical axis -> mesh axis rules."""
    abstract = jax.eval_shape(_boxed_init(model, tx), jax.random.PRNGKey(0))
    return sharding.logical_shardings(abstract, mesh, rules)


def create_decoder_state(model: Visualizer, tx: optax.GradientTransformation, rng,
                         shardings: Any = None) -> DecoderTrainState:
    """Randomly initialised state, created directly with the given shardings (or default)."""
    boxed = _boxed_init(model, tx)
    init = lambda r: nn.meta.unbox(boxed(r))  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(rng)


def _check_same_tree(name: str, given, expected) -> None:
    """Raise naming the first parameter whose path or shape differs."""
    from flax import traverse_util
    got = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(given).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            raise ValueError(f"pretrained {name}: parameter {path!r} is "
                             f"{got.get(path, 'missing')}, the decoder config expects "
                             f"{want.get(path, 'no such parameter')}")


def with_pretrained(state: DecoderTrainState, tx: optax.GradientTransformation, *,
                    unet: Any = None, vae: Any = None) -> DecoderTrainState:
    """Put converted UNet / VAE weights (pretrained.load_params of a `convert` folder) into
    a fresh state; the optimizer state restarts. Shapes must match the config. Place the
    result with jax.device_put(state, shardings)."""
    params, frozen = dict(state.params), dict(state.frozen)
    if unet is not None:
        _check_same_tree("unet", unet, params["unet"])
        params["unet"] = unet
    if vae is not None:
        if "vae" not in frozen:
            raise ValueError("pretrained vae given, but the decoder config is pixel-space")
        _check_same_tree("vae", vae, frozen["vae"])
        frozen["vae"] = vae
    return state.replace(params=params, frozen=frozen, opt_state=tx.init(params))


def decoder_loss(model: Visualizer, params, frozen, batch: dict, rng, alphas_cumprod,
                 cfg_prob: float, token_fn: Optional[Callable] = None):
    """Epsilon-MSE (fp32) and metrics for one batch."""
    variables = {"params": {**params, **frozen}}
    r_encode, r_time, r_noise, r_drop = jax.random.split(rng, 4)
    if "samples" in batch:
        samples = batch["samples"]
    else:
        samples = model.apply(variables, batch["images"], r_encode, method=Visualizer.encode_images)
    samples = jax.lax.stop_gradient(samples).astype(jnp.float32)
    tokens = token_fn(frozen, batch) if token_fn is not None else batch["tokens"]
    tokens = jax.lax.stop_gradient(tokens)

    batch_size = samples.shape[0]
    timesteps = jax.random.randint(r_time, (batch_size,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(r_noise, samples.shape, jnp.float32)
    noisy = add_noise(alphas_cumprod, samples, noise, timesteps)

    context = model.apply(variables, tokens, method=Visualizer.condition)
    drop = jax.random.bernoulli(r_drop, cfg_prob, (batch_size,))
    context = jnp.where(drop[:, None, None], jnp.zeros_like(context), context)
    eps = model.apply(variables, noisy, timesteps, context, method=Visualizer.denoise)
    loss = jnp.mean((eps.astype(jnp.float32) - noise) ** 2)
    return loss, {"loss": loss, "dropped_fraction": jnp.mean(drop.astype(jnp.float32))}


def make_decoder_train_step(model: Visualizer, tx: optax.GradientTransformation,
                            schedule: NoiseSchedule, cfg_prob: float = 0.8,
                            learning_rate_fn: Optional[optax.Schedule] = None,
                            token_fn: Optional[Callable] = None):
    """Returns train_step(state, batch, rng) -> (state, metrics); pure, so it jits.

    The step's randomness is rng folded with state.step, so resuming from a checkpoint
    replays the same draws."""
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod())
    if not 0.0 <= cfg_prob <= 1.0:
        raise ValueError(f"decoder: cfg_prob={cfg_prob} must be in [0, 1]")

    def train_step(state: DecoderTrainState, batch: dict, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(
            lambda p: decoder_loss(model, p, state.frozen, batch, step_rng, alphas_cumprod,
                                   cfg_prob, token_fn), has_aux=True)
        (_, metrics), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step, state_sharding: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DECODER_RULES):
    """jax.jit with explicit shardings: state as given (donated), every batch array split
    on its leading axis as the rules place "batch", rng and metrics replicated.

    Returns run(state, batch, rng) -> (state, metrics), which traces and runs under the
    mesh and the logical-axis rules (the models' activation constraints need both)."""
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    replicated = sharding.replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated),
                     out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    spec = batch_sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    def run(state: DecoderTrainState, batch: dict, rng):
        for key, value in batch.items():
            if value.shape[0] % ways:
                raise ValueError(f"decoder batch field {key!r}: batch size {value.shape[0]} "
                                 f"does not divide over the mesh's batch axes {axes} ({ways})")
        with sharding.activate(mesh, rules):
            return jitted(state, batch, rng)

    return run


def build_decoder_stage(config):
    """(model, tx, schedule, learning_rate_fn) from a configs/decoder_*.py config."""
    from metamorph_jax.models.visualizer import VisualizerConfig
    from metamorph_jax.training import optim

    model_cfg = VisualizerConfig.from_dict(config.model.to_dict()
                                        if hasattr(config.model, "to_dict") else config.model)
    dtype = jnp.dtype(config.get("dtype", "float32"))
    model = Visualizer(model_cfg, dtype=dtype, remat=bool(config.get("remat", False)))
    train = config.train
    lr_fn = optim.make_schedule(train.lr_schedule, peak_lr=train.peak_lr,
                                warmup_steps=train.warmup_steps,
                                decay_end_step=train.decay_end_step) \
        if train.lr_schedule == "log_warmup_linear_decay" else \
        optim.make_schedule(train.lr_schedule, peak_lr=train.peak_lr)
    tx = optim.adamw(lr_fn, b1=train.b1, b2=train.b2, eps=train.eps,
                     weight_decay=train.weight_decay, grad_clip_norm=train.grad_clip_norm)
    schedule = NoiseSchedule(**dict(config.schedule))
    return model, tx, schedule, lr_fn
