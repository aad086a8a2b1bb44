"""The stage runner behind train.py: mesh -> for each stage: restore-or-init -> steps ->
checkpoints, metrics, periodic held-out evaluation -> export.

    python train.py --config configs/tiny.py [--workdir DIR] [--config.key=value ...]

A run is a list of stages (`config.order`, names into `config.stages`); each stage names
its `kind` (objectives.py: adapter, instruct, decoder, text, tower). WORK_DIR holds::

    config.json                  the run's config
    metrics.jsonl                one line per logged step (and per evaluation) of every stage
    tensorboard/                 the same scalars as TensorBoard events, tagged <stage>/<name>
    <stage>/checkpoints/<step>/  Orbax checkpoints (checkpoint.py)
    <stage>/final/               the stage's result: a model folder with the tokenizer; its
                                 DONE file is written last, and a stage whose final/ has it
                                 is not run again; it then also holds the seconds and CPU
                                 seconds of the run that finished the stage (StageResult)

Re-running the same command with the same WORK_DIR resumes: finished stages are skipped,
the current stage restores its newest complete checkpoint (state, data iterator, RNG) and
continues with exactly the losses an uninterrupted run has (bit-identical on CPU);
metrics.jsonl lines past the restored step are dropped first, so the file reads like one
uninterrupted run.

Multi-process runs (train.py --coordinator ..., or found on Cloud TPU / SLURM): every
process runs this same code. Process 0 makes the assets (the others wait at a barrier),
writes config.json, metrics.jsonl, TensorBoard events and the DONE files; all processes
save and restore the Orbax checkpoints together (the grain iterator state is one file
per process) and take part in the export (each writes its shards of the parameters).
Each process reads its data shards (`data_shards`, default one per process) and
contributes their rows to the global batch, so the global batch is data.batch_size x
data_shards rows.

Finite data (data.num_epochs set): `steps` 0 trains one pass, counted before the stage
(epoch_steps.py); data that ends before `steps` is DataExhaustedError naming the stage,
the step and the sources (its checkpoint kept), or with the stage's `allow_short` the
stage finishes marked incomplete (DONE: "complete": false, "steps", "planned_steps").

A non-finite loss stops the run with NonFiniteLossError naming the stage, the step and the
record ids of the batch; with `skip_nonfinite` the update is skipped and counted instead
(`skipped`, `skipped_total` in the metrics).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from metamorph_jax import input_errors, sharding
from metamorph_jax.data import pipeline
from metamorph_jax.training import epoch_steps, objectives, optim, steps as steps_lib
from metamorph_jax.training import state as state_lib
from metamorph_jax.training.checkpoint import StageCheckpoints
from metamorph_jax.training.objectives import StageConfigError
from metamorph_jax.training.shards import ShardedBatches, all_processes, barrier, process_shards

logger = logging.getLogger("metamorph_jax.training")

RUN_FIELDS = {
    "work_dir": "where checkpoints, metrics and stage results go (train.py --workdir)",
    "seed": "the state RNG of stage i is seeded with seed + i",
    "mesh": "sharding.make_mesh fields: data, fsdp, tensor (-1: the remaining devices)",
    "order": "the stages to run, in order (names in `stages`)",
    "stages": "name -> stage fields (STAGE_FIELDS)",
    "checkpoint_every": "steps between checkpoints (and one at the end of every stage)",
    "keep": "checkpoints kept per stage",
    "async_checkpoints": "write checkpoints in the background",
    "log_every": "steps between metric fetches / metrics.jsonl lines",
    "eval_every": "steps between held-out evaluations (0: none)",
    "eval_batches": "batches per evaluation",
    "skip_nonfinite": "skip (and count) updates with a non-finite loss instead of stopping",
    "data_shards": "the data is read as this many shards of data.batch_size rows each, split "
                   "evenly over the processes (0: one per process); fixed, it makes the "
                   "batches the same on any number of processes",
    "assets": "inputs to make when absent (tiny.ensure_assets), or empty",
    "final_eval": "train.py evaluates the result after the stages "
                  "(evaluation/shapes_eval.py: world + ShapesEvalConfig fields), or empty",
}
STAGE_FIELDS = {
    "kind": "adapter | instruct | decoder | text | tower",
    "steps": "optimizer updates in the stage; 0: one pass over finite data (data.num_epochs "
             "epochs), the steps counted before the stage starts (epoch_steps.py)",
    "allow_short": "finite data that ends before `steps` finishes the stage marked incomplete "
                   "(DONE, the log, final_metrics) instead of stopping with an error",
    "init": "where the parameters come from (see objectives.py)",
    "data": "pipeline.DataConfig fields + sources (name -> path, weight, image_root)",
    "eval_data": "the held-out data, same fields (empty sources: no evaluation)",
    "optim": "optim.OPTIM_FIELDS",
    "grad_accum_steps": "micro-batches per update",
    "dtype": "compute dtype; params and optimizer state stay fp32",
    "remat_policy": "none | a layers.REMAT_POLICIES name (the decoder: any but none remats)",
    "scan_layers": "text stage: None keeps the folder's layer layout",
    "vision_coef": "VPiT: weight of the vision loss (None: the model's)",
    "loss_chunk_tokens": "text and VPiT: the LM head and text loss run over chunks of this "
                         "many positions, so a micro-batch's logits never exist whole "
                         "(losses.chunked_cross_entropy); 0: off",
    "model": "decoder: VisualizerConfig fields; tower: objectives.TOWER_MODEL_FIELDS",
    "noise": "decoder: the DDPM noise schedule",
    "cfg_prob": "decoder: probability of training without the condition",
    "sample": "decoder: sampling settings (sampler, num_steps, guidance_scale) for previews",
    "reference": "values from the paper or the authors' code kept for comparison (unused)",
}
DONE_FILE = "DONE"


class DataExhaustedError(StageConfigError):
    """Finite data ended before the stage's steps (the message names the stage, the step
    and the sources); a stage with allow_short=True finishes marked incomplete instead."""


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss (the message names the stage, step and the batch's record ids)."""


