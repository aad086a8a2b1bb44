"""The VPiT loss of a packed batch (REFERENCE.md, "Loss"): text cross-entropy + vision cosine.

Text: cross-entropy of the response tokens (`text_mask`). Vision: at `vision_mask`
positions the vision head's normalised prediction from the hidden state at t is compared
with the visual token at t + 1, gathered by `vision_target_index` from the same row's
(detached, normalised) SigLIP tokens: 1 - cos. Total = text + vision_coef * vision.

Convention: each term is averaged over its own target count in the global batch,

    loss = text_sum / text_count + vision_coef * vision_sum / vision_count,

with a term taken as 0 when its count is 0. `vpit_loss_sums` returns the sums and counts
so that micro-batches and devices can be added before dividing once (`vpit_loss_mean`).
The counts depend on the batch only (text_mask.sum(), vision_mask.sum()), so a step that
accumulates gradients over micro-batches can count the whole batch first and divide each
micro-batch's sums by the global counts.
The authors average per micro-batch per device (a torch CrossEntropyLoss mean and a
cosine mean), which is the same on one device with one micro-batch; their `-cos` differs
from `1 - cos` by the constant 1 only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from metamorph_jax.models.metamorph import MetaMorph, gather_tokens
from metamorph_jax.training.losses import (chunked_cross_entropy, masked_cosine_loss,
                                           masked_cross_entropy)

Array = jax.Array
VPIT_BATCH_KEYS = ("tokens", "positions", "segment_ids", "text_targets", "text_mask",
                   "image_index", "vision_mask", "vision_target_index")
SUM_KEYS = ("text_loss_sum", "text_tokens", "vision_loss_sum", "vision_tokens")


def batch_visual_tokens(model: MetaMorph, params: Any, batch: dict) -> Array:
    """The batch's visual tokens [B, N, V, C]: `batch["visual_tokens"]` when precomputed,
    else the frozen tower run on `batch["images"]` (uint8 images are normalised first)."""
    if "visual_tokens" in batch:
        return jax.lax.stop_gradient(jnp.asarray(batch["visual_tokens"], jnp.float32))
    images = jnp.asarray(batch["images"])
    if images.dtype == jnp.uint8:
        from metamorph_jax.data.images import normalize
        images = normalize(images, xp=jnp)
    return model.apply({"params": params}, images, method=MetaMorph.encode_images)


def vpit_loss_sums(model: MetaMorph, params: Any, batch: dict, chunk_tokens: int = 0,
                   unroll_chunks: bool = False) -> dict[str, Array]:
    """Sums and counts of the two loss terms for a packed batch (data/packing.py layout,
    with `images` or precomputed `visual_tokens`). chunk_tokens > 0: the LM head and the
    text loss run over chunks of that many positions (losses.chunked_cross_entropy), so
    the batch's [B, T, vocab] logits never exist.

    Returns text_loss_sum, text_tokens, vision_loss_sum (sum of 1 - cos), vision_tokens,
    all fp32 scalars.
    """
    missing = [key for key in VPIT_BATCH_KEYS if key not in batch]
    if missing or ("images" not in batch and "visual_tokens" not in batch):
        raise KeyError(f"batch lacks {missing or ['images or visual_tokens']}; the VPiT loss "
                       f"needs {list(VPIT_BATCH_KEYS)} and images or visual_tokens")
    visual = batch_visual_tokens(model, params, batch)
    out = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], image_index=batch["image_index"],
                      visual_tokens=visual, compute_logits=chunk_tokens <= 0)
    if chunk_tokens <= 0:
        text_sum, text_count = masked_cross_entropy(out.logits, batch["text_targets"],
                                                    batch["text_mask"])
    else:
        def logits_fn(hidden):
            return model.apply({"params": params}, hidden, method=MetaMorph.logits)
        text_sum, text_count = chunked_cross_entropy(out.hidden_states, logits_fn,
                                                     batch["text_targets"], batch["text_mask"],
                                                     chunk_tokens, unroll_chunks)
    predicted = model.apply({"params": params}, out.hidden_states,
                            method=MetaMorph.vision_head_outputs)
    flat = visual.reshape(visual.shape[0], -1, visual.shape[-1])
    targets = gather_tokens(flat, batch["vision_target_index"])
    vision_sum, vision_count = masked_cosine_loss(predicted, targets, batch["vision_mask"])
    return {"text_loss_sum": text_sum, "text_tokens": text_count,
            "vision_loss_sum": vision_sum, "vision_tokens": vision_count}


def _mean(total: Array, count: Array) -> Array:
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def vpit_loss_mean(sums: dict[str, Array], vision_coef: float) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) from summed `vpit_loss_sums` (see the module docstring).

    metrics: loss, text_loss, vision_loss (mean 1 - cos), vision_cosine (mean cos; 0 when
    there are no vision targets), text_tokens, vision_tokens.
    """
    text = _mean(sums["text_loss_sum"], sums["text_tokens"])
    vision = _mean(sums["vision_loss_sum"], sums["vision_tokens"])
    loss = text + vision_coef * vision
    cosine = jnp.where(sums["vision_tokens"] > 0, 1.0 - vision, 0.0)
    return loss, {"loss": loss, "text_loss": text, "vision_loss": vision,
                  "vision_cosine": cosine, "text_tokens": sums["text_tokens"],
                  "vision_tokens": sums["vision_tokens"]}


def vpit_loss(model: MetaMorph, params: Any, batch: dict) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) of one batch, each term averaged over the whole batch's targets."""
    return vpit_loss_mean(vpit_loss_sums(model, params, batch), model.config.vision_coef)
