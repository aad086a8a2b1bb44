"""The linear probe (evaluation/probe.py) on synthetic features whose answer is known by
construction, and its reading of a Shapes world's labels."""
import json

import numpy as np
import pytest

from metamorph_jax.evaluation import probe


def test_ridge_solves_a_linear_problem_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    w = rng.standard_normal((6, 3))
    y = x @ w + 2.0
    model = probe.fit_ridge(x, y, penalty=1e-9)
    np.testing.assert_allclose(model[0], w, atol=1e-6)
    np.testing.assert_allclose(probe.predict_ridge(model, x), y, atol=1e-6)
    # fewer samples than features: the dual form interpolates the training targets
    wide = rng.standard_normal((5, 40))
    model = probe.fit_ridge(wide, np.eye(5), penalty=1e-9)
    np.testing.assert_allclose(probe.predict_ridge(model, wide), np.eye(5), atol=1e-5)


def test_probe_reads_a_coded_attribute_and_not_an_absent_one():
    """Features code class c as a noisy vector m_c in 30 of 60 dimensions: the probe reads
    it on held-out samples. Labels independent of the features stay near chance."""
    rng = np.random.default_rng(1)
    classes = 5
    means = rng.standard_normal((classes, 30)) * 2.0

    def sample(n):
        labels = rng.integers(0, classes, n)
        features = np.concatenate([means[labels], np.zeros((n, 30))], 1)
        return features + 0.5 * rng.standard_normal((n, 60)), labels

    train_x, train_y = sample(300)
    test_x, test_y = sample(200)
    coded = probe.probe_accuracy(train_x, train_y, test_x, test_y, classes)
    assert coded["accuracy"] == 1.0 and coded["train"] == 300 and coded["test"] == 200
    absent = probe.probe_accuracy(train_x, rng.integers(0, classes, 300), test_x,
                                  rng.integers(0, classes, 200), classes)
    assert absent["accuracy"] < 0.35   # chance is 0.2


def test_grouped_labels_are_scored_per_group():
    # two groups (cells) of 3 classes; group g's class is coded in feature block g
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (400, 2))
    features = np.concatenate([np.eye(3)[labels[:, 0]], np.eye(3)[labels[:, 1]]], 1)
    features = features + 0.05 * rng.standard_normal(features.shape)
    result = probe.probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], 3)
    assert result["accuracy"] == 1.0
    assert probe.one_hot(np.array([[2, 0]]), 3).tolist() == [[0, 0, 1, 1, 0, 0]]
    # scoring only the labels >= 1 ("occupied"): a probe that reads class 0 only is wrong
    # on all of them
    blind = np.zeros_like(features)
    blind[:, 0] = (labels[:, 0] == 0)   # codes "group 0 is class 0", nothing else
    result = probe.probe_accuracy(blind[:300], labels[:300], blind[300:], labels[300:], 3,
                                  scored_from=1)
    assert result["scored"] == int((labels[300:] >= 1).sum())
    assert result["accuracy"] < 0.75


def test_scene_labels_and_a_bad_target_is_named(tmp_path):
    target = [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}]
    labels = probe.scene_labels(target, "x")
    assert labels["colour"].tolist() == [0] and labels["position"].tolist() == [0]
    assert labels["cell_colour"].tolist() == [1] + [0] * 8   # red, then empty cells
    two = target + [{"shape": "square", "colour": "blue", "size": "large", "position": "centre"}]
    labels = probe.scene_labels(two, "x")
    assert "colour" not in labels and labels["cell_shape"].tolist()[4] == 2
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "text_to_image.jsonl").write_text(
        json.dumps({"images": ["a.png"], "target": "a red circle"}) + "\n")
    with pytest.raises(probe.ProbeError, match="text_to_image.jsonl:1: field 'target'"):
        probe.world_scenes(tmp_path, "train")
    with pytest.raises(probe.ProbeError, match="field 'target\\[0\\].colour'"):
        probe.scene_labels([dict(target[0], colour="pink")], "w")


def test_principal_projection_keeps_the_dominant_directions():
    """An attribute coded in a low-variance direction is lost on the top components; one
    coded in the dominant direction is kept."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    loud = rng.standard_normal((400, 4)) * 10.0        # large variance, no information
    quiet = (labels[:, None] - 0.5) * 0.2 + 0.01 * rng.standard_normal((400, 1))
    features = np.concatenate([loud, quiet], 1)
    top = features @ probe.principal_projection(features[:300], 4)
    assert probe.probe_accuracy(features[:300], labels[:300], features[300:], labels[300:],
                                2)["accuracy"] == 1.0
    assert probe.probe_accuracy(top[:300], labels[:300], top[300:], labels[300:],
                                2)["accuracy"] < 0.7
    with pytest.raises(probe.ProbeError, match="components=9"):
        probe.principal_projection(features, 9)
