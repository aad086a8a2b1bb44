"""LLM text stage: losses against torch, the sharded train step against one device, and
an end-to-end train.py run (loss falls, metrics written, the final folder decodes)."""
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from metamorph_jax import pretrained, sharding, tiny
from metamorph_jax.data import text_records
from metamorph_jax.models.llama import LlamaForCausalLM
from metamorph_jax.training import objectives, optim, runner, text_step
from metamorph_jax.training import state as state_lib
from metamorph_jax.training import steps as steps_lib
from metamorph_jax.training.losses import masked_cosine_loss, masked_cross_entropy
from metamorph_jax.input_errors import run_command

REPO = Path(__file__).resolve().parents[1]


# --- losses -------------------------------------------------------------------------------

def test_masked_cross_entropy_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 7))
    mask = rng.integers(0, 2, (3, 7))
    loss_sum, count = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    keep = torch.tensor(mask, dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits)[keep], torch.tensor(targets)[keep],
                                                 reduction="sum")
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(loss_sum), expected.item(), rtol=1e-5, atol=1e-5)


def test_masked_cross_entropy_upcasts_bf16_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 3, (2, 5, 9)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 9, (2, 5)))
    mask = jnp.ones((2, 5), jnp.int32)
    loss_sum, _ = masked_cross_entropy(logits, targets, mask)
    assert loss_sum.dtype == jnp.float32
    expected = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits.astype(jnp.float32))).reshape(10, 9),
                                                 torch.tensor(np.asarray(targets)).long().reshape(10), reduction="sum")
    np.testing.assert_allclose(float(loss_sum), expected.item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_cross_entropy_gradient_matches_torch(dtype):
    """The hand-written backward against torch autograd, masked positions included."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(0, 3, (3, 6, 13)), dtype)
    targets = rng.integers(0, 13, (3, 6))
    mask = rng.integers(0, 2, (3, 6))
    scale = 0.7  # a cotangent other than 1
    grad = jax.grad(lambda l: scale * masked_cross_entropy(l, jnp.asarray(targets),
                                                          jnp.asarray(mask))[0])(logits)
    assert grad.dtype == dtype
    reference = torch.tensor(np.asarray(logits.astype(jnp.float32)), requires_grad=True)
    keep = torch.tensor(mask, dtype=torch.bool)
    loss = torch.nn.functional.cross_entropy(reference[keep], torch.tensor(targets)[keep],
                                             reduction="sum")
    (scale * loss).backward()
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), reference.grad.numpy(),
                               atol=tolerance)


def test_masked_cosine_loss_matches_torch():
    rng = np.random.default_rng(2)
    pred = rng.normal(0, 2, (2, 6, 5)).astype(np.float32)
    target = rng.normal(0, 1, (2, 6, 5)).astype(np.float32)
    mask = rng.integers(0, 2, (2, 6))
    loss_sum, count = masked_cosine_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(pred), torch.tensor(target), dim=-1)
    expected = ((1 - cosine) * torch.tensor(mask)).sum()
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(loss_sum), expected.item(), rtol=1e-5, atol=1e-5)


def test_cosine_gradient_ignores_the_prediction_norm():
    """The prediction is normalised: scaling it changes neither loss nor direction."""
    rng = np.random.default_rng(3)
    pred = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)
    mask = jnp.ones((1, 4))
    a, _ = masked_cosine_loss(pred, target, mask)
    b, _ = masked_cosine_loss(7.0 * pred, target, mask)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    grad = jax.grad(lambda p: masked_cosine_loss(p, target, mask)[0])(pred)
    np.testing.assert_allclose(np.asarray(jnp.sum(grad * pred, -1)), 0.0, atol=1e-6)


def test_all_zero_mask_gives_zero_sum_and_count():
    logits = jnp.full((2, 3, 4), jnp.inf).at[..., 0].set(-jnp.inf)  # would be NaN if used
    zeros = jnp.zeros((2, 3), jnp.int32)
    loss_sum, count = masked_cross_entropy(logits, zeros, zeros)
    assert float(loss_sum) == 0.0 and float(count) == 0.0
    grad = jax.grad(lambda l: masked_cross_entropy(l, zeros, zeros)[0])(jnp.ones((2, 3, 4)))
    assert np.all(np.asarray(grad) == 0.0)
    cos_sum, cos_count = masked_cosine_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), zeros)
    assert float(cos_sum) == 0.0 and float(cos_count) == 0.0
    assert not np.isnan(float(cos_sum))


# --- the train step ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny LLaMA saved as a model folder, and the text objective over it."""
    folder = tmp_path_factory.mktemp("text_model")
    tokenizer = tiny.tiny_tokenizer(folder / "tok")
    config = tiny.tiny_llama_config(tokenizer, vocab_size=96)
    model = LlamaForCausalLM(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), dummy,
                                                          positions=dummy)["params"]))
    pretrained.save_pretrained(folder / "llm", "llama", config.to_dict(), params)
    stage = load_text_tiny().stages.text
    stage.init.llm_dir = str(folder / "llm")
    stage.init.tokenizer_dir = str(folder / "tok")
    return model, params, objectives.build(stage, "text", None)