# --- config ---------------------------------------------------------------------------------

def check_config(config) -> None:
    """One clear error naming the first bad field."""
    keys = set(config.keys())
    missing = [f for f in ("work_dir", "mesh", "order", "stages") if f not in keys]
    if missing:
        raise StageConfigError(f"the config lacks field(s) {missing}")
    unknown = sorted(keys - set(RUN_FIELDS))
    if unknown:
        raise StageConfigError(f"unknown config field(s) {unknown}; known: {sorted(RUN_FIELDS)}")
    if "://" in str(config.work_dir):
        raise StageConfigError(
            f"config field 'work_dir' = {config.work_dir!r}: the runner writes metrics, "
            "tokenizers and DONE files through the file system; mount the bucket (e.g. "
            "gcsfuse) and give the mounted path")
    if int(config.get("data_shards", 0) or 0) < 0:
        raise StageConfigError(f"config field 'data_shards' must be 0 or more, got "
                               f"{config.get('data_shards')}")
    for field in ("checkpoint_every", "keep", "log_every"):
        if int(config.get(field, 1)) < 1:
            raise StageConfigError(f"config field {field!r} must be at least 1, got "
                                   f"{config.get(field)}")
    order = list(config.order)
    if not order:
        raise StageConfigError("config field 'order' names no stage")
    for name in order:
        if name not in config.stages:
            raise StageConfigError(f"config field 'order' names stage {name!r}, which "
                                   f"'stages' does not have (it has {sorted(config.stages)})")
        stage = config.stages[name]
        where = f"stage {name!r}"
        unknown = sorted(set(stage.keys()) - set(STAGE_FIELDS))
        if unknown:
            raise StageConfigError(f"{where}: unknown field(s) {unknown}; known: "
                                   f"{sorted(STAGE_FIELDS)}")
        for field in ("kind", "steps", "init", "data", "optim", "dtype"):
            if field not in stage:
                raise StageConfigError(f"{where}: field {field!r} is missing")
        if stage.kind not in objectives.KINDS:
            raise StageConfigError(f"{where}: field 'kind' = {stage.kind!r} is not one of "
                                   f"{objectives.KINDS}")
        if int(stage.steps) < 0:
            raise StageConfigError(f"{where}: field 'steps' must be 0 (one pass over the "
                                   f"data) or more, got {stage.steps}")
        if int(stage.steps) == 0 and stage.data.get("num_epochs", 1) is None:
            raise StageConfigError(f"{where}: field 'steps' = 0 trains one pass over the data, "
                                   "but field 'data.num_epochs' is None (the data never ends)")
        for field in ("data", "eval_data"):
            if stage.get(field) and stage[field].get("sources"):
                sources, data = objectives.data_from_config(stage[field], f"{where}: {field}")
                problem = pipeline.finite_mixture_error(sources, data)
                if problem:
                    raise StageConfigError(f"{where}: {field}: {problem}")
        if int(stage.get("grad_accum_steps", 1)) < 1:
            raise StageConfigError(f"{where}: field 'grad_accum_steps' must be at least 1, got "
                                   f"{stage.get('grad_accum_steps')}")


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


