"""Rendering and VPiT masks against hand-written expectations on a tiny word tokenizer."""
import json
import re

import numpy as np
import pytest

from metamorph_jax.data import conversation as conv
from metamorph_jax.data.testing import LLAMA3_CHAT_TEMPLATE, build_tiny_tokenizer

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


# --- piecewise tokenization vs the whole string, on a real byte-level BPE -----------------

# LLaMA-3's pre-tokenizer split (its tokenizer.json), then byte-level bytes-to-units.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", conv.IMAGE_START, conv.IMAGE_END]
BPE_CORPUS = [
    "Hello world. What is the colour of the shape?\n\nThe shape is a red circle.",
    "Describe the image here.\nThere are two shapes:\n\n - a blue square\n - a green triangle",
    "  Leading spaces, trailing spaces  \n\n\nand blank lines.\n \n\tTabs too.",
    "I will think about it visually. Generate an image of a yellow circle, please!",
    "Numbers 123 4567 and words: isn't it? we'll see, they're here.",
] * 20


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(BPE_CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=BPE_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    ids = conv.add_image_tokens(tokenizer)
    # merges across newlines exist, so a split newline run tokenizes differently
    assert len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) == 1
    return tokenizer, ids


BPE_CONVERSATIONS = {
    "text_only": [("user", "What is the colour of the shape?"),
                  ("assistant", "The shape is a red circle.")],
    "prompt_image": [("user", "<image>\nDescribe the image here."),
                     ("assistant", "There are two shapes: a blue square and a green triangle.")],
    "response_images": [("user", "Generate an image of a yellow circle, please!"),
                        ("assistant", "Here: <image> and another<image>.")],
    "multi_turn": [("system", "I will think about it visually."),
                   ("user", "Hello world<image>"), ("assistant", "<image> There are two shapes"),
                   ("user", "isn't it 123?"), ("assistant", "  we'll see  ")],
    "leading_spaces": [("user", "   Leading spaces"), ("assistant", " trailing spaces  ")],
    "inner_newlines": [("user", "Describe:\n\n - a blue square\n - a green triangle\n"),
                       ("assistant", "Tabs\ttoo.\n \nand blank lines.\n\n")],
    # content that starts with a newline (or spaces then a newline) after the header's
    "leading_newline": [("user", "\nHello world."), ("assistant", "\n\nThe shape is red.")],
    "leading_space_newline": [("user", "  \n Hello"), ("assistant", " \n\tTabs too.")],
}


def _conversation(turns):
    text = "".join(t for _, t in turns)
    paths = tuple(f"/img{i}.png" for i in range(text.count(conv.IMAGE_PLACEHOLDER)))
    return conv.Conversation("c", tuple(conv.Turn(r, t) for r, t in turns), paths)


def _text_ids(tokenizer, rendered):
    """The rendered tokens without the visual positions (left: <image_start><image_end>)."""
    return [int(t) for t, i in zip(rendered["tokens"], rendered["image_index"]) if i < 0]


def _whole_string(conversation, template, tokenizer):
    pieces = conv.template_pieces(conversation.turns, template, tokenizer)
    return "".join(p[1] if p[0] == "text" else conv.IMAGE_START + conv.IMAGE_END for p in pieces)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", conv.TEMPLATES)
@pytest.mark.parametrize("name", sorted(BPE_CONVERSATIONS))
def test_piecewise_ids_are_the_whole_string_ids_but_at_header_ends(bpe, template, name):
    """The documented difference (conversation.py, "Tokenization"): the rendered ids are
    the ids of the whole rendered string cut after each header's newline(s), each part
    tokenized whole; they equal the uncut string's ids unless a turn's content starts with
    whitespace holding a newline (possible with the untrimmed "llama3" template only)."""
    tokenizer, ids = bpe
    conversation = _conversation(BPE_CONVERSATIONS[name])
    rendered = conv.render(conversation, tokenizer, ids, template=template, num_image_tokens=2)
    piecewise = _text_ids(tokenizer, rendered)
    text = _whole_string(conversation, template, tokenizer)
    assert tokenizer.decode(piecewise) == text
    # The string cut only at header ends, each segment tokenized whole.
    header_end = r"(<\|end_header_id\|>\n)" if template == "llama3" else r"(<\|end_header_id\|>\n\n)"
    parts = re.split(header_end, text)
    segments = ["".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    assert "".join(segments) == text
    assert piecewise == [i for segment in segments for i in _encode(tokenizer, segment)]
    whole = _encode(tokenizer, text)
    contents = [t.text.strip() if template != "llama3" else t.text for t in conversation.turns]
    may_differ = template == "llama3" and any(
        "\n" in c[:len(c) - len(c.lstrip())] for c in contents)
    if not may_differ:
        assert piecewise == whole
    if name == "leading_newline" and template == "llama3":
        # The whole string merges the header's "\n" with the content's into one "\n\n"
        # pre-token (one BPE token here); render keeps them apart.
        newline, double = _encode(tokenizer, "\n"), _encode(tokenizer, "\n\n")
        assert piecewise != whole
        assert _sublist(piecewise, newline + newline) and _sublist(whole, double)


def _sublist(ids, part):
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))
