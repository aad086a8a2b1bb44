"""Meshes and logical-axis rules: how named array axes land on devices.

Models name their axes (batch, length, embed, heads, ...); a rule table, kept in the
config, maps each name to mesh axes (data, fsdp, tensor). Changing the parallelism of a
run is changing the mesh shape, not the model.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metamorph_jax.input_errors import BadInput

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over data x fsdp; parameters sharded ZeRO-3 style over fsdp on their
# embed axis and Megatron style over tensor on heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise BadInput(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise BadInput(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    if -1 in sizes:
        if len(devices) % known:
            raise BadInput(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices do not "
                           f"divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise BadInput(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                       f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what a model built for
    the mesh is compiled for (LlamaConfig.platform), which need not be the backend of
    the process compiling it (a TPU plan compiled on a CPU host)."""
    platforms = {device.platform for device in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"the mesh mixes device platforms {sorted(platforms)}")
    return platforms.pop()


def check_platform(platform: str | None, mesh: Mesh, what: str = "the model") -> None:
    """A ValueError unless a model compiled for `platform` (None: jax.default_backend())
    runs on the mesh's devices: kernels chosen for one platform do not compile for
    another."""
    chosen = jax.default_backend() if platform is None else platform
    if chosen != mesh_platform(mesh):
        raise BadInput(f"{what} is built for platform {chosen!r} (config field 'platform' = "
                       f"{platform!r}) but the mesh's devices are {mesh_platform(mesh)!r}; "
                       f"build it with platform=sharding.mesh_platform(mesh)")


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
    """The mesh and logical-axis rules that model code must be traced (and run) under.

    jax.set_mesh, not the legacy `with mesh:`: flax's with_logical_constraint looks the
    mesh up with jax.sharding.get_abstract_mesh(), which `with mesh:` leaves empty, so
    under it every activation constraint is silently dropped (XLA then gathered the whole
    batch's logits onto every device).
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of nn.LogicallyPartitioned values (or their abstract shapes).

    A dimension whose size the mesh axes it maps to do not divide is kept whole instead
    (LLaMA-3's 128256 + 2 rows on tensor=4): jax cannot place an uneven shard, and padding
    the table would change the checkpoint's shapes."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    leaves, treedef = jax.tree.flatten(shardings)
    values = jax.tree.leaves(nn.unbox(boxed_tree))
    if len(values) != len(leaves):
        raise ValueError(f"logical_shardings: {len(values)} arrays for {len(leaves)} shardings")
    return jax.tree.unflatten(treedef, [divisible_sharding(sharding_, value.shape)
                                        for sharding_, value in zip(leaves, values)])


def divisible_sharding(named: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """`named` with every dimension that its mesh axes do not divide evenly left whole."""
    spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
    for dim, entry in enumerate(spec):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        ways = int(np.prod([named.mesh.shape[axis] for axis in axes])) if axes else 1
        if shape[dim] % ways:
            spec[dim] = None
    return NamedSharding(named.mesh, PartitionSpec(*spec), memory_kind=named.memory_kind)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)
