"""Pieces shared by the transformer models: attention dispatch, RMSNorm, rotary
embeddings, gated MLP, dtype and remat helpers.

Everything here is pure math on arrays; parameter names follow Hugging Face so the
checkpoint converters stay tables.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models import splash

Array = jax.Array

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def to_dtype(name: str | Any) -> Any:
    """Turns a config dtype string ("float32", "bfloat16", "float16") into a jnp dtype."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# --------------------------------------------------------------------------- attention

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "splash", "stacked", "reference")


def resolve_platform(platform: str | None) -> str:
    """The platform kernels are chosen for: `platform` as given (the mesh's, set once by
    whoever builds the model for a mesh, see sharding.mesh_platform), else the backend
    tracing the call. A plan compiled here for other devices must give it."""
    return jax.default_backend() if platform is None else platform


def reference_attention(query: Array, key: Array, value: Array, mask: Array | None,
                        bias: Array | None) -> Array:
    """Plain einsum attention with grouped-query heads; the path tests compare against."""
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    if groups == 1:
        # Plain multi-head layout: XLA's CPU backend runs it markedly faster than the
        # grouped 5-D form below.
        logits = jnp.einsum("bthd,bshd->bhts", query, key,
                            preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhts,bshd->bthd", probs, value)
    q = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, key,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    logits = logits.reshape(batch, num_heads, q_len, key.shape[1])
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    probs = probs.reshape(batch, num_kv_heads, groups, q_len, key.shape[1])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value)
    return out.reshape(batch, q_len, num_heads, head_dim)