def load_text_tiny():
    return runner.parse_flags(["train.py", "--config", str(REPO / "configs" / "text_tiny.py")])


def packed_batch(rng, rows=8, length=16, vocab=96):
    """Two segments per row (lengths vary), padding at the end, random trained spans."""
    batch = {k: np.zeros((rows, length), np.int32) for k in text_step.TEXT_BATCH_KEYS}
    for row in range(rows):
        first = int(rng.integers(3, length // 2))
        second = int(rng.integers(2, length - first))
        offset = 0
        for segment, size in enumerate((first, second), start=1):
            where = slice(offset, offset + size)
            tokens = rng.integers(1, vocab, size)
            batch["tokens"][row, where] = tokens
            batch["positions"][row, where] = np.arange(size)
            batch["segment_ids"][row, where] = segment
            batch["text_targets"][row, offset:offset + size - 1] = tokens[1:]
            batch["text_mask"][row, offset:offset + size - 1] = rng.integers(0, 2, size - 1)
            offset += size
    return batch


def run_steps(objective, batches, mesh, optim_fields, steps):
    optimizer, schedule = optim.build_optimizer(optim_fields, steps)
    boxed = state_lib.abstract_state(*objective.boxed_parts(), optimizer)
    shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
    trainable, frozen = objective.load_parts(shardings.trainable, shardings.frozen)
    state = state_lib.init_state(trainable, frozen, optimizer, state_lib.rng_data(0), shardings,
                                 mesh)
    step = steps_lib.jit_train_step(
        steps_lib.make_train_step(objective, optimizer, schedule, False), mesh, shardings,
        objective.rules, {key: 3 if key != "images" else 6 for key in objective.batch_keys})
    history = []
    for batch in batches:
        stacked = steps_lib.stack_micro_batches([batch], objective.batch_keys)
        state, metrics = step(state, steps_lib.global_batch(stacked, mesh, objective.rules))
        history.append(jax.device_get(metrics))
    return state, history


def test_sharded_step_equals_single_device(tiny_model):
    _, params, objective = tiny_model
    fields = dict(lr=1e-2, schedule="warmup_cosine", warmup=1, grad_clip=1.0)
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng) for _ in range(3)]

    single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state_1, history_1 = run_steps(objective, batches, single, fields, 4)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    state_8, history_8 = run_steps(objective, batches, mesh, fields, 4)

    # the state really is spread over the mesh, moments like their params
    q = state_8.trainable["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = state_8.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec
    assert int(state_8.step) == 3 and state_8.frozen == {}
    for m1, m8 in zip(history_1, history_8):
        for key in ("loss", "text_tokens", "grad_norm", "lr"):
            np.testing.assert_allclose(m8[key], m1[key], atol=1e-5, rtol=1e-5, err_msg=key)
    assert history_1[0]["lr"] == 0.0 and history_1[1]["lr"] == pytest.approx(1e-2)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state_1.trainable, params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the updates are not trivially zero
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 state_8.trainable, state_1.trainable)


