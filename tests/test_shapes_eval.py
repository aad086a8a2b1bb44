"""The Shapes evaluation's metric pieces on hand-made cases (the oracle on drawn images,
exact match, cosine, the chance levels), and train.py's default config."""
import numpy as np
import pytest

import train
from metamorph_jax.data import shapes
from metamorph_jax.evaluation import shapes_eval as se


def test_the_oracle_scores_a_drawn_shape_right_only_against_its_own_description():
    item = shapes.Shape("triangle", "blue", "large", 2)
    pixels = shapes.render_scene((item,), 32)
    target = item.to_dict()
    assert se.oracle_correct(pixels, target)
    for field, other in (("colour", "red"), ("shape", "circle"), ("position", "bottom"),
                         ("size", "small")):
        assert not se.oracle_correct(pixels, dict(target, **{field: other}))
    # a blank image is never right
    assert not se.oracle_correct(np.full((32, 32, 3), 255, np.uint8), target)


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("cell", [0, 4, 8])
def test_the_oracle_reads_every_shape_in_corner_and_centre_cells(shape, cell):
    item = shapes.Shape(shape, "green", "large", cell)
    assert se.oracle_correct(shapes.render_scene((item,), 32), item.to_dict())


def test_exact_match_ignores_case_space_and_a_final_stop_only():
    assert se.exact_match(" Red.", "red")
    assert se.exact_match("top left", "Top left")
    assert not se.exact_match("red circle", "red")
    assert not se.exact_match("", "no")
    assert not se.exact_match("top", "top left")


def test_token_cosine_on_hand_made_vectors():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    np.testing.assert_allclose(se.token_cosine(a, b), [0.0, 1.0, -1.0], atol=1e-12)
    # [1, 2] . [2, 1] / (sqrt5 * sqrt5) = 4 / 5
    np.testing.assert_allclose(se.token_cosine([1.0, 2.0], [2.0, 1.0]), 0.8, atol=1e-12)


def test_the_mismatched_pair_chance_pairs_each_prompt_with_another_image():
    generated = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])   # [prompts, tokens, C]
    true = generated.copy()
    assert se.token_cosine(generated, true).mean() == 1.0
    assert se.mismatched_cosine(generated, true) == 0.0
    with pytest.raises(ValueError):
        se.mismatched_cosine(generated[:1], true[:1])


def test_question_kinds_cover_every_question_the_world_asks():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        question, _ = shapes.vqa(shapes.random_scene(rng), rng)
        seen.add(se.question_kind("<image>\n" + question))
    assert seen == {kind for kind, _ in se.QUESTION_KINDS}
    with pytest.raises(ValueError, match="not a Shapes question"):
        se.question_kind("Why?")


def test_the_blind_vqa_chance_answers_the_majority_of_each_kind():
    train_pairs = [("Is there a red circle?", "no"), ("Is there a blue square?", "no"),
                   ("Is there a red square?", "yes"), ("What colour is the circle?", "red"),
                   ("What colour is the square?", "blue"), ("What colour is the circle?", "blue")]
    assert se.majority_answers(train_pairs) == {"yesno": "no", "colour": "blue"}
    held_out = [("Is there a green circle?", "no"), ("Is there a red circle?", "yes"),
                ("What colour is the triangle?", "blue"), ("What colour is the circle?", "red")]
    assert se.blind_vqa_accuracy(train_pairs, held_out) == 0.5


def test_final_eval_fields_are_checked():
    with pytest.raises(ValueError, match="final_eval.*nope"):
        se.ShapesEvalConfig.from_config({"nope": 1})
    with pytest.raises(ValueError, match="final_eval.max_frechet_prompts' = 1: .*at least 2"):
        se.ShapesEvalConfig.from_config({"max_frechet_prompts": 1})


def test_train_py_runs_configs_shapes_by_default():
    argv = train.with_default_config(["train.py", "--workdir", "w"])
    assert argv[1:3] == ["--config", str(train.DEFAULT_CONFIG)]
    assert train.DEFAULT_CONFIG.name == "shapes.py" and train.DEFAULT_CONFIG.is_file()
    given = ["train.py", "--config", "configs/tiny.py"]
    assert train.with_default_config(given) == given


def test_the_tiny_assets_world_has_test_clips_with_video_records(tiny_assets):
    """tiny.ensure_assets writes test clips (a quarter of the training clips, as for
    validation), so the test split has video records for the evaluation to score."""
    import json

    from metamorph_jax.data import tasks
    world = json.loads((tiny_assets / "shapes" / "world.json").read_text())
    clips = dict(map(tuple, world["config"]["clips"]))
    assert clips["test"] == clips["validation"] == max(1, clips["train"] // 4)
    records = [json.loads(line) for line in
               (tiny_assets / "shapes" / "test" / "video.jsonl").read_text().splitlines()]
    assert len(records) == clips["test"] * len(tasks.VIDEO_KINDS)   # 4 frames: every kind
    assert all(record["targets"] for record in records)


def test_assets_made_with_other_world_settings_are_refused_naming_the_fields(tmp_path):
    """A world kept from an older config (other image size or scene counts) is an input
    error naming world.json and the fields, not a run on the wrong data."""
    import ml_collections
    from metamorph_jax import tiny
    from metamorph_jax.input_errors import BadInput
    assets = ml_collections.ConfigDict(dict(kind="tiny_shapes", root=str(tmp_path), image_size=16,
                                            train=6, validation=2, test=0, clips=2, seed=0))
    tiny.ensure_assets(assets)
    tiny.ensure_assets(assets)   # the same settings: reused
    assets.image_size = 32
    assets.train = 7
    with pytest.raises(BadInput, match=r"world\.json: field\(s\) \['image_size', 'scenes'\]"):
        tiny.ensure_assets(assets)