def _query_rows(query: Array, groups: int) -> Array:
    """[B,T,K*G,D] -> [B,K,T*G,D]: each kv head's queries as rows, row = t*G + g."""
    batch, length, heads, dim = query.shape
    rows = query.reshape(batch, length, heads // groups, groups, dim).transpose(0, 2, 1, 3, 4)
    return rows.reshape(batch, heads // groups, length * groups, dim)


def _query_columns(query: Array, groups: int) -> Array:
    """[B,T,K*G,D] -> [B,K,D,T*G]: the rows of _query_rows, transposed."""
    batch, length, heads, dim = query.shape
    cols = query.reshape(batch, length, heads // groups, groups, dim).transpose(0, 2, 4, 1, 3)
    return cols.reshape(batch, heads // groups, dim, length * groups)


def _from_query_rows(rows: Array, groups: int) -> Array:
    """Inverse of _query_rows: [B,K,T*G,D] -> [B,T,K*G,D]."""
    batch, kv_heads, num_rows, dim = rows.shape
    rows = rows.reshape(batch, kv_heads, num_rows // groups, groups, dim).transpose(0, 2, 1, 3, 4)
    return rows.reshape(batch, num_rows // groups, kv_heads * groups, dim)


def _query_blocks(length: int, keys: int, block: int) -> list[tuple[int, int, int]]:
    """(first, end, key_end) per block of query positions.

    block > 0 (causal self-attention): queries [first, end) see keys [0, end) only, so
    the products skip the masked upper triangle. block == 0: one block over all keys.
    """
    if block <= 0:
        return [(0, length, keys)]
    return [(first, min(first + block, length), min(first + block, length))
            for first in range(0, length, block)]


def _block_probs(q_block, k_heads, mask, groups, scale, first, end, key_end):
    """Softmax probabilities [B,K,(end-first)*G,key_end] in fp32 for the query block of
    positions [first, end), given as stacked rows q_block [B,K,(end-first)*G,D]."""
    scores = jnp.einsum("bkmd,bksd->bkms", q_block, k_heads[:, :, :key_end],
                        preferred_element_type=jnp.float32) * scale
    batch, kv_heads = scores.shape[:2]
    scores = scores.reshape(batch, kv_heads, end - first, groups, key_end)
    block_mask = mask[:, :, first:end, None, :key_end]
    scores = jnp.where(block_mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, -1, key_end)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def stacked_attention(query: Array, key: Array, value: Array, mask: Array, groups: int,
                      causal_block: int = 0) -> Array:
    """Grouped-query attention with each kv head's queries stacked as matrix rows.

    query [B,T,K*G,D], key/value [B,S,K,D], mask bool [B,1,T,S] (the same for every
    head). One [T*G, D] x [D, S] product per (batch, kv head) needs no repeated keys,
    and the hand-written backward lays every product out as a plain row-major matmul
    for XLA's CPU backend. causal_block > 0 promises the mask is causal (key <= query,
    S == T): queries then run in blocks of that many positions, each against the keys
    up to its end only, skipping the masked upper triangle.
    """
    return _stacked_attention_fwd(query, key, value, mask, groups, causal_block)[0]


def _stacked_attention_fwd(query, key, value, mask, groups, causal_block):
    # Each block's stacked query rows come straight from the [B,T,H,D] layout (the slice
    # fuses into the transpose): slicing blocks out of all rows stacked cost a copy each.
    scale = 1.0 / math.sqrt(query.shape[-1])
    k_heads, v_heads = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    q_rows, q_cols, probs, outs = [], [], [], []
    for first, end, key_end in _query_blocks(query.shape[1], key.shape[1], causal_block):
        q_block = query[:, first:end]
        q_rows.append(_query_rows(q_block, groups))
        q_cols.append(_query_columns(q_block, groups))
        probs.append(_block_probs(q_rows[-1], k_heads, mask, groups, scale, first, end,
                                  key_end))
        out_rows = jnp.einsum("bkms,bksd->bkmd", probs[-1].astype(value.dtype),
                              v_heads[:, :, :key_end])
        outs.append(_from_query_rows(out_rows, groups))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return out, (q_rows, q_cols, k_heads, v_heads, probs, out)


def _stacked_attention_bwd(groups, causal_block, residuals, d_out):
    q_rows, q_cols, k_heads, v_heads, probs, out = residuals
    scale = 1.0 / math.sqrt(out.shape[-1])
    length, keys = out.shape[1], k_heads.shape[2]
    # Softmax backward: p * (dp - sum_s(dp * p)), and sum_s(dp * p) = sum_d(d_out * out),
    # computed per [B,T,H] and laid out as rows.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = _query_rows(delta[..., None], groups)
    d_query, d_key_cols, d_value_cols = [], None, None
    for (first, end, key_end), block_q_rows, block_q_cols, block_probs in zip(
            _query_blocks(length, keys, causal_block), q_rows, q_cols, probs):
        d_block = d_out[:, first:end]
        d_rows = _query_rows(d_block, groups)
        # Transposed copies (the barrier keeps XLA from folding them back into the
        # products), so the key/value gradients are [D, rows] x [rows, S] row-major products.
        d_cols = jax.lax.optimization_barrier(_query_columns(d_block, groups))
        block_q_cols = jax.lax.optimization_barrier(block_q_cols)
        d_value_block = jnp.einsum("bkdm,bkms->bkds", d_cols, block_probs.astype(d_rows.dtype))
        d_probs = jnp.einsum("bkmd,bksd->bkms", d_rows, v_heads[:, :, :key_end],
                             preferred_element_type=jnp.float32)
        # The score scale goes on the [.., D] products, not on the [.., S] scores: a
        # scalar there becomes a broadcast constant array in XLA's CPU fusions.
        block_delta = delta[:, :, first * groups:end * groups]
        d_scores = (block_probs * (d_probs - block_delta)).astype(block_q_rows.dtype)
        d_query.append(_from_query_rows(
            jnp.einsum("bkms,bksd->bkmd", d_scores, k_heads[:, :, :key_end]), groups))
        d_key_block = jnp.einsum("bkdm,bkms->bkds", block_q_cols, d_scores)
        pad = [(0, 0)] * 3 + [(0, keys - key_end)]
        d_key_block, d_value_block = jnp.pad(d_key_block, pad), jnp.pad(d_value_block, pad)
        d_key_cols = d_key_block if d_key_cols is None else d_key_cols + d_key_block
        d_value_cols = d_value_block if d_value_cols is None else d_value_cols + d_value_block
    d_query = jnp.concatenate(d_query, axis=1) if len(d_query) > 1 else d_query[0]
    cast = jnp.asarray(scale, out.dtype)
    return (d_query * cast, (d_key_cols * cast).transpose(0, 3, 1, 2),
            d_value_cols.transpose(0, 3, 1, 2), None)


stacked_attention.defvjp(_stacked_attention_fwd, _stacked_attention_bwd)


# Query block for causal self-attention on CPU: 2 blocks at 256 tokens skip a quarter of
# the products (measured 70 -> 55 ms forward + backward for a 125M model's attention
# block); 64-position blocks were slower again (smaller products, more of them).
CAUSAL_BLOCK = 128


# Largest head_dim cuDNN flash attention takes on every GPU generation (Hopper and later
# take 256, but which GPU runs a plan is not known where the kernel is chosen).
CUDNN_MAX_HEAD_DIM = 128


def cudnn_attention_problem(query: Any, key: Any, value: Any, mask: Any | None = None,
                            bias: Any | None = None, platform: str | None = None) -> str | None:
    """Why cuDNN flash attention cannot take these inputs, or None when it can.

    Looks at shapes, dtypes and the platform name only (arrays or jax.ShapeDtypeStructs),
    so a plan can be checked for a platform other than the one tracing it. platform:
    "gpu"/"cuda" or another jax platform name; None means jax.default_backend(). The
    conditions are those jax's cuDNN wrapper enforces for bf16/fp16 (jax.nn mixes a bool
    mask into an additive bias, so a mask counts as a bias).
    """
    platform = resolve_platform(platform)
    if platform not in ("gpu", "cuda"):
        return f"cuDNN attention runs on NVIDIA GPUs, the platform is {platform!r}"
    dtypes = {jnp.dtype(t.dtype) for t in (query, key, value)}
    if dtypes - {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)} or len(dtypes) > 1:
        return (f"cuDNN attention takes query, key and value all bfloat16 or all float16, "
                f"got {query.dtype}, {key.dtype}, {value.dtype}")
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return (f"cuDNN attention takes one head_dim for query, key and value, got "
                f"{query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}")
    if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8:
        return (f"cuDNN attention takes head_dim <= {CUDNN_MAX_HEAD_DIM} and a multiple of 8, "
                f"got {head_dim}")
    (batch, length, heads, _), keys = query.shape, key.shape[1]
    for name, extra in (("mask", mask), ("bias", bias)):
        if extra is None:
            continue
        if extra.ndim > 4 or tuple(extra.shape[-2:]) != (length, keys):
            return (f"cuDNN attention takes a {name} [B|1, H|1, T, S] = [.., {length}, {keys}] "
                    f"(no broadcasting over queries or keys), got {tuple(extra.shape)}")
        lead = (1,) * (4 - extra.ndim) + tuple(extra.shape[:-2])
        if lead[0] not in (1, batch) or lead[1] not in (1, heads):
            return f"cuDNN attention cannot broadcast a {name} of shape {tuple(extra.shape)}"
        # Its backward pass with a bias needs even lengths; the kernel is chosen before
        # it is known whether a gradient will be taken.
        if length % 2 or keys % 2:
            return (f"cuDNN attention with a {name} needs even query and key lengths, got "
                    f"{length} and {keys}")
    return None


def choose_attention(query: Any, key: Any, value: Any, mask: Any | None = None,
                     bias: Any | None = None, implementation: str | None = None,
                     platform: str | None = None, causal: bool = False,
                     segment_ids: Any | None = None) -> str:
    """The kernel dot_product_attention runs: "splash", "stacked", "reference", "xla" or
    "cudnn".

    Arguments as dot_product_attention's (arrays or jax.ShapeDtypeStructs). Without a
    mask, segment ids or causality imply the [B,1,T,T] mask every kernel but splash is
    given. implementation None picks by platform (None: jax.default_backend()): on TPUs
    splash attention where `splash.splash_problem` finds none (no mask or bias array;
    lengths a multiple of 128), else jax.nn's XLA kernel; on CPU `stacked_attention` when
    the mask is a bool [B,1,T,S] (the same for every head) and there is no bias, else
    plain einsums; on GPUs cuDNN flash attention where `cudnn_attention_problem` finds
    none, else the XLA kernel. An explicit implementation is returned as is, after
    checking that "splash", "stacked" and "cudnn" can take the inputs (a ValueError
    saying why not).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    platform = resolve_platform(platform)
    if mask is None and (segment_ids is not None or causal):
        batch, length = query.shape[:2]
        implied_mask = jax.ShapeDtypeStruct((batch, 1, length, length), jnp.bool_)
    else:
        implied_mask = mask
    head_independent_mask = (implied_mask is not None and bias is None
                             and implied_mask.ndim == 4 and implied_mask.shape[1] == 1)
    if implementation == "stacked" and not head_independent_mask:
        raise ValueError("stacked attention takes a bool mask [B,1,T,S] and no bias")
    if implementation == "cudnn":
        problem = cudnn_attention_problem(query, key, value, implied_mask, bias, platform)
        if problem is not None:
            raise ValueError(f"attention implementation 'cudnn' was asked for, but {problem}")
    if implementation == "splash":
        problem = _splash_problem(query, key, value, mask, bias, causal, platform)
        if problem is not None:
            raise ValueError(f"attention implementation 'splash' was asked for, but {problem}")
    if implementation is not None:
        return implementation
    if platform == "cpu":
        return "stacked" if head_independent_mask else "reference"
    if platform in ("gpu", "cuda"):
        no_cudnn = cudnn_attention_problem(query, key, value, implied_mask, bias, platform)
        return "xla" if no_cudnn else "cudnn"
    if _splash_problem(query, key, value, mask, bias, causal, platform) is None:
        return "splash"
    return "xla"


def _splash_problem(query, key, value, mask, bias, causal, platform) -> str | None:
    if platform != "tpu":
        return f"splash attention runs on TPUs, the platform is {platform!r}"
    return splash.splash_problem(query, key, value, mask, bias, causal)


def dot_product_attention(query: Array, key: Array, value: Array, *,
                          mask: Array | None = None, bias: Array | None = None,
                          segment_ids: Array | None = None,
                          implementation: str | None = None, causal: bool = False,
                          platform: str | None = None) -> Array:
    """Scaled dot-product attention; the one place that picks the kernel.

    query [B,T,H,D]; key/value [B,S,K,D] with H % K == 0 (grouped-query attention).
    mask: bool, broadcastable to [B,H,T,S], True = attend. bias: float, same broadcast.
    segment_ids: [B,T] int (self-attention, S == T), in place of a mask: queries attend
    only to keys of their own segment (packed rows); splash attention takes them as they
    are, the other kernels get the [B,1,T,T] mask they imply. Softmax runs in fp32 on
    every path. implementation: None picks per platform (see `choose_attention`;
    platform None is jax.default_backend()), or one of ATTENTION_IMPLEMENTATIONS; asking
    for "cudnn", "splash" or "stacked" where they cannot run is an error, never a silent
    fallback. causal: only keys at or before each query (self-attention, S == T); with a
    mask it is a promise that the mask is causal (lets the CPU path skip the masked upper
    triangle), without one it is applied.
    """
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"{query.shape[2]} query heads are not a multiple of "
                         f"{key.shape[2]} key/value heads")
    if causal and query.shape[1] != key.shape[1]:
        raise ValueError(f"causal attention needs as many keys as queries, got "
                         f"{key.shape[1]} keys for {query.shape[1]} queries")
    if segment_ids is not None:
        if mask is not None:
            raise ValueError("pass a mask or segment ids, not both")
        if segment_ids.shape != query.shape[:2] or key.shape[1] != query.shape[1]:
            raise ValueError(f"segment ids {segment_ids.shape} need the queries' [B,T] = "
                             f"{query.shape[:2]} and as many keys as queries")
    kernel = choose_attention(query, key, value, mask, bias, implementation, platform,
                              causal, segment_ids)
    if kernel == "splash":
        return splash.splash_attention(query, key, value, segment_ids, causal)
    if mask is None and segment_ids is not None:
        mask = segment_mask(segment_ids, causal)
    elif mask is None and causal:
        mask = segment_mask(jnp.zeros(query.shape[:2], jnp.int32), causal)
    if kernel == "stacked":
        mask = jnp.broadcast_to(mask, (query.shape[0], 1, query.shape[1], key.shape[1]))
        return stacked_attention(query, key, value, mask, query.shape[2] // key.shape[2],
                                 CAUSAL_BLOCK if causal else 0)
    if kernel == "reference":
        return reference_attention(query, key, value, mask, bias)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation=kernel)


def segment_mask(segment_ids: Array, causal: bool) -> Array:
    """[B,T] segment ids -> bool [B,1,T,T]: never across segments, and causal if asked."""
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if causal:
        length = segment_ids.shape[-1]
        mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))
    return mask


def packed_causal_mask(segment_ids: Array) -> Array:
    """[B,T] segment ids -> bool [B,1,T,T]: causal, and never across segments."""
    return segment_mask(segment_ids, causal=True)


# --------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalise in fp32, cast back, then scale (as transformers does)."""
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def layer_norm(epsilon: float, name: str, param_dtype: Any, axis_name: str = "embed") -> nn.LayerNorm:
    """torch.nn.LayerNorm (affine), statistics in fp32 with torch's two-pass variance;
    params "scale" and "bias" on the logical axis `axis_name`. Returns fp32."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
        name=name,
    )


# --------------------------------------------------------------------------- rotary

def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in fp32, with optional LLaMA-3.1 scaling.

    Computed in fp32 in the same order as transformers so the angles agree bit for bit.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_tables(positions: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
    """cos and sin [B,T,1,D] of the rotary angles, in Hugging Face's half-split layout.

    Computed once per forward and shared by every layer. The optimisation barrier keeps
    them materialised: left to fuse, XLA recomputes sin and cos inside every consumer,
    once per head element of every layer (measured ~7 ms per layer on CPU).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jax.lax.optimization_barrier((jnp.cos(angles).astype(dtype),
                                         jnp.sin(angles).astype(dtype)))


def apply_rotary(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotates x [B,T,H,D] by the (cos, sin) tables of `rotary_tables`."""
    cos, sin = rope
    return x * cos.astype(x.dtype) + rotate_half(x) * sin.astype(x.dtype)


# --------------------------------------------------------------------------- dense

@jax.custom_vjp
def dense_matmul(inputs: Array, kernel: Array) -> Array:
    """inputs [..., N] @ kernel [N, F], with a backward pass laid out for XLA's CPU backend.

    Autodiff's weight gradient contracts the token axis of both operands; on CPU, XLA
    then transposes each activation gradient and runs a slower Eigen product (measured
    285 -> 210 ms for one 125M-model layer's forward + backward). Here the weight
    gradient is transposed(inputs) @ grad, with the transpose materialised so the
    product runs as a plain row-major matmul. For CPU only: `dense` picks it by platform,
    and other platforms get a plain product (autodiff's backward, which their compilers
    lay out themselves).
    """
    return inputs @ kernel


def _dense_matmul_fwd(inputs, kernel):
    return inputs @ kernel, (inputs, kernel)


def _dense_matmul_bwd(residuals, grad):
    inputs, kernel = residuals
    d_inputs = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    flat_inputs = inputs.reshape(-1, inputs.shape[-1])
    flat_grad = grad.reshape(-1, grad.shape[-1])
    # The barrier stops XLA from folding the transpose back into the product.
    d_kernel = jax.lax.optimization_barrier(flat_inputs.T) @ flat_grad
    return d_inputs, d_kernel.astype(kernel.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense(inputs: Array, kernel: Array, platform: str | None = None) -> Array:
    """inputs [..., N] @ kernel [N, F]: `dense_matmul` (its CPU backward) when the platform
    (None: jax.default_backend()) is "cpu", else the plain product."""
    if resolve_platform(platform) == "cpu":
        return dense_matmul(inputs, kernel)
    return inputs @ kernel


class MultiAxisDense(nn.Module):
    """Dense layer contracting the last `num_in` input axes into `features` axes.

    Same parameters as nn.DenseGeneral (kernel [*in_axes, *features], bias [*features]),
    but the kernel is initialised at its full rank: DenseGeneral initialises a flat 2-D
    kernel, and a logical-partitioning initialiser then constrains that 2-D value with a
    rank-3 spec, which fails under a mesh with axis rules.
    """
    features: tuple[int, ...]
    axis_names: tuple[str | None, ...]  # logical names of the kernel's axes, inputs first
    num_in: int = 1
    use_bias: bool = True
    kernel_init: Callable | None = None  # unpartitioned; default: fan-avg uniform
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str | None = None  # devices the layer is compiled for (see `dense`)

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        in_shape = inputs.shape[inputs.ndim - self.num_in:]
        in_axes = tuple(range(self.num_in))
        out_axes = tuple(range(self.num_in, self.num_in + len(self.features)))
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=in_axes, out_axis=out_axes)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axis_names),
                            (*in_shape, *self.features), self.param_dtype)
        # A plain 2-D matmul on reshaped operands (free for row-major arrays): XLA's CPU
        # backend emits far fewer transposes for it than for a multi-axis dot_general.
        fan_in = int(np.prod(in_shape))
        flat = inputs.astype(self.dtype).reshape(*inputs.shape[:inputs.ndim - self.num_in], fan_in)
        out = dense(flat, jnp.asarray(kernel, self.dtype).reshape(fan_in, -1), self.platform)
        out = out.reshape(*out.shape[:-1], *self.features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), self.axis_names[self.num_in:]),
                self.features, self.param_dtype)
            out = out + jnp.asarray(bias, self.dtype)
        return out


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""
    hidden_size: int
    intermediate_size: int
    use_bias: bool = False
    activation: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # One "gate_up_proj" kernel [E, 2F] (gate columns first) in place of gate_proj and
    # up_proj: a decoding layout, see llama.fuse_projections.
    fused: bool = False
    platform: str | None = None  # devices the layer is compiled for (see `dense`)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def proj(features, name, axes):
            # MultiAxisDense runs 2-D matmuls on flattened tokens; nn.Dense's 3-D dot_general
            # made XLA's CPU backward transpose each gradient before its weight product.
            return MultiAxisDense((features,), axes, use_bias=self.use_bias,
                                  kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                                  param_dtype=self.param_dtype, platform=self.platform,
                                  name=name)
        if self.fused:
            gate_up = proj(2 * self.intermediate_size, "gate_up_proj", ("embed", "fused_mlp"))(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = proj(self.intermediate_size, "gate_proj", ("embed", "mlp"))(x)
            up = proj(self.intermediate_size, "up_proj", ("embed", "mlp"))(x)
        act = getattr(jax.nn, self.activation)
        hidden = nn.with_logical_constraint(act(gate) * up, ("batch", "length", "mlp"))
        return proj(self.hidden_size, "down_proj", ("mlp", "embed"))(hidden)


# --------------------------------------------------------------------------- remat

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(module_cls: type, policy: str, static_argnums: tuple[int, ...] = (),
                prevent_cse: bool = True) -> type:
    """Wraps a module class in nn.remat with a named policy; "none" leaves it as is."""
    if policy == "none":
        return module_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of "
                         f"{['none', *REMAT_POLICIES]}")
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse,
                    static_argnums=static_argnums)
