"""What generate.py does for text: load a converted LLM and a tokenizer, decode prompts."""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from metamorph_jax import pretrained
from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM


def load_llm(model_dir: str | Path, dtype: str = "float32") -> tuple[LlamaForCausalLM, dict]:
    saved = pretrained.read_model_config(model_dir)
    if saved["model"] != "llama":
        raise ValueError(f"{Path(model_dir) / pretrained.CONFIG_FILE}: field 'model' is "
                         f"{saved['model']!r}, expected 'llama'")
    config = LlamaConfig.from_dict(saved["config"]).replace(dtype=dtype)
    params = jax.tree.map(jnp.asarray, pretrained.load_params(model_dir))
    return LlamaForCausalLM(config), params


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat: the tokenizer has no chat_template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])


def end_tokens(model: LlamaForCausalLM, tokenizer) -> list[int]:
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def run(args: argparse.Namespace) -> list[str]:
    model, params = load_llm(args.llm, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = [encode_prompt(tokenizer, text, args.chat) for text in args.prompt]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = TextGenerator(model, params, end_tokens(model, tokenizer), pad)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    outputs = generator.generate(prompts, sampling, progress=True)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
