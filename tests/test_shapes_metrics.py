"""The Shapes evaluation's new metric pieces on hand-made cases: the oracle per attribute on
drawn images, the attribute chance levels from the world's own values, the Frechet distance
in the fixed random feature space, and which edit / video records are scored with which
prompt (the training record's own tokens up to the predicted image)."""
import itertools
import json

import numpy as np
import pytest

from metamorph_jax import tiny
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import shapes
from metamorph_jax.data.testing import build_tiny_tokenizer
from metamorph_jax.evaluation import shapes_eval as se
from metamorph_jax.evaluation import shapes_metrics as sm
from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.models.metamorph import MetaMorphConfig

ITEM = shapes.Shape("triangle", "blue", "large", 2)


def test_the_oracle_scores_each_attribute_of_a_drawn_shape_on_its_own():
    pixels = shapes.render_scene((ITEM,), 32)
    right = ITEM.to_dict()
    assert sm.oracle_scores([pixels], [right]) == {
        "accuracy": 1.0, "without_size": 1.0,
        "attributes": {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0}}
    for name, other in (("colour", "red"), ("shape", "circle"), ("size", "small"),
                        ("position", "bottom")):
        scores = sm.oracle_scores([pixels], [dict(right, **{name: other})])
        assert scores["attributes"] == {k: float(k != name) for k in sm.ATTRIBUTES}, name
        # `accuracy` is generation_oracle_accuracy's rule: all four attributes count
        assert scores["accuracy"] == 0.0
        assert not se.oracle_correct(pixels, dict(right, **{name: other}))
        # the score reported before issue 23 leaves the size out
        assert scores["without_size"] == float(name == "size")
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert sm.oracle_scores([blank], [right])["attributes"] == dict.fromkeys(sm.ATTRIBUTES, 0.0)
    # two images: the means
    two = sm.oracle_scores([pixels, blank], [right, right])
    assert two["accuracy"] == 0.5 and two["attributes"]["size"] == 0.5
    assert sm.oracle_scores([], []) == {"accuracy": None, "without_size": None,
                                        "attributes": None}
    with pytest.raises(ValueError, match="1 images for 2 targets"):
        sm.oracle_scores([pixels], [right, right])


def test_each_attribute_chance_is_a_fixed_guess_s_accuracy_over_every_one_shape_scene():
    scenes = [shapes.Shape(*values) for values in itertools.product(
        shapes.SHAPES, shapes.COLOURS, shapes.SIZES, range(shapes.GRID * shapes.GRID))]
    for name in sm.ATTRIBUTES:
        guess = getattr(scenes[0], name)
        hits = [getattr(scene, name) == guess for scene in scenes]
        assert sm.ATTRIBUTE_CHANCE[name] == pytest.approx(np.mean(hits)), name
    # and the whole-image oracle's chance is the product over the four (three without size)
    assert sm.ORACLE_CHANCE == pytest.approx(np.prod([sm.ATTRIBUTE_CHANCE[name]
                                                      for name in sm.ATTRIBUTES]))
    assert sm.ORACLE_CHANCE_WITHOUT_SIZE == pytest.approx(
        sm.ORACLE_CHANCE / sm.ATTRIBUTE_CHANCE["size"])


def _scenes(seed: int, count: int, max_objects: int = 3, size: int = 32) -> list:
    rng = np.random.default_rng(seed)
    return [shapes.render_scene(shapes.random_scene(rng, max_objects), size)
            for _ in range(count)]


def test_the_frechet_distance_is_zero_for_one_set_symmetric_and_grows_with_the_difference():
    a, b = _scenes(0, 60), _scenes(1, 60)
    singles = _scenes(2, 60, max_objects=1)
    # Equal up to rounding: 60 images leave the 64-d covariances singular, whose zero
    # eigenvalues come out at +-1e-16 and their square roots at 1e-8.
    ab, ba = sm.frechet_image_distance(a, b), sm.frechet_image_distance(b, a)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-7)
    assert abs(sm.frechet_image_distance(a, a)) < 1e-6 * ab
    # two draws of the same scenes are closer than scenes of one shape, and than blanks
    assert ab < sm.frechet_image_distance(a, singles)
    blank = [np.full_like(a[0], 255)] * 60
    assert sm.frechet_image_distance(a, singles) < sm.frechet_image_distance(a, blank)


