"""One train state for every stage: trainable and frozen parameters, optimizer state over
the trainable part only, the step, the RNG and the count of skipped steps.

A stage picks its trainable set by parameter paths (objectives.py); `split` cuts a params
tree into the two parts and `merge` joins them again. Frozen parameters carry no optimizer
state (optax only ever sees `trainable`) and the step never writes them, so they stay
bit-identical through a stage.

Shardings come from the models' logical axis names: the abstract state is built with
`jax.eval_shape` over params still boxed in `nn.LogicallyPartitioned` (optax's init maps
over leaves, so the Adam moments inherit the boxes), and `sharding.logical_shardings`
turns the names into NamedShardings. Nothing here allocates a model: the abstract state
is what both initialisation and restoring a checkpoint (onto any mesh) start from.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from metamorph_jax import sharding

Array = jax.Array
Path = tuple[str, ...]


@flax.struct.dataclass
class TrainState:
    step: Array          # int32 scalar: updates applied in this stage
    trainable: Any       # nested dict: the parameters this stage updates (fp32 masters)
    frozen: Any          # nested dict: the rest of the model, never updated
    opt_state: Any       # optimizer state over `trainable` only
    rng: Array           # uint32 [2]: raw key data; step s draws from fold_in(rng, s)
    skipped: Array       # int32 scalar: steps skipped for a non-finite loss (skip_nonfinite)

    @classmethod
    def create(cls, trainable: Any, frozen: Any, optimizer: optax.GradientTransformation,
               rng: Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                   opt_state=optimizer.init(trainable), rng=rng,
                   skipped=jnp.zeros((), jnp.int32))


def split(params: dict, is_trainable: Callable[[Path], bool]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts holding the leaves whose path is / is not trainable."""
    flat = traverse_util.flatten_dict(params)
    trainable = {path: leaf for path, leaf in flat.items() if is_trainable(path)}
    frozen = {path: leaf for path, leaf in flat.items() if not is_trainable(path)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(*trees: dict) -> dict:
    """The union of disjoint nested dicts (a path present in two is an error)."""
    flat: dict = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(tree).items():
            if path in flat:
                raise ValueError(f"parameter {'/'.join(path)} is in two parts of the state")
            flat[path] = leaf
    return traverse_util.unflatten_dict(flat)


def rng_data(seed: int) -> Array:
    """The state's RNG for `seed` as raw uint32 key data (checkpoints hold plain arrays)."""
    return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


def rng_key(data: Array) -> Array:
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def abstract_state(boxed_trainable: Any, boxed_frozen: Any,
                   optimizer: optax.GradientTransformation) -> TrainState:
    """The state's shapes, with the parameters' (and moments') logical-axis boxes kept."""
    return jax.eval_shape(
        lambda t, f: TrainState.create(t, f, optimizer, jnp.zeros((2,), jnp.uint32)),
        boxed_trainable, boxed_frozen)


def state_shardings(boxed_abstract: TrainState, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings of the whole state; counters and unnamed leaves are replicated."""
    return sharding.logical_shardings(boxed_abstract, mesh, rules)


def unboxed(tree: Any) -> Any:
    import flax.linen as nn
    return nn.meta.unbox(tree)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """jax.ShapeDtypeStructs carrying `shardings` (the target of a restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def init_state(trainable: Any, frozen: Any, optimizer: optax.GradientTransformation,
               rng: Array, shardings: TrainState, mesh: Mesh) -> TrainState:
    """A TrainState built on the mesh from placed parameters. The parameters are donated
    (their buffers become the state's): one copy of the model in memory."""
    create = jax.jit(lambda t, f, r: TrainState.create(t, f, optimizer, r),
                     in_shardings=(shardings.trainable, shardings.frozen, shardings.rng),
                     out_shardings=shardings, donate_argnums=(0, 1))
    with jax.set_mesh(mesh):
        return create(trainable, frozen, rng)