# --- metrics --------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard events beside it. Only the
    main process writes."""

    def __init__(self, work_dir: Path, enabled: bool = True):
        self.path = work_dir / "metrics.jsonl"
        self.enabled = enabled
        self._board = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._board = SummaryWriter(logdir=str(work_dir / "tensorboard"))

    def truncate(self, order: Sequence[str], stage: str, step: int) -> None:
        """Drop lines of `stage` after `step` and of later stages (and a torn last line):
        what a killed run wrote past the checkpoint it resumes from."""
        if not self.enabled or not self.path.exists():
            return
        rank = {name: index for index, name in enumerate(order)}
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            position = rank.get(record.get("stage"), len(order))
            if position < rank[stage] or (position == rank[stage] and record["step"] <= step):
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, stage: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "stage": stage, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._board.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


@dataclasses.dataclass
class PendingStep:
    step: int
    metrics: Any           # device scalars, fetched at the next flush
    record_ids: list       # host: the ids of every packed record of the (accumulated) batch
    tokens: int
    records: dict


def _batch_record_ids(micro_batches: list[dict]) -> list[str]:
    ids: list[str] = []
    for batch in micro_batches:
        for row in batch.get("record_ids", ()):
            ids.extend(row if isinstance(row, tuple) else (row,))
    return [str(i) for i in ids]


def _records_per_source(record_ids: list[str], sources: dict[str, str]) -> dict[str, int]:
    counts = {f"records/{name}": 0 for name in sources}
    for record in record_ids:
        where = record[record.rfind("(") + 1:-1] if record.endswith(")") else record
        for name, path in sources.items():
            if where.startswith(path):
                counts[f"records/{name}"] += 1
                break
    return counts


def _source_paths(data) -> dict[str, str]:
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    sources = values.get("sources") or {}
    if isinstance(sources, dict):
        return {name: str(source["path"]) for name, source in sources.items()}
    return {f"source{i}": str(source["path"]) for i, source in enumerate(sources)}


# --- one stage ------------------------------------------------------------------------------

@dataclasses.dataclass
class StageResult:
    name: str
    final_dir: Path
    steps: int = 0
    losses: list = dataclasses.field(default_factory=list)
    skipped: int = 0
    resumed_from: int | None = None
    ran: bool = True
    complete: bool = True      # False: the data ended before planned_steps (allow_short)
    planned_steps: int = 0
    seconds: float = 0.0   # wall-clock of the stage in this run (compiles included)
    cpu_seconds: float = 0.0   # CPU time of this process during the stage (all threads)


class Stage:
    """One stage of a run: built from the config, then `run()`."""

    def __init__(self, config, index: int, name: str, previous_dir: Path | None, mesh,
                 metrics: MetricsLog | None, folders: objectives.Folders | None = None,
                 process_count: int | None = None):
        """folders: how the objective reads its model folders (objectives.Folders; default
        a run's, its models built for the mesh's platform). process_count: the processes
        the data shards are split over (default jax.process_count(); a plan gives its
        topology's)."""
        self.config = config
        self.index = index
        self.name = name
        self.stage = config.stages[name]
        self.mesh = mesh
        self.metrics = metrics
        self.dir = Path(config.work_dir) / name
        self.final_dir = self.dir / "final"
        self.is_main = jax.process_index() == 0
        if folders is None:
            folders = objectives.Folders(platform=sharding.mesh_platform(mesh))
        earlier = tuple((n, str(Path(config.work_dir) / n / "final")) for n in config.order[:index])
        self.objective = objectives.build(self.stage, name, previous_dir,
                                          dataclasses.replace(folders, earlier_stages=earlier))
        self.rules = self.objective.rules
        self.accum = int(self.stage.get("grad_accum_steps", 1))
        try:
            self.shards, self.shard_count = process_shards(
                int(config.get("data_shards", 0) or 0),
                process_index=None if process_count is None else 0, process_count=process_count)
        except ValueError as error:
            raise StageConfigError(str(error)) from None
        self.steps = int(self.stage.steps)
        if self.steps == 0:   # one pass over the data
            # a plan compiles one step and never reads the data: any length will do
            self.steps = 1 if folders.plan else self.count_steps()
        try:
            self.optimizer, self.schedule = optim.build_optimizer(
                self.stage.optim, self.steps, f"stage {name!r}: optim")
        except ValueError as error:
            raise StageConfigError(str(error)) from None
        trainable, frozen = self.objective.boxed_parts()
        boxed = state_lib.abstract_state(trainable, frozen, self.optimizer)
        self.shardings = state_lib.state_shardings(boxed, mesh, self.rules)
        self.abstract = state_lib.unboxed(boxed)
        self.sources = _source_paths(self.stage.data)

    def count_steps(self) -> int:
        """The optimizer steps of one pass over the data (epoch_steps.py), counted once
        per work directory; every process takes part."""
        where = f"stage {self.name!r}"
        key = epoch_steps.count_key(self.stage.kind, self.stage.data, self.shard_count,
                                    self.accum)
        steps = epoch_steps.counted_steps(
            self.dir, key, lambda: epoch_steps.count_steps(
                self.stage.kind, self.stage.data, getattr(self.objective, "tokenizer", None),
                getattr(self.objective, "ids", None), self.shards, self.shard_count,
                self.accum, where), self.is_main)
        logger.info("%s: one pass over the data is %d steps", where, steps)
        return steps

    def batches(self, data):
        """This process's shards of `data` as one iterator of its rows of the global batch."""
        return ShardedBatches(self.objective, data, self.shards, self.shard_count)

    # -- state
    def init_or_restore(self, checkpoints: StageCheckpoints, batches):
        latest = checkpoints.latest_step()
        if latest is not None:
            target = state_lib.with_shardings(self.abstract, self.shardings)
            state, meta = checkpoints.restore(latest, target, batches)
            if meta.get("stage") != self.name:
                raise ValueError(f"{checkpoints.directory}: checkpoint {latest} is of stage "
                                 f"{meta.get('stage')!r}, not {self.name!r}")
            logger.info("stage %s: resuming from step %d", self.name, latest)
            return state, latest
        trainable, frozen = self.objective.load_parts(self.shardings.trainable,
                                                      self.shardings.frozen)
        rng = state_lib.rng_data(int(self.config.get("seed", 0)) + self.index)
        return state_lib.init_state(trainable, frozen, self.optimizer, rng, self.shardings,
                                    self.mesh), None

    def meta(self, step: int) -> dict:
        return {"stage": self.name, "stage_index": self.index, "step": step,
                "config": config_json(self.config)}

    # -- steps
    def abstract_batch(self) -> dict:
        """The global stacked batch the train step takes, as ShapeDtypeStructs with their
        shardings: [grad_accum_steps, data.batch_size x data shards, ...]."""
        rows = int(self.stage.data.batch_size) * self.shard_count
        return {key: jax.ShapeDtypeStruct(
                    (self.accum,) + shape, dtype,
                    sharding=steps_lib.batch_sharding(self.mesh, self.rules, len(shape) + 1))
                for key, (shape, dtype) in self.objective.batch_shapes(self.stage.data,
                                                                       rows).items()}

    def lower(self):
        """The train step lowered from abstract shapes alone (no parameters, no data): what
        a compile-only plan for a topology needs (`.compile()` it)."""
        batch = self.abstract_batch()
        self.compile(batch)
        state = state_lib.with_shardings(self.abstract, self.shardings)
        return self.train_step.lower(state, batch)

    def compile(self, stacked: dict):
        specs = {key: len(value.shape) for key, value in stacked.items()}
        skip = bool(self.config.get("skip_nonfinite", False))
        train = steps_lib.make_train_step(self.objective, self.optimizer, self.schedule, skip)
        self.train_step = steps_lib.jit_train_step(train, self.mesh, self.shardings, self.rules,
                                                   specs)
        self.eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(self.objective),
                                                 self.mesh, self.shardings, self.rules, specs)

    def evaluate(self, state, step: int) -> dict | None:
        eval_data = self.stage.get("eval_data")
        if not eval_data or not eval_data.get("sources"):
            return None
        batches = self.batches(eval_data)
        totals = None
        for _ in range(int(self.config.get("eval_batches", 1))):
            batch = next(batches, None)
            # finite data: a process whose shards ran out stops them all (else its peers
            # would wait in the step for it)
            if not all_processes(batch is not None):
                break
            stacked = steps_lib.stack_micro_batches([batch], self.objective.batch_keys)
            sums = jax.device_get(self.eval_step(
                state, steps_lib.global_batch(stacked, self.mesh, self.rules)))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if totals is None:
            return None
        _, values = self.objective.summarize(totals)
        values = {f"eval_{key}": float(value) for key, value in values.items()}
        self.metrics.write(self.name, step, values)
        return values

    def run(self) -> StageResult:
        from tqdm import tqdm

        result = StageResult(self.name, self.final_dir)
        checkpoints = StageCheckpoints(self.dir / "checkpoints", int(self.config.get("keep", 2)),
                                       bool(self.config.get("async_checkpoints", True)))
        batches = self.batches(self.stage.data)
        finite = self.stage.data.get("num_epochs") is not None
        state, restored = self.init_or_restore(checkpoints, batches)
        result.resumed_from = restored
        step = int(jax.device_get(state.step))
        self.metrics.truncate(list(self.config.order), self.name, step)
        log_every = int(self.config.get("log_every", 1))
        ckpt_every = int(self.config.get("checkpoint_every", self.steps))
        eval_every = int(self.config.get("eval_every", 0) or 0)
        skip = bool(self.config.get("skip_nonfinite", False))
        pending: list[PendingStep] = []
        saved = restored   # the newest checkpoint's step
        clock = [time.time()]
        self.train_step = None
        bar = tqdm(total=self.steps, initial=step, desc=self.name, unit="step",
                   disable=not self.is_main)

        def flush() -> None:
            if not pending:
                return
            fetched = jax.device_get([p.metrics for p in pending])
            now = time.time()
            step_s = (now - clock[0]) / len(pending)
            clock[0] = now
            for entry, values in zip(pending, fetched):
                values = {key: float(value) for key, value in values.items()}
                loss = values["loss"]
                if not math.isfinite(loss) and not skip:
                    raise NonFiniteLossError(
                        f"stage {self.name!r} step {entry.step}: the loss is {loss}; the "
                        f"batch's records: {', '.join(entry.record_ids) or '(no ids)'}")
                if values.get("skipped"):
                    logger.warning("stage %s step %d: non-finite loss, update skipped; the "
                                   "batch's records: %s", self.name, entry.step,
                                   ", ".join(entry.record_ids))
                values.update(tokens_per_s=entry.tokens / max(step_s, 1e-9), step_s=step_s,
                              **entry.records)
                result.losses.append(loss)
                result.skipped = int(values["skipped_total"])
                self.metrics.write(self.name, entry.step, values)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}")
            pending.clear()

        try:
            while step < self.steps:
                micro = []
                for _ in range(self.accum):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    self.objective.check_batch(batch)
                    micro.append(batch)
                # Finite data may end on one process first: all agree before the step (a
                # small collective, only then, as it waits for the previous step).
                have = len(micro) == self.accum
                if not (all_processes(have) if finite else have):
                    if not self.stage.get("allow_short", False):
                        flush()
                        if step != saved:   # kept: a re-run resumes here
                            checkpoints.save(step, state, batches, self.meta(step))
                        checkpoints.wait()
                        checkpoints.close()
                        raise DataExhaustedError(self.short_message(step))
                    logger.warning("stage %s is INCOMPLETE: the data ran out after %d of %d "
                                   "steps (allow_short)", self.name, step, self.steps)
                    result.complete = False
                    break
                stacked = steps_lib.stack_micro_batches(micro, self.objective.batch_keys)
                if self.train_step is None:
                    self.compile(stacked)
                state, values = self.train_step(
                    state, steps_lib.global_batch(stacked, self.mesh, self.rules))
                step += 1
                ids = _batch_record_ids(micro)
                pending.append(PendingStep(step, values, ids,
                                           sum(self.objective.tokens_in(b) for b in micro),
                                           _records_per_source(ids, self.sources)))
                bar.update(1)
                if step % log_every == 0:
                    flush()
                if eval_every and step % eval_every == 0:
                    flush()
                    self.evaluate(state, step)
                if step % ckpt_every == 0 and step < self.steps:
                    flush()
                    checkpoints.save(step, state, batches, self.meta(step))
                    saved = step
            flush()
            if step != saved:
                checkpoints.save(step, state, batches, self.meta(step))
            checkpoints.wait()
        finally:
            bar.close()
        result.steps = step
        result.planned_steps = self.steps
        self.export(state, result)
        checkpoints.close()
        return result

    def short_message(self, step: int) -> str:
        sources = ", ".join(f"{name}={path}" for name, path in self.sources.items())
        return (f"stage {self.name!r}: the data ran out at step {step} of the {self.steps} in "
                f"field 'steps' (data.num_epochs = {self.stage.data.get('num_epochs')}; "
                f"sources: {sources}); the checkpoint of step {step} is kept. "
                + ("The counted pass read no image; one that only decoding finds corrupt "
                   "drops its record here alone. Set" if int(self.stage.steps) == 0 else
                   "Set steps to 0 to train one counted pass, lower steps, add data, or set")
                + " the stage's allow_short=True to finish it marked incomplete")

    def export(self, state, result: StageResult | None = None) -> None:
        """Every process takes part (each writes its shards of the parameters); process 0
        writes the rest and, last, the DONE file."""
        if self.is_main and self.final_dir.exists():   # an export cut short: write it again
            shutil.rmtree(self.final_dir)
        barrier(f"{self.name}: export start")
        self.objective.export(self.final_dir, state.trainable, state.frozen)
        barrier(f"{self.name}: export end")
        if self.is_main:
            done = {"stage": self.name}
            if result is not None:
                done.update(complete=result.complete, steps=result.steps,
                            planned_steps=result.planned_steps)
            (self.final_dir / DONE_FILE).write_text(json.dumps(done) + "\n")


