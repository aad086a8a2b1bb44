"""TPU splash attention (Pallas/Mosaic) for our [B,T,H,D] layout, grouped-query heads,
packed rows (segment ids) and causal masking.

The kernel works on one batch row with [H,T,D] queries and [K,S,D] keys/values (K may
divide H: grouped-query attention), so rows are vmapped. Under a mesh it runs inside
shard_map: a Mosaic kernel is an opaque custom call that XLA's partitioner would
otherwise run replicated (gathering the whole batch onto every chip). Batch and heads
split as the logical-axis rules place "batch", "heads" and "kv_heads"; the sequence
stays whole in each shard.

The kernel's products take jax_default_matmul_precision at trace time: "highest" (fp32
contract precision) with bf16 inputs fails Mosaic's compile ("Bad lhs type").
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array

# Block sizes tried, largest first: each must divide the query and key lengths. The
# kernel needs multiples of 128 (one TPU lane row).
BLOCK_SIZES = (512, 256, 128)


def block_size(q_len: int, kv_len: int) -> int | None:
    """The largest of BLOCK_SIZES dividing both lengths, or None (splash cannot run)."""
    for block in BLOCK_SIZES:
        if q_len % block == 0 and kv_len % block == 0:
            return block
    return None


def splash_problem(query: Any, key: Any, value: Any, mask: Any | None, bias: Any | None,
                   causal: bool) -> str | None:
    """Why splash attention cannot take these inputs (shapes only), or None when it can."""
    if mask is not None or bias is not None:
        return "splash attention takes segment ids and causality, not a mask or bias array"
    (_, q_len, heads, head_dim), (_, kv_len, kv_heads, _) = query.shape, key.shape
    if causal and q_len != kv_len:
        return f"causal splash attention needs as many keys as queries, got {kv_len} and {q_len}"
    if block_size(q_len, kv_len) is None:
        return (f"splash attention needs query and key lengths that are multiples of "
                f"{BLOCK_SIZES[-1]}, got {q_len} and {kv_len}")
    if value.shape[-1] != head_dim or key.shape[-1] != head_dim:
        return "splash attention takes one head_dim for query, key and value"
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    return None


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    head_mask = sm.CausalMask((q_len, kv_len)) if causal else sm.FullMask((q_len, kv_len))
    block = block_size(q_len, kv_len)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(query, key, value, segment_ids, causal, interpret):
    """Splash attention on arrays that are all on one device (or one shard)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    _, q_len, heads, head_dim = query.shape
    kernel = _kernel(heads, q_len, key.shape[1], causal, interpret)
    # The kernel does not scale the scores; scaling the queries is the same product.
    query = query * jnp.asarray(1.0 / math.sqrt(head_dim), query.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
            q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)


def _axes_size(mesh, spec_entry) -> int:
    names = () if spec_entry is None else (
        (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry))
    return math.prod(mesh.shape[name] for name in names)


def splash_attention(query: Array, key: Array, value: Array, segment_ids: Array | None = None,
                     causal: bool = True, interpret: bool = False) -> Array:
    """query [B,T,H,D], key/value [B,S,K,D], segment_ids [B,T] (S == T; attention stays
    within equal ids), causal: keys at or before each query only. interpret: run the
    kernel in Pallas's interpreter (any backend; for tests)."""
    problem = splash_problem(query, key, value, None, None, causal)
    if problem is not None:
        raise ValueError(problem)
    if segment_ids is not None and query.shape[1] != key.shape[1]:
        raise ValueError("segment ids need as many keys as queries")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local_attention(query, key, value, segment_ids, causal, interpret)
    # Partition specs from the logical-axis rules in force (sharding.activate); a mesh
    # axis that does not divide the dimension is left out (that dimension replicated).
    batch_axes = nn.logical_to_mesh_axes(("batch",))[0]
    head_axes = nn.logical_to_mesh_axes(("heads",))[0]
    kv_head_axes = nn.logical_to_mesh_axes(("kv_heads",))[0]
    if query.shape[0] % _axes_size(mesh, batch_axes):
        batch_axes = None
    heads, kv_heads = query.shape[2], key.shape[2]
    if (head_axes != kv_head_axes or heads % _axes_size(mesh, head_axes)
            or kv_heads % _axes_size(mesh, kv_head_axes)):
        # Query head h reads kv head h // (H/K): only an equal split of both keeps each
        # shard's query heads with their kv heads.
        head_axes = kv_head_axes = None
    q_spec = PartitionSpec(batch_axes, None, head_axes, None)
    kv_spec = PartitionSpec(batch_axes, None, kv_head_axes, None)
    args, specs = [query, key, value], [q_spec, kv_spec, kv_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(PartitionSpec(batch_axes, None))

    def local(q, k, v, s=None):
        return _local_attention(q, k, v, s, causal, interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                         check_vma=False)(*args)
