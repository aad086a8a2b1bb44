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


@pytest.mark.parametrize("name", ["tiny.py", "shapes.py", "text_tiny.py", "decoder_sd15.py",
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
        config.stages.instruct.steps = 0
    with pytest.raises(StageConfigError, match="stage 'instruct': field 'steps' must be at least 1"):
        runner.check_config(config)
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