# --- the run --------------------------------------------------------------------------------

def run(config) -> list[StageResult]:
    """Run the config's stages in order (see the module docstring)."""
    check_config(config)
    work_dir = Path(config.work_dir)
    is_main = jax.process_index() == 0
    if config.get("assets") and config.assets.get("kind"):
        from metamorph_jax import tiny
        if is_main:
            tiny.ensure_assets(config.assets)
        barrier("assets")   # the other processes read what process 0 made
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    metrics = MetricsLog(work_dir, enabled=is_main)
    results: list[StageResult] = []
    previous: Path | None = None
    try:
        for index, name in enumerate(config.order):
            final_dir = work_dir / name / "final"
            if (final_dir / DONE_FILE).exists():
                logger.info("stage %s is done (%s); skipping it", name, final_dir)
                results.append(StageResult(name, final_dir, ran=False,
                                           **recorded_seconds(final_dir),
                                           **recorded_completion(final_dir)))
            else:
                wall, cpu = time.time(), time.process_time()
                result = Stage(config, index, name, previous, mesh, metrics).run()
                result.seconds = time.time() - wall
                result.cpu_seconds = time.process_time() - cpu
                if is_main:   # after the export: DONE is there, and only its content grows
                    done = final_dir / DONE_FILE
                    done.write_text(json.dumps(dict(
                        json.loads(done.read_text()), seconds=result.seconds,
                        cpu_seconds=result.cpu_seconds, resumed_from=result.resumed_from))
                        + "\n")
                results.append(result)
            previous = final_dir
    finally:
        metrics.close()
    return results


