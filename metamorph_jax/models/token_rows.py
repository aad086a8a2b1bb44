"""New vocabulary rows for a LLaMA parameter tree, initialised to the mean of the old ones.

MetaMorph adds `<image_start>` and `<image_end>` to LLaMA-3's vocabulary (REFERENCE.md,
"Model"); the authors' code resizes the embeddings and sets every new row, of the input
embedding and of the LM head alike, to the mean of the existing rows. Pure functions on
nested dicts of numpy or jax arrays; the files side is pretrained.add_token_rows.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def _mean_rows(table: Any, axis: int, count: int) -> Any:
    """`table` with `count` copies of its mean along `axis` appended there.

    The mean is accumulated in fp32 and stored in the table's dtype (as torch does for a
    bf16 `.mean`). Host arrays stay numpy, so an 8B model's tables never touch a device.
    """
    xp = np if isinstance(table, np.ndarray) else jnp
    mean = xp.mean(table.astype(np.float32), axis=axis, keepdims=True).astype(table.dtype)
    reps = [1] * table.ndim
    reps[axis] = count
    return xp.concatenate([table, xp.tile(mean, reps)], axis=axis)


def grow_vocab(llm_params: dict, count: int, tie_word_embeddings: bool) -> dict:
    """A copy of a LlamaForCausalLM params tree with `count` new vocabulary rows.

    `embed_tokens/embedding` [V, d] gains rows V .. V+count-1 and, unless the embeddings
    are tied, `lm_head/kernel` [d, V] gains the matching columns; each new row is the mean
    of the table's existing rows. Everything else is shared, not copied.
    """
    if count < 0:
        raise ValueError(f"count={count}: cannot remove vocabulary rows")
    if "embed_tokens" not in llm_params:
        raise ValueError("the params tree has no 'embed_tokens': not a LlamaForCausalLM tree")
    has_head = "lm_head" in llm_params
    if has_head == tie_word_embeddings:
        raise ValueError(f"tie_word_embeddings={tie_word_embeddings} but the params tree "
                         f"{'has' if has_head else 'lacks'} 'lm_head'")
    out = dict(llm_params)
    out["embed_tokens"] = {**llm_params["embed_tokens"],
                           "embedding": _mean_rows(llm_params["embed_tokens"]["embedding"],
                                                   0, count)}
    if has_head:
        out["lm_head"] = {**llm_params["lm_head"],
                          "kernel": _mean_rows(llm_params["lm_head"]["kernel"], 1, count)}
    return out
