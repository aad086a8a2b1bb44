"""The jitted train / eval step of the LLM text stage (text-only conversation records).

A batch is the packed layout of data/packing.py; these steps read only `tokens`,
`positions`, `segment_ids`, `text_targets` and `text_mask` (TEXT_BATCH_KEYS). The VPiT
step with images and the vision loss will live in step.py.

Sharding: the train state's shardings come from the model's logical axis names
(sharding.logical_shardings over an abstract state whose params are still boxed), so
the Adam moments are sharded exactly like the parameters. `jit_train_step` compiles one
`jax.jit` with those explicit in/out shardings, the batch split over (data, fsdp), and
the state donated.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from metamorph_jax import sharding
from metamorph_jax.models import llama
from metamorph_jax.training.losses import masked_cross_entropy

Array = jax.Array
TEXT_BATCH_KEYS = ("tokens", "positions", "segment_ids", "text_targets", "text_mask")


@flax.struct.dataclass
class TrainState:
    step: Array          # int32 scalar: number of updates applied
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def text_batch(batch: dict) -> dict:
    """The keys the text step reads, so that images (unused here) are never sent to devices."""
    missing = [key for key in TEXT_BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; the text step needs {list(TEXT_BATCH_KEYS)}")
    return {key: batch[key] for key in TEXT_BATCH_KEYS}


def text_loss_sum(model: nn.Module, params: Any, batch: dict) -> tuple[Array, Array]:
    """(loss_sum, token_count) of the response tokens of a packed batch."""
    output = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    return masked_cross_entropy(output.logits, batch["text_targets"], batch["text_mask"])


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    learning_rate_fn: Callable[[Array], Array] | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """(state, batch) -> (state, metrics), un-jitted (see jit_train_step).

    The loss is the mean over the batch's trained tokens (all rows together, so packing
    does not reweight samples). metrics: loss, tokens (trained tokens in the batch),
    grad_norm (global norm before clipping), lr (learning_rate_fn at this step's count;
    NaN when not given).
    """
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            loss_sum, count = text_loss_sum(model, params, batch)
            return loss_sum / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = (jnp.asarray(learning_rate_fn(state.step), jnp.float32) if learning_rate_fn is not None
              else jnp.full((), jnp.nan, jnp.float32))
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads), "lr": lr}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], tuple[Array, Array]]:
    """(params, batch) -> (loss_sum, token_count), un-jitted (see jit_eval_step)."""
    def eval_step(params: Any, batch: dict) -> tuple[Array, Array]:
        return text_loss_sum(model, params, batch)
    return eval_step


# --- shardings and compilation ----------------------------------------------------------

def abstract_boxed_params(model: nn.Module) -> Any:
    """The model's parameter shapes, still boxed with their logical axis names."""
    return llama.abstract_boxed_params(model)


def param_shardings(model: nn.Module, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Any:
    sharding.check_platform(model.config.platform, mesh)
    return sharding.logical_shardings(abstract_boxed_params(model), mesh, rules)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings of the whole TrainState (optimizer moments follow their params;
    counters and other unnamed leaves are replicated). The model must be built for the
    mesh's platform (sharding.check_platform)."""
    sharding.check_platform(model.config.platform, mesh)
    boxed = abstract_boxed_params(model)
    # optax's init maps over leaves, so moments inherit the boxes (and the axis names).
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, optimizer), boxed)
    return sharding.logical_shardings(abstract_state, mesh, rules)


def init_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
               shardings: TrainState) -> TrainState:
    """A TrainState built on the mesh from params placed with `shardings.params`. The
    params are donated (their buffers become the state's), so there is one copy of the
    model in memory; do not use the passed params afterwards."""
    create = jax.jit(lambda p: TrainState.create(p, optimizer),
                     in_shardings=(shardings.params,), out_shardings=shardings,
                     donate_argnums=(0,))
    with jax.set_mesh(mesh):
        return create(params)


def _check_batch_divides(mesh: Mesh, rules, batch_size: int) -> None:
    spec = sharding.batch_sharding(mesh, rules).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch_size % ways:
        raise ValueError(f"global batch size {batch_size} does not divide over the mesh's "
                         f"batch axes {axes} ({ways} ways); change data.batch_size or the mesh")


def jit_train_step(train_step: Callable, mesh: Mesh, shardings: TrainState,
                   rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Callable:
    """Compile `train_step` with explicit shardings and the state donated.

    The returned function takes (state, batch of global jax.Arrays or host numpy arrays)
    and runs under the mesh and the logical-axis rules (the model's activation
    constraints need both at trace time); its `lower` attribute lowers it the same way
    (for inspecting the compiled program).
    """
    batch_sharding = sharding.batch_sharding(mesh, rules)
    jitted = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

    def run(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = text_batch(batch)
        _check_batch_divides(mesh, rules, batch["tokens"].shape[0])
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    def lower(state: Any, batch: dict) -> Any:
        """jax's Lowered for (abstract) state and batch, traced exactly as `run` traces."""
        batch = text_batch(batch)
        _check_batch_divides(mesh, rules, batch["tokens"].shape[0])
        with sharding.activate(mesh, rules):
            return jitted.lower(state, batch)
    run.lower = lower
    return run


def jit_eval_step(eval_step: Callable, mesh: Mesh, params_shardings: Any,
                  rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Callable:
    """Compile `eval_step` with explicit shardings; returns (params, batch) -> (sum, count)."""
    batch_sharding = sharding.batch_sharding(mesh, rules)
    jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding),
                     out_shardings=sharding.replicated(mesh))

    def run(params: Any, batch: dict) -> tuple[Array, Array]:
        batch = text_batch(batch)
        _check_batch_divides(mesh, rules, batch["tokens"].shape[0])
        with sharding.activate(mesh, rules):
            return jitted(params, batch)
    return run


def global_batch(batch: dict, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> dict:
    """This process's rows of a batch -> global jax.Arrays split over the batch axes
    (each process contributes its own rows; one process: the batch as is)."""
    batch = text_batch(batch)
    _check_batch_divides(mesh, rules, batch["tokens"].shape[0] * jax.process_count())
    batch_sharding = sharding.batch_sharding(mesh, rules)
    return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
            for key, value in batch.items()}
