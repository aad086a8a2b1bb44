"""The stage runner on configs/tiny.py: every stage's loss falls, freezing leaves frozen
parameters bit-identical with no optimizer state, gradient accumulation equals the large
batch, resume after SIGKILL replays the uninterrupted losses, the NaN guard names record ids.

One tiny run (adapter, instruct, decoder on the Shapes world) is shared by the module.
"""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from metamorph_jax import pretrained
from metamorph_jax.training import objectives, runner, steps as steps_lib
from metamorph_jax.training import state as state_lib
from metamorph_jax.training.checkpoint import StageCheckpoints
from metamorph_jax.input_errors import run_command

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"


def tiny_config(assets: Path, work: Path, *overrides: str):
    return runner.parse_flags(["train.py", "--config", f"{TINY}:{assets}", "--workdir",
                               str(work), *overrides])


def read_metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def train_losses(lines: list[dict]) -> list[tuple]:
    return [(line["stage"], line["step"], line["loss"]) for line in lines if "loss" in line]


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_assets):
    assets, work = tiny_assets, tmp_path_factory.mktemp("tiny") / "run"
    config = tiny_config(assets, work)
    results = runner.run(config)
    return config, results, assets, work


@pytest.mark.slow
def test_a_tiny_run_learns_in_every_stage_and_logs_the_metric_names(tiny_run):
    config, results, _, work = tiny_run
    assert [r.name for r in results] == ["adapter", "instruct", "decoder"]
    lines = read_metrics(work)
    for name in config.order:
        train = [line for line in lines if line["stage"] == name and "loss" in line]
        assert [line["step"] for line in train] == list(range(1, config.stages[name].steps + 1))
        losses = [line["loss"] for line in train]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, (name, losses)
        assert {"step", "stage", "loss", "grad_norm", "lr", "tokens_per_s", "step_s",
                "skipped", "skipped_total"} <= set(train[0])
        assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0  # warm-up from 0
        evals = [line for line in lines if line["stage"] == name and "eval_loss" in line]
        assert [line["step"] for line in evals] == [config.eval_every]
        assert (work / name / "final" / runner.DONE_FILE).exists()
    vpit = [line for line in lines if line["stage"] == "instruct" and "loss" in line]
    assert {"text_loss", "vision_cosine", "records/image_qa", "records/video"} <= set(vpit[0])
    # records per source add up to the batch's records, and sources with weight are drawn
    assert sum(v for k, v in vpit[0].items() if k.startswith("records/")) > 0
    # the instruct stage trains the vision head: cosine with the target tokens rises
    assert vpit[-1]["vision_cosine"] > vpit[0]["vision_cosine"]
    assert any(p.name.startswith("events.out.tfevents") for p in (work / "tensorboard").iterdir())
    # re-running a finished work directory does nothing more
    again = runner.run(config)
    assert [r.ran for r in again] == [False, False, False]
    assert len(read_metrics(work)) == len(lines)


