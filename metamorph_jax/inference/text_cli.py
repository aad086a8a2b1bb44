"""What generate.py does for text: load a model folder and its tokenizer, decode prompts.

A command-line module: nothing in the library imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.inference.generate import SamplingConfig, TextGenerator


def encode_prompt(tokenizer, text: str, chat: bool, template: str) -> list[int]:
    """Token ids of a prompt. chat: one user turn rendered with `template` (the model
    folder's, as in training) and the assistant header after it; else the plain text
    after the tokenizer's begin-of-text token."""
    if chat:
        return conv.prompt_tokens([conv.Turn("user", text)], tokenizer, template)
    return list(tokenizer(text)["input_ids"])


def end_tokens(eos_token_ids: Sequence[int], tokenizer) -> list[int]:
    ids = set(eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def run(llm_dir: str | Path, tokenizer_dir: str | Path | None, prompts: Sequence[str], *,
        chat: bool = False, template: str | None = None,
        sampling: SamplingConfig = SamplingConfig(), dtype: str = "float32") -> list[str]:
    """Decode `prompts` as one batch; returns the new text of each.

    tokenizer_dir: None reads the tokenizer from the model folder (train.py saves it
    there). template: None uses the folder's own (pretrained.chat_template).
    """
    model, params, saved = pretrained.load_llama(llm_dir, dtype=dtype)
    tokenizer = pretrained.load_tokenizer(tokenizer_dir or llm_dir)
    template = template or pretrained.chat_template(llm_dir)
    ids = [encode_prompt(tokenizer, text, chat, template) for text in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = TextGenerator(model, params, end_tokens(model.config.eos_token_ids, tokenizer), pad)
    outputs = generator.generate(ids, sampling, progress=True)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
