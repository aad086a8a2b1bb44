"""Visual tokens computed once (issue 13, section 5): the encoder's stored tokens are the
tower's tokens of the pipeline's pixels, a stopped run resumes with only what is missing,
the instruct loss with stored tokens equals the loss with pixels, the decoder stage trains
on stored tokens, and missing tokens or another tower are errors naming the record / field.

One tiny MetaMorph (tests/vpit_helpers.py: 2-layer SigLIP, 16 px, 4 tokens of width 24) and
a dozen records over 14 image files are shared by the module.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest
from PIL import Image

from metamorph_jax import pretrained
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import conversation, pipeline, token_store
from metamorph_jax.data import encode as encode_cli
from metamorph_jax.data.image_batches import image_batches
from metamorph_jax.data.sources import open_source
from metamorph_jax.inference import token_encoder
from metamorph_jax.models.siglip import SiglipVisionModel
from metamorph_jax.training import objectives
from metamorph_jax.models import metamorph
from tests.vpit_helpers import IMAGE_SIZE, TOKENS_PER_IMAGE, VISION_WIDTH, tiny_vpit_config

N_RECORDS = 12
# Measured: the store's float32 tokens against the tower run image by image differ by 0
# here (a batch of 16 vs 1 may reorder sums: allowed 2e-6); bf16 keeps 8 significant bits.
F32_TOLERANCE = 2e-6
BF16_RTOL = 2.0 ** -8


def make_record(i: int) -> dict:
    """Kinds: text only, a prompt image, a response image, two images (the second one
    shared by every such record, to check an image is stored once)."""
    kind = i % 4
    if kind == 0:
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": "hello"},
                                                 {"from": "gpt", "value": "world"}]}
    if kind == 1:
        return {"id": f"r{i}", "image": f"pics/img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the colour ?"},
            {"from": "gpt", "value": "red"}]}
    if kind == 2:
        return {"id": f"r{i}", "image": f"pics/img{i}.png", "conversations": [
            {"from": "human", "value": "generate a circle"},
            {"from": "gpt", "value": "here <image>"}]}
    return {"id": f"r{i}", "images": [f"pics/img{i}.png", "pics/shared.png"], "conversations": [
        {"from": "human", "value": "<image> predict next frame"},
        {"from": "gpt", "value": "<image>"}]}


def random_params(shapes, seed: int):
    """Random numpy leaves for an abstract tree (no init to compile): norm scales 1 and
    biases 0, other weights N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = str(path[-1])
        if "scale" in name:
            return np.ones(shape.shape, np.float32)
        if "bias" in name:
            return np.zeros(shape.shape, np.float32)
        return (0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(shapes))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    (root / "pics").mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(N_RECORDS) if i % 4] + ["shared"]
    for name in names:
        pixels = rng.integers(0, 256, (IMAGE_SIZE + 5, IMAGE_SIZE + 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "pics" / f"{name}.png")
    write_jsonl(root / "records.jsonl", [make_record(i) for i in range(N_RECORDS)])
    # The decoder stage reads records with images only.
    write_jsonl(root / "with_images.jsonl", [make_record(i) for i in range(N_RECORDS) if i % 4])
    tokenizer, config = tiny_vpit_config()
    params = random_params(metamorph.param_shapes(config), 0)
    # The model's own tower, saved as the SigLIP folder the encoder reads.
    pretrained.save_pretrained(root / "siglip", "siglip", config.vision.to_dict(),
                               jax.tree.map(np.asarray, params["vision_tower"]))
    model_dir = root / "metamorph"
    pretrained.save_pretrained(model_dir, "metamorph", config.to_dict(),
                               jax.tree.map(np.asarray, params))
    tokenizer.save_pretrained(str(model_dir))
    return {"root": root, "records": root / "records.jsonl", "siglip": root / "siglip",
            "model_dir": model_dir, "config": config, "params": params,
            "keys": sorted(token_store.image_key(root / "pics" / f"{n}.png") for n in names)}


def encode(world, output, **kwargs):
    kwargs.setdefault("batch_size", 2)   # x 8 devices: 16 rows, the last batch padded
    return token_encoder.encode(world["siglip"], [str(world["records"])], output,
                                progress=False, **kwargs)


@pytest.fixture(scope="module")
def stores(world):
    """Two complete stores: float32 (through the command line) and bfloat16."""
    f32 = world["root"] / "f32.array_record"
    assert encode_cli.main(["--checkpoint", str(world["siglip"]), "--input",
                            str(world["records"]), "--output", str(f32), "--dtype", "float32",
                            "--batch-size", "2", "--part-size", "4", "--no-progress"]) == 0
    bf16 = world["root"] / "bf16.array_record"
    encode(world, bf16, dtype="bfloat16")
    return {"float32": f32, "bfloat16": bf16}


def tower_tokens(world, paths) -> np.ndarray:
    """The tower's tokens of the pipeline's pixels of each file, one image per call."""
    tower = SiglipVisionModel(world["config"].vision)
    run = jax.jit(lambda p, x: tower.apply({"params": p}, x, method=tower.visual_tokens))
    return [np.asarray(run(world["params"]["vision_tower"],
                           images_lib.load_image(path, IMAGE_SIZE)[None]))[0] for path in paths]


def test_stored_tokens_are_the_towers_tokens_of_the_pipelines_pixels(world, stores):
    f32 = token_store.TokenStore(stores["float32"])
    bf16 = token_store.TokenStore(stores["bfloat16"])
    assert f32.keys() == bf16.keys() == world["keys"]     # the shared image once
    assert f32.shape == bf16.shape == (TOKENS_PER_IMAGE, VISION_WIDTH)
    assert len(f32.index["parts"]) == 3                  # 10 images, parts of 4
    worst = 0.0
    expected_all = tower_tokens(world, [world["root"] / key for key in world["keys"]])
    for key, expected in zip(world["keys"], expected_all):
        got = f32[key]
        assert got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max()))
        np.testing.assert_allclose(bf16[key].astype(np.float32), expected, rtol=BF16_RTOL,
                                   atol=1e-7)
    assert worst <= F32_TOLERANCE, worst
    print(f"float32 store vs tower: max abs error {worst:.1e}")


