"""The LLM text stage runner behind train.py: finetune a converted LLaMA on text-only
conversation records.

    python train.py --config configs/text_tiny.py [--config.steps=20 --config.optim.lr=1e-4 ...]

One run: load the model folder onto a (data, fsdp, tensor) mesh (fp32 master params,
compute in `dtype`), AdamW with global-norm clipping and a warm-up + cosine schedule, the
grain pipeline's packed batches, `steps` jitted steps with a tqdm bar, metrics appended to
`work_dir/metrics.jsonl` and written as TensorBoard events, and the trained params saved
to `work_dir/final` (a model folder like the converter's, plus the tokenizer) that
generate.py and eval.py read.

Records must be text-only: a record with an "image", "images" or "video" field stops the
run with an error naming its file and line (the VPiT image stages come later). Other
unusable records (too long, malformed, no response) are counted and reported by the
pipeline, never dropped silently.

Not here yet: checkpointing and resuming in the middle of a run (Orbax state + iterator
state, training/checkpoint.py), evaluation during training, multi-stage runs, and
multi-host saving of the final params (the save gathers the params into this process,
which needs them to be fully addressable, i.e. one process).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import optax

from metamorph_jax import pretrained, sharding
from metamorph_jax.data import pipeline
from metamorph_jax.data.text_records import check_text_only, text_batches
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM, with_layer_layout
from metamorph_jax.training import text_step

logger = logging.getLogger("metamorph_jax.training")

REQUIRED_FIELDS = ("llm_dir", "tokenizer_dir", "data", "steps", "optim", "mesh", "dtype", "work_dir")


# --- data ---------------------------------------------------------------------------------

def data_from_config(data) -> tuple[list[pipeline.Source], pipeline.DataConfig]:
    """pipeline.from_config, also accepting `sources` as a mapping name -> source fields
    (what configs/text_tiny.py uses, so that `--config.data.sources.text.path=F` works on
    the command line, which a list does not allow)."""
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    if isinstance(values.get("sources"), dict):
        values["sources"] = list(values["sources"].values())
    return pipeline.from_config(values)


# --- model and optimizer ------------------------------------------------------------------

def saved_layout(model: LlamaForCausalLM, saved: dict, host_params: Any) -> Any:
    """Host params in the layer layout of the folder the run started from."""
    return with_layer_layout(host_params, model.config.num_layers,
                             LlamaConfig.from_dict(saved["config"]).scan_layers)


def make_optimizer(optim, steps: int) -> tuple[optax.GradientTransformation, Any]:
    """AdamW behind global-norm clipping, with a linear warm-up over `warmup_ratio` of the
    steps (3% in the paper's recipe) from 0 to `lr`, then cosine decay to `lr * end_ratio`.
    Returns (optimizer, schedule)."""
    warmup = max(1, int(round(optim.warmup_ratio * steps)))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=optim.lr * optim.end_ratio)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay)
    if optim.grad_clip and optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw), schedule
    return adamw, schedule


# --- metrics --------------------------------------------------------------------------------

class MetricsWriter:
    """Appends one JSON line per logged step to metrics.jsonl and mirrors the scalars into
    TensorBoard event files (tensorboardX) in the same folder."""

    def __init__(self, work_dir: Path):
        from tensorboardX import SummaryWriter
        self.path = work_dir / "metrics.jsonl"
        self._jsonl = open(self.path, "a")
        self._board = SummaryWriter(logdir=str(work_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._board.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._jsonl.close()
        self._board.close()


# --- the run ------------------------------------------------------------------------------

def check_config(config) -> None:
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        raise ValueError(f"the config lacks {missing}")
    if int(config.steps) < 1:
        raise ValueError(f"config field 'steps' must be at least 1, got {config.steps}")
    for field in ("llm_dir", "tokenizer_dir"):
        if not Path(config[field]).is_dir():
            raise FileNotFoundError(f"config field {field!r}: folder {config[field]} does not exist")


def train(config) -> dict:
    """Run the text stage described by `config` (see configs/text_tiny.py); returns a
    summary {steps, first_loss, last_loss, final_dir, bad_records}."""
    from tqdm import tqdm

    check_config(config)
    work_dir = Path(config.work_dir)
    final_dir = work_dir / "final"
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; choose another config field 'work_dir'")
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(**config.mesh.to_dict())
    rules = sharding.DEFAULT_RULES
    tokenizer = pretrained.load_tokenizer(config.tokenizer_dir)
    model, params, saved = pretrained.load_llama(config.llm_dir, mesh, rules, dtype=config.dtype,
                                                 remat_policy=config.get("remat_policy"),
                                                 scan_layers=config.get("scan_layers"))
    pretrained.check_vocab(model.config.vocab_size, tokenizer, config.llm_dir,
                           config.tokenizer_dir)
    sources, data_config = data_from_config(config.data)
    batches = text_batches(sources, tokenizer, data_config)

    steps = int(config.steps)
    optimizer, schedule = make_optimizer(config.optim, steps)
    shardings = text_step.state_shardings(model, optimizer, mesh, rules)
    state = text_step.init_state(params, optimizer, mesh, shardings)
    del params
    train_step = text_step.jit_train_step(text_step.make_train_step(model, optimizer, schedule),
                                          mesh, shardings, rules)

    is_main = jax.process_index() == 0
    writer = MetricsWriter(work_dir) if is_main else None
    log_every = max(1, int(config.get("log_every", 1)))
    pending: list[tuple[int, dict]] = []   # device metrics not yet fetched (keeps steps async)
    losses: list[float] = []
    start = time.time()
    done = 0
    bar = tqdm(total=steps, desc="train", unit="step", disable=not is_main)

    def flush() -> None:
        """Fetch, NaN-check and log every pending step's metrics."""
        for logged_step, values in jax.device_get(pending):
            values = {**values, "time_s": time.time() - start}
            losses.append(float(values["loss"]))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"step {logged_step}: the loss is {losses[-1]}")
            if writer is not None:
                writer.write(logged_step, values)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{float(values['lr']):.2e}")
        pending.clear()

    try:
        for step in range(1, steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                logger.warning("the data ran out after %d steps (data.num_epochs=%s)",
                               done, data_config.num_epochs)
                break
            check_text_only(batch)
            state, metrics = train_step(state, text_step.global_batch(batch, mesh, rules))
            done = step
            pending.append((step, metrics))
            if len(pending) >= log_every:
                flush()
            bar.update(1)
        # The last steps (fewer than log_every, or cut short by the data) are logged and
        # checked too.
        flush()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    batches.bad_records.report(final=True)

    if is_main:
        host_params = saved_layout(model, saved, jax.device_get(state.params))
        pretrained.save_pretrained(final_dir, "llama", saved["config"], host_params,
                                   hf_config=saved.get("hf_config"),
                                   chat_template=data_config.template)
        tokenizer.save_pretrained(str(final_dir))
    return {"steps": done, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "final_dir": str(final_dir),
            "bad_records": batches.bad_records.as_dict()}


def parse_flags(argv: Sequence[str]):
    """`argv` (program name first) -> the ConfigDict of `--config FILE` with every
    `--config.a.b=value` override applied (ml_collections config_flags; unknown fields
    are an error). Uses its own flag registry, so it can be called more than once."""
    from absl import flags
    from ml_collections import config_flags

    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()",
                                    flag_values=registry, lock_config=True,
                                    sys_argv=list(argv))  # overrides are found in argv, not sys.argv
    try:
        rest = registry(list(argv))
    except (AttributeError, KeyError) as error:  # ml_collections' word for an unknown field
        raise flags.Error(f"a --config.* override names a field the config does not have: "
                          f"{error}") from None
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}; overrides look like --config.steps=20")
    if registry.config is None:
        raise flags.Error("--config FILE is required, e.g. --config configs/text_tiny.py")
    return registry.config
