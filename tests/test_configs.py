"""The run configs: every config passes the runner's schema check; the paper configs carry
REFERENCE.md's recipe (per-stage lr and batch, warm-up 3% + cosine, wd 0, 4096 tokens,
bf16, remat) on each topology; a bad field gives one error naming it."""
from pathlib import Path

import pytest

from metamorph_jax.training import runner
from metamorph_jax.training.objectives import StageConfigError

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = {"v5p-256": (128, 32), "v5p-1024": (512, 128), "v6e-256": (256, 64),
              "h100x8:4": (32, 4), "h100x8:16": (128, 16)}   # (devices, processes)
# REFERENCE.md, "Training recipe": stage 1 at the code's 448 / 3.74e-5 (lr scaled by
# sqrt(batch / 448) when the batch is rounded up); stage 2 at the paper's numbers.
RECIPE = {"8b": {"adapter": (448, 3.74e-5), "instruct": (1536, 6.93e-5)},
          "70b": {"adapter": (448, 3.74e-5), "instruct": (768, 4.90e-5)}}


def load(name: str, *args: str):
    return runner.parse_flags(["train.py", "--config", str(REPO / "configs" / name), *args])


@pytest.mark.parametrize("name", ["tiny.py", "shapes.py", "shapes.py:random", "text_tiny.py",
                                  "decoder_sd15.py",
                                  "decoder_tiny.py", "tower_tiny.py"])
def test_every_config_passes_the_schema_check(name):
    runner.check_config(load(name))


@pytest.mark.parametrize("size", ["8b", "70b"])
@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_paper_configs_carry_the_recipe(size, topology):
    config = load(f"metamorph_llama3_{size}.py:{topology}")
    runner.check_config(config)
    devices, processes = TOPOLOGIES[topology]
    assert tuple(config.order) == ("adapter", "instruct", "decoder")
    for name in ("adapter", "instruct"):
        stage = config.stages[name]
        batch, lr = RECIPE[size][name]
        # one counted pass over every record of every source (epoch_steps.py)
        assert stage.steps == 0 and stage.data.num_epochs == 1
        assert config.data_shards == processes   # the dry run counts the run's shards
        assert len({s.weight for s in stage.data.sources.values()}) == 1
        global_batch = stage.data.batch_size * processes * stage.grad_accum_steps
        # rounded up to whole micro-batch rows per device: less than one row per device
        # and accumulation step over the recipe
        ways = devices // config.mesh.tensor
        assert batch <= global_batch < batch + ways * stage.grad_accum_steps
        assert stage.optim.lr == pytest.approx(lr * (global_batch / batch) ** 0.5)
        assert (stage.optim.schedule, stage.optim.warmup, stage.optim.weight_decay) == \
            ("warmup_cosine", 0.03, 0.0)
        assert (stage.data.seq_len, stage.dtype, stage.remat_policy) == (4096, "bfloat16", "full")
        assert stage.kind == name
        # every micro-batch divides over the mesh's batch axes
        tensor = config.mesh.tensor
        assert stage.data.batch_size * processes % (devices // tensor) == 0
    assert config.stages.instruct.init.from_previous
    decoder = config.stages.decoder
    assert decoder.optim.lr == 1e-5 and decoder.cfg_prob == 0.8
    assert decoder.data.batch_size * processes * decoder.grad_accum_steps >= 2112


def test_a_bad_field_is_named(tmp_path):
    config = load("tiny.py")
    with config.unlocked():
        config.stages.instruct.steps = -1
    with pytest.raises(StageConfigError, match="stage 'instruct': field 'steps' must be 0"):
        runner.check_config(config)
    with config.unlocked():   # one pass over data that never ends
        config.stages.instruct.steps = 0
    with pytest.raises(StageConfigError, match="stage 'instruct': field 'steps' = 0 .* "
                                               "'data.num_epochs' is None"):
        runner.check_config(config)
    config = load("tiny.py", "--config.stages.instruct.data.num_epochs=1")
    with pytest.raises(StageConfigError, match="stage 'instruct': data: field 'weight' differs"):
        runner.check_config(config)   # tiny's instruct weights are sampling shares
    config = load("tiny.py", "--config.order=('adapter','nope')")
    with pytest.raises(StageConfigError, match="names stage 'nope'"):
        runner.check_config(config)
    config = load("tiny.py")
    with config.unlocked():
        config.stages.adapter.lrate = 1.0
    with pytest.raises(StageConfigError, match=r"stage 'adapter': unknown field\(s\) \['lrate'\]"):
        runner.check_config(config)


def test_a_bucket_url_work_dir_and_negative_data_shards_are_named():
    config = load("tiny.py", "--config.work_dir=gs://bucket/run")
    with pytest.raises(StageConfigError, match="'work_dir' = 'gs://bucket/run'.*mount the bucket"):
        runner.check_config(config)
    config = load("tiny.py", "--config.data_shards=-1")
    with pytest.raises(StageConfigError, match="'data_shards' must be 0 or more, got -1"):
        runner.check_config(config)


def test_paper_recipe_reads_a_long_video_as_its_frame_budget(tmp_path):
    """The paper's data fields (no max_video_frames): a 20 s clip at 1 fps is 20 frames, more
    than a row's 16 slots; it is read as 16 frames spread over the whole clip, not dropped."""
    import json

    import numpy as np

    from metamorph_jax.data import conversation, pipeline
    from metamorph_jax.data.testing import build_tiny_tokenizer, write_test_video

    data = load("metamorph_llama3_8b.py:v5p-256").stages.instruct.data.to_dict()
    assert data.get("max_video_frames") is None
    write_test_video(tmp_path / "clip.mp4", [np.full((16, 16, 3), 12 * i, np.uint8)
                                              for i in range(20)], fps=1)
    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]}))
    data.update(sources=[dict(path=str(tmp_path / "v.jsonl"))], worker_count=0, batch_size=1,
                shard_index=0, shard_count=1, visual_tokens=None)
    sources, config = pipeline.from_config(data)
    assert config.video_frame_budget() == config.max_images_per_row == 16
    tokenizer = build_tiny_tokenizer(["what", "colour", "red"])
    iterator = pipeline.make_iterator(sources, tokenizer, conversation.add_image_tokens(tokenizer),
                                      config)
    batches = list(iterator)
    assert iterator.bad_records.total == 0 and len(batches) == 1
    assert batches[0]["image_valid"][0].sum() == 16
    # 16 of seconds 0..19, first and last included: round(19 k / 15), nearest, earlier on a tie
    means = batches[0]["images"][0].reshape(16, -1).mean(-1)
    seconds = np.floor(np.linspace(0, 19, 16) + 0.5 - 1e-9)
    assert seconds[0] == 0 and seconds[-1] == 19
    assert np.allclose(means, 12 * seconds, atol=6)