def test_a_stopped_run_resumes_with_only_the_missing_images(world, stores, tmp_path):
    store = tmp_path / "tokens.array_record"
    shutil.copytree(stores["float32"], store)
    # As a run stopped while writing its last part leaves it: no index, a part without keys.
    (store / token_store.INDEX_FILE).unlink()
    last = sorted(store.glob("part-*.keys.json"))[-1]
    cut = json.loads(last.read_text())
    last.unlink()
    with pytest.raises(token_store.TokenStoreError, match="incomplete store"):
        token_store.TokenStore(store)
    result = encode(world, store, dtype="float32", part_size=4)
    assert result["encoded"] == len(cut) and result["already"] == len(world["keys"]) - len(cut)
    resumed, first = token_store.TokenStore(store), token_store.TokenStore(stores["float32"])
    for key in world["keys"]:
        np.testing.assert_allclose(resumed[key], first[key], rtol=0, atol=F32_TOLERANCE)
    # A complete store: a rerun encodes nothing; other settings are refused.
    assert encode(world, store, dtype="float32", part_size=4)["encoded"] == 0
    with pytest.raises(token_store.TokenStoreError, match="encode.json: field 'dtype'"):
        encode(world, store, dtype="bfloat16")


def vpit_stage(world, visual_tokens=None):
    data = ml_collections.ConfigDict(dict(
        sources={"records": dict(path=str(world["records"]), weight=1.0)},
        seq_len=48, batch_size=8, num_image_tokens=TOKENS_PER_IMAGE, image_size=IMAGE_SIZE,
        max_images_per_row=3, num_epochs=1, shard_index=0, shard_count=1,
        visual_tokens=visual_tokens))
    return ml_collections.ConfigDict(dict(
        kind="instruct", init=dict(model_dir=str(world["model_dir"])), data=data,
        eval_data=dict(sources={}), dtype="float32", remat_policy="none",
        vision_coef=None))