@pytest.mark.slow
def test_each_stage_trains_only_its_part_and_frozen_parameters_stay_bit_identical(tiny_run):
    from metamorph_jax.models import metamorph
    from metamorph_jax.models.llama import LlamaConfig
    from metamorph_jax.models.siglip import SiglipConfig
    config, _, assets, work = tiny_run
    # Stage 1 starts from the parts (same seed as the run) ...
    llm_saved = pretrained.read_model_config(assets / "llm")
    siglip_saved = pretrained.read_model_config(assets / "siglip")
    _, start = metamorph.from_pretrained_parts(
        pretrained.load_params(assets / "llm"), LlamaConfig.from_dict(llm_saved["config"]),
        pretrained.load_params(assets / "siglip"), SiglipConfig.from_dict(siglip_saved["config"]),
        jax.random.key(0))
    start = flat(start)
    adapter = flat(pretrained.load_params(work / "adapter" / "final"))
    instruct = flat(pretrained.load_params(work / "instruct" / "final"))
    assert set(adapter) == set(start) == set(instruct)
    vocab = LlamaConfig.from_dict(llm_saved["config"]).vocab_size
    embedding = ("llm", "embed_tokens", "embedding")
    for path, before in start.items():
        after = adapter[path]
        if path[0] == "mm_projector":
            assert not np.array_equal(after, before), path
        elif path == embedding:   # only the two new input rows move
            np.testing.assert_array_equal(after[:vocab], before[:vocab])
            assert not np.array_equal(after[vocab:], before[vocab:])
        else:
            np.testing.assert_array_equal(after, before, err_msg="/".join(path))
    # ... stage 2 from stage 1's result: everything but the tower moves
    for path, before in adapter.items():
        if path[0] == "vision_tower":
            np.testing.assert_array_equal(instruct[path], before, err_msg="/".join(path))
    for part in ("mm_projector", "llm", "vision_head"):
        assert any(not np.array_equal(instruct[p], adapter[p]) for p in adapter if p[0] == part)

    # Optimizer state exists for the trainable part only.
    for name, trainable in (("adapter", {"mm_projector", objectives.NEW_TOKEN_ROWS}),
                            ("instruct", {"mm_projector", "llm", "vision_head"}),
                            ("decoder", {"projector", "unet"})):
        stage = runner.Stage(config, list(config.order).index(name), name,
                             work / "adapter" / "final", runner.sharding.make_mesh(
                                 **config.mesh.to_dict()), runner.MetricsLog(work, False))
        assert set(stage.abstract.trainable) == trainable
        adam = stage.abstract.opt_state[1][0]
        assert jax.tree.structure(adam.mu) == jax.tree.structure(stage.abstract.trainable)
        assert not set(stage.abstract.frozen) & trainable
        if name == "decoder":
            assert set(stage.abstract.frozen) == {"siglip"}   # pixel space: no VAE
            # the frozen SigLIP tower in the decoder's last checkpoint is the folder's
            checkpoints = StageCheckpoints(work / "decoder" / "checkpoints", 2)
            step = checkpoints.latest_step()
            assert step == config.stages.decoder.steps
            target = state_lib.with_shardings(stage.abstract, stage.shardings)
            restored, meta = checkpoints.restore(step, target, stage.objective.batches(
                config.stages.decoder.data))
            assert meta["stage"] == "decoder" and meta["step"] == step
            for path, value in flat(pretrained.load_params(assets / "siglip")).items():
                np.testing.assert_array_equal(flat(restored.frozen["siglip"])[path], value)
            checkpoints.close()


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(tiny_run):
    """Two micro-batches of 4 rows accumulated = one batch of their 8 rows (VPiT loss, whose
    text and vision terms each average over all targets of the whole batch)."""
    config, _, _, work = tiny_run
    mesh = runner.sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
    stage = config.stages.instruct
    objective = objectives.build(stage, "instruct", work / "adapter" / "final")
    batches = objective.batches(stage.data)
    large = next(batches)
    keys = objective.batch_keys
    halves = [{k: large[k][:4] for k in keys}, {k: large[k][4:] for k in keys}]
    assert all(h["vision_mask"].sum() > 0 for h in halves)   # both terms in both halves

    results = []
    for micro in ([large], halves):
        from metamorph_jax.training import optim
        # eps = 1 makes Adam's first update about lr * g (not lr * sign(g)), so the params
        # compare the gradients themselves.
        tx, schedule = optim.build_optimizer(dict(lr=1.0, schedule="constant", eps=1.0), 1)
        boxed = state_lib.abstract_state(*objective.boxed_parts(), tx)
        shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
        trainable, frozen = objective.load_parts(shardings.trainable, shardings.frozen)
        initial = flat(trainable)
        state = state_lib.init_state(trainable, frozen, tx, state_lib.rng_data(0), shardings, mesh)
        stacked = steps_lib.stack_micro_batches(micro, keys)
        step = steps_lib.jit_train_step(
            steps_lib.make_train_step(objective, tx, schedule, False), mesh, shardings,
            objective.rules, {k: v.ndim for k, v in stacked.items()})
        state, metrics = step(state, steps_lib.global_batch(stacked, mesh, objective.rules))
        results.append((jax.device_get(metrics), flat(state.trainable)))
    (m1, p1), (m2, p2) = results
    for key in ("loss", "text_loss", "vision_loss", "grad_norm", "text_tokens", "vision_tokens"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, err_msg=key)
    for path in p1:
        np.testing.assert_allclose(p2[path], p1[path], rtol=1e-5, atol=2e-7,
                                   err_msg="/".join(path))
    assert max(float(np.abs(p1[path] - initial[path]).max()) for path in p1) > 1e-3


