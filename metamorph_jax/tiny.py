"""Tiny random models and a word-level tokenizer, for the demo and for tests.

Nothing here is downloaded: the tokenizer is built from a fixed word list with LLaMA-3's
special tokens and a chat template.
"""
from __future__ import annotations

from pathlib import Path

WORDS = ("the a red green blue yellow circle square triangle is on in left right top bottom "
         "middle of and what colour shape how many there image picture small big one two "
         "three yes no user assistant system hello world generate an here your request I "
         "will think about it visually answer question").split()
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "[UNK]", "[PAD]"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tiny_tokenizer(save_dir: str | Path | None = None):
    """A PreTrainedTokenizerFast over WORDS; eos is <|eot_id|> (id 4), pad is [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        unk_token="[UNK]", pad_token="[PAD]",
        additional_special_tokens=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    from metamorph_jax.models.llama import LlamaConfig
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=256, bos_token_id=0, eos_token_ids=(4,),
                  pad_token_id=6)
    fields.update(overrides)
    return LlamaConfig(**fields)