@pytest.mark.slow
def test_instruct_loss_with_stored_tokens_equals_the_loss_with_pixels(world, stores):
    with_pixels = objectives.build(vpit_stage(world), "instruct", None)
    with_tokens = objectives.build(vpit_stage(world, str(stores["float32"])), "instruct", None)
    assert "visual_tokens" in with_tokens.batch_keys and "images" not in with_tokens.batch_keys
    pixels_batch = next(with_pixels.batches(with_pixels.stage.data))
    tokens_batch = next(with_tokens.batches(with_tokens.stage.data))
    for key in ("tokens", "image_index", "vision_mask", "image_valid"):
        np.testing.assert_array_equal(pixels_batch[key], tokens_batch[key])
    assert tokens_batch["visual_tokens"].shape == (8, 3, TOKENS_PER_IMAGE, VISION_WIDTH)
    assert int(tokens_batch["vision_mask"].sum()) > 0   # the vision term is in the loss
    params = world["params"]

    def loss(objective, batch):
        batch = {k: jnp.asarray(batch[k]) for k in objective.batch_keys}
        return jax.jit(lambda p, b: objective.loss(p, b, objective.normalizers(b),
                                                   jax.random.key(0)))(params, batch)
    (expected, sums_p), (got, sums_t) = loss(with_pixels, pixels_batch), loss(with_tokens, tokens_batch)
    # Measured difference 0 to ~1e-7: the stored fp32 tokens equal the tower's to ~3e-7.
    assert abs(float(got) - float(expected)) <= 1e-5, (float(got), float(expected))
    assert abs(float(sums_t["vision_loss_sum"]) - float(sums_p["vision_loss_sum"])) <= 1e-5
    shapes = with_tokens.batch_shapes(with_tokens.stage.data, 8)
    assert shapes["visual_tokens"] == ((8, 3, TOKENS_PER_IMAGE, VISION_WIDTH), np.float32)


def decoder_stage(world, visual_tokens):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "tiny_config", Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    stage = tiny.decoder_stage(str(world["root"]), 1)
    stage.init.vision_dir = str(world["siglip"])
    stage.model.token_dim = VISION_WIDTH
    stage.model.projector_hidden = 16
    stage.data.sources = ml_collections.ConfigDict(
        {"records": dict(path=str(world["root"] / "with_images.jsonl"), weight=1.0)})
    stage.data.num_epochs = 1
    stage.data.batch_size = 2
    stage.data.shard_index, stage.data.shard_count = 0, 1
    stage.data.visual_tokens = visual_tokens
    stage.eval_data = ml_collections.ConfigDict(dict(sources={}))
    return stage


@pytest.mark.slow
def test_the_decoder_loss_with_stored_tokens_equals_the_loss_with_pixels(world, stores):
    """Issue 22 item 6: the decoder's images (24 px here, the tower's 16 px: as SD 1.5's 512
    against SigLIP's 384) and the condition are the same on both paths: the tower's input
    is SigLIP's preprocessing of the original file, never the decoder's pixels resized."""
    def stage(visual_tokens):
        config = decoder_stage(world, visual_tokens)
        config.data.image_size = config.model.image_size = config.model.unet.sample_size = 24
        config.cfg_prob = 0.0          # the condition is never dropped: the loss reads it
        return config
    with_tokens = objectives.build(stage(str(stores["float32"])), "decoder", None)
    with_pixels = objectives.build(stage(None), "decoder", None)
    assert with_tokens.batch_keys == ("images", "tokens")
    assert with_pixels.batch_keys == ("images", "tower_images")
    tokens_batch = next(with_tokens.batches(with_tokens.stage.data))
    pixels_batch = next(with_pixels.batches(with_pixels.stage.data))
    np.testing.assert_array_equal(tokens_batch["record_ids"], pixels_batch["record_ids"])
    np.testing.assert_array_equal(tokens_batch["images"], pixels_batch["images"])
    assert tokens_batch["images"].shape == (2, 24, 24, 3)
    assert tokens_batch["tokens"].shape == (2, TOKENS_PER_IMAGE, VISION_WIDTH)
    assert pixels_batch["tower_images"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    trainable, frozen = random_params(with_tokens.boxed_parts(), 1)
    frozen["siglip"] = world["params"]["vision_tower"]    # the tower the store was made with
    params = with_tokens.model_params(trainable, frozen)
    rng = jax.random.key(3)

    def loss(objective, batch):
        batch = {k: jnp.asarray(batch[k]) for k in objective.batch_keys}
        return float(jax.jit(lambda p, b: objective.loss(p, b, objective.normalizers(b),
                                                         rng)[0])(params, batch))
    stored, computed = loss(with_tokens, tokens_batch), loss(with_pixels, pixels_batch)
    assert np.isfinite(stored)
    # The stored fp32 tokens equal the tower's to F32_TOLERANCE.
    assert abs(stored - computed) <= 1e-5 * max(1.0, abs(computed)), (stored, computed)


def test_an_image_without_stored_tokens_is_an_error_naming_the_record(world, stores, tmp_path):
    # Another record file: record 1 names a stored image (by an absolute path), record 2
    # an image that was never encoded.
    extra = tmp_path / "more.jsonl"
    shutil.copy(world["root"] / "pics" / "img1.png", tmp_path / "new.png")
    stored = dict(make_record(1), image=str(world["root"] / "pics" / "img1.png"))
    write_jsonl(extra, [stored, {"id": "late", "image": "new.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is the colour ?"},
        {"from": "gpt", "value": "red"}]}])
    stage = vpit_stage(world, str(stores["float32"]))
    stage.data.sources = ml_collections.ConfigDict({"more": dict(path=str(extra))})
    objective = objectives.build(stage, "instruct", None)
    with pytest.raises(token_store.TokenStoreError,
                       match=rf"more.jsonl:2: field 'image': image '.*/new.png' .* has no tokens"):
        next(objective.batches(stage.data))
    config = pipeline.DataConfig(image_size=IMAGE_SIZE, num_image_tokens=TOKENS_PER_IMAGE,
                                 batch_size=1, shard_index=0, shard_count=1,
                                 visual_tokens=str(stores["float32"]))
    with pytest.raises(token_store.TokenStoreError, match=r"more.jsonl:2: field 'image'"):
        list(image_batches([pipeline.Source(str(extra))], config, IMAGE_SIZE))


