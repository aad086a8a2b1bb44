"""The SigLIP sigmoid loss against a PyTorch re-implementation written here (values and
gradients with respect to the embeddings, the logit scale and the bias).

Tolerance: the measured float32 error is at most 3e-6 on values of 8 to 13 and 1e-6 on
the gradients; the test allows 2e-5 (relative to the value, absolute on the gradients).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metamorph_jax.models.siglip_text import l2_normalize
from metamorph_jax.training import contrastive_loss

TOLERANCE = 2e-5


def torch_siglip_loss(image, text, logit_scale, logit_bias):
    image = image / image.norm(p=2, dim=-1, keepdim=True)
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    logits = image @ text.t() * logit_scale.exp() + logit_bias
    labels = 2 * torch.eye(logits.shape[0]) - torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def jax_siglip_loss(image, text, logit_scale, logit_bias):
    logits = jnp.exp(logit_scale) * l2_normalize(image) @ l2_normalize(text).T + logit_bias
    return contrastive_loss.sigmoid_loss(logits)


@pytest.mark.parametrize("batch,scale,bias", [(5, math.log(10.0), -10.0), (8, 2.0, 0.5)])
def test_loss_and_gradients_match_torch(batch, scale, bias):
    rng = np.random.default_rng(batch)
    image = rng.standard_normal((batch, 7)).astype(np.float32)
    text = rng.standard_normal((batch, 7)).astype(np.float32)
    text[0] = image[0] + 0.1 * text[0]   # one pair close, so the diagonal term matters
    tensors = [torch.tensor(x, requires_grad=True) for x in
               (image, text, np.float32(scale), np.float32(bias))]
    theirs = torch_siglip_loss(*tensors)
    theirs.backward()
    ours, grads = jax.value_and_grad(jax_siglip_loss, argnums=(0, 1, 2, 3))(
        jnp.asarray(image), jnp.asarray(text), jnp.float32(scale), jnp.float32(bias))
    assert abs(float(ours) - theirs.item()) <= TOLERANCE * max(1.0, abs(theirs.item()))
    for ours_grad, tensor in zip(grads, tensors):
        np.testing.assert_allclose(np.asarray(ours_grad), tensor.grad.numpy(), atol=TOLERANCE)


def test_loss_by_hand_on_two_pairs():
    # log(1 + e^-x) for the diagonal, log(1 + e^x) for the others, divided by 2
    logits = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)) + np.log1p(np.exp(0.5))
                + np.log1p(np.exp(-3.0))) / 2
    assert float(contrastive_loss.sigmoid_loss(jnp.asarray(logits))) == pytest.approx(
        expected, rel=1e-6)
    assert float(contrastive_loss.pair_accuracy(jnp.asarray(logits))) == 0.75
    assert float(contrastive_loss.retrieval_accuracy(jnp.asarray(logits))) == 1.0


def test_non_square_logits_are_an_error():
    with pytest.raises(ValueError, match="square"):
        contrastive_loss.sigmoid_loss(jnp.zeros((2, 3)))
