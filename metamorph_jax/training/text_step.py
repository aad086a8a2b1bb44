"""The LLM's text loss on packed text-only batches, and its jitted eval step.

A batch is the packed layout of data/packing.py; this reads only `tokens`, `positions`,
`segment_ids`, `text_targets` and `text_mask` (TEXT_BATCH_KEYS). Training runs through
the stage runner (training/runner.py; the `text` kind in objectives.py uses
`text_loss_sum`); evaluation/text_loss.py uses the eval step here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from metamorph_jax import sharding
from metamorph_jax.models import llama
from metamorph_jax.training.losses import chunked_cross_entropy, masked_cross_entropy

Array = jax.Array
TEXT_BATCH_KEYS = ("tokens", "positions", "segment_ids", "text_targets", "text_mask")


def text_batch(batch: dict) -> dict:
    """The keys the text step reads, so that images (unused here) are never sent to devices."""
    missing = [key for key in TEXT_BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; the text step needs {list(TEXT_BATCH_KEYS)}")
    return {key: batch[key] for key in TEXT_BATCH_KEYS}


def text_loss_sum(model: nn.Module, params: Any, batch: dict, chunk_tokens: int = 0,
                  unroll_chunks: bool = False) -> tuple[Array, Array]:
    """(loss_sum, token_count) of the response tokens of a packed batch. chunk_tokens > 0
    applies the LM head and the loss over chunks of that many positions
    (losses.chunked_cross_entropy): the batch's [B, T, vocab] logits never exist."""
    if chunk_tokens <= 0:
        output = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
        return masked_cross_entropy(output.logits, batch["text_targets"], batch["text_mask"])
    output = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], compute_logits=False,
                         return_hidden=True)

    def logits_fn(hidden):
        return model.apply({"params": params}, hidden, method=llama.LlamaForCausalLM.logits)
    return chunked_cross_entropy(output.hidden_states, logits_fn, batch["text_targets"],
                                 batch["text_mask"], chunk_tokens, unroll_chunks)


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], tuple[Array, Array]]:
    """(params, batch) -> (loss_sum, token_count), un-jitted (see jit_eval_step)."""
    def eval_step(params: Any, batch: dict) -> tuple[Array, Array]:
        return text_loss_sum(model, params, batch)
    return eval_step


# --- shardings and compilation ----------------------------------------------------------

def abstract_boxed_params(model: nn.Module) -> Any:
    """The model's parameter shapes, still boxed with their logical axis names."""
    return llama.abstract_boxed_params(model)


def param_shardings(model: nn.Module, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Any:
    sharding.check_platform(model.config.platform, mesh)
    return sharding.logical_shardings(abstract_boxed_params(model), mesh, rules)


def _check_batch_divides(mesh: Mesh, rules, batch_size: int) -> None:
    spec = sharding.batch_sharding(mesh, rules).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch_size % ways:
        raise ValueError(f"global batch size {batch_size} does not divide over the mesh's "
                         f"batch axes {axes} ({ways} ways); change data.batch_size or the mesh")


def jit_eval_step(eval_step: Callable, mesh: Mesh, params_shardings: Any,
                  rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Callable:
    """Compile `eval_step` with explicit shardings; returns (params, batch) -> (sum, count)."""
    batch_sharding = sharding.batch_sharding(mesh, rules)
    jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding),
                     out_shardings=sharding.replicated(mesh))

    def run(params: Any, batch: dict) -> tuple[Array, Array]:
        batch = text_batch(batch)
        _check_batch_divides(mesh, rules, batch["tokens"].shape[0])
        with sharding.activate(mesh, rules):
            return jitted(params, batch)
    return run


def global_batch(batch: dict, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> dict:
    """This process's rows of a batch -> global jax.Arrays split over the batch axes
    (each process contributes its own rows; one process: the batch as is)."""
    batch = text_batch(batch)
    _check_batch_divides(mesh, rules, batch["tokens"].shape[0] * jax.process_count())
    batch_sharding = sharding.batch_sharding(mesh, rules)
    return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
            for key, value in batch.items()}
