"""Text about the Shapes world: the corpus of the LLM `text` stage, and the table of world
knowledge that finding 4 tests (issue 23).

The corpus teaches a small LLaMA the language the VPiT records use before it sees an
image, as the paper's VPiT starts from a pretrained LLaMA-3. Every sentence uses the
world's own wording (data/shapes.py caption(), vqa(), edit(); the clip questions of its
video_qa records):

- captions of random scenes ("a scene with a small red circle in the top left and ...");
- questions about scenes described in words, with their answers, as plain text ("in a
  scene with ..., the colour of the circle is red.") and as chat turns (user: "A scene
  with ...\\nWhat colour is the circle?", assistant: "red"), every kind of vqa();
- edits ("before the edit there is ...; make the red circle in the top left blue; after
  the edit there is ...") and motions ("in a video, a small red circle in the left moves
  right to the right.", "Which way does the circle move?" -> "right");
- the knowledge FACTS linking everyday things to the world's colours and shapes ("grass
  is green", "What colour is grass?" -> "green", "a small shape the colour of grass in the
  top left is a small green shape in the top left."), each in several sentences.

Records are text-only LLaVA-style conversations (data/text_records.py): a chat record has
a user and an assistant turn (the loss covers the answer); a plain-text record is one
assistant turn, so the whole sentence is trained on, as in language-model pretraining.
Every record carries a "kind" field (caption, question_text, question_chat, edit_text,
edit_chat, motion_text, motion_chat, fact_text, fact_chat) that readers ignore.

Scenes: corpus scenes are drawn from the world's train split (shapes.split_of), the
evaluation questions (`write_eval`) from its test split, so "held-out scenes" are scenes
the corpus never describes.

Finding 4 (knowledge reaches generation): HELD_OUT_FACTS must never appear in a VPiT
record; only the text stage's corpus holds them, and `write_corpus(...,
held_out_facts=False)` leaves them out (the control). `knowledge_prompts` builds the
finding's generation prompts ("a small shape the colour of grass in the top left") with
the attributes the pixel oracle should read.

Command line::

    python -m metamorph_jax.data.shapes_text --out runs/shapes_text [--seed 0] \\
        [--scenes 4000] [--eval-scenes 300]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np

from metamorph_jax.data import shapes

# --- world knowledge -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fact:
    thing: str       # a noun phrase with its article as it stands in a sentence: "the sun"
    attribute: str   # "colour" or "shape"
    value: str       # a shapes.COLOURS or shapes.SHAPES name

    @property
    def noun(self) -> str:
        """The thing without its article ("sun"): the words a VPiT record must not hold."""
        return re.sub(r"^(a|an|the) ", "", self.thing)


def _facts(attribute: str, pairs: Sequence[tuple[str, str]]) -> tuple[Fact, ...]:
    return tuple(Fact(thing, attribute, value) for thing, value in pairs)


FACTS = _facts("colour", (
    ("grass", "green"), ("a leaf", "green"), ("a frog", "green"), ("a lime", "green"),
    ("the sky", "blue"), ("the sea", "blue"), ("a blueberry", "blue"), ("a sapphire", "blue"),
    ("the sun", "yellow"), ("a banana", "yellow"), ("a lemon", "yellow"),
    ("a stop sign", "red"), ("a strawberry", "red"), ("a tomato", "red"),
    ("a fire truck", "red"),
    ("a plum", "purple"), ("a grape", "purple"), ("a violet", "purple"),
    ("an aubergine", "purple"),
    ("a pumpkin", "orange"), ("a carrot", "orange"), ("a tangerine", "orange"),
)) + _facts("shape", (
    ("a coin", "circle"), ("a wheel", "circle"), ("a plate", "circle"),
    ("the full moon", "circle"),
    ("a dice", "square"), ("a box", "square"), ("a chessboard", "square"),
    ("a window", "square"),
    ("a slice of cheese", "triangle"), ("a slice of pizza", "triangle"),
    ("a pyramid", "triangle"), ("a tent", "triangle"),
))

# The facts finding 4 tests: one per colour and one per shape. They are only ever in the
# text stage's corpus, never in a VPiT record (tests/test_shapes_text.py scans the world).
HELD_OUT_THINGS = ("grass", "the sky", "the sun", "a stop sign", "a plum", "a pumpkin",
                   "a coin", "a dice", "a slice of cheese")
HELD_OUT_FACTS = tuple(f for f in FACTS if f.thing in HELD_OUT_THINGS)
TAUGHT_FACTS = tuple(f for f in FACTS if f.thing not in HELD_OUT_THINGS)


def _check_facts() -> None:
    things = [f.thing for f in FACTS]
    if len(set(things)) != len(things):
        raise ValueError("shapes_text.FACTS names a thing twice")
    if set(HELD_OUT_THINGS) - set(things):
        raise ValueError(f"HELD_OUT_THINGS not in FACTS: {sorted(set(HELD_OUT_THINGS) - set(things))}")
    for fact in FACTS:
        allowed = shapes.COLOURS if fact.attribute == "colour" else shapes.SHAPES
        if fact.value not in allowed:
            raise ValueError(f"fact {fact}: {fact.value!r} is not a world {fact.attribute}")


_check_facts()


def knowledge_phrase(fact: Fact, size: str, position: str, other: str) -> tuple[str, str]:
    """(phrase naming `fact.thing`, the same phrase in world words). `other` is the
    attribute the fact does not give: for a colour fact a shape name, or "shape" for none
    ("a small shape the colour of grass in the top left" -> "a small green shape in the
    top left"); for a shape fact a colour ("a large red shape like a coin in the centre"
    -> "a large red circle in the centre")."""
    if fact.attribute == "colour":
        return (f"a {size} {other} the colour of {fact.thing} in the {position}",
                f"a {size} {fact.value} {other} in the {position}")
    return (f"a {size} {other} shape like {fact.thing} in the {position}",
            f"a {size} {other} {fact.value} in the {position}")


@dataclasses.dataclass(frozen=True)
class KnowledgePrompt:
    caption: str       # what to draw, naming the fact's thing instead of its attribute
    expected: dict     # the attributes the pixel oracle should read (shape absent: any)
    fact: Fact


def knowledge_prompts(facts: Sequence[Fact] = HELD_OUT_FACTS, per_fact: int = 4,
                      seed: int = 0) -> list[KnowledgePrompt]:
    """Finding 4's generation prompts: `per_fact` single-shape captions per fact, with
    seeded sizes, positions and (shape facts) colours. A colour fact leaves the shape
    open ("a small shape the colour of grass in the top left": colour, size and position
    expected); a shape fact names a colour ("a large blue shape like a coin in the
    centre": all four expected). Wrap a caption with tasks.text_to_image_request."""
    rng = np.random.default_rng(seed)
    prompts = []
    for fact in facts:
        for _ in range(per_fact):
            size = list(shapes.SIZES)[rng.integers(len(shapes.SIZES))]
            position = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
            expected = {"size": size, "position": position, fact.attribute: fact.value}
            if fact.attribute == "colour":
                other = "shape"
            else:
                other = list(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))]
                expected["colour"] = other
            caption, _ = knowledge_phrase(fact, size, position, other)
            prompts.append(KnowledgePrompt(caption, expected, fact))
    return prompts