def test_paper_recipe_dry_run_reads_every_stage_2_source_once(tmp_path, capsys):
    """`train.py --config configs/metamorph_llama3_8b.py:v5p-16 --dry-run`, its six stage-2
    files replaced by small text record files of different sizes: every source is listed
    as read once, and steps=0 is counted from them (issue 22: the recipe read ~6x the
    smallest source under grain's mixture)."""
    import json

    from metamorph_jax.data.testing import build_tiny_tokenizer
    from metamorph_jax.input_errors import run_command

    import train

    words = ["what", "is", "it", "a", "red", "circle", "blue", "square"]
    build_tiny_tokenizer(words).save_pretrained(str(tmp_path / "tok"))
    kinds = ("image_qa", "video_qa", "text_to_image", "image_to_image", "video",
             "visual_thinking")
    overrides = []
    for count, kind in zip((40, 3, 17, 5, 9, 11), kinds):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{kind}{i}", "conversations": [
            {"from": "human", "value": "what is it ?"},
            {"from": "gpt", "value": words[4 + i % 4]}]}) + "\n" for i in range(count)))
        overrides.append(f"--config.stages.instruct.data.sources.{kind}.path={path}")
    argv = ["train.py", "--config", str(REPO / "configs" / "metamorph_llama3_8b.py:v5p-16"),
            "--dry-run", "--workdir", str(tmp_path / "run"), "--config.order=('instruct',)",
            f"--config.stages.instruct.init.tokenizer_dir={tmp_path / 'tok'}",
            "--config.stages.instruct.init.from_previous=False",
            "--config.stages.instruct.data.batch_size=1",
            "--config.stages.instruct.data.seq_len=64",
            "--config.stages.instruct.data.worker_count=0",
            "--config.stages.instruct.grad_accum_steps=1", *overrides]
    assert run_command(train.main, argv) == 0
    printed = capsys.readouterr().out
    assert "every record of every source read 1 time(s)" in printed
    for count, kind in zip((40, 3, 17, 5, 9, 11), kinds):
        assert f"  {kind}: {count} records x 1 = {count} read  {tmp_path / kind}.jsonl" in printed
    assert "  all sources: 85 records read" in printed
    assert "  steps: 0 -> " in printed
