"""Masked losses for VPiT (REFERENCE.md, "Loss"), computed in fp32.

Both return a (sum, count) pair rather than a mean, so that callers can add sums across
micro-batches, devices or an evaluation set before dividing once: the mean over all
trained tokens, not a mean of per-batch means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metamorph_jax.models.visual_tokens import l2_normalize

Array = jax.Array


def masked_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Next-token cross-entropy summed over the positions where mask is set.

    logits [B,T,V] (any float dtype; upcast to fp32 before the log-softmax), targets [B,T]
    int ids, mask [B,T] (0/1 or bool). Returns (loss_sum, token_count), both fp32 scalars.
    An all-zero mask gives (0, 0): masked positions are selected with `where`, so a
    non-finite logit at an untrained position cannot leak in as NaN.
    """
    selected = mask.astype(bool)
    loss_sum = _selected_nll_sum(logits, targets.astype(jnp.int32), selected)
    return loss_sum, jnp.sum(selected, dtype=jnp.float32)


@jax.custom_vjp
def _selected_nll_sum(logits: Array, targets: Array, selected: Array) -> Array:
    """Sum over selected positions of logsumexp(logits) - logits[target].

    The backward pass is written out (softmax minus a one-hot made by comparing the
    vocabulary index with the target). Autodiff of the gather scatters into a zeroed
    [B,T,V] buffer and adds passes over the logits: for a 32k vocabulary and 1024 tokens
    on CPU, LM head plus loss forward and backward took 856 ms that way and 731 ms here.
    """
    return _selected_nll_sum_fwd(logits, targets, selected)[0]


def _selected_nll_sum_fwd(logits, targets, selected):
    upcast = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(upcast, axis=-1)
    target_logits = jnp.take_along_axis(upcast, targets[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum(jnp.where(selected, log_norm - target_logits, 0.0))
    return loss_sum, (logits, log_norm, targets, selected)


def _selected_nll_sum_bwd(residuals, grad):
    logits, log_norm, targets, selected = residuals
    vocab_index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    probs = jnp.exp(logits.astype(jnp.float32) - log_norm[..., None])
    d_logits = probs - (vocab_index == targets[..., None]).astype(jnp.float32)
    d_logits = jnp.where(selected[..., None], d_logits * grad, 0.0)
    return d_logits.astype(logits.dtype), None, None


_selected_nll_sum.defvjp(_selected_nll_sum_fwd, _selected_nll_sum_bwd)


def masked_cosine_loss(pred: Array, target: Array, mask: Array,
                       eps: float = 1e-8) -> tuple[Array, Array]:
    """Sum of (1 - cos(pred, target)) over the positions where mask is set.

    pred [B,T,C] is the vision head's output and is L2-normalised here (the paper's loss);
    target [B,T,C] (the SigLIP tokens, normalised by the encoder side and treated as
    constants) is normalised as well, which is a no-op for unit vectors and makes the value
    a true cosine. Computed in fp32. Returns (loss_sum, count); an all-zero mask gives (0, 0).
    """
    pred = l2_normalize(pred, eps=eps)  # fp32
    target = l2_normalize(jax.lax.stop_gradient(target), eps=eps)
    cosine = jnp.sum(pred * target, axis=-1)
    selected = mask.astype(bool)
    loss_sum = jnp.sum(jnp.where(selected, 1.0 - cosine, 0.0))
    return loss_sum, jnp.sum(selected, dtype=jnp.float32)


def chunked_cross_entropy(hidden: Array, logits_fn, targets: Array, mask: Array,
                          chunk_tokens: int, unroll: bool = False) -> tuple[Array, Array]:
    """masked_cross_entropy(logits_fn(hidden), targets, mask) without the [B,T,V] logits.

    hidden [B,T,d] (the LLM's final hidden states), logits_fn: [B,c,d] -> [B,c,V] (the LM
    head), targets and mask [B,T]. The sequence axis is cut into chunks of `chunk_tokens`
    positions (the last one padded with masked positions); a scan applies the LM head and
    the NLL chunk by chunk, each chunk under jax.checkpoint, so neither the forward nor the
    backward ever holds more than one chunk's logits: [B, chunk_tokens, V] instead of
    [B, T, V] (the batch axis keeps its sharding). The backward recomputes each chunk's
    logits (one more LM-head matmul per chunk). chunk_tokens <= 0, or >= T: unchunked.
    Returns (loss_sum, token_count) as masked_cross_entropy does. unroll: the scan fully
    unrolled (the same values; what a compile-only plan's cost analysis needs, since XLA
    counts a loop body once).
    """
    import flax.linen as nn

    batch, length = targets.shape
    if chunk_tokens <= 0 or chunk_tokens >= length:
        return masked_cross_entropy(logits_fn(hidden), targets, mask)
    chunks = -(-length // chunk_tokens)
    pad = chunks * chunk_tokens - length
    selected = mask.astype(bool)
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        selected = jnp.pad(selected, ((0, 0), (0, pad)))

    def split(x):   # [B, chunks * c, ...] -> [chunks, B, c, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, chunk_tokens, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h, t, s):
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        return _selected_nll_sum(logits_fn(h), t, s)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (split(hidden), split(targets), split(selected)),
                            unroll=chunks if unroll else 1)
    return total, jnp.sum(selected, dtype=jnp.float32)
