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


def test_folders_without_a_template_use_the_training_default(tmp_path):
    tokenizer = tiny.tiny_tokenizer(tmp_path / "model")
    config = tiny.tiny_llama_config(tokenizer)
    pretrained.save_pretrained(tmp_path / "model", "llama", config.to_dict(),
                               {"unused": np.zeros(1, np.float32)})
    assert pretrained.chat_template(tmp_path / "model") == "llama3"
    # Meta's own template (the tokenizer's) puts two newlines after the header; ours one
    ours = text_cli.encode_prompt(tokenizer, QUESTION, chat=True, template="llama3")
    metas = text_cli.encode_prompt(tokenizer, QUESTION, chat=True, template="tokenizer")
    assert ours != metas