def test_train_step_loss_is_the_masked_mean(tiny_model):
    """The reported loss equals the model's cross-entropy over the trained tokens only."""
    model, params, objective = tiny_model
    batch = packed_batch(np.random.default_rng(5))
    single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, [metrics] = run_steps(objective, [batch], single, dict(lr=0.0, schedule="constant"), 1)
    logits = np.asarray(model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"]).logits)
    keep = batch["text_mask"].astype(bool)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits[keep]),
                                                 torch.tensor(batch["text_targets"][keep]).long())
    np.testing.assert_allclose(float(metrics["loss"]), expected.item(), rtol=1e-5)
    assert float(metrics["text_tokens"]) == keep.sum()
    loss_sum, count = jax.jit(text_step.make_eval_step(model))(params, batch)
    np.testing.assert_allclose(float(loss_sum / count), expected.item(), rtol=1e-5)


def test_schedule_warms_up_over_three_percent_then_decays():
    fields = dict(lr=1e-3, schedule="warmup_cosine", warmup=0.03, end_ratio=0.1)
    _, schedule = optim.build_optimizer(fields, steps=200)
    lrs = np.asarray([schedule(step) for step in range(201)])
    assert lrs[0] == 0.0 and lrs[3] < 1e-3 and lrs[6] == pytest.approx(1e-3)  # 6 = 3% of 200
    assert np.all(np.diff(lrs[:7]) > 0) and np.all(np.diff(lrs[6:]) <= 1e-12)
    assert lrs[200] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="optim: unknown field"):
        optim.build_optimizer(dict(fields, warmup_ratio=0.1), steps=10)
    with pytest.raises(ValueError, match="field 'schedule' = 'linear'"):
        optim.build_optimizer(dict(fields, schedule="linear"), steps=10)


def test_a_fractional_warmup_rounds_up_as_the_authors_trainer_does():
    """The authors' LLaVA-style trainer: transformers' get_cosine_schedule_with_warmup with
    num_warmup_steps = ceil(warmup_ratio * steps) (TrainingArguments.get_warmup_steps).
    110 steps at 3% is 3.3: 4 warm-up steps (rounding would give 3)."""
    import math

    from transformers import get_cosine_schedule_with_warmup
    steps, ratio, peak = 110, 0.03, 2e-5
    assert optim.warmup_steps(ratio, steps) == 4
    _, schedule = optim.build_optimizer(dict(lr=peak, schedule="warmup_cosine", warmup=ratio),
                                        steps)
    weight = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([weight], lr=peak)
    reference = get_cosine_schedule_with_warmup(sgd, math.ceil(ratio * steps), steps)
    expected = []
    for _ in range(steps):            # the lr each update applies
        expected.append(sgd.param_groups[0]["lr"])
        sgd.step()
        reference.step()
    ours = [float(schedule(step)) for step in range(steps)]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-12)


class _LeastSquares:
    """A two-parameter least-squares objective over batches {"x": [k, B, 2]}: an x holding
    inf makes the loss and the gradient non-finite, as a bad batch does."""

    def normalizers(self, batch):
        return {"count": jnp.asarray(batch["x"].size, jnp.float32)}

    def model_params(self, trainable, frozen):
        return trainable

    def loss(self, params, batch, normalizers, rng):
        total = jnp.sum((batch["x"] - params["w"]) ** 2)
        return total / normalizers["count"], {"sum": total,
                                              "count": jnp.asarray(batch["x"].size, jnp.float32)}

    def summarize(self, sums):
        loss = sums["sum"] / sums["count"]
        return loss, {"loss": loss}


def test_the_logged_lr_is_the_one_applied_after_a_skipped_step():
    """skip_nonfinite drops a bad update and the optimizer's count with it: the next update
    applies the lr the skipped one would have, and that is the lr logged. A run with a bad
    batch in it logs and learns what the run without it does."""
    optimizer, schedule = optim.build_optimizer(dict(lr=0.1, schedule="warmup_cosine", warmup=2),
                                                steps=4)
    step = jax.jit(steps_lib.make_train_step(_LeastSquares(), optimizer, schedule, True))
    rng = np.random.default_rng(0)
    good = [{"x": rng.normal(size=(1, 4, 2)).astype(np.float32)} for _ in range(3)]
    bad = {"x": np.full((1, 4, 2), np.inf, np.float32)}

    def run(batches):
        state = state_lib.TrainState.create({"w": jnp.zeros(2)}, {}, optimizer,
                                            state_lib.rng_data(0))
        logged = []
        for batch in batches:
            state, metrics = step(state, batch)
            logged.append((float(metrics["lr"]), float(metrics["skipped"])))
        return state, logged

    clean, clean_logged = run(good)
    # linear warm-up over 2 steps to 0.1: the updates apply 0, 0.05, 0.1
    assert [lr for lr, _ in clean_logged] == pytest.approx([0.0, 0.05, 0.1])
    skipped, skipped_logged = run([good[0], bad, good[1], good[2]])
    assert [s for _, s in skipped_logged] == [0.0, 1.0, 0.0, 0.0]
    applied = [entry for entry in skipped_logged if entry[1] == 0.0]
    assert applied == clean_logged
    np.testing.assert_array_equal(np.asarray(skipped.trainable["w"]),
                                  np.asarray(clean.trainable["w"]))
    assert int(skipped.step) == 4 and int(clean.step) == 3


