"""Finding 4's evaluation: does knowledge the LLM learnt from text alone reach generation?

For prompts that name a thing instead of its attribute ("a small shape the colour of grass
in the top left"; data/shapes_text.knowledge_prompts over the facts given, by default
HELD_OUT_FACTS, which no VPiT record holds), the work directory's MetaMorph generates an
image, the visualiser renders it, and the pixel oracle (data/shapes.read_shape) reads it
back. Scores, each with its prompt-blind chance level:

    fact_attribute_accuracy   the attribute the fact gives (grass -> colour green) read right
                              (chance: 1 / 6 for a colour, 1 / 3 for a shape)
    knowledge_oracle_accuracy every attribute the prompt fixes read right (colour facts:
                              colour, size, position; shape facts: shape, colour, size,
                              position); chance: the product of 1 / (number of values) over
                              those attributes, averaged over the prompts

The decoding and rendering are evaluation/shapes_eval.py's (load_models,
generated_image_tokens); the request wording is the training records' first
text-to-image wording (data/tasks.text_to_image_request).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax.data import shapes, shapes_text, tasks
from metamorph_jax.evaluation import shapes_eval

KNOWLEDGE_FILE = "knowledge_metrics.json"
# How many values each attribute the oracle reads can take (the chance levels).
ATTRIBUTE_VALUES = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES),
                    "size": len(shapes.SIZES), "position": len(shapes.POSITIONS)}


def reading_matches(reading, expected: dict) -> dict[str, bool]:
    """{attribute: read right} for every attribute `expected` fixes (reading None: none)."""
    return {name: reading is not None and getattr(reading, name) == value
            for name, value in expected.items()}


def prompt_chance(expected: dict) -> float:
    """The chance that a uniform guess gets every attribute of `expected` right."""
    return float(np.prod([1.0 / ATTRIBUTE_VALUES[name] for name in expected]))


def evaluate_knowledge(work_dir: str | Path, config: shapes_eval.ShapesEvalConfig,
                       visualizer_dir: str | Path | None = None,
                       facts: Sequence[shapes_text.Fact] = shapes_text.HELD_OUT_FACTS,
                       per_fact: int = 4, seed: int = 0,
                       out_dir: str | Path | None = None) -> dict:
    """Score the work directory's model on knowledge prompts (module docstring); writes
    OUT/knowledge_metrics.json (out_dir, default work_dir) and returns the metrics."""
    started = time.time()
    prompts = shapes_text.knowledge_prompts(facts, per_fact=per_fact, seed=seed)
    if not prompts:
        raise ValueError("finding 4's evaluation needs at least one fact and one prompt per fact")
    models = shapes_eval.load_models(work_dir, config, visualizer_dir)
    tokens = shapes_eval.generated_image_tokens(
        models, [tasks.text_to_image_request(p.caption) for p in prompts], config.batch_size)
    images = models.renderer.render(tokens)
    rows = []
    for prompt, pixels in zip(prompts, images):
        reading = shapes.read_shape(np.asarray(pixels))
        right = reading_matches(reading, prompt.expected)
        rows.append({"caption": prompt.caption, "thing": prompt.fact.thing,
                     "attribute": prompt.fact.attribute, "expected": prompt.expected,
                     "read": None if reading is None else dataclasses.asdict(reading),
                     "fact_attribute_right": right[prompt.fact.attribute],
                     "all_right": all(right.values())})
    by_thing: dict[str, list] = {}
    for row in rows:
        by_thing.setdefault(row["thing"], []).append(row["fact_attribute_right"])
    metrics = {
        "fact_attribute_accuracy": float(np.mean([r["fact_attribute_right"] for r in rows])),
        "fact_attribute_chance": float(np.mean(
            [1.0 / ATTRIBUTE_VALUES[p.fact.attribute] for p in prompts])),
        "knowledge_oracle_accuracy": float(np.mean([r["all_right"] for r in rows])),
        "knowledge_oracle_chance": float(np.mean([prompt_chance(p.expected) for p in prompts])),
        "fact_attribute_accuracy_by_thing": {k: float(np.mean(v)) for k, v in by_thing.items()},
        "counts": {"facts": len(facts), "prompts": len(prompts)},
        "facts": [f.thing for f in facts],
        "prompts": rows,
        "seconds": time.time() - started,
    }
    out_dir = Path(out_dir or work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / KNOWLEDGE_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