def _poisoned_llm(assets: Path, out: Path) -> Path:
    """The tiny LLM with a NaN in its final norm: every loss is NaN."""
    saved = pretrained.read_model_config(assets / "llm")
    params = pretrained.load_params(assets / "llm")
    params["norm"]["scale"] = np.full_like(params["norm"]["scale"], np.nan)
    pretrained.save_pretrained(out, "llama", saved["config"], params)
    return out


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_records_or_is_skipped(tiny_run, tmp_path):
    _, _, assets, _ = tiny_run
    llm = _poisoned_llm(assets, tmp_path / "nan_llm")
    common = ["--config.order=('adapter',)", "--config.stages.adapter.steps=2",
              f"--config.stages.adapter.init.llm_dir={llm}", "--config.eval_every=0"]
    with pytest.raises(runner.NonFiniteLossError) as error:
        runner.run(tiny_config(assets, tmp_path / "stop", *common))
    message = str(error.value)
    assert "stage 'adapter' step 1: the loss is nan" in message
    assert "train-qa-" in message and "image_qa.jsonl:" in message  # "id (file:line)"
    assert not (tmp_path / "stop" / "adapter" / "checkpoints" / "1").exists()

    work = tmp_path / "skip"
    [result] = runner.run(tiny_config(assets, work, *common, "--config.skip_nonfinite=True"))
    lines = [line for line in read_metrics(work) if "loss" in line]
    assert [line["skipped"] for line in lines] == [1.0, 1.0]
    assert [line["skipped_total"] for line in lines] == [1.0, 2.0]
    assert result.skipped == 2
    # no update was applied: the exported adapter is the initial one
    from metamorph_jax.models import metamorph
    from metamorph_jax.models.llama import LlamaConfig
    from metamorph_jax.models.siglip import SiglipConfig
    _, start = metamorph.from_pretrained_parts(
        pretrained.load_params(llm),
        LlamaConfig.from_dict(pretrained.read_model_config(llm)["config"]),
        pretrained.load_params(assets / "siglip"),
        SiglipConfig.from_dict(pretrained.read_model_config(assets / "siglip")["config"]),
        jax.random.key(0))
    final = flat(pretrained.load_params(work / "adapter" / "final"))
    for path, value in flat(start["mm_projector"]).items():
        np.testing.assert_array_equal(final[("mm_projector",) + path], value)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_run, tmp_path):
    """train.py killed (SIGKILL) at a random step after a stage's first checkpoint, then run
    again with the same command, resumes from that checkpoint and ends with exactly (bit for
    bit) the loss sequence of the uninterrupted in-process run."""
    config, _, assets, reference = tiny_run
    chooser = random.Random()
    order = list(config.order)
    stage = chooser.choice(order)
    every = config.checkpoint_every
    kill_step = chooser.randint(every + 1, config.stages[stage].steps - 1)
    # The stages up to the killed one; no evaluations (the fixture's come after its last
    # step, so they cannot change its losses): two train.py runs are the test's cost.
    ran = tuple(order[:order.index(stage) + 1])
    expected = [entry for entry in train_losses(read_metrics(reference)) if entry[0] in ran]
    work = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--config", f"{TINY}:{assets}",
               "--workdir", str(work), f"--config.order={ran!r}", "--config.eval_every=0",
               "--config.final_eval={}"]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # as conftest sets it
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics, first_checkpoint = work / "metrics.jsonl", work / stage / "checkpoints" / str(every)

    def reached() -> bool:
        if not (metrics.exists() and first_checkpoint.exists()):   # renamed when complete
            return False
        lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.endswith("}")]
        return any(l["stage"] == stage and l["step"] >= kill_step for l in lines)

    try:
        while process.poll() is None and not reached():
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, f"the run ended before {stage} {kill_step}"
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed = [line for line in finished.stdout.splitlines() if "resumed at step" in line]
    assert len(resumed) == 1 and resumed[0].startswith(f"stage {stage}:"), finished.stdout
    assert train_losses(read_metrics(work)) == expected, f"killed at {stage} {kill_step}"

