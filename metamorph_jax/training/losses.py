"""Masked losses for VPiT (REFERENCE.md, "Loss"), computed in fp32.

Both return a (sum, count) pair rather than a mean, so that callers can add sums across
micro-batches, devices or an evaluation set before dividing once: the mean over all
trained tokens, not a mean of per-batch means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Next-token cross-entropy summed over the positions where mask is set.

    logits [B,T,V] (any float dtype; upcast to fp32 before the log-softmax), targets [B,T]
    int ids, mask [B,T] (0/1 or bool). Returns (loss_sum, token_count), both fp32 scalars.
    An all-zero mask gives (0, 0): masked positions are selected with `where`, so a
    non-finite logit at an untrained position cannot leak in as NaN.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                           axis=-1)[..., 0]
    selected = mask.astype(bool)
    loss_sum = -jnp.sum(jnp.where(selected, target_log_probs, 0.0))
    return loss_sum, jnp.sum(selected, dtype=jnp.float32)


def _l2_normalize(x: Array, eps: float) -> Array:
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def masked_cosine_loss(pred: Array, target: Array, mask: Array,
                       eps: float = 1e-8) -> tuple[Array, Array]:
    """Sum of (1 - cos(pred, target)) over the positions where mask is set.

    pred [B,T,C] is the vision head's output and is L2-normalised here (the paper's loss);
    target [B,T,C] (the SigLIP tokens, normalised by the encoder side and treated as
    constants) is normalised as well, which is a no-op for unit vectors and makes the value
    a true cosine. Computed in fp32. Returns (loss_sum, count); an all-zero mask gives (0, 0).
    """
    pred = _l2_normalize(pred.astype(jnp.float32), eps)
    target = _l2_normalize(jax.lax.stop_gradient(target).astype(jnp.float32), eps)
    cosine = jnp.sum(pred * target, axis=-1)
    selected = mask.astype(bool)
    loss_sum = jnp.sum(jnp.where(selected, 1.0 - cosine, 0.0))
    return loss_sum, jnp.sum(selected, dtype=jnp.float32)
