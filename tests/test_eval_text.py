"""eval.py: the mean response-token loss over packed records equals transformers'
cross-entropy on the same rendered tokens and masks; unusable records are reported."""
import importlib
import json

import numpy as np
import pytest
import torch
import transformers

from convert.__main__ import main as convert_main
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import text_records
from tests.helpers import tiny_llama_hf_config, tiny_tokenizer

eval_cli = importlib.import_module("eval")

RECORDS = [
    {"conversations": [{"from": "human", "value": "what colour is the circle ?"},
                       {"from": "gpt", "value": "red"}]},
    {"conversations": [{"from": "system", "value": "you are helpful"},
                       {"from": "human", "value": "how many shapes"},
                       {"from": "gpt", "value": "there are two shapes : a red circle and a blue square ."}]},
    {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world"},
                       {"from": "human", "value": "describe the image"},
                       {"from": "gpt", "value": "a green triangle in the top left"}]},
    {"conversations": [{"from": "human", "value": "is there a yellow square ?"},
                       {"from": "gpt", "value": "no"}]},
    {"conversations": [{"from": "human", "value": "where is the blue circle ?"},
                       {"from": "gpt", "value": "bottom right"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    # a larger initializer range than transformers' 0.02 gives logits far from uniform
    config = transformers.LlamaConfig(**tiny_llama_hf_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, initializer_range=0.3))
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(root / "hf"))
    assert convert_main(["to-flax", "llama", str(root / "hf"), str(root / "flax")]) == 0
    return root, tokenizer, model


def reference_loss(model, tokenizer, records):
    """transformers' summed cross-entropy over each record's trained tokens, unpacked."""
    ids = text_records.text_special_ids(tokenizer)
    total, count = 0.0, 0
    for index, record in enumerate(records):
        sample = conv.render(conv.parse_record(record, where=f"r{index}"), tokenizer, ids,
                             template="llama3")
        with torch.no_grad():
            logits = model(torch.tensor(sample["tokens"][None]).long()).logits[0]
        keep = torch.tensor(sample["text_mask"], dtype=torch.bool)
        total += torch.nn.functional.cross_entropy(
            logits[keep], torch.tensor(sample["text_targets"]).long()[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count, count


def test_mean_loss_matches_transformers(converted, tmp_path, capsys):
    root, tokenizer, model = converted
    data = write_jsonl(tmp_path / "records.jsonl", RECORDS)
    expected, count = reference_loss(model, tokenizer, RECORDS)
    # seq_len 96 packs several records per row; the mesh shards params and batch both ways
    assert eval_cli.main(["--llm", str(root / "flax"), "--tokenizer", str(root / "tok"),
                          "--data", str(data), "--seq-len", "96", "--batch-size", "4",
                          "--mesh", "2,2,2", "--out", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tokens"] == count and results["records"] == len(RECORDS)
    assert results["bad_records"] == {}
    assert abs(results["mean_loss"] - expected) <= 1e-4
    assert results["perplexity"] == pytest.approx(np.exp(expected), rel=1e-4)
    assert expected > 0.5 and abs(expected - np.log(len(tokenizer))) > 0.1  # not a uniform model
    assert f"mean loss {results['mean_loss']:.6f}" in capsys.readouterr().out


def test_unusable_records_are_counted_and_images_stop_the_run(converted, tmp_path):
    root, _, _ = converted
    from metamorph_jax.evaluation.text_loss import evaluate
    long_record = {"conversations": [{"from": "human", "value": "hello " * 100},
                                     {"from": "gpt", "value": "no"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", RECORDS[:2] + [long_record])
    results = evaluate(root / "flax", root / "tok", [str(data)], seq_len=64, batch_size=8,
                       progress=False)
    assert results["records"] == 2
    assert results["bad_records"]["too_long"]["count"] == 1
    assert "mixed.jsonl:3" in results["bad_records"]["too_long"]["examples"][0]

    with_image = dict(RECORDS[0], image="a.png")
    data = write_jsonl(tmp_path / "images.jsonl", RECORDS[:1] + [with_image])
    with pytest.raises(text_records.TextStageError, match=r"images.jsonl:2: field 'image'"):
        evaluate(root / "flax", root / "tok", [str(data)], seq_len=64, batch_size=8, progress=False)
