"""Prompt text per benchmark, as lmms-eval words it, with `<image>` placeholders where the
images go (and `<video>` for a video's frames). Rendering into tokens is the chat
template's job (data/conversation.py generation_prompt_pieces / prompt_tokens).

`build_prompt(benchmark, sample)` returns (text, images in placeholder order). Images go
before the question, one `<image>` line each, except for MMMU, whose `<image k>` tags
mark where each image belongs in the question (images never tagged go first).
"""
from __future__ import annotations

import re

from metamorph_jax.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from metamorph_jax.evaluation.samples import Sample

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
MMBENCH_OPTIONS_HEADER = "There are several options:"
_MMMU_TAG = re.compile(r"<image (\d+)>")


def option_lines(choices: dict) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in choices.items())


def question_text(benchmark: str, sample: Sample) -> str:
    """The text part of the prompt (no image placeholders)."""
    if benchmark == "mmbench":
        options = f"{MMBENCH_OPTIONS_HEADER}\n{option_lines(sample.choices)}"
        body = f"{sample.hint} {sample.question} {options}" if sample.hint else \
            f"{sample.question} {options}"
        return f"{body}\n{MC_INSTRUCTION}"
    if benchmark == "scienceqa":
        context = f"Context: {sample.hint}\n" if sample.hint else ""
        return f"{context}{sample.question}\n{option_lines(sample.choices)}\n{MC_INSTRUCTION}"
    if benchmark == "mmmu":
        return f"{sample.question}\n{option_lines(sample.choices)}\n\n{MC_INSTRUCTION}"
    if sample.choices:  # SEED, RealWorldQA, V*, MMVP, MV-Bench, generic multiple choice
        return f"{sample.question}\n{option_lines(sample.choices)}\n{MC_INSTRUCTION}"
    return f"{sample.question}\n{SHORT_INSTRUCTION}"  # TextVQA, ChartQA, generic short answer


def build_prompt(benchmark: str, sample: Sample) -> tuple[str, list]:
    text = question_text(benchmark, sample)
    if sample.video is not None:
        return f"{VIDEO_PLACEHOLDER}\n{text}", []
    if benchmark == "mmmu":
        order = []

        def place(match):
            number = int(match.group(1))
            if not 1 <= number <= len(sample.images):
                raise ValueError(f"{sample.where}: question names <image {number}> but the row "
                                 f"has {len(sample.images)} image(s)")
            order.append(number - 1)
            return IMAGE_PLACEHOLDER
        text = _MMMU_TAG.sub(place, text)
        untagged = [i for i in range(len(sample.images)) if i not in order]
        prefix = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in untagged)
        return prefix + text, [sample.images[i] for i in untagged + order]
    prefix = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in sample.images)
    return prefix + text, list(sample.images)
