"""The VPiT model and loss against a PyTorch version of the authors' forward
(tests/metamorph_reference.py, written from REFERENCE.md's facts). Weights go into our
params through the converter's table (convert/metamorph.py), so the table is checked too.

Batches come from the real renderer and packer (data/conversation.py, data/packing.py) with
the tiny tokenizer, so the splice and target positions are the ones training uses.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from convert import metamorph as metamorph_convert
from convert.core import state_dict_to_flax
from metamorph_jax.data import conversation, packing
from metamorph_jax.data.testing import build_tiny_tokenizer
from metamorph_jax.models import metamorph
from metamorph_jax.models.siglip import SiglipConfig
from metamorph_jax.training import vpit_loss
from tests.metamorph_reference import (IMAGE_SIZE, TOKENS_PER_IMAGE, VISION_COEF, TorchMetaMorph,
                                       authors_hf_config, render_samples, vision_hf_config)

TOLERANCE = 1e-5

# Rows of the packed batch: several images per row, prompt and response images, a
# text-only row, and two rows holding two samples each.
ROWS = [["edit_two_turns"], ["prompt_image", "response_image"],
        ["two_response_images", "text_only"], ["text_only"]]
SEQ_LEN, MAX_IMAGES = 72, 3


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    ids = conversation.add_image_tokens(tokenizer)
    hf_config = authors_hf_config(ids.vocab_size)
    reference = TorchMetaMorph(hf_config)
    config = metamorph.MetaMorphConfig.from_hf(hf_config, SiglipConfig.from_hf(vision_hf_config()))
    assert (config.image_start_id, config.image_end_id) == (ids.image_start_id, ids.image_end_id)
    params = jax.tree.map(jnp.asarray, state_dict_to_flax(metamorph_convert.SPEC, config,
                                                          reference.authors_state_dict()))
    samples = render_samples(tokenizer, ids)
    return config, params, reference, samples, ids


def packed_batch(samples: dict, rows: list[list[str]]) -> dict:
    batch = packing.empty_batch(len(rows), SEQ_LEN, MAX_IMAGES, IMAGE_SIZE)
    for row, names in enumerate(rows):
        packing.fill_row(batch, row, [samples[n] for n in names], TOKENS_PER_IMAGE)
    return packing.device_fields(batch)


def ours(config, params, batch):
    model = metamorph.MetaMorph(config)

    def loss_fn(p):
        return vpit_loss.vpit_loss(model, p, {k: jnp.asarray(v) for k, v in batch.items()})
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, metrics, grads


def compare_grads(config, grads, reference) -> float:
    expected = state_dict_to_flax(metamorph_convert.SPEC, config, reference.authors_grads())
    flat_expected = traverse_util.flatten_dict(expected)
    worst = 0.0
    for path, got in traverse_util.flatten_dict(grads).items():
        want = np.asarray(flat_expected[path])
        if path[0] == "vision_tower":  # frozen: no gradient at all
            assert not np.asarray(got).any(), path
            continue
        error = float(np.abs(np.asarray(got) - want).max())
        assert error <= TOLERANCE, (path, error)
        worst = max(worst, error)
    print(f"max gradient error {worst:.2e}")
    return worst


@pytest.mark.slow
def test_loss_and_gradients_match_the_authors_forward_on_packed_rows(setup):
    config, params, reference, samples, ids = setup
    batch = packed_batch(samples, ROWS)
    loss, metrics, grads = ours(config, params, batch)

    reference.zero_grad()
    sums = [0.0, 0, 0.0, 0]
    for row, names in enumerate(ROWS):
        for name in names:  # each packed sample alone, as the authors' batch-1 forward
            s = samples[name]
            terms = reference.sample_sums(s["tokens"], s["images"], s["text_mask"],
                                          ids.image_start_id)
            sums = [a + b for a, b in zip(sums, terms)]
    text_sum, text_count, vision_sum, vision_count = sums
    total = text_sum / text_count + VISION_COEF * vision_sum / vision_count
    total.backward()

    assert int(metrics["text_tokens"]) == text_count == int(batch["text_mask"].sum())
    assert int(metrics["vision_tokens"]) == vision_count == 9 * 4  # four response images
    text_sum, vision_sum, total = text_sum.detach(), vision_sum.detach(), total.detach()
    assert abs(float(metrics["text_loss"]) - float(text_sum / text_count)) <= TOLERANCE
    assert abs(float(metrics["vision_loss"]) - float(vision_sum / vision_count)) <= TOLERANCE
    assert abs(float(metrics["vision_cosine"]) - (1 - float(vision_sum / vision_count))) <= TOLERANCE
    assert abs(float(loss) - float(total)) <= TOLERANCE
    print(f"loss {float(loss):.6f}, error {abs(float(loss) - float(total)):.2e}")
    compare_grads(config, grads, reference)


@pytest.mark.slow
def test_one_sample_equals_the_authors_mean_formula(setup):
    """One sample, batch 1: ours = CrossEntropyLoss() mean + coef * (-cos mean) + coef."""
    config, params, reference, samples, ids = setup
    s = samples["edit_two_turns"]  # a prompt image, a response image, text after it
    loss, _, grads = ours(config, params, packed_batch(samples, [["edit_two_turns"]]))
    reference.zero_grad()
    logits, labels, preds, targets = reference.sample_forward(
        s["tokens"], s["images"], s["text_mask"], ids.image_start_id)
    authors = (torch.nn.CrossEntropyLoss()(logits, labels)
               + VISION_COEF * -F.cosine_similarity(targets, preds, dim=-1).mean())
    authors.backward()
    authors = authors.detach()
    assert abs(float(loss) - (float(authors) + VISION_COEF)) <= TOLERANCE
    print(f"loss error {abs(float(loss) - (float(authors) + VISION_COEF)):.2e}")
    compare_grads(config, grads, reference)


def test_text_only_batch_has_no_vision_term(setup):
    config, params, _, samples, _ = setup
    loss, metrics, _ = ours(config, params, packed_batch(samples, [["text_only"], ["prompt_image"]]))
    assert float(metrics["vision_tokens"]) == 0 and float(metrics["vision_loss"]) == 0
    assert float(loss) == pytest.approx(float(metrics["text_loss"]))


def test_pixels_and_precomputed_visual_tokens_agree(setup):
    config, params, _, samples, _ = setup
    batch = {k: jnp.asarray(v) for k, v in packed_batch(samples, ROWS).items()}
    model = metamorph.MetaMorph(config)
    visual = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=metamorph.MetaMorph.encode_images))(
        params, batch["images"])
    assert visual.shape == (len(ROWS), MAX_IMAGES, TOKENS_PER_IMAGE, 24)

    loss = jax.jit(lambda p, b: vpit_loss.vpit_loss(model, p, b)[1])
    without_images = {k: v for k, v in batch.items() if k != "images"}
    from_pixels = loss(params, batch)
    from_tokens = loss(params, {**without_images, "visual_tokens": visual})
    for key in ("text_loss", "vision_loss"):
        assert float(from_pixels[key]) == pytest.approx(float(from_tokens[key]), abs=1e-6)
    assert float(from_pixels["vision_tokens"]) > 0


def _gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_splice_positions_by_hand():
    """Two rows, two images each, visual tokens placed in a hand-chosen order."""
    config = metamorph.MetaMorphConfig.from_hf(authors_hf_config(20),
                                              SiglipConfig.from_hf(vision_hf_config()))
    model = metamorph.MetaMorph(config)
    # Only the parts embed_inputs reads: the token table and the adapter.
    normal = np.random.default_rng(4).standard_normal
    p = {"linear_0": {"kernel": normal((24, 32)), "bias": normal(32)},
         "linear_2": {"kernel": normal((32, 32)) / 6, "bias": normal(32)}}
    table = normal((20, 32))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                          {"llm": {"embed_tokens": {"embedding": table}}, "mm_projector": p})
    rng = np.random.default_rng(3)
    visual = rng.standard_normal((2, 2, TOKENS_PER_IMAGE, 24)).astype(np.float32)
    tokens = rng.integers(0, 20, (2, 8)).astype(np.int32)
    index = np.full((2, 8), -1, np.int32)
    index[0, 1:4] = [9, 10, 17]     # row 0: image 1's tokens 0, 1, 8
    index[0, 6] = 0                 # row 0: image 0's token 0
    index[1, 2:4] = [4, 13]         # row 1: image 0's token 4, image 1's token 4
    embed = jax.jit(lambda p, *a: model.apply({"params": p}, *a,
                                              method=metamorph.MetaMorph.embed_inputs))
    out = np.asarray(embed(params, jnp.asarray(tokens), jnp.asarray(index), jnp.asarray(visual)))
    for b in range(2):
        for t in range(8):
            if index[b, t] < 0:
                want = table[tokens[b, t]]
            else:
                x = visual[b, index[b, t] // TOKENS_PER_IMAGE, index[b, t] % TOKENS_PER_IMAGE]
                h = _gelu(x @ p["linear_0"]["kernel"] + p["linear_0"]["bias"])
                want = h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
            np.testing.assert_allclose(out[b, t], want, atol=1e-5, err_msg=f"row {b} position {t}")


def test_from_pretrained_parts_grows_the_vocabulary_with_mean_rows(setup):
    config, params, _, _, _ = setup
    llm_config = config.llm.replace(vocab_size=config.llm.vocab_size - 2)
    llm = dict(params["llm"])
    llm["embed_tokens"] = {"embedding": params["llm"]["embed_tokens"]["embedding"][:-2]}
    llm["lm_head"] = {"kernel": params["llm"]["lm_head"]["kernel"][:, :-2]}
    built, built_params = metamorph.from_pretrained_parts(
        llm, llm_config, params["vision_tower"], config.vision, jax.random.key(1),
        vision_coef=VISION_COEF)
    assert built == config
    assert (jax.tree.map(np.shape, built_params)
            == jax.tree.map(np.shape, metamorph.param_shapes(config)))
    embedding = np.asarray(built_params["llm"]["embed_tokens"]["embedding"])
    kernel = np.asarray(built_params["llm"]["lm_head"]["kernel"])
    for row in (config.image_start_id, config.image_end_id):
        np.testing.assert_allclose(embedding[row], embedding[:-2].mean(0), atol=1e-7)
        np.testing.assert_allclose(kernel[:, row], kernel[:, :-2].mean(1), atol=1e-7)


@pytest.mark.parametrize("field,value,message", [
    ("mm_projector_type", "linear", "mm_projector_type"),
    ("vision_head_type", "mlp2x_gelu", "vision_head_type"),
    ("mm_hidden_size", 1152, "mm_hidden_size"),
    ("normalize_vision", False, "normalize_vision"),
    ("apply_softmax", True, "apply_softmax"),
    ("image_token_reduction", "mlpmixer", "image_token_reduction"),
    ("num_image_tokens", 8, "num_visual_tokens=8"),
])
def test_unsupported_fields_are_errors(field, value, message):
    hf = authors_hf_config(76)
    hf[field] = value
    with pytest.raises(ValueError, match=message):
        metamorph.MetaMorphConfig.from_hf(hf, SiglipConfig.from_hf(vision_hf_config()))


def test_config_round_trips_through_a_dict(setup):
    config = setup[0]
    assert metamorph.MetaMorphConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MetaMorphConfig fields"):
        metamorph.MetaMorphConfig.from_dict({**config.to_dict(), "extra": 1})


def test_kv_cache_decoding_with_fed_back_visual_tokens_equals_the_full_forward(setup):
    """Image-mode decoding as the authors' loop does it (the head's prediction goes through
    the adapter and is the next input embedding), with the KV cache passed through."""
    config, params, _, samples, _ = setup
    model = metamorph.MetaMorph(config)
    M = metamorph.MetaMorph
    s = samples["prompt_image"]
    length, steps = len(s["tokens"]), 3
    tokens, index = jnp.asarray(s["tokens"])[None], jnp.asarray(s["image_index"])[None]
    visual = jax.jit(lambda p, x: model.apply({"params": p}, x, method=M.encode_images))(
        params, jnp.asarray(s["images"])[None])

    @jax.jit
    def prefill(p):
        cache = model.apply({"params": p}, 1, length + steps, method=M.init_cache)
        out = model.apply({"params": p}, tokens, positions=jnp.arange(length)[None],
                          image_index=index, visual_tokens=visual, cache=cache)
        return out.hidden_states, out.cache

    @jax.jit
    def step(p, hidden, cache, t):
        predicted = model.apply({"params": p}, hidden, method=M.vision_head_outputs)
        embeds = model.apply({"params": p}, predicted, method=M.project_visual_tokens)
        out = model.apply({"params": p}, inputs_embeds=embeds, positions=t[None, None],
                          cache=cache, cache_index=t[None])
        return out.hidden_states, out.cache, embeds

    hidden, cache = prefill(params)
    decoded, fed = [hidden[:, -1:]], []
    for t in range(length, length + steps):
        last, cache, embeds = step(params, decoded[-1], cache, jnp.asarray(t, jnp.int32))
        decoded.append(last)
        fed.append(embeds)

    @jax.jit
    def full(p, extra):
        embeds = model.apply({"params": p}, tokens, index, visual, method=M.embed_inputs)
        embeds = jnp.concatenate([embeds, extra], axis=1)
        return model.apply({"params": p}, inputs_embeds=embeds,
                           positions=jnp.arange(length + steps)[None]).hidden_states
    expected = full(params, jnp.concatenate(fed, axis=1))
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(expected[:, :length]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(decoded, axis=1)),
                               np.asarray(expected[:, length - 1:]), atol=1e-5)


def test_sharded_loss_equals_single_device(setup):
    """Params placed by their logical axis names on a (data, fsdp, tensor) = 2x2x2 mesh, the
    batch split over rows: the same loss, activations constrained by the same names."""
    from metamorph_jax import sharding
    config, params, _, samples, _ = setup
    model = metamorph.MetaMorph(config)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(samples, ROWS).items()}
    loss = jax.jit(lambda p, b: vpit_loss.vpit_loss(model, p, b)[0])
    expected = float(loss(params, batch))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    boxed = jax.eval_shape(lambda r: metamorph.init_params(config, r), jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh)
    assert (shardings["mm_projector"]["linear_0"]["kernel"].spec
            == jax.sharding.PartitionSpec("fsdp", "tensor"))
    assert (shardings["vision_head"]["linear_2"]["kernel"].spec
            == jax.sharding.PartitionSpec("tensor", "fsdp"))
    placed = jax.device_put(params, shardings)
    placed_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, ndim=v.ndim))
                    for k, v in batch.items()}

    @jax.jit
    def sharded_loss(p, b):
        with nn.logical_axis_rules(sharding.DEFAULT_RULES):
            return vpit_loss.vpit_loss(model, p, b)[0]
    with jax.set_mesh(mesh):
        got = float(sharded_loss(placed, placed_batch))
    assert abs(got - expected) <= TOLERANCE
