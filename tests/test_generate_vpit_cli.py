"""generate.py --checkpoint on a tiny MetaMorph folder and a tiny pixel-space visualiser
folder (tests/vpit_helpers.save_tiny_folders: a model whose LM head prefers <image_start>,
so images are generated without a logits hook)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import generate
from metamorph_jax.inference import checkpoints, vpit_cli
from metamorph_jax.inference import vpit_generate as vg
from tests.vpit_helpers import TOKENS_PER_IMAGE, VISION_WIDTH, save_tiny_folders

FAST_RENDER = ["--sampler", "ddim", "--diffusion-steps", "2", "--guidance-scale", "2.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_folders(tmp_path_factory.mktemp("models"))


@pytest.mark.slow
def test_generate_writes_text_tokens_images_and_visual_tokens(folders, tmp_path, capsys):
    model_dir, _ = folders
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), np.uint8)).save(picture)
    out = tmp_path / "out"
    assert generate.main(["--checkpoint", str(model_dir), "--prompt", "describe the image",
                          "--image", str(picture), "--max-new-tokens", "6",
                          "--max-new-images", "2", "--out", str(out), *FAST_RENDER]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"text", "tokens", "images", "finish_reason"}
    assert result["images"] == [str(out / "image_0.png"), str(out / "image_1.png")]
    for n, path in enumerate(result["images"]):
        assert f"[image {n}: {path}]" in result["text"]
        assert np.asarray(Image.open(path)).shape == (8, 8, 3)
    assert result["text"] in printed
    assert result["tokens"].count(vg.VISUAL_POSITION) == 2 * TOKENS_PER_IMAGE
    visual = np.load(out / "visual_tokens.npy")
    assert visual.shape == (2, TOKENS_PER_IMAGE, VISION_WIDTH) and visual.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(visual, axis=-1), 1.0, atol=1e-5)


def test_prompts_file_is_one_batch_with_a_folder_per_prompt(folders, tmp_path):
    model_dir, _ = folders
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n"
                       + json.dumps({"prompt": "generate an image of a circle"}) + "\n")
    out = tmp_path / "out"
    generate.main(["--checkpoint", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                   "--max-new-tokens", "3", "--no-render"])
    for n in range(2):
        result = json.loads((out / f"prompt_{n:04d}" / "result.json").read_text())
        assert result["images"] == [] and "[image 0: not rendered]" in result["text"]
        assert np.load(out / f"prompt_{n:04d}" / "visual_tokens.npy").shape[0] == 1
    prompts.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: field 'prompt'"):
        generate.main(["--checkpoint", str(model_dir), "--prompts", str(prompts), "--no-render"])


@pytest.mark.slow
def test_chat_keeps_generated_images_in_context(folders, tmp_path):
    model_dir, vis_dir = folders
    session = vpit_cli.load_session(model_dir, render=False)
    sampling = vg.VPiTSampling(max_new_tokens=3)
    results = vpit_cli.chat(session, ["generate an image of a circle", "/quit", "ignored"],
                            tmp_path / "chat", sampling)
    assert len(results) == 1
    lines = ["generate an image of a circle", "make it red"]
    results = vpit_cli.chat(session, lines, tmp_path / "chat", sampling)
    assert [len(r["tokens"]) for r in results] == [3 + TOKENS_PER_IMAGE] * 2
    saved = json.loads((tmp_path / "chat" / "chat.json").read_text())
    assert [r["user"] for r in saved] == lines
    # The second turn's images are numbered after the first turn's.
    assert "[image 1: not rendered]" in saved[1]["text"]


def test_checkpoint_resolution(folders, tmp_path):
    model_dir, vis_dir = folders
    assert checkpoints.resolve(model_dir) == (model_dir, vis_dir)   # the sibling
    # A work directory: the latest finished export of each kind, in the stage order.
    work = tmp_path / "work"
    for stage, source in (("adapter", model_dir), ("instruct", model_dir), ("decoder", vis_dir)):
        shutil.copytree(source, work / stage / "final")
        (work / stage / "final" / "DONE").write_text("{}")
    (work / "instruct" / "final" / "DONE").unlink()   # not finished: not used
    (work / "config.json").write_text(json.dumps({"order": ["adapter", "instruct", "decoder"]}))
    assert checkpoints.resolve(work) == (work / "adapter" / "final", work / "decoder" / "final")
    # A stage export finds the visualiser through its work directory.
    assert checkpoints.resolve(work / "adapter" / "final")[1] == work / "decoder" / "final"
    with pytest.raises(ValueError, match="expected 'metamorph'"):
        checkpoints.resolve(vis_dir)
    with pytest.raises(ValueError, match="expected 'visualizer'"):
        checkpoints.resolve(model_dir, visualizer=model_dir)
    (work / "decoder" / "final" / "DONE").unlink()
    with pytest.raises(FileNotFoundError, match="--no-render"):
        vpit_cli.load_session(work)