# --- train.py end to end ------------------------------------------------------------------

def test_train_cli_loss_falls_and_the_final_folder_decodes(tmp_path, capsys):
    import importlib

    train_cli = importlib.import_module("train")
    tokenizer = tiny.tiny_tokenizer(tmp_path / "tok")
    config = tiny.tiny_llama_config(tokenizer)
    dummy = np.zeros((1, 1), np.int32)
    initial = jax.tree.map(np.asarray, nn.unbox(LlamaForCausalLM(config).init(
        jax.random.key(0), dummy, positions=dummy))["params"])
    pretrained.save_pretrained(tmp_path / "llm", "llama", config.to_dict(), initial)
    data = text_records.write_text_records(tmp_path / "text.jsonl", count=8)
    work = tmp_path / "run"
    argv = ["train.py", "--config", str(REPO / "configs" / "text_tiny.py"),
            "--config.stages.text.steps=10", f"--config.stages.text.init.llm_dir={tmp_path / 'llm'}",
            f"--config.stages.text.init.tokenizer_dir={tmp_path / 'tok'}", "--workdir", str(work),
            f"--config.stages.text.data.sources.text.path={data}",
            "--config.stages.text.data.seq_len=64", "--config.stages.text.optim.lr=3e-3"]
    assert train_cli.main(argv) == 0
    final = work / "text" / "final"

    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert set(lines[0]) >= {"loss", "text_loss", "text_tokens", "grad_norm", "lr", "tokens_per_s",
                             "step_s", "records/text"}
    assert {line["stage"] for line in lines} == {"text"}
    losses = [line["loss"] for line in lines]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(3e-3)  # 1 warm-up step
    assert any(path.name.startswith("events.out.tfevents") for path in (work / "tensorboard").iterdir())

    # the saved folder is a model folder generate.py reads, holding the trained params
    model, params, _ = pretrained.load_llama(final)
    assert model.config.to_dict() == config.to_dict()
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params, initial)
    assert min(jax.tree.leaves(moved)) > 0
    assert pretrained.chat_template(final) == "llama3"
    generate_cli = importlib.import_module("generate")
    assert generate_cli.main(["--llm", str(final), "--prompt", "how many shapes are there ?",
                              "--chat", "--max-new-tokens", "3"]) == 0

    # running it again finds the stage done and leaves the result as it is
    assert train_cli.main(argv) == 0
    assert "stage text: already done" in capsys.readouterr().out
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 10
    # bad configs: one error naming the field
    assert run_command(train_cli.main, argv + ["--config.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert run_command(train_cli.main, argv + ["--config.stages.text.kind=vision"]) == 2
    assert "stage 'text': field 'kind' = 'vision'" in capsys.readouterr().err
    assert run_command(train_cli.main, argv + ["--workdir", str(tmp_path / "other"),
                                  "--config.stages.text.optim.schedule=linear"]) == 2
    assert "stage 'text': optim: field 'schedule' = 'linear'" in capsys.readouterr().err


def test_a_record_with_images_stops_the_text_stage(tmp_path):
    from metamorph_jax.data import pipeline
    path = tmp_path / "mixed.jsonl"
    text = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello"}]}
    rows = [text, text, dict(text, images=["a.png"]), text]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batches = text_records.text_batches([pipeline.Source(str(path))], tiny.tiny_tokenizer(),
                                     pipeline.DataConfig(seq_len=32, batch_size=8, shard_index=0,
                                                         shard_count=1))
    with pytest.raises(text_records.TextStageError, match=r"mixed.jsonl:3: field 'images'"):
        next(batches)


def test_training_unrolled_from_a_scanned_folder_matches_scanned_training(tmp_path):
    """scan_layers=False trains the same model (the same losses and final params, up to
    float rounding) and saves final/ in the folder's scanned layout."""
    tokenizer = tiny.tiny_tokenizer(tmp_path / "tok")
    config = tiny.tiny_llama_config(tokenizer)
    assert config.scan_layers
    dummy = np.zeros((1, 1), np.int32)
    initial = jax.tree.map(np.asarray, nn.unbox(LlamaForCausalLM(config).init(
        jax.random.key(0), dummy, positions=dummy))["params"])
    pretrained.save_pretrained(tmp_path / "llm", "llama", config.to_dict(), initial)
    data = text_records.write_text_records(tmp_path / "text.jsonl", count=8)
    finals, losses = [], []
    for scan in (None, False):
        work = tmp_path / f"run_{scan}"
        run = runner.parse_flags([
            "train.py", "--config", str(REPO / "configs" / "text_tiny.py"),
            "--config.stages.text.steps=3", f"--config.stages.text.init.llm_dir={tmp_path / 'llm'}",
            f"--config.stages.text.init.tokenizer_dir={tmp_path / 'tok'}", "--workdir", str(work),
            f"--config.stages.text.data.sources.text.path={data}",
            "--config.stages.text.data.seq_len=64", "--config.stages.text.optim.lr=3e-3"]
            + ([] if scan is None else [f"--config.stages.text.scan_layers={scan}"]))
        runner.run(run)
        losses.append([json.loads(line)["loss"]
                       for line in (work / "metrics.jsonl").read_text().splitlines()])
        assert pretrained.read_model_config(work / "text" / "final")["config"] == config.to_dict()
        finals.append(pretrained.load_params(work / "text" / "final"))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert jax.tree.structure(finals[0]) == jax.tree.structure(initial)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-6), *finals)


