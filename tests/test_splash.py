"""Splash attention (TPU): our layout mapped onto the kernel, checked in Pallas's
interpreter on CPU against the einsum reference, and the dispatcher's choice of it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.models import layers, splash


def _inputs(batch, length, heads, kv_heads, dim, seed=0):
    rng = np.random.default_rng(seed)
    query = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    key, value = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
                  for _ in range(2))
    # Row 0: one sequence; row 1: three packed sequences, then padding (id 0).
    segments = np.ones((batch, length), np.int32)
    segments[1, length // 4:] = 2
    segments[1, length // 2:] = 3
    segments[1, -length // 8:] = 0
    return query, key, value, jnp.asarray(segments)


@pytest.mark.slow
def test_splash_matches_reference_in_interpreter():
    # Grouped-query heads (4 query heads on 2 kv heads), packed rows, causal; two blocks
    # of 128 positions, so the causal mask has a skipped, a partial and a full block.
    query, key, value, segments = _inputs(2, 256, 4, 2, 64)
    mask = layers.packed_causal_mask(segments)
    cotangent = jax.random.normal(jax.random.key(0), query.shape)

    def run(attention):
        def loss(q, k, v):
            out = attention(q, k, v)
            return jnp.sum(out * cotangent), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            query, key, value)
        return out, grads

    out, grads = run(lambda q, k, v: splash.splash_attention(q, k, v, segments, causal=True,
                                                             interpret=True))
    ref_out, ref_grads = run(lambda q, k, v: layers.reference_attention(q, k, v, mask, None))
    # Measured: 6e-7 (output), under 1e-5 (gradients), fp32.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=5e-6)
    for got, want, name in zip(grads, ref_grads, ("query", "key", "value")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, err_msg=name)


def _spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_splash_is_the_tpu_choice_where_it_can_run():
    query, key = _spec((2, 256, 8, 128)), _spec((2, 256, 2, 128))
    segments = _spec((2, 256), jnp.int32)
    choose = lambda *a, **k: layers.choose_attention(*a, platform="tpu", **k)  # noqa: E731
    assert choose(query, key, key, causal=True, segment_ids=segments) == "splash"
    assert choose(query, key, key, causal=True) == "splash"
    # A length that is no multiple of 128, or a mask array (decoding): the XLA kernel.
    short_q, short_k = _spec((2, 200, 8, 128)), _spec((2, 200, 2, 128))
    assert choose(short_q, short_k, short_k, causal=True) == "xla"
    decode_mask = _spec((2, 1, 256, 256), jnp.bool_)
    assert choose(query, key, key, decode_mask) == "xla"
    # The same inputs on other platforms never get it.
    assert layers.choose_attention(query, key, key, causal=True, segment_ids=segments,
                                   platform="cpu") == "stacked"


def test_splash_asked_for_where_it_cannot_run_is_an_error():
    query, key = _spec((2, 200, 8, 128)), _spec((2, 200, 2, 128))
    with pytest.raises(ValueError, match="'splash' was asked for.*multiples of 128"):
        layers.choose_attention(query, key, key, causal=True, implementation="splash",
                                platform="tpu")
    query, key = _spec((2, 256, 8, 128)), _spec((2, 256, 2, 128))
    with pytest.raises(ValueError, match="'splash' was asked for.*platform is 'cpu'"):
        layers.choose_attention(query, key, key, causal=True, implementation="splash",
                                platform="cpu")


def test_segment_ids_on_cpu_attend_as_their_mask():
    query, key, value, segments = _inputs(2, 24, 4, 2, 8)
    got = layers.dot_product_attention(query, key, value, segment_ids=segments, causal=True,
                                       implementation="reference")
    want = layers.reference_attention(query, key, value, layers.packed_causal_mask(segments),
                                      None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="mask or segment ids, not both"):
        layers.dot_product_attention(query, key, value, segment_ids=segments,
                                     mask=layers.packed_causal_mask(segments))