def test_the_frechet_features_are_fixed_and_do_not_depend_on_batching_or_image_size():
    images = _scenes(3, 5)
    features = sm.random_conv_features(images)
    assert features.shape == (5, 64) and features.dtype == np.float64
    np.testing.assert_array_equal(features, sm.random_conv_features(images))
    np.testing.assert_allclose(sm.random_conv_features(images, chunk=2), features, atol=1e-12)
    # white is zero ink: a blank image has no features at all
    assert not sm.random_conv_features([np.full((32, 32, 3), 255, np.uint8)]).any()
    # another size is resized to 32x32 first (PIL bilinear)
    assert sm.random_conv_features(_scenes(3, 5, size=64)).shape == (5, 64)
    with pytest.raises(ValueError, match="uint8 RGB"):
        sm.random_conv_features([np.zeros((32, 32, 3), np.float32)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    shapes.write_world(str(out), shapes.WorldConfig(
        seed=1, image_size=16, scenes=(("train", 4), ("validation", 4), ("test", 40)),
        clips=(("train", 1), ("validation", 1), ("test", 2))), progress=False)
    return out


def _read(world, kind):
    return [json.loads(line) for line in (world / "test" / f"{kind}.jsonl").read_text().splitlines()]


def test_edit_and_video_cases_are_the_records_whose_first_predicted_image_has_one_shape(world):
    edits, video = _read(world, "image_to_image"), _read(world, "video")
    cases, reason = se.frame_cases(edits, "image_to_image", "i2i.jsonl")
    assert reason is None
    assert [c.record_id for c in cases] == [r["id"] for r in edits if len(r["target"]) == 1]
    assert 0 < len(cases) < len(edits)
    for case in cases:
        record = next(r for r in edits if r["id"] == case.record_id)
        assert case.prompt_images == (record["images"][0],)
        assert case.true_image == record["images"][1] and case.target == record["target"][0]
        assert case.reply_prefix in ("Here is the edited image: ", "")
    cases, reason = se.frame_cases(video, "video", "video.jsonl")
    assert reason is None and len(cases) == len(video) == 2 * len(shapes_kinds(video))
    for case, record in zip(cases, video):
        shown = record["conversations"][0]["value"].count(conv.IMAGE_PLACEHOLDER)
        assert case.prompt_images == tuple(record["images"][:shown])
        assert case.true_image == record["images"][shown]
        assert case.target == record["targets"][0][0] and case.reply_prefix == ""


def shapes_kinds(video):
    return {r["id"].rsplit("-", 1)[1] for r in video}


def test_a_world_without_video_targets_or_records_gives_no_cases_and_says_why(world):
    video = [{k: v for k, v in r.items() if k != "targets"} for r in _read(world, "video")]
    cases, reason = se.frame_cases(video, "video", "old/video.jsonl")
    assert cases == [] and "old/video.jsonl" in reason and "'targets'" in reason
    cases, reason = se.frame_cases([], "video", "old/video.jsonl")
    assert cases == [] and reason.startswith("old/video.jsonl has no records (")
    assert "delete the world folder" in reason
    # a record without the field among records with it is bad input, named
    mixed = _read(world, "video")[:1] + video[:1]
    with pytest.raises(ValueError, match="old/video.jsonl: record .*'targets'"):
        se.frame_cases(mixed, "video", "old/video.jsonl")
    short = [dict(r, images=r["images"][:1]) for r in _read(world, "image_to_image")]
    with pytest.raises(ValueError, match="i2i.jsonl: record .*field 'images' needs"):
        se.frame_cases(short, "image_to_image", "i2i.jsonl")


def test_an_edit_or_video_prompt_is_the_training_record_s_tokens_up_to_its_image(world):
    """vpit_generate.image_prompt with the record's images and reply prefix: exactly the
    rendered training record up to and including the predicted image's <image_start>."""
    tokenizer = build_tiny_tokenizer(tiny._shapes_words(world))
    ids = conv.add_image_tokens(tokenizer)
    config = MetaMorphConfig(llm=tiny.tiny_llama_config(tokenizer), vision=tiny.tiny_siglip_config(),
                             num_image_tokens=4, image_start_id=ids.image_start_id,
                             image_end_id=ids.image_end_id)
    for kind in ("image_to_image", "video"):
        records = _read(world, kind)
        cases, _ = se.frame_cases(records, kind, kind)
        assert cases
        for case in cases:
            record = next(r for r in records if r["id"] == case.record_id)
            rendered = conv.render(conv.parse_record(record, where=kind, image_root=str(world)),
                                   tokenizer, ids, num_image_tokens=4)
            shown = len(case.prompt_images)
            images = [np.zeros((16, 16, 3), np.float32)] * shown
            prompt = vg.image_prompt(case.request, tokenizer, "llama3", config, ids.placeholder_id,
                                     images=images, reply_prefix=case.reply_prefix)
            # the predicted image's <image_start>: where the first vision target is (the
            # hidden state there predicts the image's first token)
            start = int(np.flatnonzero(rendered["vision_mask"])[0])
            assert rendered["tokens"][start] == ids.image_start_id
            np.testing.assert_array_equal(prompt.tokens, rendered["tokens"][:start + 1])
            np.testing.assert_array_equal(prompt.image_index, rendered["image_index"][:start + 1])
            assert len(prompt.images) == shown