def fact_records(fact: Fact, rng) -> list[dict]:
    """The sentences of one fact: statements, a question answered in plain text and as
    chat, and two knowledge phrases over random sizes and positions resolved into world
    words."""
    attribute, value, thing = fact.attribute, fact.value, fact.thing
    question = f"What {attribute} is {thing}?"
    if attribute == "colour":
        statements = [f"{thing} is {value}.", f"the colour of {thing} is {value}.",
                      f"a shape the colour of {thing} is a {value} shape."]
    else:
        statements = [f"{thing} is a {value}.", f"the shape of {thing} is a {value}.",
                      f"a shape like {thing} is a {value}."]
    records = [_plain("fact_text", s) for s in statements]
    records.append(_plain("fact_text", f"{question} {value}"))
    records.append(_chat("fact_chat", question, value))
    for _ in range(2):
        size = list(shapes.SIZES)[rng.integers(len(shapes.SIZES))]
        position = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
        other = (list(shapes.SHAPES) + ["shape"])[rng.integers(len(shapes.SHAPES) + 1)] \
            if attribute == "colour" else list(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))]
        phrase, resolved = knowledge_phrase(fact, size, position, other)
        records.append(_plain("fact_text", f"{phrase} is {resolved}."))
    return records


# --- scenes in words -------------------------------------------------------------------------

