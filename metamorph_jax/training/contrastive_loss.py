"""The SigLIP sigmoid image-text loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"; big_vision's siglip trainer, transformers' SiglipModel(return_loss=True)).

Every image-text pair of a batch is a binary classification: logits [B, B] =
t * img @ txt.T + b on L2-normalised embeddings (models/siglip_text.SiglipDualEncoder),
labels +1 on the diagonal (an image and its own caption) and -1 elsewhere, and

    loss = -sum_ij log_sigmoid(label_ij * logit_ij) / B.

No softmax over the batch: each pair stands alone, so the loss of a batch is a sum that
micro-batches can split (each with its own negatives) and the objective divides by the
whole accumulated batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_loss_sum(logits: jax.Array) -> jax.Array:
    """-sum(log_sigmoid(labels * logits)) over a square [B, B] logit matrix whose diagonal
    holds the matching pairs (not yet divided by B). fp32."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square [batch, batch] matrix, got {logits.shape}")
    logits = logits.astype(jnp.float32)
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(logits: jax.Array) -> jax.Array:
    """The SigLIP loss of one batch: sigmoid_loss_sum / B."""
    return sigmoid_loss_sum(logits) / logits.shape[0]


def pair_accuracy(logits: jax.Array) -> jax.Array:
    """Fraction of the B x B pairs whose sign is right (matching > 0, others < 0)."""
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return jnp.mean((labels * logits.astype(jnp.float32)) > 0)


def retrieval_accuracy(logits: jax.Array) -> jax.Array:
    """Fraction of images whose own caption has the highest logit of their row."""
    return jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
