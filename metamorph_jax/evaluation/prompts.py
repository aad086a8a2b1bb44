"""Prompt text per benchmark, as lmms-eval words it, with `<image>` placeholders where the
images go (and `<video>` for a video's frames). Rendering into tokens is the chat
template's job (data/conversation.py generation_prompt_pieces / prompt_tokens).

`build_prompt(benchmark, sample)` returns (text, images in placeholder order). Images go
before the text, one `<image>` line each (lmms-eval's layout for single-stream models).
MMMU keeps its `<image k>` tags in the text and passes the images the question and options
name, in tag order (lmms-eval's default, non-interleaved MMMU prompt).
"""
from __future__ import annotations

import re

from metamorph_jax.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from metamorph_jax.evaluation.samples import Sample

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
MMBENCH_OPTIONS_HEADER = "There are several options:"
MVBENCH_INSTRUCTION = "Only give the best option.\n"
REALWORLDQA_INSTRUCTION = ("Please answer directly with only the letter of the correct option "
                           "and nothing else.")
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
    if benchmark == "mvbench":
        options = "".join(f"({letter}) {text}\n" for letter, text in sample.choices.items())
        return f"Question:{sample.question}\nOption:\n{options}{MVBENCH_INSTRUCTION}"
    if sample.choices:  # SEED, RealWorldQA, V*, MMVP, generic multiple choice
        question = sample.question
        if benchmark == "realworldqa":  # lmms-eval swaps the file's own instruction for its own
            question = question.replace(REALWORLDQA_INSTRUCTION, "").strip()
        return f"{question}\n{option_lines(sample.choices)}\n{MC_INSTRUCTION}"
    return f"{sample.question}\n{SHORT_INSTRUCTION}"  # TextVQA, ChartQA, generic short answer


def build_prompt(benchmark: str, sample: Sample) -> tuple[str, list]:
    text = question_text(benchmark, sample)
    if sample.video is not None:
        return f"{VIDEO_PLACEHOLDER}\n{text}", []
    images = list(sample.images)
    if benchmark == "mmmu":
        named = sorted({int(n) for n in _MMMU_TAG.findall(text)})
        if named and (named[0] < 1 or named[-1] > len(sample.images)):
            raise ValueError(f"{sample.where}: the question names images {named} but the "
                             f"row has {len(sample.images)} image(s)")
        images = [sample.images[n - 1] for n in named] if named else images
    return "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + text, images
