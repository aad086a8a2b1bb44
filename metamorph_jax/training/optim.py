"""Optimizers and learning-rate schedules (optax), built from one config shape for every stage.

A stage's `optim` fields (configs/*.py)::

    lr              peak learning rate
    schedule        "warmup_cosine" | "constant" | "log_warmup_linear_decay"
    warmup          warm-up length: a value below 1 is a fraction of the stage's steps (the
                    paper's 0.03; rounded up, as transformers' trainer does), 1 or more is
                    a number of steps, 0 is none
    end_ratio       the lr at the end of the decay, as a fraction of lr
    decay_end_step  log_warmup_linear_decay: the step where the decay reaches end_ratio * lr
                    (0: the stage's last step)
    weight_decay, b1, b2, eps   AdamW (decoupled weight decay)
    grad_clip       global-norm clipping of the (accumulated) gradient; 0 disables
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from metamorph_jax.input_errors import BadInput

SCHEDULES = ("warmup_cosine", "constant", "log_warmup_linear_decay")
OPTIM_FIELDS = ("lr", "schedule", "warmup", "end_ratio", "decay_end_step", "weight_decay",
                "b1", "b2", "eps", "grad_clip")


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
        raise BadInput(f"schedule: need 0 <= warmup_steps ({warmup_steps}) <= decay_end_step "
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


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to peak_lr over warmup_steps, then cosine decay to end_lr at
    total_steps (the paper's recipe: 3% warm-up, cosine)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.01, grad_clip_norm: Optional[float] = None,
          weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay), optionally after global-norm gradient clipping.

    weight_decay_mask: pytree of bools (or a function of params) choosing decayed params.
    """
    chain = []
    if grad_clip_norm:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=weight_decay_mask))
    return optax.chain(*chain)


def warmup_steps(warmup: float, steps: int) -> int:
    """The `warmup` field in steps: below 1 a fraction of `steps`, rounded up as the
    authors' trainer does (transformers' TrainingArguments.get_warmup_steps:
    ceil(steps * warmup_ratio)), else a step count."""
    if warmup < 0:
        raise BadInput(f"optim field 'warmup' must be >= 0, got {warmup}")
    if warmup == 0:
        return 0
    if warmup < 1:
        return math.ceil(steps * warmup)
    return int(warmup)


def make_schedule(optim, steps: int, where: str = "optim") -> optax.Schedule:
    """The learning-rate schedule of a stage's `optim` fields (see the module docstring)."""
    kind = optim["schedule"]
    lr = float(optim["lr"])
    end = lr * float(optim.get("end_ratio", 0.0) or 0.0)
    warm = warmup_steps(float(optim.get("warmup", 0.0) or 0.0), steps)
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "warmup_cosine":
        return warmup_cosine(lr, warm, steps, end)
    if kind == "log_warmup_linear_decay":
        decay_end = int(optim.get("decay_end_step", 0) or 0) or steps
        if decay_end < warm:
            raise BadInput(f"{where}: field 'decay_end_step' = {decay_end} is before the end "
                           f"of the warm-up ({warm} steps)")
        return log_warmup_linear_decay(lr, warm, decay_end, end)
    raise BadInput(f"{where}: field 'schedule' = {kind!r} is not one of {SCHEDULES}")


def build_optimizer(optim, steps: int, where: str = "optim"
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW behind optional global-norm clipping, its schedule) from a stage's `optim`."""
    unknown = sorted(set(optim.keys()) - set(OPTIM_FIELDS))
    if unknown:
        raise BadInput(f"{where}: unknown field(s) {unknown}; known: {list(OPTIM_FIELDS)}")
    for field in ("lr", "schedule"):
        if field not in optim:
            raise BadInput(f"{where}: field {field!r} is missing")
    schedule = make_schedule(optim, steps, where)
    tx = adamw(schedule, b1=float(optim.get("b1", 0.9)), b2=float(optim.get("b2", 0.999)),
               eps=float(optim.get("eps", 1e-8)),
               weight_decay=float(optim.get("weight_decay", 0.0)),
               grad_clip_norm=float(optim.get("grad_clip", 0.0) or 0.0) or None)
    return tx, schedule


def schedule_count(opt_state: Any) -> jax.Array:
    """The count the optimizer's learning-rate schedule reads at its next update (optax's
    ScaleByScheduleState): the updates applied so far. A skipped non-finite step leaves it
    as it was, so it can lag the stage's step; the lr an update applies is schedule(count)."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState)]
    if len(states) != 1:
        raise ValueError(f"the optimizer state holds {len(states)} learning-rate schedule "
                         "counts; expected one (an optimizer from optim.build_optimizer)")
    return states[0].count


def schedule_by_name(kind: str, **kwargs) -> optax.Schedule:
    """A schedule by name with explicit arguments: 'log_warmup_linear_decay' | 'constant'."""
    builders: dict[str, Callable[..., optax.Schedule]] = {
        "log_warmup_linear_decay": log_warmup_linear_decay,
        "constant": lambda peak_lr: optax.constant_schedule(peak_lr),
    }
    if kind not in builders:
        raise BadInput(f"optim: schedule {kind!r} is not one of {sorted(builders)}")
    return builders[kind](**kwargs)