def _stage(config, name, work, mesh):
    return runner.Stage(config, list(config.order).index(name), name, work / "adapter" / "final",
                        mesh, runner.MetricsLog(work, False))


@pytest.mark.slow
def test_the_train_step_lowers_from_abstract_shapes_alone(tiny_run):
    """What a compile-only plan needs: the step traced from the config, no params, no data;
    its batch shapes are the pipeline's."""
    config, _, _, work = tiny_run
    for name in config.order:
        stage = _stage(config, name, work, runner.sharding.make_mesh(**config.mesh.to_dict()))
        lowered = stage.lower()
        assert "stablehlo" in lowered.as_text() or "mhlo" in lowered.as_text()
        real = steps_lib.stack_micro_batches([next(stage.objective.batches(stage.stage.data))],
                                             stage.objective.batch_keys)
        assert {k: (v.shape, v.dtype) for k, v in stage.abstract_batch().items()} == \
            {k: (v.shape, v.dtype) for k, v in real.items()}


@pytest.mark.slow
def test_a_checkpoint_resumes_onto_another_mesh_with_the_same_losses(tiny_run, tmp_path):
    """The instruct stage's step-4 checkpoint (saved on fsdp=8) restored onto data=2 x
    fsdp=2 and onto one device: the same params and optimizer state, and steps 5..8 give
    the losses of the uninterrupted run (measured: within 1.2e-7 relative; allowed 1e-6,
    the reductions split differently). Its exported model folder restores onto both meshes
    too."""
    import shutil
    config, _, assets, work = tiny_run
    expected = [line["loss"] for line in read_metrics(work)
                if line["stage"] == "instruct" and "loss" in line and line["step"] > 4]
    saved = StageCheckpoints(work / "instruct" / "checkpoints", 2)
    assert 4 in saved.all_steps()
    stage = _stage(config, "instruct", work, runner.sharding.make_mesh(**config.mesh.to_dict()))
    state, _ = saved.restore(4, state_lib.with_shardings(stage.abstract, stage.shardings),
                             stage.objective.batches(stage.stage.data))
    original = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(jax.device_get(state))}
    saved.close()
    folder = flat(pretrained.load_params(work / "instruct" / "final"))
    devices = jax.devices()
    for mesh_fields, count in ((dict(data=2, fsdp=2, tensor=1), 4),
                               (dict(data=1, fsdp=1, tensor=1), 1)):
        mesh = runner.sharding.make_mesh(**mesh_fields, devices=devices[:count])
        resumed = tmp_path / f"mesh{count}"
        shutil.copytree(work / "instruct" / "checkpoints" / "4",
                        resumed / "instruct" / "checkpoints" / "4")
        moved = tiny_config(assets, resumed, "--config.eval_every=0")
        stage = runner.Stage(moved, list(moved.order).index("instruct"), "instruct",
                             work / "adapter" / "final", mesh, runner.MetricsLog(resumed, False))
        checkpoints = StageCheckpoints(resumed / "instruct" / "checkpoints", 2)
        state, _ = checkpoints.restore(4, state_lib.with_shardings(stage.abstract,
                                                                   stage.shardings),
                                       stage.objective.batches(stage.stage.data))
        checkpoints.close()
        q = state.trainable["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.mesh.shape == mesh.shape
        values = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                  jax.tree_util.tree_leaves_with_path(jax.device_get(state))}
        assert values.keys() == original.keys()
        for path, value in original.items():
            np.testing.assert_array_equal(values[path], value, err_msg=path)
        result = stage.run()   # restores step 4 again, steps to 8, exports
        assert result.resumed_from == 4 and result.steps == 8
        gap = np.max(np.abs(np.asarray(result.losses) / np.asarray(expected) - 1))
        print(f"mesh {mesh_fields}: losses within {gap:.1e} relative")   # the measured error
        np.testing.assert_allclose(result.losses, expected, rtol=1e-6)
        # the model folder (written sharded over 8 devices) onto this mesh
        shardings = {**stage.shardings.trainable, **stage.shardings.frozen}
        placed = pretrained.load_params(work / "instruct" / "final", shardings)
        assert placed["llm"]["embed_tokens"]["embedding"].sharding == \
            shardings["llm"]["embed_tokens"]["embedding"]
        for path, value in flat(placed).items():
            np.testing.assert_array_equal(value, folder[path], err_msg="/".join(path))


