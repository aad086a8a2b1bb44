"""Shared layers: the CPU attention and dense-matmul backward passes equal plain autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.models import layers


def _packed_mask(batch: int, length: int) -> jnp.ndarray:
    # Two rows: one whole sequence; two packed sequences followed by padding.
    segments = np.ones((batch, length), np.int32)
    if batch > 1:
        segments[1, length // 2:] = 2
        segments[1, -2:] = 0
    return layers.packed_causal_mask(jnp.asarray(segments))


@pytest.mark.parametrize("causal_block", [0, 4], ids=["one_block", "causal_blocks"])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_stacked_attention_matches_reference(heads, kv_heads, causal_block, monkeypatch):
    # Blocks of 4 over 11 positions: three blocks, the last one short.
    monkeypatch.setattr(layers, "CAUSAL_BLOCK", causal_block)
    rng = np.random.default_rng(heads * 10 + kv_heads)
    batch, length, dim = 2, 11, 8
    query = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    key, value = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
                  for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal(query.shape), jnp.float32)
    mask = _packed_mask(batch, length)

    def run(implementation):
        def fn(q, k, v):
            out = layers.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                               causal=True)
            return jnp.sum(out * cotangent), out
        (_, out), grads = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(
            query, key, value)
        return out, grads

    out, grads = run("stacked")
    ref_out, ref_grads = run("reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)
    for got, want, name in zip(grads, ref_grads, ("query", "key", "value")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=name)


def test_stacked_attention_is_the_cpu_default_for_head_independent_masks():
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    key = value = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
    mask = _packed_mask(1, 5)
    auto = jax.make_jaxpr(lambda q: layers.dot_product_attention(q, key, value, mask=mask))(query)
    assert "custom_vjp_call" in str(auto)


def test_causal_attention_needs_as_many_keys_as_queries():
    with pytest.raises(ValueError, match="as many keys as queries"):
        layers.dot_product_attention(jnp.zeros((1, 1, 2, 8)), jnp.zeros((1, 4, 2, 8)),
                                     jnp.zeros((1, 4, 2, 8)), mask=jnp.ones((1, 1, 1, 4), bool),
                                     causal=True)


def test_stacked_attention_rejects_bias_and_per_head_masks():
    query = jnp.zeros((1, 4, 2, 8))
    key = value = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"\[B,1,T,S\]"):
        layers.dot_product_attention(query, key, value, mask=jnp.ones((1, 2, 4, 4), bool),
                                     implementation="stacked")
    with pytest.raises(ValueError, match="no bias"):
        layers.dot_product_attention(query, key, value, mask=jnp.ones((1, 1, 4, 4), bool),
                                     bias=jnp.zeros((1, 1, 4, 4)), implementation="stacked")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matmul_gradients_equal_autodiff(dtype):
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.standard_normal((3, 5, 16)), dtype)
    kernel = jnp.asarray(rng.standard_normal((16, 24)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((3, 5, 24)), dtype)

    def loss(fn):
        return lambda x, w: jnp.sum((fn(x, w) * cotangent).astype(jnp.float32))
    ours = jax.grad(loss(layers.dense_matmul), argnums=(0, 1))(inputs, kernel)
    plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(inputs, kernel)
    for got, want in zip(ours, plain):
        assert got.dtype == want.dtype
        # Same products, so bf16 agrees to its last bit here; fp32 up to summation order.
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=1e-5, rtol=1e-5)
