"""A linear probe of a SigLIP tower's visual tokens on the Shapes world: what can an LLM
that reads these tokens read at all?

The features are the tower's VPiT visual tokens (SiglipVisionModel.visual_tokens: the
configured block's output before the post-layernorm -> grid reduction -> L2 norm),
flattened [num_tokens * width]. A ridge regression (closed form, numpy; inputs centred,
the penalty chosen by 5-fold cross-validation on the training scenes) maps them to one-hot
classes, and the prediction is the arg-max class. Fitted on the `train_split` scenes,
scored on the `test_split` scenes (the world's splits are disjoint by scene):

    colour, shape, size, position   single-shape scenes (text_to_image records whose
                                    "target" holds one shape): 6, 3, 2 and 9 classes
    cell_colour, cell_shape         every scene, each of the 9 grid cells: the colour
                                    (or "empty", 7 classes) and the shape (or "empty", 4)
                                    of what is in it, fitted on all cells and scored on
                                    the occupied cells of the test scenes (binding an
                                    attribute to a place, which multi-shape questions
                                    need; an occupied cell read as empty is wrong)

With `components` K > 0 the features are first projected on the top K principal directions
of the training scenes' features: whether an attribute lives in the directions that vary
most (what a small adapter and LLM meet first), not merely somewhere in the tokens.

The single-shape test set is small: the world holds 324 distinct single-shape scenes and
about a tenth of them fall in the test split (38 in configs/shapes.py's world), so one
scene is 2.6 points there; the cell probes score every test scene's shapes.

    python -m metamorph_jax.evaluation.probe --tower DIR --world WORLD [--train-split train]
        [--test-split test] [--components K] [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax import pretrained
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import shapes

EMPTY = "empty"
SINGLE_ATTRIBUTES = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES,
                     "size": tuple(shapes.SIZES), "position": shapes.POSITIONS}
CELL_ATTRIBUTES = {"cell_colour": (EMPTY, *shapes.COLOURS), "cell_shape": (EMPTY, *shapes.SHAPES)}
PENALTIES = tuple(10.0 ** k for k in range(-6, 4))


class ProbeError(ValueError):
    """A world or tower the probe cannot use (the message names the file and field)."""


# --- the ridge probe (pure numpy) ---------------------------------------------------------

def fit_ridge(features: np.ndarray, targets: np.ndarray, penalty: float):
    """(weights [d, k], feature mean [d], target mean [k]) minimising
    |(X - mx) W - (Y - my)|^2 + penalty |W|^2, in closed form (float64)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    # the dual form when there are fewer samples than features: the same W
    if xc.shape[0] < xc.shape[1]:
        gram = xc @ xc.T + penalty * np.eye(xc.shape[0])
        weights = xc.T @ np.linalg.solve(gram, yc)
    else:
        gram = xc.T @ xc + penalty * np.eye(xc.shape[1])
        weights = np.linalg.solve(gram, xc.T @ yc)
    return weights, x_mean, y_mean