@pytest.mark.slow
def test_train_py_evaluates_the_tiny_run_and_writes_final_metrics_and_samples(tiny_run, capsys):
    """train.py on the finished tiny work directory: the stages are skipped, the final
    evaluation (configs/tiny.py's final_eval) writes final_metrics.json and samples.png."""
    import train
    from PIL import Image
    from metamorph_jax.evaluation import shapes_eval
    config, _, assets, work = tiny_run
    # A stage whose data ran out under allow_short: its DONE file says so (as Stage.export
    # writes it), and so must the final metrics.
    done_file = work / "instruct" / "final" / runner.DONE_FILE
    recorded = done_file.read_text()
    assert json.loads(recorded)["complete"] is True
    done_file.write_text(json.dumps(dict(json.loads(recorded), complete=False, steps=5,
                                         planned_steps=8)) + "\n")
    try:
        assert train.main(["train.py", "--config", f"{TINY}:{assets}", "--workdir",
                           str(work)]) == 0
    finally:
        done_file.write_text(recorded)
    printed = capsys.readouterr().out
    metrics = json.loads((work / "final_metrics.json").read_text())
    assert metrics["incomplete_stages"] == {"instruct": {"steps": 5, "planned_steps": 8}}
    assert "stage instruct is INCOMPLETE: 5 of 8 steps" in printed
    for name, chance in shapes_eval.CHANCE_FIELDS.items():
        assert -1.0 <= metrics[chance] <= 1.0 and -1.0 <= metrics[name] <= 1.0
        assert f"{name}: {metrics[name]:.3f} (chance {metrics[chance]:.3f})" in printed
    assert metrics["counts"]["questions"] == config.final_eval.max_questions
    assert metrics["counts"]["text_to_image_prompts"] == config.final_eval.max_prompts
    # guessing each attribute of the world: 6 colours, 3 shapes, 2 sizes, 9 cells
    assert metrics["generation_oracle_chance"] == pytest.approx(1 / (6 * 3 * 2 * 9))
    assert metrics["generation_oracle_without_size_chance"] == pytest.approx(1 / (6 * 3 * 9))
    assert set(metrics["eval_seconds"]) == {"vqa", "visual_tokens", "render_and_oracle",
                                            "frechet", "edits_and_video"}
    assert all(seconds >= 0 for seconds in metrics["eval_seconds"].values())
    # every prompt is rendered (the Frechet distance takes them all)
    counts = metrics["counts"]
    assert counts["rendered"] == counts["text_to_image_prompts"] == config.final_eval.max_prompts
    check_new_metric_fields(metrics, config, assets)
    for line in shapes_eval.summary_lines(metrics):
        assert line in printed
    # the stages were run by the fixture: their times come from their DONE files
    for name in config.order:
        done = json.loads((work / name / "final" / runner.DONE_FILE).read_text())
        assert metrics["stage_seconds"][name] == {
            "seconds": round(done["seconds"], 1), "cpu_seconds": round(done["cpu_seconds"], 1),
            "earlier_run": True}
        assert done["cpu_seconds"] > 0
    with Image.open(work / "samples.png") as image:
        # one row per sample: 14 px of heading, then rows of the 4x image and 6 px padding
        side = 4 * config.assets.image_size
        assert image.size[1] == 14 + 6 + config.final_eval.samples * (side + 6)
    assert metrics["samples"] == str(work / "samples.png")


