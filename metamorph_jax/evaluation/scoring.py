"""Per-sample scoring: (sample, raw model answer) -> (extracted answer, score in [0, 1]).

Rules: "choice" (the extracted option letter equals the answer letter; MMMU extracts with
its own rule, "choice_mmmu"), "vqa" (VQA
accuracy over the human answers), "relaxed" (ChartQA's relaxed accuracy), "exact" (the
VQA-normalised answer equals one of the references: the generic short-answer rule).

An answer no option letter could be extracted from scores 0, except on MMMU, whose
harness answers it with a random option (`UnparsedGuesser`); either way results count it
as "unparsed".
"""
from __future__ import annotations

import random

from metamorph_jax.evaluation import answers
from metamorph_jax.evaluation.samples import Sample

RULES = ("choice", "choice_mmmu", "vqa", "relaxed", "exact")
# MMMU's eval_utils seeds Python's random module with 42 on import and, for each answer
# parse_multi_choice_response cannot parse, takes random.choice(all_choices).
MMMU_RANDOM_SEED = 42


def score_sample(rule: str, sample: Sample, raw: str) -> tuple[str | None, float]:
    raw = str(raw)
    if rule in ("choice", "choice_mmmu"):
        extract = answers.extract_choice if rule == "choice" else answers.extract_choice_mmmu
        letter = extract(raw, sample.choices)
        return letter, float(letter == sample.answer)
    stripped = raw.strip()
    if rule == "vqa":
        return answers.normalize_vqa(stripped), answers.vqa_accuracy(stripped, list(sample.answer))
    if rule == "relaxed":
        return stripped, float(answers.relaxed_match(stripped, str(sample.answer)))
    if rule == "exact":
        references = sample.answer if isinstance(sample.answer, list) else [sample.answer]
        predicted = answers.normalize_vqa(stripped)
        return predicted, float(any(answers.normalize_vqa(r) == predicted for r in references))
    raise ValueError(f"unknown scoring rule {rule!r}; choose one of {RULES}")


def rule_for(benchmark: str, sample: Sample) -> str:
    """The rule a benchmark scores `sample` with."""
    if benchmark == "textvqa":
        return "vqa"
    if benchmark == "chartqa":
        return "relaxed"
    if benchmark == "mmmu":
        return "choice_mmmu"
    return "choice" if sample.choices else "exact"


class UnparsedGuesser:
    """MMMU's rule for answers no option could be parsed from: a random option letter,
    drawn with random.choice over the sample's letters from one random.Random(42), in the
    order the unparsed answers are met (MMMU's order when the benchmark file is scored
    whole and in file order). Other benchmarks: no guess (the answer scores 0)."""

    def __init__(self, benchmark: str):
        self.rng = random.Random(MMMU_RANDOM_SEED) if benchmark == "mmmu" else None

    def __call__(self, sample: Sample) -> str | None:
        if self.rng is None or not sample.choices:
            return None
        return self.rng.choice(list(sample.choices))
