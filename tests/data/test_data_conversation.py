"""Rendering and VPiT masks against hand-written expectations on a tiny word tokenizer."""
import json

import numpy as np
import pytest

from metamorph_jax.data import conversation as conv
from metamorph_jax.data.testing import build_tiny_tokenizer

V = 3  # visual tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    return tokenizer, ids


def names(tokenizer, ids, token_ids, image_index=None):
    """Token strings; visual positions (image_index >= 0) shown as "V"."""
    if image_index is None:
        image_index = np.full(len(token_ids), -1)
    return ["V" if i >= 0 else tokenizer.convert_ids_to_tokens(int(t))
            for t, i in zip(token_ids, image_index)]


def render(tok, record, template="llama3", **kw):
    tokenizer, ids = tok
    c = conv.parse_record(record, where="f.jsonl:1", image_root="/imgs")
    return conv.render(c, tokenizer, ids, template=template, num_image_tokens=V, **kw)


def test_special_ids_are_new_rows(tok):
    tokenizer, ids = tok
    assert ids.image_start_id == ids.vocab_size - 2 and ids.image_end_id == ids.vocab_size - 1
    assert ids.placeholder_id == 0  # no pad token in the tiny tokenizer
    assert ids.to_config()["vocab_size"] == len(tokenizer)
    again = conv.add_image_tokens(tokenizer)  # idempotent
    assert again == ids
    assert conv.SpecialIds.from_config(ids.to_config()) == ids
    ids.check(tokenizer)
    with pytest.raises(ValueError, match="<image_start>"):
        ids.check(build_tiny_tokenizer())  # a tokenizer without the image tokens
    with pytest.raises(ValueError, match="lacks"):
        conv.SpecialIds.from_config({"image_start_id": 1})


def test_llama3_text_to_image(tok):
    tokenizer, ids = tok
    record = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "generate an image of a red circle"},
        {"from": "gpt", "value": "here is an image : <image>"}]}
    out = render(tok, record)
    got = names(tokenizer, ids, out["tokens"], out["image_index"])
    expected = (["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n",
                 "generate", "an", "image", "of", "a", "red", "circle", "<|eot_id|>",
                 "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n",
                 "here", "is", "an", "image", ":", "<image_start>"] + ["V"] * V
                + ["<image_end>", "<|eot_id|>"])
    assert got == expected
    L = len(expected)
    # trained tokens: "here" (index 17) .. end, except the visual positions.
    trained = np.zeros(L, bool)
    trained[17:] = True
    trained[23:23 + V] = False
    assert np.array_equal(out["text_mask"][:-1], trained[1:])
    assert out["text_mask"][-1] == 0
    assert np.array_equal(out["text_targets"][:-1], out["tokens"][1:])
    image_index = np.full(L, -1)
    image_index[23:23 + V] = np.arange(V)
    assert np.array_equal(out["image_index"], image_index)
    # <image_start> (22) predicts visual 0, visual 0 predicts 1, visual 1 predicts 2; visual 2 none.
    vision_mask = np.zeros(L, int)
    vision_mask[22:22 + V] = 1
    assert np.array_equal(out["vision_mask"], vision_mask)
    target = np.full(L, -1)
    target[22:22 + V] = np.arange(V)
    assert np.array_equal(out["vision_target_index"], target)
    # the target index is the image_index of the next position
    pos = np.nonzero(out["vision_mask"])[0]
    assert np.array_equal(out["vision_target_index"][pos], out["image_index"][pos + 1])
    # the last visual position's hidden state predicts <image_end> as text
    assert out["text_mask"][22 + V] == 1 and out["text_targets"][22 + V] == ids.image_end_id


def test_prompt_image_no_vision_loss_and_official_template(tok):
    tokenizer, ids = tok
    record = {"id": "q", "image": ["a.png"], "conversations": [
        {"from": "system", "value": "you are helpful"},
        {"from": "human", "value": "<image>\nwhat colour ?"},
        {"from": "gpt", "value": " red "}]}
    out = render(tok, record, template="llama3_official")
    got = names(tokenizer, ids, out["tokens"], out["image_index"])
    expected = (["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "\n", "\n",
                 "you", "are", "helpful", "<|eot_id|>",
                 "<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n", "<image_start>"]
                + ["V"] * V + ["<image_end>", "\n", "what", "colour", "?", "<|eot_id|>",
                               "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n",
                               "red", "<|eot_id|>"])
    assert got == expected
    assert out["vision_mask"].sum() == 0
    assert np.array_equal(out["image_index"][16:16 + V], np.arange(V))
    # Only "red" and <|eot_id|> are targets.
    targets = out["text_targets"][out["text_mask"] == 1]
    assert names(tokenizer, ids, targets) == ["red", "<|eot_id|>"]


