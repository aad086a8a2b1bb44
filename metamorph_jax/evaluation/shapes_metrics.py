"""Pure metric pieces of the Shapes evaluation (evaluation/shapes_eval.py, which documents
the metrics): exact-match VQA with its per-kind majority chance, token cosines, the
oracle's whole-image and per-attribute scores with their chance levels, and a Frechet
distance between two image sets in a fixed feature space.

Oracle scores (`oracle_scores`): data/shapes.read_shape reads each single-shape image;
`accuracy` counts colour, shape, size and position all right (as
generation_oracle_accuracy), `without_size` the first three, `attributes` each alone. Each attribute's chance level
is one over the world's number of values for it (`ATTRIBUTE_CHANCE`: colour 1/6, shape
1/3, size 1/2, position 1/9), derived from data/shapes.

Frechet feature space (`random_conv_features`), trained on nothing: a fixed random
convolutional network in numpy float64, its weights drawn once from
numpy.random.default_rng(FRECHET_SEED) (the same numbers on every machine; no JAX PRNG).
Images are resized to 32x32 (PIL bilinear), mapped to ink = 1 - pixel / 255 (white is 0),
then three 3x3 convolutions (3 -> 16 -> 32 -> 32 channels, zero padding, He-scaled
normal weights, no bias) each followed by ReLU and 2x2 average pooling, and a 1x1
projection to 4 channels: the 4x4x4 = 64 numbers, flattened, are an image's features
(the 4x4 grid keeps where things are, the channels what colour and outline they have).
The distance is evaluation/fid.py's Frechet distance of the two sets' feature means and
covariances. It is not FID (not Inception features) and its values compare only with
each other.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import shapes
from metamorph_jax.evaluation import fid

QUESTION_KINDS = (("colour", r"^What colour is the "), ("shape", r"^What shape is the "),
                  ("count_all", r"^How many shapes are there"), ("count_shape", r"^How many "),
                  ("position", r"^Where is the "), ("yesno", r"^Is there "))

ATTRIBUTES = ("colour", "shape", "size", "position")
ATTRIBUTE_VALUES = {"colour": tuple(shapes.COLOURS), "shape": tuple(shapes.SHAPES),
                    "size": tuple(shapes.SIZES), "position": tuple(shapes.POSITIONS)}
ATTRIBUTE_CHANCE = {name: 1.0 / len(values) for name, values in ATTRIBUTE_VALUES.items()}


# --- VQA, visual tokens and the whole-image oracle -----------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, surrounding white space and a final full stop dropped."""
    return text.strip().lower().rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def question_kind(question: str) -> str:
    text = question.replace(conv.IMAGE_PLACEHOLDER, "").strip()
    for kind, pattern in QUESTION_KINDS:
        if re.match(pattern, text):
            return kind
    raise ValueError(f"not a Shapes question: {question!r}")


def majority_answers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{question kind: most frequent answer} over (question, answer) pairs (ties: the
    alphabetically first)."""
    counts: dict[str, dict[str, int]] = {}
    for question, answer in pairs:
        kind_counts = counts.setdefault(question_kind(question), {})
        kind_counts[normalize_answer(answer)] = kind_counts.get(normalize_answer(answer), 0) + 1
    return {kind: sorted(c.items(), key=lambda item: (-item[1], item[0]))[0][0]
            for kind, c in counts.items()}


def blind_vqa_accuracy(train: Sequence[tuple[str, str]], held_out: Sequence[tuple[str, str]]
                       ) -> float:
    """Accuracy on `held_out` of the majority training answer of each question's kind."""
    majority = majority_answers(train)
    hits = [majority.get(question_kind(q)) == normalize_answer(a) for q, a in held_out]
    return float(np.mean(hits)) if hits else 0.0


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis of two [..., C] arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def mismatched_cosine(generated: np.ndarray, true: np.ndarray) -> float:
    """Mean cosine of prompt i's generated tokens with the true tokens of prompt i+1 (a
    cyclic shift): what the cosine is when the tokens do not depend on the prompt."""
    if len(generated) < 2:
        raise ValueError("the mismatched-pair chance level needs at least two prompts")
    return float(token_cosine(generated, np.roll(true, 1, axis=0)).mean())