def recorded_seconds(final_dir: Path) -> dict:
    """{"seconds", "cpu_seconds"} that a finished stage's DONE file records (of the run that
    finished it); {} for a DONE file written before it recorded them."""
    done = json.loads((final_dir / DONE_FILE).read_text())
    return {key: float(done[key]) for key in ("seconds", "cpu_seconds") if key in done}


def recorded_completion(final_dir: Path) -> dict:
    """{"complete", "steps", "planned_steps"} that a finished stage's DONE file records ({}
    for a DONE file written before it recorded them)."""
    done = json.loads((final_dir / DONE_FILE).read_text())
    return {key: done[key] for key in ("complete", "steps", "planned_steps") if key in done}


def parse_flags(argv: Sequence[str]):
    """`argv` (program name first) -> the ConfigDict of `--config FILE` with every
    `--config.a.b=value` override applied and `--workdir` (if given) as work_dir. Unknown
    fields are an error. Uses its own flag registry, so it can be called more than once."""
    return parse_command(argv)[0]


def _config_path(argv: Sequence[str]) -> str | None:
    """The file of `--config FILE[:ARG]` as given (a flag that failed counts as unparsed)."""
    values = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return values[-1].split(":", 1)[0] if values else None


def _config_load_error(argv: Sequence[str], error: OSError) -> str:
    """One line for a config file ml_collections could not load (its own message lists
    every path it tried, over several lines)."""
    path = _config_path(argv) or "FILE"
    if not os.path.isfile(path):
        return f"--config {path}: no such file"
    return f"--config {path}: cannot load it ({input_errors.one_line(error)})"


