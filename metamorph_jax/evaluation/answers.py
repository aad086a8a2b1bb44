"""Answer extraction and normalisation rules of the evaluation harnesses.

* `extract_choice`: the option letter of a free-form multiple-choice answer (VLMEvalKit's
  `can_infer`: `can_infer_option`, then `can_infer_text`). Letters: after replacing the
  characters .()[],:;!*#{} by spaces, if exactly one of the option letters appears as a
  whole word, that letter, except an "A" followed by more than three words, which is read
  as the article (VLMEvalKit keeps a letter only among an answer's last four words).
  Otherwise (no letter, several letters, or the article) the option texts: if the answer is
  no longer than twice the options' text together and exactly one option's text occurs in
  it (case-insensitive), that option's letter; otherwise None (scored wrong). (VLMEvalKit's
  exact-matching mode only tries answers shorter than 10 characters; longer ones it leaves
  to an LLM judge. Here the rule is applied to every answer.)
* `extract_choice_mmmu`: MMMU's own rule, for MMMU.
* `normalize_vqa`: the VQA / TextVQA answer normalisation (EvalAI's answer processor):
  lower case, drop "," and "?", split "'s", strip punctuation (kept out of numbers like
  1,000 and 2.5), number words to digits, articles dropped, contractions restored.
* `vqa_accuracy`: min(1, matches / 3) averaged over the ten leave-one-out subsets of the
  human answers.
* `relaxed_match`: ChartQA's relaxed accuracy: numbers (a trailing % divides by 100) within
  5% of a non-zero target; anything else an exact case-insensitive match.
"""
from __future__ import annotations

import itertools
import re

import numpy as np

_SPLIT_CHARS = ".()[],:;!*#{}"


def extract_choice(answer: str, choices: dict) -> str | None:
    letter = _choice_by_letter(str(answer), choices)
    return letter if letter is not None else _choice_by_text(str(answer), choices)


def _choice_by_letter(answer: str, choices: dict) -> str | None:
    text = answer
    for char in _SPLIT_CHARS:
        text = text.replace(char, " ")
    words = text.split()
    present = [letter for letter in choices if letter in words]
    if len(present) != 1:
        return None  # no letter, or several named: left to the option texts
    letter = present[0]
    if letter == "A" and len(words) - 1 - words.index("A") > 3:
        return None  # "A cat sits on the mat": an article, not an answer
    return letter


def _choice_by_text(answer: str, choices: dict) -> str | None:
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [letter for letter, option in choices.items() if str(option).lower() in lowered]
    return found[0] if len(found) == 1 else None


_MMMU_STRIP = (",", ".", "!", "?", ";", ":", "'")


def extract_choice_mmmu(answer: str, choices: dict) -> str | None:
    """MMMU's own parsing rule (MMMU's eval_utils, as lmms-eval runs it): after stripping
    ,.!?;:' from both ends, candidates are letters written "(X)"; failing that "X " (a
    space after); failing that "X."; failing that, in answers of more than five words,
    options whose text occurs in the answer. Several candidates: the one whose mention
    comes last. None when nothing matches (MMMU then picks at random; here it scores 0)."""
    text = str(answer)
    for char in _MMMU_STRIP:
        text = text.strip(char)
    text = f" {text} "
    letters = list(choices)
    found = [c for c in letters if f"({c})" in text]
    bracketed = bool(found)
    if not found:
        found = [c for c in letters if f"{c} " in text]
    if not found:
        found = [c for c in letters if f"{c}." in text]
    by_text = False
    if not found and len(text.split()) > 5:
        found = [c for c in letters if str(choices[c]).lower() in text.lower()]
        by_text = True
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    if by_text:
        where = [text.lower().rfind(str(choices[c]).lower()) for c in found]
    elif bracketed:
        where = [text.rfind(f"({c})") for c in found]
    else:
        where = [text.rfind(f" {c} ") for c in found]
    return found[int(np.argmax(where))]


# --- VQA normalisation ---------------------------------------------------------------------

_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd "
    "it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've "
    "o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict:
    # Every spelling with some apostrophes left out maps to the full contraction.
    table = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        for kept in itertools.product((True, False), repeat=len(parts) - 1):
            if all(kept):
                continue
            spelled = parts[0] + "".join(("'" if k else "") + p for k, p in zip(kept, parts[1:]))
            table[spelled] = word
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # A mark beside a space (or any mark, once the text holds a digit-grouping comma) is
        # deleted; a mark inside a word ("x-ray") becomes a space.
        if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_vqa(answer: str) -> str:
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, human_answers: list) -> float:
    predicted = normalize_vqa(prediction)
    references = [normalize_vqa(a) for a in human_answers]
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1:]
        scores.append(min(1.0, sum(r == predicted for r in others) / 3.0))
    return sum(scores) / len(scores)


def _number(text: str):
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    predicted, expected = _number(prediction), _number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()
