"""The metrics the findings read, in one table: add a row to report a new field.

Every value comes from a run's own files: final_metrics.json (evaluation/shapes_eval.py)
and, for finding 4, knowledge_metrics.json (evaluation/knowledge_eval.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from metamorph_jax.evaluation.knowledge_eval import KNOWLEDGE_FILE

FINAL_FILE = "final_metrics.json"


@dataclasses.dataclass(frozen=True)
class Metric:
    field: str          # the key in the file
    label: str          # as the report and the figures name it
    chance: str | None  # the key of its prompt-blind chance level
    file: str = FINAL_FILE
    higher_is_better: bool = True
    # the chance level is computed from the run's own outputs (so it differs between runs)
    chance_per_run: bool = False
    # the key in the file's "counts" of the items the metric is a share of (for "k of N")
    denominator: str | None = None


# Held-out evaluation of every run (final_metrics.json).
METRICS = (
    Metric("vqa_accuracy", "VQA accuracy", "vqa_chance", denominator="questions"),
    Metric("visual_token_cosine", "visual-token cosine", "visual_token_cosine_chance",
           chance_per_run=True),
    Metric("generation_oracle_accuracy", "generation oracle accuracy", "generation_oracle_chance",
           denominator="single_shape_prompts"),
)
# The metrics that measure generation (findings 1 and 2's kinds row).
GENERATION_METRICS = ("visual_token_cosine", "generation_oracle_accuracy")
# Copied as they are (dicts): per-kind VQA accuracy, the evaluation's counts.
DETAILS = ("vqa_accuracy_by_kind", "counts")
# Knowledge prompts (finding 4, knowledge_metrics.json).
KNOWLEDGE_METRICS = (
    Metric("fact_attribute_accuracy", "fact attribute accuracy", "fact_attribute_chance",
           KNOWLEDGE_FILE, denominator="prompts"),
    Metric("knowledge_oracle_accuracy", "knowledge oracle accuracy", "knowledge_oracle_chance",
           KNOWLEDGE_FILE, denominator="prompts"),
)
KNOWLEDGE_DETAILS = ("fact_attribute_accuracy_by_thing", "counts")

BY_FIELD = {m.field: m for m in METRICS + KNOWLEDGE_METRICS}

# A metric whose chance level is the run's own also compares as its margin over that level
# (a token cosine at its chance does not depend on the prompt): "<field>_above_chance".
ABOVE_CHANCE = "_above_chance"
def with_margins(fields) -> tuple:
    """The fields, each followed by its margin over chance where its chance is per run."""
    return tuple(key for field in fields for key in (
        (field, field + ABOVE_CHANCE) if BY_FIELD[field].chance_per_run else (field,)))


# What the verdicts compare: generation (findings 1, 2's kinds) and every metric (2, 3).
GENERATION_COMPARISONS = with_margins(GENERATION_METRICS)
COMPARISONS = with_margins(m.field for m in METRICS)


def value(metrics: dict, key: str) -> float:
    """A field of `metrics` (a run's metrics as extract() gives them) or its derived margin
    over chance (ABOVE_CHANCE)."""
    if key.endswith(ABOVE_CHANCE):
        field = key[:-len(ABOVE_CHANCE)]
        return metrics[field] - metrics[BY_FIELD[field].chance]
    return metrics[key]


def label(key: str) -> str:
    if key.endswith(ABOVE_CHANCE):
        return f"{BY_FIELD[key[:-len(ABOVE_CHANCE)]].label} above its chance"
    return BY_FIELD[key].label


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def extract(values: dict, metrics=METRICS, details=DETAILS, where: str = "") -> dict:
    """{field: value, chance field: value, detail: value} of `values` (a metrics file's
    content); an error naming the file and the field when one is missing."""
    out = {}
    for metric in metrics:
        for key in (metric.field, metric.chance):
            if key is None:
                continue
            if key not in values:
                raise KeyError(f"{where}: field {key!r} is missing")
            out[key] = values[key]
    for key in details:
        if key in values:
            out[key] = values[key]
    return out


def run_metrics(work_dir: Path) -> dict:
    path = Path(work_dir) / FINAL_FILE
    return extract(read_json(path), where=str(path))


def knowledge_metrics(work_dir: Path) -> dict:
    path = Path(work_dir) / KNOWLEDGE_FILE
    return extract(read_json(path), KNOWLEDGE_METRICS, KNOWLEDGE_DETAILS, where=str(path))