def check_new_metric_fields(metrics: dict, config, assets: Path) -> None:
    """The per-kind chance, per-attribute, Frechet and predicted-frame fields: present, in
    range, and counted from the world's records."""
    from metamorph_jax.data import shapes
    from metamorph_jax.evaluation import shapes_eval
    world = Path(assets) / "shapes" / config.final_eval.split
    records = {kind: [json.loads(line) for line in (world / f"{kind}.jsonl").read_text().splitlines()]
               for kind in ("image_qa", "image_to_image", "video")}
    kinds = metrics["vqa_accuracy_by_kind"].keys()
    assert metrics["vqa_chance_by_kind"].keys() == kinds and kinds
    assert all(0.0 <= v <= 1.0 for v in metrics["vqa_chance_by_kind"].values())
    # the overall chance is the per-kind chances weighted by the questions of each kind
    asked = [shapes_eval.question_kind(r["conversations"][0]["value"])
             for r in records["image_qa"][:config.final_eval.max_questions]]
    weighted = sum(metrics["vqa_chance_by_kind"][k] * asked.count(k) for k in kinds) / len(asked)
    assert abs(weighted - metrics["vqa_chance"]) < 1e-9
    assert metrics["generation_attribute_chance"] == {
        "colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES),
        "size": 1 / len(shapes.SIZES), "position": 1 / len(shapes.POSITIONS)}
    if metrics["counts"]["single_shape_prompts"]:
        assert set(metrics["generation_attribute_accuracy"]) == {"colour", "shape", "size",
                                                                 "position"}
        assert all(0.0 <= v <= 1.0 for v in metrics["generation_attribute_accuracy"].values())
        assert metrics["generation_oracle_accuracy"] <= metrics["generation_oracle_without_size"]
        # the decoder alone, on the true tokens of the same single-shape prompts
        alone = metrics["decoder_true_token_oracle"]
        assert 0.0 <= alone["accuracy"] <= alone["without_size"] <= 1.0
        assert set(alone["attributes"]) == {"colour", "shape", "size", "position"}
    for name in ("generation_frechet", "generation_frechet_reference", "generation_frechet_blank"):
        assert np.isfinite(metrics[name]) and metrics[name] > 0.0, name
    assert metrics["frechet_counts"] == {"generated": config.final_eval.max_prompts,
                                         "reference": config.final_eval.max_prompts}
    # predicted frames: the records whose first predicted image shows one shape, up to the limit
    single_edits = [r for r in records["image_to_image"] if len(r["target"]) == 1]
    single_video = [r for r in records["video"] if r["targets"][0] and len(r["targets"][0]) == 1]
    for name, single, limit in (("edit_oracle", single_edits, config.final_eval.max_edits),
                                ("video_oracle", single_video, config.final_eval.max_video)):
        scored = metrics[name]
        assert scored["records"] == min(len(single), limit) > 0, name
        assert 0.0 <= scored["accuracy"] <= scored["without_size"] <= 1.0
        assert set(scored["attributes"]) == {"colour", "shape", "size", "position"}
        assert set(scored["true_frame"]) == set(scored["copy_prompt_image"]) == {
            "accuracy", "without_size"}
    assert metrics["counts"]["edits"] == metrics["edit_oracle"]["records"]
    assert metrics["counts"]["video"] == metrics["video_oracle"]["records"]


@pytest.mark.slow
def test_a_world_written_before_video_targets_scores_no_video_and_says_why(tiny_run, tmp_path):
    """A world whose video records carry no "targets" (written before they did) and one
    without video records: video_oracle counts 0 with null scores and the reason, in
    final_metrics.json and in the log; never a silent zero."""
    import shutil
    from metamorph_jax.evaluation import shapes_eval
    config, _, assets, work = tiny_run
    world = tmp_path / "shapes"
    shutil.copytree(Path(assets) / "shapes", world)
    videos = world / "validation" / "video.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "targets"}
           for line in videos.read_text().splitlines()]
    videos.write_text("".join(json.dumps(record) + "\n" for record in old))
    fields = dict(config.final_eval.to_dict(), max_questions=2, max_prompts=2, samples=2,
                  max_edits=1)
    fields.pop("world")
    logged = []
    metrics = shapes_eval.evaluate_shapes(work, world, shapes_eval.ShapesEvalConfig(**fields),
                                          out_dir=tmp_path / "out", log=logged.append)
    written = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    for scored in (metrics["video_oracle"], written["video_oracle"]):
        assert scored["records"] == 0 and scored["accuracy"] is None
        assert scored["attributes"] is None and "'targets'" in scored["reason"]
    assert written["counts"]["video"] == 0 and written["edit_oracle"]["records"] == 1
    assert any("video" in line and "'targets'" in line for line in logged)
    assert any(line.startswith("video_oracle: none scored") for line in
               shapes_eval.summary_lines(written))