def predict_ridge(model, features: np.ndarray) -> np.ndarray:
    weights, x_mean, y_mean = model
    return (np.asarray(features, np.float64) - x_mean) @ weights + y_mean


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """[n, groups] class indices -> [n, groups * classes] one-hot blocks."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    out = np.zeros((labels.shape[0], labels.shape[1], classes))
    np.put_along_axis(out, labels[..., None], 1.0, axis=-1)
    return out.reshape(labels.shape[0], -1)


def block_argmax(scores: np.ndarray, classes: int) -> np.ndarray:
    """[n, groups * classes] -> [n, groups] arg-max class per block."""
    return scores.reshape(scores.shape[0], -1, classes).argmax(-1)


def choose_penalty(features: np.ndarray, labels: np.ndarray, classes: int,
                   penalties: Sequence[float] = PENALTIES, folds: int = 5, seed: int = 0
                   ) -> float:
    """The penalty with the best k-fold accuracy on (features, labels) (first on ties)."""
    order = np.random.default_rng(seed).permutation(len(features))
    parts = np.array_split(order, min(folds, len(features)))
    best, best_accuracy = penalties[0], -1.0
    for penalty in penalties:
        hits = 0
        for part in parts:
            train = np.setdiff1d(order, part)
            model = fit_ridge(features[train], one_hot(labels[train], classes), penalty)
            predicted = block_argmax(predict_ridge(model, features[part]), classes)
            hits += int((predicted == labels[part].reshape(len(part), -1)).sum())
        accuracy = hits / labels.size
        if accuracy > best_accuracy:
            best, best_accuracy = penalty, accuracy
    return best


def probe_accuracy(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray,
                   test_labels: np.ndarray, classes: int, scored_from: int = 0) -> dict:
    """Fit on train (penalty by cross-validation), score on test: {accuracy, penalty,
    chance (the most frequent scored training class's share of the scored test labels),
    train, test (scenes), scored (labels)}. Only test labels >= `scored_from` are scored
    (1: the occupied cells, class 0 being "empty"); the prediction is over all classes."""
    train_labels = np.asarray(train_labels).reshape(len(train_labels), -1)
    test_labels = np.asarray(test_labels).reshape(len(test_labels), -1)
    penalty = choose_penalty(train_x, train_labels, classes)
    model = fit_ridge(train_x, one_hot(train_labels, classes), penalty)
    predicted = block_argmax(predict_ridge(model, test_x), classes)
    scored = test_labels >= scored_from
    counts = np.bincount(train_labels[train_labels >= scored_from], minlength=classes)
    majority = counts.argmax()
    return {"accuracy": float((predicted == test_labels)[scored].mean()), "penalty": penalty,
            "chance": float((test_labels[scored] == majority).mean()),
            "train": int(len(train_labels)), "test": int(len(test_labels)),
            "scored": int(scored.sum())}


# --- the world's scenes ---------------------------------------------------------------------

def world_scenes(world: str | Path, split: str) -> list[tuple[str, list[dict]]]:
    """[(image path, target shapes)] of the split's text_to_image records."""
    path = Path(world) / split / "text_to_image.jsonl"
    if not path.exists():
        raise ProbeError(f"{path} does not exist: {world} is not a Shapes world with a "
                         f"{split!r} split")
    scenes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        record = json.loads(line)
        target, images = record.get("target"), record.get("images")
        if not isinstance(target, list) or not target:
            raise ProbeError(f"{path}:{number}: field 'target' is {target!r}; the probe needs "
                             "the Shapes world's list of shapes")
        if not isinstance(images, list) or len(images) != 1:
            raise ProbeError(f"{path}:{number}: field 'images' is {images!r}; one image expected")
        scenes.append((str(Path(world) / images[0]), target))
    if not scenes:
        raise ProbeError(f"{path} holds no records")
    return scenes


def _index(values: Sequence[str], value, where: str) -> int:
    if value not in values:
        raise ProbeError(f"{where}: {value!r} is not one of {list(values)}")
    return list(values).index(value)


def scene_labels(target: list[dict], where: str) -> dict[str, np.ndarray]:
    """Labels of one scene: the single-shape attributes (when it holds one shape) and the
    9 cells' colour and shape classes."""
    labels = {}
    if len(target) == 1:
        for name, values in SINGLE_ATTRIBUTES.items():
            labels[name] = np.array([_index(values, target[0].get(name), f"{where}: field "
                                            f"'target[0].{name}'")])
    colours = np.zeros(len(shapes.POSITIONS), np.int64)
    kinds = np.zeros(len(shapes.POSITIONS), np.int64)
    for index, item in enumerate(target):
        cell = _index(shapes.POSITIONS, item.get("position"),
                      f"{where}: field 'target[{index}].position'")
        colours[cell] = _index(CELL_ATTRIBUTES["cell_colour"], item.get("colour"),
                               f"{where}: field 'target[{index}].colour'")
        kinds[cell] = _index(CELL_ATTRIBUTES["cell_shape"], item.get("shape"),
                             f"{where}: field 'target[{index}].shape'")
    labels["cell_colour"], labels["cell_shape"] = colours, kinds
    return labels


# --- the tower -----------------------------------------------------------------------------

def tower_features(tower_dir: str | Path, image_paths: Sequence[str],
                   batch_size: int = 64) -> np.ndarray:
    """The tower's visual tokens of the images, flattened: float32 [n, tokens * width]."""
    import jax

    from metamorph_jax.models.siglip import SiglipConfig, SiglipVisionModel
    saved = pretrained.read_model_config(tower_dir)
    if saved["model"] != "siglip":
        raise ProbeError(f"{tower_dir}: field 'model' is {saved['model']!r}, expected 'siglip'")
    config = SiglipConfig.from_dict(saved["config"])
    params = pretrained.load_params(tower_dir, dtype=np.float32)
    model = SiglipVisionModel(config)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.visual_tokens))
    out = []
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start:start + batch_size]
        pixels = np.stack([images_lib.load_image(path, config.image_size) for path in chunk])
        padded = np.concatenate([pixels, np.zeros((batch_size - len(chunk), *pixels.shape[1:]),
                                                  pixels.dtype)])   # one compiled shape
        out.append(np.asarray(run(params, padded))[:len(chunk)])
    tokens = np.concatenate(out)
    return tokens.reshape(len(tokens), -1)