def test_multi_turn_images_on_both_sides(tok):
    tokenizer, ids = tok
    record = {"images": ["a.png", "b.png", "c.png"], "conversations": [
        {"from": "human", "value": "<image> predict next frame"},
        {"from": "gpt", "value": "<image>"},
        {"from": "human", "value": "<image> and next"},
        {"from": "gpt", "value": "no"}]}
    out = render(tok, record)
    # image numbers in order of appearance; only image 1 (in a response) has vision targets
    flat = out["image_index"][out["image_index"] >= 0]
    assert np.array_equal(flat, np.arange(3 * V))
    assert sorted(set(out["vision_target_index"][out["vision_mask"] == 1] // V)) == [1]
    targets = names(tokenizer, ids, out["text_targets"][out["text_mask"] == 1])
    assert targets == ["<image_start>", "<image_end>", "<|eot_id|>", "no", "<|eot_id|>"]


def test_tokenizer_template_matches_official(tok):
    # The tiny tokenizer's chat_template is Meta's official one.
    record = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nwhat colour ?"},
        {"from": "gpt", "value": "red <image>"}]}
    ours = render(tok, record, template="llama3_official")
    theirs = render(tok, record, template="tokenizer")
    for key in conv.RENDERED_KEYS:
        assert np.array_equal(ours[key], theirs[key]), key


def test_video_expands_to_frames(tok, tmp_path):
    from PIL import Image
    folder = tmp_path / "clip"
    folder.mkdir()
    for ms in range(0, 2001, 500):
        Image.new("RGB", (4, 4)).save(folder / f"{ms:05d}ms.png")
    c = conv.parse_record({"video": "clip", "conversations": [
        {"from": "human", "value": "<video>\nwhat is the colour ?"},
        {"from": "gpt", "value": "red"}]}, where="v.jsonl:3", image_root=str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in c.image_paths] == ["00000ms.png", "01000ms.png", "02000ms.png"]
    assert c.turns[0].text.count(conv.IMAGE_PLACEHOLDER) == 3


def test_text_only_and_paths(tok):
    c = conv.parse_record(json.dumps({"conversations": [
        {"from": "user", "value": "hello"}, {"from": "assistant", "value": "hello world"}]}),
        where="t.jsonl:7")
    assert c.image_paths == () and c.id == "t.jsonl:7"
    c = conv.parse_record({"image": "sub/a.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}, image_root="/root")
    assert c.image_paths == ("/root/sub/a.png",)


@pytest.mark.parametrize("record, reason", [
    (b"{not json", "malformed_json"),
    ("[1, 2]", "malformed_json"),
    ({"conversations": []}, "bad_field"),
    ({"conversations": [{"from": "human"}]}, "bad_field"),
    ({"image": 3, "conversations": [{"from": "human", "value": "<image>"}]}, "bad_field"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown_role"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                          {"from": "gpt", "value": "a"}]}, "image_count_mismatch"),
    ({"conversations": [{"from": "human", "value": "<image> hi"},
                        {"from": "gpt", "value": "a"}]}, "image_count_mismatch"),
    ({"video": "nope", "conversations": [{"from": "human", "value": "<video>"}]}, "missing_image"),
])
def test_parse_errors(record, reason):
    with pytest.raises(conv.RecordError) as info:
        conv.parse_record(record, where="bad.jsonl:12")
    assert info.value.reason == reason
    assert "bad.jsonl:12" in str(info.value)


def test_render_errors(tok):
    base = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image> <image> what"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(conv.RecordError, match="too_long"):
        render(tok, base, max_length=10)
    with pytest.raises(conv.RecordError, match="too_many_images"):
        render(tok, base, max_images=1)
    with pytest.raises(conv.RecordError, match="no_trained_tokens"):
        render(tok, {"conversations": [{"from": "human", "value": "hello"}]})