def picture_record(name: str, image: str) -> dict:
    return {"id": name, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nwhat is the colour ?"},
        {"from": "gpt", "value": "red"}]}


def save_random_png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    Image.fromarray(pixels).save(path)


def test_two_roots_naming_the_same_relative_path_keep_their_own_tokens(world, tmp_path):
    """Issue 22 item 2: a/records.jsonl and b/records.jsonl both name img/1.png, under
    their own folders, with other pixels; one store, each record its own image's tokens
    as the training pipeline reads them (SampleMaker.stored_tokens)."""
    files = []
    for seed, name in enumerate(("a", "b")):
        save_random_png(tmp_path / name / "img" / "1.png", seed + 10)
        files.append(tmp_path / name / "records.jsonl")
        write_jsonl(files[-1], [picture_record(name, "img/1.png")])
    store = tmp_path / "tokens.array_record"
    token_encoder.encode(world["siglip"], [str(f) for f in files], store, dtype="float32",
                         batch_size=1, progress=False)
    assert len(token_store.TokenStore(store)) == 2
    tokenizer, _ = tiny_vpit_config()
    config = pipeline.DataConfig(image_size=IMAGE_SIZE, num_image_tokens=TOKENS_PER_IMAGE,
                                 visual_tokens=str(store))
    maker = pipeline.SampleMaker(tokenizer, conversation.add_image_tokens(tokenizer), config)
    expected = tower_tokens(world, [tmp_path / "a" / "img" / "1.png",
                                    tmp_path / "b" / "img" / "1.png"])
    assert np.abs(expected[0] - expected[1]).max() > 0.1    # the two images' tokens differ
    for path, want in zip(files, expected):
        sample = maker(open_source(str(path))[0])
        assert sample["visual_tokens"].shape == (1, TOKENS_PER_IMAGE, VISION_WIDTH)
        np.testing.assert_allclose(sample["visual_tokens"][0], want, rtol=0, atol=F32_TOLERANCE)


