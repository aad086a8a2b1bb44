"""The chunked LM head + cross-entropy (losses.chunked_cross_entropy, the stage field
`loss_chunk_tokens`) equals the unchunked masked_cross_entropy: values and gradients in
fp32, against our unchunked loss and against torch's cross_entropy; and the text and VPiT
losses give the same sums and gradients with and without chunks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.training.losses import chunked_cross_entropy, masked_cross_entropy

B, T, D, V = 2, 37, 16, 50   # T not a multiple of the chunk: the last chunk is padded
# Measured (fp32, chunks 1/8/16/36): the sums differ by at most 1.7e-7 relative (the order
# of the additions), the gradients by at most 1.2e-6 absolute on entries up to 5.
RTOL, ATOL = 1e-6, 3e-6


def problem(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.int32)
    return hidden, kernel, targets, mask


def chunked(hidden, kernel, targets, mask, chunk):
    return chunked_cross_entropy(hidden, lambda h: h @ kernel, targets, mask, chunk)[0]


def unchunked(hidden, kernel, targets, mask):
    return masked_cross_entropy(hidden @ kernel, targets, mask)[0]


@pytest.mark.parametrize("chunk", [1, 8, 16, 36])
def test_chunked_equals_unchunked_values_and_gradients(chunk):
    hidden, kernel, targets, mask = problem()
    want, want_grads = jax.value_and_grad(unchunked, argnums=(0, 1))(hidden, kernel, targets,
                                                                     mask)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)),
                             static_argnums=4)(hidden, kernel, targets, mask, chunk)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    _, count = chunked_cross_entropy(hidden, lambda h: h @ kernel, targets, mask, chunk)
    assert float(count) == float(mask.sum())


def test_chunk_off_or_longer_than_the_rows_is_the_plain_loss():
    hidden, kernel, targets, mask = problem(1)
    want = unchunked(hidden, kernel, targets, mask)
    for chunk in (0, T, 4 * T):
        assert float(chunked(hidden, kernel, targets, mask, chunk)) == float(want)


def test_against_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    hidden, kernel, targets, mask = problem(2)
    got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel, targets, mask,
                                                                  8)
    h = torch.tensor(np.asarray(hidden), requires_grad=True)
    k = torch.tensor(np.asarray(kernel), requires_grad=True)
    logits = (h @ k).reshape(-1, V)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(np.asarray(targets)).reshape(-1)
                                            .long(), reduction="none")
    want = (nll * torch.tensor(np.asarray(mask)).reshape(-1).float()).sum()
    want.backward()
    np.testing.assert_allclose(got, want.item(), rtol=RTOL)
    np.testing.assert_allclose(got_grads[0], h.grad.numpy(), rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(got_grads[1], k.grad.numpy(), rtol=1e-5, atol=ATOL)


def test_chunked_backward_keeps_one_chunk_of_logits():
    # The jitted gradient's HLO holds [B, chunk, V] logits, never [B, T, V].
    hidden, kernel, targets, mask = problem()
    chunk = 8
    grad = jax.jit(jax.grad(chunked, argnums=(0, 1)), static_argnums=4)
    hlo = grad.lower(hidden, kernel, targets, mask, chunk).compile().as_text()
    assert f"f32[{B},{chunk},{V}]" in hlo
    assert f"f32[{B},{T},{V}]" not in hlo and f"f32[{B},40,{V}]" not in hlo


LENGTH = 24


def tiny_text_batch(vocab: int) -> dict:
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, vocab, (2, LENGTH)), jnp.int32)
    return dict(tokens=tokens, positions=jnp.tile(jnp.arange(LENGTH), (2, 1)),
                segment_ids=jnp.ones((2, LENGTH), jnp.int32),
                text_targets=jnp.roll(tokens, -1, axis=1),
                text_mask=jnp.asarray(rng.random((2, LENGTH)) < 0.6, jnp.int32))


def tiny_llm_config():
    from metamorph_jax import tiny
    from metamorph_jax.data.testing import build_tiny_tokenizer
    return tiny.tiny_llama_config(build_tiny_tokenizer(), num_layers=1)


def assert_trees_close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=ATOL), got, want)


@pytest.mark.slow
def test_text_loss_chunked_matches_unchunked():
    import flax.linen as nn

    from metamorph_jax.models.llama import LlamaForCausalLM
    from metamorph_jax.training.text_step import text_loss_sum
    config = tiny_llm_config()
    batch = tiny_text_batch(config.vocab_size)
    model = LlamaForCausalLM(config)
    params = jax.jit(lambda: nn.unbox(model.init(
        jax.random.key(0), batch["tokens"][:, :1], positions=batch["positions"][:, :1])
        ["params"]))()
    grad = jax.jit(jax.value_and_grad(lambda p, c: text_loss_sum(model, p, batch, c)[0]),
                   static_argnums=1)
    want, want_grad = grad(params, 0)
    got, got_grad = grad(params, 5)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert_trees_close(got_grad, want_grad)


@pytest.mark.slow
def test_vpit_loss_chunked_matches_unchunked():
    import flax.linen as nn

    from metamorph_jax import tiny
    from metamorph_jax.models import metamorph
    from metamorph_jax.training.vpit_loss import vpit_loss_sums
    llm_config = tiny_llm_config()
    vision = tiny.tiny_siglip_config()
    config = metamorph.MetaMorphConfig(
        llm=llm_config.replace(vocab_size=llm_config.vocab_size + 2), vision=vision,
        num_image_tokens=vision.num_visual_tokens, image_start_id=llm_config.vocab_size,
        image_end_id=llm_config.vocab_size + 1)
    model = metamorph.MetaMorph(config)
    params = jax.jit(lambda: nn.unbox(metamorph.init_params(config, jax.random.key(1))))()
    index = np.full((2, LENGTH), -1, np.int32)
    index[:, 2:6] = np.arange(4)
    vision_mask = np.zeros((2, LENGTH), np.int32)
    vision_mask[:, 2:5] = 1
    target_index = np.full((2, LENGTH), -1, np.int32)
    target_index[:, 2:5] = np.arange(1, 4)
    rng = np.random.default_rng(4)
    batch = dict(tiny_text_batch(llm_config.vocab_size), image_index=jnp.asarray(index),
                 vision_mask=jnp.asarray(vision_mask),
                 vision_target_index=jnp.asarray(target_index),
                 visual_tokens=jnp.asarray(rng.normal(size=(2, 1, 4, vision.hidden_size)),
                                           jnp.float32))

    def loss(p, chunk):
        sums = vpit_loss_sums(model, p, batch, chunk)
        return sums["text_loss_sum"] + sums["vision_loss_sum"], sums
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (want, want_sums), want_grad = grad(params, 0)
    (got, got_sums), got_grad = grad(params, 7)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for key in want_sums:
        np.testing.assert_allclose(got_sums[key], want_sums[key], rtol=RTOL)
    assert_trees_close(got_grad, want_grad)
