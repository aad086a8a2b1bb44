"""The jitted train and eval steps of every stage, from an objective (objectives.py).

A train step takes the state and a batch stacked over `grad_accum_steps` micro-batches
(every array [k, B, ...]); it scans the micro-batches adding the gradients of
loss(micro-batch) = sum / normaliser-of-the-whole-batch, so the update equals the one of
the single large batch. Metrics: loss and the objective's terms, grad_norm (before
clipping), lr (the schedule at the optimizer's count, the lr this update applies: after a
skipped step the count lags the step), skipped (1 when this update was skipped) and
skipped_total.

Non-finite loss or gradient: with `skip_nonfinite` the update is dropped (params, moments
and the optimizer count stay as they were; the step counter still advances, so the data
and RNG move on) and counted in `state.skipped`; without it the step applies as is and
the runner stops at the next metrics fetch, naming the step and the batch's records.

Both steps are compiled with explicit shardings from abstract shapes only, so a step can
be lowered for a topology without any parameters (`lower`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from metamorph_jax import sharding
from metamorph_jax.training.optim import schedule_count
from metamorph_jax.training.state import TrainState, rng_key

Array = jax.Array
EVAL_SEED = 12345   # eval draws (decoder timesteps, noise) are the same at every evaluation


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def make_train_step(objective, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, skip_nonfinite: bool
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(rng_key(state.rng), state.step)
        normalizers = objective.normalizers(batch)
        count = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, xs):
            grads, sums = carry
            index, micro_batch = xs

            def loss_fn(trainable):
                params = objective.model_params(trainable, state.frozen)
                return objective.loss(params, micro_batch, normalizers,
                                      jax.random.fold_in(step_rng, index))

            (_, micro_sums), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.trainable)
            micro_sums = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), micro_sums)
            if grads is None:
                return (micro_grads, micro_sums), None
            return (_add(grads, micro_grads), _add(sums, micro_sums)), None

        if count == 1:
            (grads, sums), _ = micro((None, None), (0, jax.tree.map(lambda x: x[0], batch)))
        else:
            first = jax.tree.map(lambda x: x[0], batch)
            rest = jax.tree.map(lambda x: x[1:], batch)
            carry, _ = micro((None, None), (0, first))
            (grads, sums), _ = jax.lax.scan(micro, carry, (jnp.arange(1, count), rest))
        loss, metrics = objective.summarize(sums)
        applied_lr = schedule(schedule_count(state.opt_state))  # the lr this update applies
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state.skipped
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda n, o: jnp.where(finite, n, o), new, old)
            trainable = keep(trainable, state.trainable)
            opt_state = keep(opt_state, state.opt_state)
            skipped = skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        metrics = dict(metrics, grad_norm=grad_norm,
                       lr=jnp.asarray(applied_lr, jnp.float32),
                       skipped=jnp.where(finite, 0.0, 1.0) if skip_nonfinite else jnp.zeros(()),
                       skipped_total=skipped.astype(jnp.float32))
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                             skipped=skipped), metrics
    return train_step


def make_eval_step(objective) -> Callable[[TrainState, dict], dict]:
    """(state, one batch [1, B, ...]) -> the objective's loss sums (add them over batches,
    then objective.summarize)."""
    def eval_step(state: TrainState, batch: dict) -> dict:
        params = objective.model_params(state.trainable, state.frozen)
        micro_batch = jax.tree.map(lambda x: x[0], batch)
        _, sums = objective.loss(params, micro_batch, objective.normalizers(batch),
                                 jax.random.key(EVAL_SEED))
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), sums)
    return eval_step


# --- batches and compilation ---------------------------------------------------------------

def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """[k, B, ...]: micro-batch axis whole, B over the data axes, the rest replicated."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((None, "batch") + (None,) * (ndim - 2),
                                                       rules))


def batch_ways(mesh: Mesh, rules) -> int:
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def stack_micro_batches(micro_batches: list[dict], keys: tuple[str, ...]) -> dict:
    """Host micro-batches -> {key: [k, B, ...]} of the keys the step reads (host-only
    fields such as record_ids stay behind)."""
    missing = [key for key in keys if key not in micro_batches[0]]
    if missing:
        raise KeyError(f"the batch lacks {missing}; this stage reads {list(keys)}")
    return {key: np.stack([np.asarray(mb[key]) for mb in micro_batches]) for key in keys}


def global_batch(stacked: dict, mesh: Mesh, rules) -> dict:
    """This process's rows -> global arrays (each process contributes its own rows)."""
    rows = next(iter(stacked.values())).shape[1] * jax.process_count()
    ways = batch_ways(mesh, rules)
    if rows % ways:
        raise ValueError(f"global batch size {rows} does not divide over the mesh's batch axes "
                         f"({ways} ways); change the stage's data.batch_size or the mesh")
    return {key: jax.make_array_from_process_local_data(
        batch_sharding(mesh, rules, value.ndim), value) for key, value in stacked.items()}


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings: TrainState, rules,
                   batch_specs: dict) -> Callable:
    """jax.jit with the state donated; batch_specs: {key: ndim} of the stacked batch."""
    batch_shardings = {key: batch_sharding(mesh, rules, ndim) for key, ndim in batch_specs.items()}
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))

    def run(state: TrainState, batch: dict):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    def lower(state: Any, batch: dict):
        """jax's Lowered for (abstract) state and batch, traced exactly as `run` traces."""
        with sharding.activate(mesh, rules):
            return jitted.lower(state, batch)
    run.jitted = jitted
    run.lower = lower
    return run


def jit_eval_step(eval_step: Callable, mesh: Mesh, state_shardings: TrainState, rules,
                  batch_specs: dict) -> Callable:
    batch_shardings = {key: batch_sharding(mesh, rules, ndim) for key, ndim in batch_specs.items()}
    jitted = jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=sharding.replicated(mesh))

    def run(state: TrainState, batch: dict):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run