def test_the_encoder_refuses_one_key_for_two_files_naming_both(world, tmp_path):
    """The one way a normalised absolute path names two files: a symlinked folder followed
    by "..". b/records.jsonl names link/../../a/img/1.png: normalised, that is a's image
    (a/img/1.png, named by a/records.jsonl); the OS follows link -> b/deep/inner and reads
    b/a/img/1.png, another picture. The encoder refuses, naming both records."""
    save_random_png(tmp_path / "a" / "img" / "1.png", 1)
    save_random_png(tmp_path / "b" / "a" / "img" / "1.png", 2)
    (tmp_path / "b" / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "b" / "link").symlink_to(tmp_path / "b" / "deep" / "inner")
    write_jsonl(tmp_path / "a" / "records.jsonl", [picture_record("a", "img/1.png")])
    write_jsonl(tmp_path / "b" / "records.jsonl",
                [picture_record("b", "link/../../a/img/1.png")])
    with pytest.raises(token_encoder.EncodeError,
                       match=r"b/records.jsonl:1: field 'image' .* and .*a/records.jsonl:1: "
                             r"field 'image' .* are two files with one store key"):
        token_encoder.encode(world["siglip"], [str(tmp_path / "a" / "records.jsonl"),
                                               str(tmp_path / "b" / "records.jsonl")],
                             tmp_path / "tokens.array_record", progress=False)


def test_a_store_written_with_relative_keys_is_refused_saying_to_reencode(stores, tmp_path):
    old = tmp_path / "old.array_record"
    shutil.copytree(stores["float32"], old)
    index = json.loads((old / token_store.INDEX_FILE).read_text())
    (old / token_store.INDEX_FILE).write_text(json.dumps(dict(index, version=1)))
    with pytest.raises(token_store.TokenStoreError,
                       match=r"index.json: field 'version' is 1: .* re-encode it"):
        token_store.TokenStore(old)


def test_a_store_of_another_tower_or_size_is_refused(world, stores, tmp_path):
    with pytest.raises(token_encoder.EncodeError, match=r"field 'config.image_size' is 16, "
                                                        r"the data's is 32"):
        encode(world, tmp_path / "x.array_record", image_size=32)
    with pytest.raises(token_store.TokenStoreError, match=r"index.json field shape\[0\]"):
        token_store.TokenStore(stores["float32"]).check(num_tokens=64)
    # A stage whose tower differs from the store's (here: another token layer).
    other = world["config"].vision.replace(visual_token_layer=1)
    with pytest.raises(token_store.TokenStoreError, match=r"tower.visual_token_layer"):
        token_store.TokenStore(stores["float32"]).check_tower(other.to_dict())
    # A record whose image cannot be read: the record and the field are named.
    broken = tmp_path / "broken.jsonl"
    write_jsonl(broken, [{"id": "b", "images": ["pics/img1.png", "gone.png"], "conversations": [
        {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}]}])
    with pytest.raises(token_encoder.EncodeError,
                       match=r"broken.jsonl:1: field 'images\[1\]': .*gone.png: file does not exist"):
        token_encoder.encode(world["siglip"], [str(broken)], tmp_path / "b.array_record",
                             image_root=str(world["root"]), progress=False)


@pytest.mark.slow
def test_two_processes_encode_their_shares_into_one_store(world, stores, tmp_path):
    """Two local processes x 2 CPU devices (distributed.initialize over gloo): each writes
    its own parts, process 0 indexes them all; the tokens equal the one-process store's."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    output = tmp_path / "two.array_record"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "metamorph_jax.data.encode", "--checkpoint",
               str(world["siglip"]), "--input", str(world["records"]), "--output", str(output),
               "--dtype", "float32", "--batch-size", "1", "--part-size", "2", "--no-progress",
               "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    # Each process writes to its own file: a pipe read only after the other process ends
    # could fill and stop its writer, while the reader waits for it in a barrier.
    log_paths = [tmp_path / f"process{i}.log" for i in range(2)]
    runs = []
    for i, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:
            runs.append(subprocess.Popen(command + ["--process-id", str(i)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT))
    try:
        for run in runs:
            run.wait(timeout=900)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    logs = [log_path.read_text()[-4000:] for log_path in log_paths]
    assert [run.returncode for run in runs] == [0, 0], logs
    store, single = token_store.TokenStore(output), token_store.TokenStore(stores["float32"])
    assert {name.split("-")[1] for name in store.index["parts"]} == {"00000", "00001"}
    assert store.keys() == world["keys"]
    for key in world["keys"]:
        np.testing.assert_allclose(store[key], single[key], rtol=0, atol=F32_TOLERANCE)
