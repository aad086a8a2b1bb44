"""The `tower` stage (SigLIP's sigmoid image-text pretraining) end to end through the
runner on the tiny Shapes world (configs/tower_tiny.py), and its caption-pair data."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax import pretrained
from metamorph_jax.data import caption_pairs, pipeline
from metamorph_jax.models import siglip, siglip_text
from metamorph_jax.training import objectives, runner

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tower_tiny.py"


def tower_config(assets: Path, work: Path, *overrides: str):
    return runner.parse_flags(["train.py", "--config", f"{CONFIG}:{assets}", "--workdir",
                               str(work), *overrides])


@pytest.fixture(scope="module")
def tower_run(tmp_path_factory, tiny_assets):
    work = tmp_path_factory.mktemp("tower") / "run"
    # 16 steps: the loss (from SigLIP's b = -10 start) must fall well within them
    config = tower_config(tiny_assets, work, "--config.stages.tower.steps=16",
                          "--config.eval_every=16")
    results = runner.run(config)
    return config, results, tiny_assets, work


@pytest.mark.slow   # ~100 s on the shared 2 cores (the tiny assets included)
def test_the_tower_stage_learns_and_exports_a_siglip_folder(tower_run):
    config, results, assets, work = tower_run
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert {"pair_accuracy", "retrieval_accuracy", "temperature", "bias"} <= set(lines[0])
    assert any("eval_loss" in line for line in lines)
    final = work / "tower" / "final"
    saved = pretrained.read_model_config(final)
    assert saved["model"] == "siglip"
    vision = siglip.SiglipConfig.from_dict(saved["config"])
    start = siglip.SiglipConfig.from_dict(pretrained.read_model_config(assets / "siglip")["config"])
    # the same tower (VPiT's token path unchanged), now with the head the loss trained
    assert vision.replace(use_head=False) == start and vision.use_head
    params = pretrained.load_params(final, dtype=np.float32)
    before = pretrained.load_params(assets / "siglip", dtype=np.float32)
    moved = np.abs(np.asarray(params["encoder"]["layers"]["mlp"]["fc1"]["kernel"])
                   - np.asarray(before["encoder"]["layers"]["mlp"]["fc1"]["kernel"])).max()
    assert moved > 1e-3
    images = jnp.ones((2, vision.image_size, vision.image_size, 3))
    model = siglip.SiglipVisionModel(vision)
    tokens = model.apply({"params": params}, images, method=model.visual_tokens)
    assert tokens.shape == (2, vision.num_visual_tokens, vision.hidden_size)
    # the text tower beside it, with its tokenizer and the learned logit scale and bias
    text_dir = final / objectives.TEXT_TOWER_DIR
    text_saved = pretrained.read_model_config(text_dir)
    assert text_saved["model"] == "siglip_text"
    text = siglip_text.SiglipTextConfig.from_dict(text_saved["config"])
    assert text.output_size == vision.hidden_size
    pretrained.load_tokenizer(text_dir)
    logits = json.loads((text_dir / objectives.LOGITS_FILE).read_text())
    assert logits["logit_bias"] != -10.0
    assert (final / runner.DONE_FILE).exists()
    # the probe reads the exported folder (its scores on 48 scenes mean little)
    from metamorph_jax.evaluation import probe
    scores = probe.probe_tower(final, assets / "shapes", "train", "validation")
    assert set(scores) == {"colour", "shape", "size", "position", "cell_colour", "cell_shape"}
    assert all(0.0 <= s["accuracy"] <= 1.0 and s["test"] > 0 for s in scores.values())


def _pairs_config(**changes):
    fields = dict(seq_len=32, batch_size=4, image_size=16, num_epochs=1, seed=0)
    fields.update(changes)
    return pipeline.DataConfig(**fields)


def test_caption_batches_pad_with_end_of_text_and_resume(tiny_assets):
    tokenizer = pretrained.load_tokenizer(tiny_assets / "tokenizer")
    path = tiny_assets / "shapes" / "train" / "text_to_image.jsonl"
    sources = [pipeline.Source(path=str(path), image_root=str(tiny_assets / "shapes"))]
    batches = caption_pairs.caption_batches(sources, tokenizer, _pairs_config())
    first = next(batches)
    assert first["images"].shape == (4, 16, 16, 3) and first["input_ids"].shape == (4, 32)
    assert first["images"].min() >= -1.0 and first["images"].max() <= 1.0
    records = {json.loads(line)["id"]: json.loads(line) for line in path.read_text().splitlines()}
    eos = tokenizer.eos_token_id
    for row, record_id in zip(first["input_ids"], first["record_ids"]):
        caption = records[record_id.split(" (")[0]]["caption"]
        words = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert list(row[:len(words)]) == words
        assert (row[len(words):] == eos).all()   # end-of-text, then padded with it
    state = batches.get_state()
    second = next(batches)
    resumed = caption_pairs.caption_batches(sources, tokenizer, _pairs_config())
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], second["input_ids"])


def test_bad_caption_records_name_the_file_line_and_field(tiny_assets, tmp_path):
    tokenizer = pretrained.load_tokenizer(tiny_assets / "tokenizer")
    good = json.loads((tiny_assets / "shapes" / "train" / "text_to_image.jsonl")
                      .read_text().splitlines()[0])
    cases = [({k: v for k, v in good.items() if k != "caption"}, "field 'caption' is None"),
             (dict(good, caption=" ".join(["red"] * 40)), "field 'caption': the caption is 40"),
             (dict({k: v for k, v in good.items() if k not in ("images", "image")},
                   conversations=[{"from": "human", "value": "Draw it"},
                                  {"from": "gpt", "value": "no image"}]),
              "field 'image' / 'images'"),
             (dict(good, conversations=[]), "bad_field")]
    for index, (record, message) in enumerate(cases):
        path = tmp_path / f"bad{index}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        sources = [pipeline.Source(path=str(path), image_root=str(tiny_assets / "shapes"))]
        batches = caption_pairs.caption_batches(sources, tokenizer,
                                                _pairs_config(batch_size=2))
        with pytest.raises(caption_pairs.CaptionPairError, match=f"{path}:2: {message}"):
            next(batches)