ONE_PASS = ("--config.order=('adapter',)", "--config.stages.adapter.data.num_epochs=1",
            "--config.eval_every=0")


def _lines(path) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_finite_data_is_read_once_counted_and_never_silently_short(tiny_assets, tmp_path,
                                                                   capsys, caplog):
    """The adapter stage over its two sources with num_epochs=1: steps=50 stops with one
    error line naming the stage, the step and the sources (exit status 2); re-run with
    allow_short it finishes marked incomplete; steps=0 trains exactly the counted pass,
    which reads every record of both files once; --dry-run prints the same."""
    import re

    import train
    base = ["train.py", "--config", f"{TINY}:{tiny_assets}", *ONE_PASS]
    sources = {name: Path(tiny_assets) / "shapes" / "train" / f"{name}.jsonl"
               for name in ("image_qa", "text_to_image")}

    short = tmp_path / "short"
    assert run_command(train.main, [*base, "--workdir", str(short),
                                    "--config.stages.adapter.steps=50"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    found = re.search(r"stage 'adapter': the data ran out at step (\d+) of the 50 in field "
                      r"'steps' \(data.num_epochs = 1; sources: image_qa=(\S+), "
                      r"text_to_image=(\S+)\);", err)
    assert found, err
    ran_out = int(found.group(1))
    assert (found.group(2), found.group(3)) == tuple(str(p) for p in sources.values())
    # allow_short: the kept checkpoint resumes, and the stage is marked incomplete
    config = tiny_config(tiny_assets, short, *ONE_PASS, "--config.stages.adapter.steps=50",
                         "--config.stages.adapter.allow_short=True")
    with caplog.at_level(logging.WARNING, logger="metamorph_jax.training"):
        (result,) = runner.run(config)
    assert (result.resumed_from, result.steps, result.complete) == (ran_out, ran_out, False)
    assert f"stage adapter is INCOMPLETE: the data ran out after {ran_out} of 50" in caplog.text
    assert json.loads((short / "adapter" / "final" / runner.DONE_FILE).read_text())[
        "complete"] is False
    done = runner.recorded_completion(short / "adapter" / "final")
    assert done == {"complete": False, "steps": ran_out, "planned_steps": 50}
    (again,) = runner.run(config)   # finished: not run again, still incomplete
    assert (again.ran, again.complete, again.planned_steps) == (False, False, 50)

    # steps=0: one pass, counted before the stage, is exactly the steps the data makes
    assert train.main([*base, "--dry-run", "--workdir", str(tmp_path / "dry"),
                       "--config.stages.adapter.steps=0"]) == 0
    printed = capsys.readouterr().out
    for name, path in sources.items():
        assert f"  {name}: {_lines(path)} records x 1 = {_lines(path)} read  {path}" in printed
    assert f"  steps: 0 -> {ran_out} (one counted pass;" in printed
    one_pass = tmp_path / "one_pass"
    (result,) = runner.run(tiny_config(tiny_assets, one_pass, *ONE_PASS,
                                       "--config.stages.adapter.steps=0"))
    assert (result.steps, result.complete, result.planned_steps) == (ran_out, True, ran_out)
    assert json.loads((one_pass / "adapter" / "counted_steps.json").read_text())["steps"] == ran_out
    lines = [line for line in read_metrics(one_pass) if "loss" in line]
    assert [line["step"] for line in lines] == list(range(1, ran_out + 1))
    for name, path in sources.items():   # every record of each source, once
        assert sum(line[f"records/{name}"] for line in lines) == _lines(path)