# vqa()'s questions -> (kind, the statement they ask about). Kinds as in
# evaluation/shapes_eval.py's QUESTION_KINDS.
_STATEMENTS = (
    ("colour", r"^What colour is the (\w+)\?$", "the colour of the {0} is {a}"),
    ("shape", r"^What shape is the (\w+) object\?$", "the {0} object is a {a}"),
    ("count_all", r"^How many shapes are there\?$", "the number of shapes is {a}"),
    ("count_shape", r"^How many (\w+) are there\?$", "the number of {0} is {a}"),
    ("position", r"^Where is the (\w+ \w+)\?$", "the {0} is in the {a}"),
    ("yesno", r"^Is there a (\w+ \w+)\?$", None),
)
QUESTION_KINDS = tuple(kind for kind, _, _ in _STATEMENTS)


def question_statement(question: str, answer: str) -> tuple[str, str]:
    """(kind, the answer as a statement) of one of shapes.vqa()'s questions."""
    for kind, pattern, template in _STATEMENTS:
        match = re.match(pattern, question)
        if match:
            if kind == "yesno":
                return kind, f"there is {'a' if answer == 'yes' else 'no'} {match.group(1)}"
            return kind, template.format(*match.groups(), a=answer)
    raise ValueError(f"not a Shapes question: {question!r}")


def _plain(kind: str, text: str, **extra) -> dict:
    return {"kind": kind, **extra, "conversations": [{"from": "gpt", "value": text}]}


def _chat(kind: str, user: str, answer: str, **extra) -> dict:
    return {"kind": kind, **extra, "conversations": [{"from": "human", "value": user},
                                                     {"from": "gpt", "value": answer}]}


def scene_prompt(scene) -> str:
    return f"A scene with {shapes.caption(scene)}."


def question_records(scene, rng, count: int) -> list[dict]:
    """`count` vqa() questions about `scene` as chat, and the first also as plain text.
    (Plain text trains on every token, most of them the scene's random description; the
    chat records' loss is on the answers alone, so they carry most questions.)"""
    records = []
    for index in range(count):
        question, answer = shapes.vqa(scene, rng)
        kind, statement = question_statement(question, answer)
        if index == 0:
            records.append(_plain("question_text",
                                  f"in a scene with {shapes.caption(scene)}, {statement}.",
                                  question_kind=kind))
        records.append(_chat("question_chat", f"{scene_prompt(scene)}\n{question}", answer,
                             question_kind=kind))
    return records


def edit_records(scene, rng) -> list[dict]:
    instruction, edited = shapes.edit(scene, rng)
    before, after = shapes.caption(scene), shapes.caption(edited)
    return [_plain("edit_text", f"before the edit there is {before}; {instruction}; "
                                f"after the edit there is {after}."),
            _chat("edit_chat", f"{scene_prompt(scene)}\n{instruction}", f"a scene with {after}.")]


def motion_records(rng) -> list[dict]:
    """A clip of the world (shapes.random_clip): the shape crosses the grid in its
    direction, from one edge to the other."""
    item, direction = shapes.random_clip(rng)
    d_row, d_col = shapes.DIRECTIONS[direction]
    row, col = divmod(item.cell, shapes.GRID)
    end = shapes.POSITIONS[(row + d_row * (shapes.GRID - 1)) * shapes.GRID
                           + col + d_col * (shapes.GRID - 1)]
    return [_plain("motion_text", f"in a video, {item.describe()} moves {direction} "
                                  f"to the {end}."),
            _chat("motion_chat", f"In a video, {item.describe()} moves to the {end}.\n"
                                 f"Which way does the {item.shape} move?", direction)]


