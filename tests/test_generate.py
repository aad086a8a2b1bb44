"""Sampling rules of the decoder loop."""
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models.llama import LlamaConfig

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
    from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
    from metamorph_jax.models.llama import LlamaForCausalLM
    from tests.helpers import tiny_llama_hf_config
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config())
    model = LlamaForCausalLM(cfg)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, positions=dummy))["params"]
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1, 4]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)
    scanned = TextGenerator(model, params, [-1], unroll_layers=False).generate(prompts, sampling)
    unrolled = TextGenerator(model, params, [-1]).generate(prompts, sampling)
    assert scanned == unrolled
    assert [len(t) for t in unrolled] == [6, 6]


def _tiny_generator_inputs():
    import flax.linen as nn
    from metamorph_jax.models.llama import LlamaForCausalLM
    from tests.helpers import tiny_llama_hf_config
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config())
    model = LlamaForCausalLM(cfg)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, positions=dummy))["params"]
    # Larger weights than the init's, so greedy continuations vary instead of looping.
    params = jax.tree.map(lambda p: p * 4.0, params)
    return model, params


def _greedy_without_cache(model, params, prompt, steps):
    # Full causal forwards over a fixed-width row (one compile): the zeros after the
    # current token cannot change its logits.
    width = len(prompt) + steps
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids,
                                              positions=jnp.arange(width)[None]).logits)
    tokens = list(prompt)
    for _ in range(steps):
        ids = np.zeros((1, width), np.int32)
        ids[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(jnp.asarray(ids))[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_chunked_decoding_equals_full_forward_and_stops_per_row():
    from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
    model, params = _tiny_generator_inputs()
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1, 4]]
    steps = 2 * TextGenerator.DECODE_CHUNK + 5  # crosses two chunk boundaries
    sampling = SamplingConfig(max_new_tokens=steps)
    expected = [_greedy_without_cache(model, params, p, steps) for p in prompts]
    assert TextGenerator(model, params, [-1]).generate(prompts, sampling) == expected

    # An end token first produced by row 0 late in the second chunk ends that row there;
    # the other row runs on (to its own first end token, if any).
    eos = expected[0][TextGenerator.DECODE_CHUNK + 3]
    got = TextGenerator(model, params, [eos]).generate(prompts, sampling)
    for row, tokens in zip(got, expected):
        stop = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert row == tokens[:stop]
    assert len(got[0]) <= TextGenerator.DECODE_CHUNK + 4


def test_fused_projections_decode_the_same_tokens():
    from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
    model, params = _tiny_generator_inputs()
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1, 4]]
    sampling = SamplingConfig(max_new_tokens=10)
    fused = TextGenerator(model, params, [-1], fuse_projections=True)
    assert fused.model.config.fused_projections and "qkv_proj" in fused.params["layers_0"]["self_attn"]
    plain = TextGenerator(model, params, [-1], fuse_projections=False)
    assert fused.generate(prompts, sampling) == plain.generate(prompts, sampling)


def test_top_k_never_samples_outside_the_k_largest():
    probs = jnp.array([[0.1, 0.4, 0.05, 0.3, 0.15]])
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: sample_tokens(jnp.log(probs), k, 1.0, 1.0, 2))(keys)[:, 0]
    # The two largest (ids 1 and 3) only, in ratio 4:3.
    assert set(np.unique(draws)) == {1, 3}
    assert abs(float((draws == 1).mean()) - 0.4 / 0.7) < 0.04
    # top_k then top_p: of {1: 4/7, 3: 3/7}, a nucleus of 0.5 keeps id 1 alone.
    draws = jax.vmap(lambda k: sample_tokens(jnp.log(probs), k, 1.0, 0.5, 2))(keys)[:, 0]
    assert set(np.unique(draws)) == {1}
