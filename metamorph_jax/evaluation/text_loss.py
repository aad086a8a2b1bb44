"""Response-token loss and perplexity of a model folder over text-only conversation records
(the library side of eval.py).

Each record is rendered with the chat template exactly as in training (the loss covers
the assistant's tokens and end-of-turn tokens only), packed into fixed-shape batches
(packed records never attend to each other) and scored with the sharded eval step. The
mean is over tokens: total loss / total response tokens of a file, and over all files
together; perplexity = exp(mean loss). Unusable records (too long for --seq-len,
malformed, no response) are counted and listed in the results, never dropped silently; a
record with images stops the run (text stage only).

Processes: every process packs the same batches from every record (the packing is
deterministic) and contributes its own block of each batch's rows (batch_size / P of them)
to one global batch over the mesh of all processes' devices, so every process runs the
same number of steps and the sums are those of one process over the same batch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import jax

from metamorph_jax import pretrained, sharding
from metamorph_jax.data import pipeline
from metamorph_jax.data.sources import open_source
from metamorph_jax.data.text_records import check_text_only, text_batches
from metamorph_jax.input_errors import BadInput
from metamorph_jax.models.llama import abstract_boxed_params
from metamorph_jax.training import text_step


def evaluate(llm_dir: str | Path, tokenizer_dir: str | Path | None, data_paths: Sequence[str], *,
             template: str | None = None, seq_len: int = 2048, batch_size: int = 8,
             dtype: str = "float32", mesh_shape: Sequence[int] = (-1, 1, 1),
             progress: bool = True) -> dict:
    """Mean response-token loss and perplexity over the records of `data_paths`.

    tokenizer_dir: None reads the model folder's tokenizer. template: None renders with the
    model folder's own chat template (pretrained.chat_template), as training did.
    Returns {"mean_loss", "perplexity", "tokens", "records", "bad_records", "files":
    {path: the same per file}, and the settings}.
    """
    from tqdm import tqdm

    process, processes = jax.process_index(), jax.process_count()
    if batch_size % processes:
        raise BadInput(f"--batch-size {batch_size} does not split over {processes} "
                       f"processes; give a multiple of {processes}")
    local_rows = slice(process * batch_size // processes, (process + 1) * batch_size // processes)
    if not data_paths:
        raise BadInput("no data files given")
    for path in data_paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file {path} does not exist")
    mesh = sharding.make_mesh(*mesh_shape)
    rules = sharding.DEFAULT_RULES
    tokenizer_dir = tokenizer_dir or llm_dir
    tokenizer = pretrained.load_tokenizer(tokenizer_dir)
    template = template or pretrained.chat_template(llm_dir)
    model, params, _ = pretrained.load_llama(llm_dir, mesh, rules, dtype=dtype)
    pretrained.check_vocab(model.config.vocab_size, tokenizer, llm_dir, tokenizer_dir)
    param_shardings = sharding.logical_shardings(abstract_boxed_params(model), mesh, rules)
    eval_step = text_step.jit_eval_step(text_step.make_eval_step(model), mesh, param_shardings,
                                        rules)
    data_config = pipeline.DataConfig(seq_len=seq_len, batch_size=batch_size, template=template,
                                      num_epochs=1, shard_index=0, shard_count=1)

    files = {}
    for path in data_paths:
        batches = text_batches([pipeline.Source(str(path))], tokenizer, data_config)
        loss_sum, tokens, records = 0.0, 0, 0
        with tqdm(total=len(open_source(str(path))), desc=f"eval {Path(path).name}", unit="record",
                  disable=not progress or process != 0) as bar:
            for batch in batches:
                check_text_only(batch)
                rows = {k: v[local_rows] for k, v in text_step.text_batch(batch).items()}
                batch_sum, batch_count = jax.device_get(
                    eval_step(params, text_step.global_batch(rows, mesh, rules)))
                loss_sum += float(batch_sum)
                tokens += int(round(float(batch_count)))
                in_batch = int(batch["segment_ids"].max(axis=1).sum())   # records packed here
                records += in_batch
                bar.update(in_batch)
                if tokens:
                    bar.set_postfix(loss=f"{loss_sum / tokens:.4f}")
        batches.bad_records.report(final=True)
        files[str(path)] = _summary(loss_sum, tokens, records, batches.bad_records.as_dict())

    total_sum = sum(f["loss_sum"] for f in files.values())
    total_tokens = sum(f["tokens"] for f in files.values())
    if total_tokens == 0:
        raise BadInput(f"no response tokens to score in {list(data_paths)} "
                       "(every record was unusable or had no assistant turn)")
    bad: dict = {}
    for summary in files.values():
        for reason, entry in summary["bad_records"].items():
            merged = bad.setdefault(reason, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:3]
    result = _summary(total_sum, total_tokens, sum(f["records"] for f in files.values()), bad)
    result.update(files=files, llm=str(llm_dir), template=template, seq_len=seq_len)
    return result


def _summary(loss_sum: float, tokens: int, records: int, bad_records: dict) -> dict:
    mean = loss_sum / tokens if tokens else float("nan")
    return {"mean_loss": mean, "perplexity": math.exp(mean) if tokens else float("nan"),
            "tokens": tokens, "records": records, "loss_sum": loss_sum,
            "bad_records": bad_records}