def _config_code_error(argv: Sequence[str], error: Exception) -> str | None:
    """'--config FILE, line N: Type: message' when the config file's own code (its
    get_config) raised `error`, else None. ml_collections re-raises a ValueError or
    TypeError of get_config with the traceback as text, which absl wraps once more."""
    path = _config_path(argv)
    if path is None:
        return None
    here = os.path.abspath(path)
    frames = [f.lineno for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == here]
    what = f"{type(error).__name__}: {error}"
    text = str(error)
    if not frames and "Error whilst parsing config file:" in text:
        frames = [int(n) for n in re.findall(rf'File "{re.escape(path)}", line (\d+)', text)]
        what = text.strip().splitlines()[-1]
    if not frames:
        return None
    return f"--config {path}, line {frames[-1]}: {input_errors.one_line(Exception(what))}"


def parse_command(argv: Sequence[str]):
    """(config as parse_flags gives it, the absl registry with train.py's other flags:
    the multi-process ones, distributed.define_flags)."""
    from absl import flags
    from ml_collections import config_flags

    from metamorph_jax import distributed
    registry = flags.FlagValues()
    distributed.define_flags(registry)
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()",
                                    flag_values=registry, lock_config=True,
                                    sys_argv=list(argv))  # overrides are found in argv, not sys.argv
    flags.DEFINE_string("workdir", None, "the run's work directory (default: the config's "
                        "work_dir)", flag_values=registry)
    flags.DEFINE_string("plan", None, "compile every stage for this TPU topology (v5p-N, "
                        "v5e-N, v6e-N) on this host and report memory, FLOPs and the "
                        "estimated step time; nothing runs (training/plan.py)",
                        flag_values=registry)
    flags.DEFINE_bool("dry-run", False, "print per stage and source the records that will "
                      "be read and the stage's steps (counted where the data is finite); "
                      "nothing trains (training/epoch_steps.py)", flag_values=registry)
    flags.DEFINE_string("plan-out", None, "with --plan: write the plan as JSON to this file",
                        flag_values=registry)
    flags.DEFINE_boolean("debug", False, "show the traceback of any error (also of bad "
                         "input; metamorph_jax/input_errors.py)", flag_values=registry)
    try:
        rest = registry(list(argv))
        if registry.config is not None:
            registry.config.keys()   # a config file that failed to load raises here
    except SyntaxError as error:   # in the config file
        raise flags.Error(f"--config {error.filename}, line {error.lineno}: {error.msg}") from None
    except Exception as error:   # noqa: BLE001 -- classified below, re-raised if none fits
        in_config = _config_code_error(argv, error)
        if in_config is not None:   # the config file's own code failed: the user's to fix
            raise flags.Error(in_config) from None
        if isinstance(error, (AttributeError, KeyError)):   # ml_collections: unknown field
            raise flags.Error(input_errors.unknown_override(error, argv)) from None
        if isinstance(error, OSError):   # ml_collections: the config file could not load
            raise flags.Error(_config_load_error(argv, error)) from None
        raise
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}; overrides look like "
                          "--config.stages.adapter.steps=20")
    if registry.config is None:
        raise flags.Error("--config FILE is required, e.g. --config configs/tiny.py")
    if registry["plan-out"].value and not registry.plan:
        raise flags.Error("--plan-out needs --plan TOPOLOGY")
    config = registry.config
    if registry.workdir:
        with config.unlocked():
            config.work_dir = registry.workdir
    return config, registry
