"""Pieces shared by the transformer models: attention dispatch, RMSNorm, rotary
embeddings, gated MLP, dtype and remat helpers.

Everything here is pure math on arrays; parameter names follow Hugging Face so the
checkpoint converters stay tables.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "reference")


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


def dot_product_attention(query: Array, key: Array, value: Array, *,
                          mask: Array | None = None, bias: Array | None = None,
                          implementation: str | None = None) -> Array:
    """Scaled dot-product attention; the one place that picks the kernel.

    query [B,T,H,D]; key/value [B,S,K,D] with H % K == 0 (grouped-query attention).
    mask: bool, broadcastable to [B,H,T,S], True = attend. bias: float, same broadcast.
    Softmax runs in fp32 on every path. implementation: None picks per backend (plain
    einsums on CPU, jax.nn's XLA kernel on TPU, cuDNN flash attention on GPUs where it
    applies), or "xla", "cudnn", "reference" (plain einsums).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"{query.shape[2]} query heads are not a multiple of "
                         f"{key.shape[2]} key/value heads")
    if implementation == "reference" or (implementation is None and jax.default_backend() == "cpu"):
        # On CPU the plain einsums run ~3x faster than jax.nn's XLA path (measured on the
        # UNet's 1024-token self-attention), with the same fp32-softmax numerics.
        return reference_attention(query, key, value, mask, bias)
    if implementation is None and jax.default_backend() == "gpu":
        # cuDNN flash attention takes bf16/fp16 with head_dim <= 128; else use XLA.
        if query.dtype in (jnp.bfloat16, jnp.float16) and query.shape[-1] <= 128:
            try:
                return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                                    implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError):
                pass
        implementation = "xla"
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation=implementation)


def packed_causal_mask(segment_ids: Array) -> Array:
    """[B,T] segment ids -> bool [B,1,T,T]: causal, and never across segments."""
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


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


def apply_rotary(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding in Hugging Face's half-split layout. x [B,T,H,D], positions [B,T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- dense

def dense_init(axes: Sequence[str], stddev: float = 0.02) -> Callable:
    """Normal(stddev) kernel initialiser carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(axes))


def bias_init(axes: Sequence[str]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


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
        out = flat @ jnp.asarray(kernel, self.dtype).reshape(fan_in, -1)
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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def proj(features, name, axes):
            return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_init=dense_init(axes),
                            bias_init=bias_init(axes[-1:]), name=name)
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
