"""LLaMA decoder parity with transformers' LlamaForCausalLM, packing and KV-cache decoding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models.llama import LlamaConfig
import optax
import pytest
import torch
import transformers

from convert import llama as llama_convert
from convert.core import state_dict_to_flax
from metamorph_jax.models.llama import LlamaForCausalLM, stack_layers, unstack_layers
from tests.helpers import llama_params_from_torch, tiny_llama_hf_config

CONFIGS = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
    "head_dim_differs": dict(head_dim=24, num_key_value_heads=1),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, scan):
    hf_config = tiny_llama_hf_config(**CONFIGS[name])
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    cfg = LlamaConfig.from_hf(hf_config).replace(scan_layers=scan)
    params = llama_params_from_torch(reference, cfg)
    tokens = np.random.default_rng(0).integers(0, hf_config["vocab_size"], (2, 13))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(13), (2, 13))
    out = LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(tokens),
                                      positions=jnp.asarray(positions))
    assert np.abs(np.asarray(out.logits) - expected).max() <= 1e-4


def test_reference_attention_matches_xla():
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config())
    model = LlamaForCausalLM(cfg)
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    positions = jnp.arange(10)[None]
    params = model.init(jax.random.key(1), tokens, positions=positions)["params"]
    xla = LlamaForCausalLM(cfg.replace(attention_impl="xla")).apply(
        {"params": params}, tokens, positions=positions).logits
    ref = LlamaForCausalLM(cfg.replace(attention_impl="reference")).apply(
        {"params": params}, tokens, positions=positions).logits
    assert np.abs(np.asarray(xla) - np.asarray(ref)).max() <= 1e-5


def _random_model(**overrides):
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config(**overrides))
    model = LlamaForCausalLM(cfg)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, positions=dummy))["params"]
    return cfg, model, params


def test_packed_rows_equal_separate_sequences():
    cfg, model, params = _random_model()
    rng = np.random.default_rng(1)
    lengths = [5, 7, 3]
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    row_len = 18  # 15 tokens + 3 padding
    tokens = np.zeros((1, row_len), np.int32)
    positions = np.zeros((1, row_len), np.int32)
    segments = np.zeros((1, row_len), np.int32)
    start = 0
    for seg, seq in enumerate(seqs, start=1):
        tokens[0, start:start + len(seq)] = seq
        positions[0, start:start + len(seq)] = np.arange(len(seq))
        segments[0, start:start + len(seq)] = seg
        start += len(seq)
    packed = model.apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions),
                         segment_ids=jnp.asarray(segments)).logits[0]
    start = 0
    for seq in seqs:
        alone = model.apply({"params": params}, jnp.asarray(seq)[None],
                            positions=jnp.arange(len(seq))[None]).logits[0]
        np.testing.assert_allclose(np.asarray(packed[start:start + len(seq)]), np.asarray(alone),
                                   atol=1e-5)
        start += len(seq)


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
def test_stack_layers_inverts_unstack_layers(on_host):
    cfg, _, params = _random_model()
    if on_host:
        params = jax.tree.map(np.asarray, params)
    unrolled = unstack_layers(params, cfg.num_layers)
    assert "layers" not in unrolled and f"layers_{cfg.num_layers - 1}" in unrolled
    restacked = stack_layers(unrolled, cfg.num_layers)
    assert jax.tree.structure(restacked) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(params)):
        assert isinstance(a, np.ndarray) == on_host
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("empty_prefill", [False, True], ids=["indexed", "empty_prefill"])
def test_kv_cache_decoding_equals_full_forward(scan, empty_prefill):
    """Prefill then one-token steps equal the full forward; the prefill either writes at
    cache_index 0 (attending over the cache) or, without an index, fills the empty cache
    attending to its own tokens only."""
    cfg, _, params = _random_model()
    cfg = cfg.replace(scan_layers=scan)
    if not scan:
        params = unstack_layers(params, cfg.num_layers)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = model.apply({"params": params}, tokens, positions=positions).logits
    cache = model.apply({"params": params}, 2, 16, method=LlamaForCausalLM.init_cache)
    prefill = model.apply({"params": params}, tokens[:, :7], positions=positions[:, :7],
                          cache=cache,
                          cache_index=None if empty_prefill else jnp.zeros(2, jnp.int32))
    assert jax.tree.map(jnp.shape, prefill.cache) == jax.tree.map(jnp.shape, cache)
    np.testing.assert_allclose(np.asarray(prefill.logits), np.asarray(full[:, :7]), atol=1e-5)
    cache = prefill.cache
    for t in range(7, 12):
        step = model.apply({"params": params}, tokens[:, t:t + 1], positions=positions[:, t:t + 1],
                           cache=cache, cache_index=jnp.full((2,), t, jnp.int32))
        np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(full[:, t]), atol=1e-5)
        cache = step.cache


def test_a_prefill_longer_than_the_cache_is_an_error():
    cfg, model, params = _random_model()
    cache = model.apply({"params": params}, 1, 4, method=LlamaForCausalLM.init_cache)
    tokens = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="prefill of 6 tokens does not fit a cache of 4"):
        model.apply({"params": params}, tokens, positions=jnp.arange(6)[None], cache=cache)


def test_inputs_embeds_equal_tokens():
    cfg, model, params = _random_model()
    tokens = jnp.arange(6)[None]
    positions = jnp.arange(6)[None]
    embeds = params["embed_tokens"]["embedding"][tokens]
    a = model.apply({"params": params}, tokens, positions=positions).logits
    b = model.apply({"params": params}, inputs_embeds=embeds, positions=positions).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_stays_close():
    cfg, model, params = _random_model()
    tokens = jnp.arange(8)[None]
    positions = jnp.arange(8)[None]
    f32 = model.apply({"params": params}, tokens, positions=positions).logits
    bf16 = LlamaForCausalLM(cfg.replace(dtype="bfloat16")).apply(
        {"params": params}, tokens, positions=positions).logits
    assert bf16.dtype == jnp.float32  # logits come back in fp32 for the loss
    # Measured: max |f32 - bf16| = 1.8e-3 with max |logit| = 0.43 (0.42%, about one bf16
    # step of 2^-8 = 0.39%; 0.48-0.58% for other init seeds); bound: 1.5% of the scale.
    f32, bf16 = np.asarray(f32), np.asarray(bf16)
    assert np.abs(f32 - bf16).max() < 0.015 * np.abs(f32).max()


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("model_type", "mistral"),
                                          ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0,
                                                               "factor": 2.0})])
def test_unsupported_config_fields_are_errors(field, value):
    hf = tiny_llama_hf_config(**{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "rope_parameters" else "rope_type"):
        LlamaConfig.from_hf(hf)


def test_remat_policies_give_same_gradients():
    cfg, model, params = _random_model()
    tokens = jnp.arange(8)[None]
    positions = jnp.arange(8)[None]

    def loss(p, c):
        return LlamaForCausalLM(c).apply({"params": p}, tokens, positions=positions).logits.sum()
    base = jax.grad(loss)(params, cfg)
    remat = jax.grad(loss)(params, cfg.replace(remat_policy="full"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 base, remat)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_gradients_match_transformers(name, scan):
    """The CPU backward passes (stacked attention, dense matmul) against torch autograd."""
    hf_config = tiny_llama_hf_config(**CONFIGS[name])
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    cfg = LlamaConfig.from_hf(hf_config).replace(scan_layers=scan)
    params = llama_params_from_torch(reference, cfg)
    tokens = np.random.default_rng(1).integers(0, hf_config["vocab_size"], (2, 12))
    logits = reference(torch.tensor(tokens[:, :-1])).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.tensor(tokens[:, 1:]).reshape(-1)).backward()
    expected = state_dict_to_flax(llama_convert.SPEC, cfg,
                                  {k: p.grad for k, p in reference.named_parameters()})
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))

    def loss(p):
        out = LlamaForCausalLM(cfg).apply({"params": p}, jnp.asarray(tokens[:, :-1]),
                                          positions=positions).logits
        return optax.softmax_cross_entropy_with_integer_labels(
            out, jnp.asarray(tokens[:, 1:])).mean()
    grads = jax.grad(loss)(params)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = np.asarray(flat_expected[path])
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 + 1e-4 * np.abs(want).max(),
                                   err_msg=jax.tree_util.keystr(path))
