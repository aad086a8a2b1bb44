"""A stage's length from the data it reads, and train.py --dry-run.

`steps = 0` with a finite `data.num_epochs` means one pass: the stage trains for the
optimizer steps that num_epochs epochs of its data make. Records -> packed rows depends
on every record's length, so the steps are counted before the stage starts:

    per data shard the process reads: the batches its pipeline yields (data/counting.py:
        text and image slots rendered, no image decoded; a tqdm bar over the records)
    steps = min over the run's shards of (batches // grad_accum_steps)

which is the step at which the first shard runs out, where the runner's all-process
agreement ends a real pass (each process counts its own shards; the minimum is taken
over all processes). The count is kept in WORK_DIR/<stage>/counted_steps.json with what it
depends on (the stage kind, data fields, data shards, grad_accum_steps): a re-run
(resume) reads it instead of counting again; a changed field counts again.

`python train.py --config ... --dry-run` (dry_run) prints per stage and source the records
that will be read, and the steps (counted where the data is finite), and trains nothing.
It reads the record files and, to count, the stage's tokenizer (a from_previous stage: the
tokenizer of the stage it starts from); it loads no weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from metamorph_jax.training.objectives import StageConfigError, data_from_config, source_names
from metamorph_jax.training.shards import all_processes_min, process_shards, shard_data

logger = logging.getLogger("metamorph_jax.training")
COUNT_FILE = "counted_steps.json"
VPIT_KINDS = ("adapter", "instruct")


def count_shard_batches(kind: str, data, tokenizer, ids, shard: int, shard_count: int,
                        where: str) -> int:
    """Batches shard `shard` of `shard_count` of `data` yields for a stage of `kind`."""
    from metamorph_jax.data import counting
    sources, config = data_from_config(shard_data(data, shard, shard_count), f"{where}: data")
    description = f"{where}: counting shard {shard}"
    if kind in VPIT_KINDS:
        return counting.count_packed_batches(sources, tokenizer, ids, config,
                                             description=description)
    if kind == "text":
        from metamorph_jax.data.text_records import count_text_batches
        return count_text_batches(sources, tokenizer, config)
    return counting.count_image_batches(sources, config)


def count_steps(kind: str, data, tokenizer, ids, shards: list[int], shard_count: int,
                accum: int, where: str) -> int:
    """One pass's optimizer steps (module docstring); every process must call it."""
    local = min(count_shard_batches(kind, data, tokenizer, ids, shard, shard_count, where)
                for shard in shards)
    steps = all_processes_min(local // accum)
    if steps < 1:
        raise StageConfigError(
            f"{where}: field 'steps' = 0 (one pass over the data), but one pass makes no "
            f"whole step of {accum} micro-batch(es) on the smallest of {shard_count} data "
            "shard(s); add data, raise 'data.num_epochs', or lower the batch")
    return steps


def count_key(kind: str, data, shard_count: int, accum: int) -> dict:
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    return json.loads(json.dumps({"kind": kind, "data": values, "data_shards": shard_count,
                                  "grad_accum_steps": accum}, sort_keys=True, default=str))


def counted_steps(stage_dir: Path, key: dict, count, is_main: bool) -> int:
    """The steps kept in stage_dir/COUNT_FILE for `key`, else count() (kept by process 0).
    Every process reads the file before any writes it (count() is a collective)."""
    path = Path(stage_dir) / COUNT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return int(saved["steps"])
        logger.info("%s: the data or its batching changed since the count; counting again", path)
    steps = count()
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"steps": steps, "key": key}, indent=1) + "\n")
    return steps


# --- train.py --dry-run ----------------------------------------------------------------------

def tokenizer_dir(config, name: str) -> str | None:
    """The tokenizer folder stage `name` reads (objectives.py's rule): init.tokenizer_dir,
    else model_dir, else the starting stage's tokenizer when from_previous, else llm_dir."""
    init = config.stages[name].init
    for field in ("tokenizer_dir", "model_dir"):
        if init.get(field):
            return str(init.get(field))
    order = list(config.order)
    if init.get("from_previous", False) and order.index(name) > 0:
        return tokenizer_dir(config, order[order.index(name) - 1])
    return str(init.get("llm_dir")) if init.get("llm_dir") else None


def _tokenizer(config, name: str, where: str):
    from metamorph_jax import pretrained
    from metamorph_jax.data import conversation as conv
    folder = tokenizer_dir(config, name)
    if folder is None or not Path(folder).is_dir():
        raise StageConfigError(f"{where}: counting the steps needs the stage's tokenizer; "
                               f"folder {folder!r} (init.tokenizer_dir / model_dir / llm_dir, "
                               "or the previous stage's) does not exist")
    tokenizer = pretrained.load_tokenizer(folder)
    kind = config.stages[name].kind
    return tokenizer, (conv.add_image_tokens(tokenizer) if kind in VPIT_KINDS else None)


def stage_report(config, name: str, out=print) -> None:
    from metamorph_jax.data import pipeline
    stage = config.stages[name]
    where = f"stage {name!r}"
    sources, data = data_from_config(stage.data, f"{where}: data")
    names = source_names(stage.data)
    try:
        records = pipeline.source_records(sources)
    except (OSError, ValueError) as error:
        raise StageConfigError(f"{where}: data: {error}") from None
    epochs = data.num_epochs
    if epochs is None:
        out(f"stage {name} ({stage.kind}): data.num_epochs = None: the sources repeat "
            "forever, sampled by weight")
        total = sum(float(s.weight) for s in sources)
        for source_name, source, count in zip(names, sources, records):
            out(f"  {source_name}: {count} records, weight {float(source.weight):g} "
                f"({100 * float(source.weight) / total:.1f}% of the records read)  "
                f"{source.path}")
        out(f"  steps: {int(stage.steps)} (set)")
        return
    out(f"stage {name} ({stage.kind}): data.num_epochs = {epochs}: every record of every "
        f"source read {epochs} time(s)")
    for source_name, source, count in zip(names, sources, records):
        out(f"  {source_name}: {count} records x {epochs} = {count * epochs} read  "
            f"{source.path}")
    out(f"  all sources: {sum(records) * epochs} records read")
    shards, shard_count = process_shards(int(config.get("data_shards", 0) or 0),
                                         process_index=0, process_count=1)
    accum = int(stage.get("grad_accum_steps", 1))
    tokenizer, ids = (None, None) if stage.kind == "decoder" else _tokenizer(config, name, where)
    one_pass = count_steps(stage.kind, stage.data, tokenizer, ids, shards, shard_count, accum,
                           where)
    on = f"{shard_count} data shard(s) of {int(data.batch_size)} rows, {accum} per step"
    if not int(config.get("data_shards", 0) or 0):
        on += "; data_shards 0 is one per process: counted for one process"
    if int(stage.steps) == 0:
        out(f"  steps: 0 -> {one_pass} (one counted pass; {on})")
    elif int(stage.steps) <= one_pass:
        out(f"  steps: {int(stage.steps)} (set; one pass makes {one_pass}; {on})")
    else:
        out(f"  steps: {int(stage.steps)} (set), but the data runs out after {one_pass} "
            f"({on}): the stage stops with an error unless it sets allow_short=True")


def dry_run(config, out=print) -> int:
    """Print what each stage of `config` will read (module docstring); trains nothing."""
    from metamorph_jax.training import runner
    runner.check_config(config)
    if config.get("assets") and config.assets.get("kind"):
        from metamorph_jax import tiny
        tiny.ensure_assets(config.assets)
    for name in config.order:
        stage_report(config, name, out)
    return 0
