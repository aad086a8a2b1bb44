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


def test_scanned_and_unrolled_decoding_agree():
    import flax.linen as nn
    from convert import llama as llama_convert
    from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
    from metamorph_jax.models.llama import LlamaForCausalLM
    from tests.helpers import tiny_llama_hf_config
    cfg = llama_convert.config_from_hf(tiny_llama_hf_config())
    model = LlamaForCausalLM(cfg)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, positions=dummy))["params"]
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1, 4]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)
    scanned = TextGenerator(model, params, [-1], unroll_layers=False).generate(prompts, sampling)
    unrolled = TextGenerator(model, params, [-1]).generate(prompts, sampling)
    assert scanned == unrolled
    assert [len(t) for t in unrolled] == [6, 6]