def oracle_correct(pixels: np.ndarray, target: dict) -> bool:
    """The oracle reads colour, shape, size and position of `pixels` (uint8 HWC) as `target`
    says (issue 23 §2: all four right)."""
    reading = shapes.read_shape(pixels)
    return reading is not None and all(getattr(reading, name) == target[name]
                                       for name in ATTRIBUTES)


ORACLE_CHANCE = 1.0 / (len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.SIZES)
                       * len(shapes.POSITIONS))
# The score before issue 23 left the size out; kept to compare with earlier reports.
ORACLE_CHANCE_WITHOUT_SIZE = ORACLE_CHANCE * len(shapes.SIZES)


# --- the oracle, per attribute ----------------------------------------------------------------

def attribute_hits(pixels: np.ndarray, target: dict) -> dict[str, bool]:
    """{attribute: the oracle reads it as `target` says} for one single-shape image
    (uint8 HWC); every attribute is wrong when the oracle finds no shape."""
    reading = shapes.read_shape(pixels)
    return {name: reading is not None and getattr(reading, name) == target[name]
            for name in ATTRIBUTES}


def oracle_scores(images: Sequence[np.ndarray], targets: Sequence[dict]) -> dict:
    """The oracle on images against their one-shape targets: `accuracy` (colour, shape, size
    and position right), `without_size` (colour, shape and position), `attributes`
    {attribute: accuracy}. None everywhere when there are no images."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    if not len(images):
        return {"accuracy": None, "without_size": None, "attributes": None}
    hits = [attribute_hits(image, target) for image, target in zip(images, targets)]
    mean = lambda values: float(np.mean(values))   # noqa: E731
    return {"accuracy": mean([all(h.values()) for h in hits]),
            "without_size": mean([h["colour"] and h["shape"] and h["position"] for h in hits]),
            "attributes": {name: mean([h[name] for h in hits]) for name in ATTRIBUTES}}


# --- a Frechet distance in a fixed random feature space -------------------------------------

FRECHET_SEED = 0
FRECHET_SIZE = 32
_CHANNELS = (3, 16, 32, 32)
_PROJECTED = 4
FRECHET_FEATURE_SPACE = (f"random conv net (numpy seed {FRECHET_SEED}, {FRECHET_SIZE}x"
                         f"{FRECHET_SIZE} input, {(FRECHET_SIZE // 8) ** 2 * _PROJECTED} "
                         "features; evaluation/shapes_metrics.py)")


def _weights() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(FRECHET_SEED)
    kernels = [rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))
               for c_in, c_out in zip(_CHANNELS[:-1], _CHANNELS[1:])]
    projection = rng.standard_normal((_CHANNELS[-1], _PROJECTED)) / np.sqrt(_CHANNELS[-1])
    return kernels, projection


def _conv3x3_relu_pool(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    n, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    y = np.maximum(np.tensordot(windows, kernel, axes=([4, 5, 3], [0, 1, 2])), 0.0)
    return y.reshape(n, height // 2, 2, width // 2, 2, -1).mean(axis=(2, 4))


def random_conv_features(images: Sequence[np.ndarray], chunk: int = 64) -> np.ndarray:
    """[N, 64] float64 features of uint8 RGB images [N, H, W, 3] (any square size)."""
    from PIL import Image

    kernels, projection = _weights()
    out = []
    for start in range(0, len(images), chunk):
        batch = []
        for image in images[start:start + chunk]:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"expected uint8 RGB images [H, W, 3], got {image.dtype} "
                                 f"{image.shape}")
            if image.shape[:2] != (FRECHET_SIZE, FRECHET_SIZE):
                image = np.asarray(Image.fromarray(image).resize(
                    (FRECHET_SIZE, FRECHET_SIZE), Image.BILINEAR))
            batch.append(1.0 - image.astype(np.float64) / 255.0)
        x = np.stack(batch)
        for kernel in kernels:
            x = _conv3x3_relu_pool(x, kernel)
        out.append((x @ projection).reshape(len(x), -1))
    return np.concatenate(out) if out else np.zeros((0, (FRECHET_SIZE // 8) ** 2 * _PROJECTED))


def frechet_image_distance(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray]
                           ) -> float:
    """The Frechet distance of two image sets (each at least 2 images) in
    random_conv_features."""
    mu_a, sigma_a = fid.statistics(random_conv_features(images_a))
    mu_b, sigma_b = fid.statistics(random_conv_features(images_b))
    return fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
