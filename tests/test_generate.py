"""Sampling rules of the decoder loop."""
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.inference.generate import sample_tokens


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 11))
    np.testing.assert_array_equal(sample_tokens(logits, jax.random.key(1), 0.0, 1.0),
                                  np.argmax(logits, axis=-1))


def test_small_top_p_keeps_only_the_top_token():
    logits = jax.random.normal(jax.random.key(0), (4, 11))
    for seed in range(5):
        tokens = sample_tokens(logits, jax.random.key(seed), 1.0, 1e-6)
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_top_p_never_samples_outside_the_nucleus():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probs)
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: sample_tokens(logits, k, 1.0, 0.75))(keys)[:, 0]
    # 0.5 + 0.3 reaches 0.75: tokens 0 and 1 only, in ratio 5:3.
    assert set(np.unique(draws)) == {0, 1}
    assert abs(float((draws == 0).mean()) - 0.5 / 0.8) < 0.04


def test_temperature_sampling_follows_the_softmax():
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    keys = jax.random.split(jax.random.key(3), 4000)
    draws = jax.vmap(lambda k: sample_tokens(jnp.log(jnp.asarray(probs))[None], k, 1.0, 1.0))(keys)
    frequencies = np.bincount(np.asarray(draws[:, 0]), minlength=4) / len(keys)
    np.testing.assert_allclose(frequencies, probs, atol=0.03)
