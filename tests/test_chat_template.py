"""One chat template per model folder: training, evaluation and generation render the same
prompt tokens for the same conversation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from metamorph_jax import pretrained, tiny
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.data.text_records import text_batches, text_special_ids
from metamorph_jax.inference import text_cli

QUESTION = "how many shapes are there ?"
RECORD = {"id": "r0", "conversations": [{"from": "human", "value": QUESTION},
                                         {"from": "gpt", "value": "two"}]}


def training_prompt(sample: dict) -> list[int]:
    """The tokens before the first trained (assistant) token of a rendered sample."""
    first_target = int(np.flatnonzero(sample["text_mask"])[0])
    return [int(t) for t in sample["tokens"][:first_target + 1]]


@pytest.mark.parametrize("template", ["llama3", "llama3_official"])
def test_train_eval_and_generate_prompt_the_same_tokens(tmp_path, template):
    tokenizer = tiny.tiny_tokenizer(tmp_path / "model")
    config = tiny.tiny_llama_config(tokenizer)
    # what train.py writes: the folder names the template its data was rendered with
    pretrained.save_pretrained(tmp_path / "model", "llama", config.to_dict(),
                               {"unused": np.zeros(1, np.float32)}, chat_template=template)
    folder_template = pretrained.chat_template(tmp_path / "model")
    assert folder_template == template

    # training: the pipeline's rendering with the data config's template
    ids = text_special_ids(tokenizer)
    sample = conv.render(conv.parse_record(RECORD), tokenizer, ids, template=template)
    trained = training_prompt(sample)

    # evaluation: the same pipeline, with the folder's template (what eval.py passes)
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    batch = next(text_batches([pipeline.Source(str(path))], tokenizer, pipeline.DataConfig(
        seq_len=64, batch_size=1, template=folder_template, num_epochs=1, shard_index=0,
        shard_count=1)))
    length = int((batch["segment_ids"][0] > 0).sum())
    evaluated = training_prompt({key: batch[key][0, :length] for key in ("tokens", "text_mask")})

    # generation: generate.py --chat with the folder's template
    generated = text_cli.encode_prompt(tokenizer, QUESTION, chat=True, template=folder_template)
    assert trained == evaluated == generated


def test_folders_without_a_template_use_the_training_default_and_say_so(tmp_path):
    tokenizer = tiny.tiny_tokenizer(tmp_path / "model")
    config = tiny.tiny_llama_config(tokenizer)
    pretrained.save_pretrained(tmp_path / "model", "llama", config.to_dict(),
                               {"unused": np.zeros(1, np.float32)})
    with pytest.warns(UserWarning, match=f"{tmp_path / 'model'}.* names no chat template.*"
                                         "'llama3'"):
        assert pretrained.chat_template(tmp_path / "model") == "llama3"
    # Meta's own template (the tokenizer's) puts two newlines after the header; ours one
    ours = text_cli.encode_prompt(tokenizer, QUESTION, chat=True, template="llama3")
    metas = text_cli.encode_prompt(tokenizer, QUESTION, chat=True, template="tokenizer")
    assert ours != metas


CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer():
    """The tiny word-level tokenizer with a ChatML template and its special tokens (as
    e.g. a Qwen-style LLaMA-architecture chat model carries)."""
    from tokenizers import AddedToken

    from metamorph_jax.data.testing import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(chat_template=CHATML)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)
                          for token in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def test_a_converted_chat_model_chats_with_its_tokenizers_template(tmp_path):
    """python -m convert to-flax llama on a chat model whose tokenizer carries its own
    (ChatML) template records "tokenizer"; generate.py --llm DIR --tokenizer HF_DIR --chat
    then prompts as transformers' apply_chat_template does and answers as transformers."""
    import torch

    from convert.__main__ import main as convert_main
    from metamorph_jax.inference.generate import SamplingConfig
    from tests.test_convert_llama import save_hf_model

    hf, flax = tmp_path / "hf", tmp_path / "flax"
    tokenizer = chatml_tokenizer()
    reference = save_hf_model(hf, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(str(hf))
    assert pretrained.tokenizer_has_chat_template(hf)
    assert convert_main(["to-flax", "llama", str(hf), str(flax)]) == 0
    assert pretrained.chat_template(flax) == "tokenizer"

    loaded = pretrained.load_tokenizer(hf)
    messages = [{"role": "user", "content": QUESTION}]
    expected = loaded.apply_chat_template(messages, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    ours = text_cli.encode_prompt(loaded, QUESTION, chat=True,
                                  template=pretrained.chat_template(flax))
    assert ours == expected and loaded.decode(ours).startswith("<|im_start|> user")

    # what generate.py --llm flax --tokenizer hf --chat answers: transformers' greedy reply
    [answer] = text_cli.run(flax, hf, [QUESTION], chat=True,
                            sampling=SamplingConfig(max_new_tokens=6))
    with torch.no_grad():
        output = reference.generate(torch.tensor([expected]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=loaded.eos_token_id, pad_token_id=0)
    assert answer == loaded.decode(output[0, len(expected):], skip_special_tokens=True)


def test_a_tokenizer_without_a_template_records_none(tmp_path):
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(tmp_path / "base"))
    assert not pretrained.tokenizer_has_chat_template(tmp_path / "base")
    chatml_tokenizer().save_pretrained(str(tmp_path / "chat"))
    assert pretrained.tokenizer_has_chat_template(tmp_path / "chat")