def principal_projection(train_features: np.ndarray, components: int) -> np.ndarray:
    """[d, components]: the top principal directions of the (centred) training features."""
    centred = np.asarray(train_features, np.float64) - np.mean(train_features, 0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    if components > vt.shape[0]:
        raise ProbeError(f"components={components} is more than the features' "
                         f"{vt.shape[0]} directions")
    return vt[:components].T


def probe_tower(tower_dir: str | Path, world: str | Path, train_split: str = "train",
                test_split: str = "test", components: int = 0) -> dict:
    """{attribute: probe_accuracy(...)} for SINGLE_ATTRIBUTES and CELL_ATTRIBUTES
    (`components` > 0: on the top principal directions of the training features)."""
    data = {}
    for split in (train_split, test_split):
        scenes = world_scenes(world, split)
        labels = [scene_labels(target, f"{world}/{split}/text_to_image.jsonl scene {path}")
                  for path, target in scenes]
        data[split] = (tower_features(tower_dir, [path for path, _ in scenes]), labels)
    if components:
        projection = principal_projection(data[train_split][0], components)
        data = {split: (features @ projection, labels)
                for split, (features, labels) in data.items()}
    results = {}
    for name, classes in {**SINGLE_ATTRIBUTES, **CELL_ATTRIBUTES}.items():
        picked = {}
        for split, (features, labels) in data.items():
            rows = [i for i, label in enumerate(labels) if name in label]
            if not rows:
                raise ProbeError(f"{world}/{split}: no scene has a {name!r} label (single-"
                                 "shape scenes are needed)")
            picked[split] = (features[rows], np.stack([labels[i][name] for i in rows]))
        results[name] = probe_accuracy(*picked[train_split], *picked[test_split], len(classes),
                                       scored_from=1 if name in CELL_ATTRIBUTES else 0)
    return results


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per attribute, one column per tower."""
    towers = list(results)
    names = list(next(iter(results.values())))
    lines = ["| attribute | chance | " + " | ".join(towers) + " |",
             "|---|---|" + "---|" * len(towers)]
    for name in names:
        first = results[towers[0]][name]
        lines.append(f"| {name} | {first['chance']:.2f} | " + " | ".join(
            f"{results[t][name]['accuracy']:.2f}" for t in towers) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Linear probe of a SigLIP tower's visual "
                                     "tokens on the Shapes world (module docstring).")
    parser.add_argument("--tower", required=True, action="append",
                        help="a siglip model folder (repeat to compare towers)")
    parser.add_argument("--world", required=True, help="the Shapes world folder")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--components", type=int, default=0,
                        help="probe the top K principal directions only (0: all features)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {tower: probe_tower(tower, args.world, args.train_split, args.test_split,
                                  args.components)
               for tower in args.tower}
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