def _scenes(rng, count: int, split: str) -> list:
    return shapes._sample_unique(rng, count, split, lambda: shapes.random_scene(rng),
                                 shapes.scene_key)


def corpus(seed: int = 0, scenes: int = 4000, questions_per_scene: int = 4,
           motions: int = 1000, fact_repeats: int = 48, held_out_facts: bool = True
           ) -> list[dict]:
    """The text stage's records, shuffled, deterministic from `seed`: per train-split
    scene a caption, `questions_per_scene` questions (chat, the first also plain text;
    question_records) and an edit (plain
    and chat); `motions` clips (plain and chat); every fact's sentences
    (`fact_records`) `fact_repeats` times with fresh phrases. held_out_facts=False leaves
    HELD_OUT_FACTS out (finding 4's control); everything else is the same."""
    rng = np.random.default_rng([seed, 23])
    records = []
    for scene in _scenes(rng, scenes, "train"):
        records.append(_plain("caption", f"a scene with {shapes.caption(scene)}."))
        records += question_records(scene, rng, questions_per_scene)
        records += edit_records(scene, rng)
    for _ in range(motions):
        records += motion_records(rng)
    facts_rng = np.random.default_rng([seed, 24])   # the same scene text with or without
    for _ in range(fact_repeats):
        for fact in FACTS:
            fact_text = fact_records(fact, facts_rng)
            if held_out_facts or fact not in HELD_OUT_FACTS:
                records += fact_text
    order = np.random.default_rng([seed, 25]).permutation(len(records))
    return [dict(records[i], id=f"text-{n}") for n, i in enumerate(order)]


def eval_records(seed: int = 0, scenes: int = 300) -> list[dict]:
    """Chat questions about test-split scenes (scenes no corpus describes), one per
    scene, kinds drawn as vqa() draws them; then one chat question per fact. For measuring
    answer-token accuracy of a text-stage model."""
    rng = np.random.default_rng([seed, 26])
    records = []
    for index, scene in enumerate(_scenes(rng, scenes, "test")):
        question, answer = shapes.vqa(scene, rng)
        kind, _ = question_statement(question, answer)
        records.append(_chat("question_chat", f"{scene_prompt(scene)}\n{question}", answer,
                             question_kind=kind, id=f"eval-scene-{index}"))
    for index, fact in enumerate(FACTS):
        records.append(_chat("fact_chat", f"What {fact.attribute} is {fact.thing}?", fact.value,
                             held_out_fact=fact in HELD_OUT_FACTS, id=f"eval-fact-{index}"))
    return records


def write_jsonl(records: Sequence[dict], path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


CORPUS_FILE = "corpus.jsonl"
CONTROL_FILE = "corpus_without_held_out_facts.jsonl"
EVAL_FILE = "eval.jsonl"


def write_text_world(out, seed: int = 0, scenes: int = 4000, eval_scenes: int = 300) -> dict:
    """OUT/corpus.jsonl (with every fact), OUT/corpus_without_held_out_facts.jsonl (finding
    4's control) and OUT/eval.jsonl (held-out scenes and the facts); returns the counts."""
    counts = {}
    for name, records in ((CORPUS_FILE, corpus(seed, scenes)),
                          (CONTROL_FILE, corpus(seed, scenes, held_out_facts=False)),
                          (EVAL_FILE, eval_records(seed, eval_scenes))):
        write_jsonl(records, os.path.join(os.fspath(out), name))
        counts[name] = len(records)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the Shapes world's text corpus.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--eval-scenes", type=int, default=300)
    args = parser.parse_args(argv)
    print(json.dumps(write_text_world(args.out, args.seed, args.scenes, args.eval_scenes),
                     indent=1))


if __name__ == "__main__":
    main()