def test_steps_cut_short_by_the_data_are_still_logged_and_checked(tmp_path, capsys):
    """log_every > 1 and data that runs out before `steps`: the pending steps are flushed
    (logged, NaN-checked), the run stops with one error line naming the stage and the step;
    re-run with allow_short it finishes marked incomplete and train.py says so."""
    import importlib
    train_cli = importlib.import_module("train")
    tokenizer = tiny.tiny_tokenizer(tmp_path / "tok")
    config = tiny.tiny_llama_config(tokenizer)
    dummy = np.zeros((1, 1), np.int32)
    initial = jax.tree.map(np.asarray, nn.unbox(LlamaForCausalLM(config).init(
        jax.random.key(0), dummy, positions=dummy))["params"])
    pretrained.save_pretrained(tmp_path / "llm", "llama", config.to_dict(), initial)
    data = text_records.write_text_records(tmp_path / "text.jsonl", count=6)
    work = tmp_path / "run"
    # 6 records, 2 per 64-token row: one epoch is one batch of 8 rows, fewer than 10 steps
    argv = ["train.py", "--config", str(REPO / "configs" / "text_tiny.py"),
            "--config.stages.text.steps=10", "--config.log_every=4",
            f"--config.stages.text.init.llm_dir={tmp_path / 'llm'}",
            f"--config.stages.text.init.tokenizer_dir={tmp_path / 'tok'}", "--workdir", str(work),
            f"--config.stages.text.data.sources.text.path={data}",
            "--config.stages.text.data.seq_len=64", "--config.stages.text.data.num_epochs=1"]
    assert run_command(train_cli.main, argv) == 2
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert 0 < len(steps) < 4 and steps == list(range(1, len(steps) + 1))
    err = capsys.readouterr().err
    assert f"stage 'text': the data ran out at step {len(steps)} of the 10" in err
    assert "Traceback" not in err
    assert train_cli.main([*argv, "--config.stages.text.allow_short=True"]) == 0
    assert (f"stage text: resumed at step {len(steps)}, INCOMPLETE: the data ran out after "
            f"{len(steps)} of 10 steps (allow_short); {len(steps)} steps") in capsys.readouterr().out
