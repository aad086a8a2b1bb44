"""Optimizers and learning-rate schedules (optax), shared by the training stages."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax.numpy as jnp
import optax


def log_warmup_linear_decay(peak_lr: float, warmup_steps: int, decay_end_step: int,
                            end_lr: float = 0.0) -> optax.Schedule:
    """Logarithmic warm-up to peak_lr, then linear decay to end_lr.

    lr(s) = peak_lr * log(1 + s) / log(1 + warmup_steps) for s < warmup_steps (0 at step 0,
    fast early growth), then a straight line from peak_lr at warmup_steps to end_lr at
    decay_end_step, constant after. The update with optimizer count s uses lr(s), as the
    authors' torch LambdaLR does (its first update uses the multiplier at step 0). The
    MetaMorph decoder uses peak 1e-5, warm-up 4000, decay to 0 at step 16000 (authors'
    code, configs/decoder_sd15.py) or 1.1e-5 / 2000 / 14000 (paper's text).
    """
    if warmup_steps < 0 or decay_end_step < warmup_steps:
        raise ValueError(f"schedule: need 0 <= warmup_steps ({warmup_steps}) <= decay_end_step "
                         f"({decay_end_step})")
    log_norm = math.log1p(max(warmup_steps, 1))
    decay_len = max(decay_end_step - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * jnp.log1p(step) / log_norm
        frac = jnp.clip((step - warmup_steps) / decay_len, 0.0, 1.0)
        decay = peak_lr + (end_lr - peak_lr) * frac
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.01, grad_clip_norm: Optional[float] = None,
          weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay), optionally after global-norm gradient clipping.

    weight_decay_mask: pytree of bools (or a function of params) choosing decayed params.
    """
    chain = []
    if grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=weight_decay_mask))
    return optax.chain(*chain)


def make_schedule(kind: str, **kwargs) -> optax.Schedule:
    """A schedule by name from config: 'log_warmup_linear_decay' | 'constant'."""
    builders: dict[str, Callable[..., optax.Schedule]] = {
        "log_warmup_linear_decay": log_warmup_linear_decay,
        "constant": lambda peak_lr: optax.constant_schedule(peak_lr),
    }
    if kind not in builders:
        raise ValueError(f"optim: schedule {kind!r} is not one of {sorted(builders)}")
    return builders[kind](**kwargs)
