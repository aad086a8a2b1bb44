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

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamorph_jax import pretrained, sharding
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.data.packing import PackedBatchIterator
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM, with_layer_layout
from metamorph_jax.training import text_step

logger = logging.getLogger("metamorph_jax.training")

IMAGE_FIELDS = ("image", "images", "video")
REQUIRED_FIELDS = ("llm_dir", "tokenizer_dir", "data", "steps", "optim", "mesh", "dtype", "work_dir")


class TextStageError(ValueError):
    """A record the text stage cannot train on (it holds images or a video)."""


# --- data ---------------------------------------------------------------------------------

class TextOnlyCheck:
    """Pipeline map before rendering: a record with images stops the run, naming file:line.

    Records that are not valid JSON pass through: the renderer counts them as
    "malformed_json" like any other bad record.
    """

    def __call__(self, element: dict) -> dict:
        raw = element["raw"]
        try:
            record = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        except (json.JSONDecodeError, UnicodeDecodeError):
            return element
        if isinstance(record, dict):
            for field in IMAGE_FIELDS:
                if record.get(field) is not None:
                    raise TextStageError(
                        f"{element['where']}: field {field!r}: the LLM text stage trains and "
                        "evaluates on text-only records; remove records with images or videos "
                        "(the VPiT image stages are not implemented yet)")
        return element


def text_special_ids(tokenizer) -> conv.SpecialIds:
    """Ids for the renderer. Text-only records never emit image tokens, so the image ids
    are marked unused (-1) instead of adding tokens the model has no rows for."""
    return conv.SpecialIds(image_start_id=-1, image_end_id=-1, placeholder_id=0,
                           vocab_size=len(tokenizer))


def text_batches(sources: Sequence[pipeline.Source], tokenizer,
                 config: pipeline.DataConfig) -> PackedBatchIterator:
    """Packed batches of text-only records: pipeline.build_dataset with the TextOnlyCheck
    in front of rendering and no image slots (so no image buffers are allocated)."""
    config = dataclasses.replace(config, max_images_per_row=0, image_size=1)
    return pipeline.make_iterator(sources, tokenizer, text_special_ids(tokenizer), config,
                                  record_check=TextOnlyCheck())


def data_from_config(data) -> tuple[list[pipeline.Source], pipeline.DataConfig]:
    """pipeline.from_config, also accepting `sources` as a mapping name -> source fields
    (what configs/text_tiny.py uses, so that `--config.data.sources.text.path=F` works on
    the command line, which a list does not allow)."""
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    if isinstance(values.get("sources"), dict):
        values["sources"] = list(values["sources"].values())
    return pipeline.from_config(values)


def check_text_only(batch: dict) -> None:
    """Second line of defence after packing: no image slot may reach the text step."""
    if np.any(batch["image_index"] >= 0) or np.any(batch["vision_mask"]) or \
            np.any(batch["image_valid"]):
        raise TextStageError("a packed batch holds image positions; the LLM text stage "
                             "takes text-only records")


def write_text_records(path: str | Path, count: int = 64, seed: int = 0) -> Path:
    """Write `count` text-only conversation records about Shapes-world scenes (the scene
    described in words, a question, its answer) as JSONL: a small text data set for the
    tiny config, demos and tests."""
    from metamorph_jax.data import shapes
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(count):
            scene = shapes.random_scene(rng)
            question, answer = shapes.vqa(scene, rng)
            record = {"id": f"text{index}", "conversations": [
                {"from": "human", "value": f"there is {shapes.caption(scene)} . {question.lower()}"},
                {"from": "gpt", "value": answer}]}
            handle.write(json.dumps(record) + "\n")
    return path


# --- model and optimizer ------------------------------------------------------------------

def load_model(llm_dir: str | Path, mesh, rules=sharding.DEFAULT_RULES, *, dtype: str = "float32",
               remat_policy: str | None = None, scan_layers: bool | None = None
               ) -> tuple[LlamaForCausalLM, Any, dict]:
    """(model, fp32 params placed on the mesh by their logical axes, saved model_config).

    scan_layers: None keeps the folder's layer layout; True/False trains in that layout,
    converting the params once here (saved_layout turns them back for the saved folder).
    """
    saved = pretrained.read_model_config(llm_dir)
    if saved["model"] != "llama":
        raise ValueError(f"{Path(llm_dir) / pretrained.CONFIG_FILE}: field 'model' is "
                         f"{saved['model']!r}; the text stage trains a 'llama' model folder")
    changes = dict(dtype=dtype, param_dtype="float32")
    if remat_policy is not None:
        changes["remat_policy"] = remat_policy
    stored = LlamaForCausalLM(LlamaConfig.from_dict(saved["config"]).replace(**changes))
    params = pretrained.load_params(llm_dir, text_step.param_shardings(stored, mesh, rules),
                                    dtype=jnp.float32)
    if scan_layers is None or bool(scan_layers) == stored.config.scan_layers:
        return stored, params, saved
    model = LlamaForCausalLM(stored.config.replace(scan_layers=bool(scan_layers)))
    params = jax.jit(lambda p: with_layer_layout(p, model.config.num_layers, bool(scan_layers)),
                     out_shardings=text_step.param_shardings(model, mesh, rules))(params)
    return model, params, saved


def saved_layout(model: LlamaForCausalLM, saved: dict, host_params: Any) -> Any:
    """Host params in the layer layout of the folder the run started from."""
    return with_layer_layout(host_params, model.config.num_layers,
                             LlamaConfig.from_dict(saved["config"]).scan_layers)


def check_vocab(model: LlamaForCausalLM, tokenizer, llm_dir, tokenizer_dir) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but "
                         f"{Path(llm_dir) / pretrained.CONFIG_FILE} field 'config.vocab_size' is "
                         f"{model.config.vocab_size}; use the tokenizer the model was made with")


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

    from metamorph_jax.inference.text_cli import load_tokenizer

    check_config(config)
    work_dir = Path(config.work_dir)
    final_dir = work_dir / "final"
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; choose another config field 'work_dir'")
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(**config.mesh.to_dict())
    rules = sharding.DEFAULT_RULES
    tokenizer = load_tokenizer(config.tokenizer_dir)
    model, params, saved = load_model(config.llm_dir, mesh, rules, dtype=config.dtype,
                                      remat_policy=config.get("remat_policy"),
                                      scan_layers=config.get("scan_layers"))
    check_vocab(model, tokenizer, config.llm_dir, config.tokenizer_dir)
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
            if len(pending) >= log_every or step == steps:
                for logged_step, values in jax.device_get(pending):
                    values = {**values, "time_s": time.time() - start}
                    losses.append(float(values["loss"]))
                    if not math.isfinite(losses[-1]):
                        raise FloatingPointError(f"step {logged_step}: the loss is {losses[-1]}")
                    if writer is not None:
                        writer.write(logged_step, values)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{float(values['lr']):.2e}")
                pending.clear()
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    batches.bad_records.report(final=True)

    if is_main:
        host_params = saved_layout(model, saved, jax.device_get(state.params))
        pretrained.save_pretrained(final_dir, "llama", saved["config"], host_params,
                                   hf_config=saved.get("hf_config"))
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
