"""Batched autoregressive decoding with a KV cache.

Prompts of different lengths share one batch: they are right-padded, prefilled in one
pass, and each row then writes its next token at its own cache offset, so no row waits
for or attends to another row's padding.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from metamorph_jax.models.llama import LlamaForCausalLM, unstack_layers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float,
                  top_p: float) -> jax.Array:
    """logits [B,V] -> tokens [B]. Greedy at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class TextGenerator:
    """Greedy or sampled continuation of token prompts with one model and its params.

    unroll_layers: decode with the layers unrolled (a scanned model's stacked params are
    sliced once here). Scan slices every layer's weights out of the stack at each step,
    which costs a weight copy per token; unrolled decoding measured ~1.5x faster at batch 1.
    """

    def __init__(self, model: LlamaForCausalLM, params, eos_token_ids: Sequence[int],
                 pad_token_id: int = 0, unroll_layers: bool = True):
        if unroll_layers and model.config.scan_layers:
            params = unstack_layers(params, model.config.num_layers)
            model = LlamaForCausalLM(model.config.replace(scan_layers=False))
        self.model = model
        self.params = params
        self.eos_token_ids = np.asarray(sorted(set(eos_token_ids)), np.int32)
        self.pad_token_id = pad_token_id

    # Sampling happens inside the jitted calls: one dispatch per token, and only the new
    # token ids travel back to the host.
    @partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(3,))
    def _prefill(self, params, tokens, cache, lengths, key, temperature, top_p):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        out = self.model.apply({"params": params}, tokens, positions=positions, cache=cache,
                               cache_index=jnp.zeros(tokens.shape[0], jnp.int32))
        last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, sub = jax.random.split(key)
        return sample_tokens(last, sub, temperature, top_p), out.cache, key

    @partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(4,))
    def _step(self, params, tokens, index, cache, key, temperature, top_p):
        out = self.model.apply({"params": params}, tokens[:, None], positions=index[:, None],
                               cache=cache, cache_index=index)
        key, sub = jax.random.split(key)
        return sample_tokens(out.logits[:, 0], sub, temperature, top_p), out.cache, key

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
                 progress: bool = False) -> list[list[int]]:
        """Returns the new tokens of each prompt, up to and including its end token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        width = _round_up(int(lengths.max()), 8)  # fewer recompiles across prompt lengths
        tokens = np.full((batch, width), self.pad_token_id, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        cache_len = _round_up(width + sampling.max_new_tokens, 8)
        cache = self.model.init_cache(batch, cache_len)
        rule = (float(sampling.temperature), float(sampling.top_p))
        new, cache, key = self._prefill(self.params, jnp.asarray(tokens), cache,
                                        jnp.asarray(lengths), jax.random.key(sampling.seed), *rule)
        index = lengths.copy()
        outputs: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        for step in tqdm(range(sampling.max_new_tokens), disable=not progress, desc="decoding"):
            new = np.asarray(new)
            for row in np.flatnonzero(~done):
                outputs[row].append(int(new[row]))
            done |= np.isin(new, self.eos_token_ids)
            if done.all() or step == sampling.max_new_tokens - 1:
                break
            new, cache, key = self._step(self.params, jnp.asarray(new), jnp.asarray(index), cache,
                                         key, *rule)
            index += 1
        return outputs
