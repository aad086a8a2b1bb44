"""CLIP score against transformers' own CLIP forward on a tiny random CLIP built here
(the reference takes the cosines from CLIPModel's logits_per_image / logit_scale, one pair
per call, so batching, padding and truncation in clip_score are checked against it);
caption files."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_jax.evaluation import captions, clip_score
from metamorph_jax.evaluation.samples import BenchmarkFileError
from tests.helpers import write_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return clip_score.load_clip(str(folder))


def reference_cosine(model, processor, image, caption):
    inputs = processor(text=[caption], images=[image], return_tensors="pt", padding=True)
    inputs["input_ids"] = inputs["input_ids"][:, :16]  # torchmetrics' cut at the text positions
    inputs["attention_mask"] = inputs["attention_mask"][:, :16]
    with torch.no_grad():
        out = model(**inputs)
        return float(out.logits_per_image[0, 0] / model.logit_scale.exp())


def test_clip_score_matches_transformers(tiny_clip, tmp_path):
    model, processor = tiny_clip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(5)]
    Image.fromarray(images[0]).save(tmp_path / "0.png")
    inputs = [str(tmp_path / "0.png")] + images[1:]
    texts = ["a red cat", "dog", "a very long caption that runs past sixteen tokens of text",
             "sky", "blue boat on a lake"]
    expected = np.array([reference_cosine(model, processor, Image.fromarray(i), t)
                         for i, t in zip(images, texts)])
    got = clip_score.cosines(model, processor, inputs, texts, batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    result = clip_score.clip_score(model, processor, inputs, texts, batch_size=3)
    per_pair = 100 * np.maximum(expected, 0)
    np.testing.assert_allclose(result["per_pair"], per_pair, atol=1e-3)
    assert result["score"] == pytest.approx(per_pair.mean(), abs=1e-3)
    assert result["negative"] == int((expected < 0).sum())


def test_caption_files(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"image_id": 9, "caption": " A dog. "}\n{"caption": "A cat."}\n')
    assert captions.read_captions(jsonl) == [("9", "A dog."), ("2", "A cat.")]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("id\tcaption\n1\tA dog.\n2\tA cat.\n")
    assert captions.read_captions(tsv) == [("1", "A dog."), ("2", "A cat.")]
    bad = tmp_path / "d.tsv"
    bad.write_text("id\ttext\n1\tA dog.\n")
    with pytest.raises(BenchmarkFileError, match=r"d.tsv, row 1, field 'caption'"):
        captions.read_captions(bad)
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"caption": "x"}\n{"text": "y"}\n')
    with pytest.raises(BenchmarkFileError, match=r"e.jsonl, row 2, field 'caption'"):
        captions.read_captions(bad)
