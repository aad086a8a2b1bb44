"""Conversation records -> tokens, image slots and VPiT loss masks.

Records follow the LLaVA / MetaMorph format (one JSON object per record)::

    {"id": "...", "image": "a.png" | ["a.png", ...]   (or "images": [...], or
     "video": "frame_folder"), "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                  {"from": "gpt", "value": "... <image>"}]}

`<image>` may stand in any turn; in an assistant turn that image is a prediction target.
A `video` is a frame folder sampled at `video_fps` (1 fps by default); its one `<video>`
(or `<image>`) placeholder expands to one image slot per sampled frame. Records without
images are text-only samples.

Rendering (`render`) gives one unpacked sample of length L, all int32 [L]:

- `tokens`: the chat-templated token ids. Every image is `<image_start>`, then
  `num_image_tokens` visual positions holding `placeholder_id` (pad id, else 0; the model
  replaces their embeddings, so the id does not matter), then `<image_end>`.
- `text_targets[t] = tokens[t+1]` (0 at the last position); `text_mask[t] = 1` where token
  t+1 is a trained response token: assistant text, its `<image_start>`/`<image_end>` and
  its end-of-turn token. Never a visual position; never prompt or header tokens.
- `image_index[t] = i * num_image_tokens + k` when position t holds visual token k
  (0-based) of the sample's image i (in order of appearance), else -1.
- `vision_mask[t] = 1` where the hidden state at t is trained to predict the next visual
  token: for a response image whose `<image_start>` sits at s, positions s .. s+V-1
  (V = num_image_tokens); the last visual position s+V has no vision target. Prompt images
  give no vision loss.
- `vision_target_index[t] = image_index[t+1]` where `vision_mask[t]`, else -1: the flat index
  of the target visual token.

Templates: "llama3" (the MetaMorph authors' variant: one newline after each header),
"llama3_official" (Meta's: two newlines, content trimmed) and "tokenizer" (the tokenizer's
own `chat_template`, trained spans found by rendering growing prefixes).

Tokenization: each text piece of the template (bos, a header with its newline(s), a
turn's content between images, `<|eot_id|>`) is tokenized on its own. Special tokens split
the string anyway, so this equals tokenizing the whole rendered string (images as
`<image_start><image_end>`) with one intended exception: the string is cut after each
header's newline(s). A turn whose content starts with whitespace holding a newline (only
the untrimmed "llama3" template allows it) would, in the whole string, share a
pre-token with the header's newline (LLaMA-3's `\\s*[\\r\\n]+`, e.g. "\\n" + "\\n..." ->
"\\n\\n"); here the header and the content never share a token. That is how Meta's LLaMA-3
`ChatFormat` encodes header and content, and how generation sees a reply: the model writes
it after the header's tokens, so a trained reply must not begin mid-token.

Records that cannot be used raise `RecordError` with a reason from `REASONS` and the
file and line they came from.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from metamorph_jax.data import images as images_lib
from metamorph_jax.input_errors import InputError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"
TEMPLATES = ("llama3", "llama3_official", "tokenizer")

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}

# Reasons a record can be refused; the pipeline counts them under these names.
REASONS = (
    "malformed_json",        # not JSON / not an object
    "bad_field",             # a missing or wrongly typed field
    "unknown_role",          # a turn's "from" is not human/gpt/user/assistant/system
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "missing_image",         # an image file or frame folder that does not exist
    "corrupt_image",         # an image file that cannot be decoded
    "too_long",              # rendered longer than seq_len
    "too_many_images",       # more images than a packed row may hold
    "no_trained_tokens",     # nothing to learn from (e.g. no assistant turn)
)


class RecordError(InputError, ValueError):
    """A record that cannot be used: `reason` (one of REASONS), `where` ("file:line")."""

    def __init__(self, reason: str, where: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{where}: {reason}: {message}")
        self.reason = reason
        self.where = where
        self.message = message


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str   # "system" | "user" | "assistant"
    text: str   # with one IMAGE_PLACEHOLDER per image slot


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    image_paths: tuple   # resolved paths (or uint8 arrays), in order of their placeholders
    where: str = "?"


def _as_path_list(value, field: str, where: str) -> list:
    # Paths (str); uint8 HWC arrays are accepted from Python sources such as TFDS.
    if isinstance(value, (str, np.ndarray)):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, np.ndarray)) for v in value):
        return list(value)
    raise RecordError("bad_field", where, f'field "{field}" must be a path or a list of paths')


def record_object(record: Any, where: str = "?") -> dict:
    """A record as a dict: JSON str or bytes are parsed; anything but a JSON object is
    RecordError("malformed_json")."""
    if isinstance(record, (bytes, str)):
        try:
            record = json.loads(record)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecordError("malformed_json", where, str(error)) from None
    if not isinstance(record, dict):
        raise RecordError("malformed_json", where, f"a record must be a JSON object, got {type(record).__name__}")
    return record


def parse_record(record: Any, *, where: str = "?", image_root: str | None = None,
                 video_fps: float = 1.0, video_source_fps: float | None = None,
                 max_video_frames: int | None = None) -> Conversation:
    """Validate one LLaVA/MetaMorph record (dict, JSON str or bytes) into a Conversation.

    Relative image paths are joined to `image_root`. Raises RecordError.
    """
    record = record_object(record, where)
    turns_raw = record.get("conversations")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RecordError("bad_field", where, 'field "conversations" must be a non-empty list')
    turns = []
    for index, turn in enumerate(turns_raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise RecordError("bad_field", where,
                              f'conversations[{index}] needs string fields "from" and "value"')
        role = ROLE_ALIASES.get(turn["from"].lower())
        if role is None:
            raise RecordError("unknown_role", where,
                              f'conversations[{index}].from = {turn["from"]!r}')
        turns.append(Turn(role, turn["value"]))

    paths: list[str] = []
    keys = [k for k in ("image", "images", "video") if record.get(k) is not None]
    if len(keys) > 1:
        raise RecordError("bad_field", where, f"give only one of {keys}")
    if keys and keys[0] in ("image", "images"):
        paths = _as_path_list(record[keys[0]], keys[0], where)
    root = image_root or ""

    def resolve(p):
        return p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(root, p)

    if keys and keys[0] == "video":
        if not isinstance(record["video"], str):
            raise RecordError("bad_field", where, 'field "video" must be a frame folder path')
        try:
            frames = images_lib.sample_frames(resolve(record["video"]), fps=video_fps,
                                              source_fps=video_source_fps,
                                              max_frames=max_video_frames)
        except images_lib.ImageError as error:
            reason = "missing_image" if "does not exist" in error.reason else "corrupt_image"
            raise RecordError(reason, where, str(error)) from None
        placeholders = sum(t.text.count(VIDEO_PLACEHOLDER) + t.text.count(IMAGE_PLACEHOLDER)
                           for t in turns)
        if placeholders != 1:
            raise RecordError("image_count_mismatch", where,
                              f"a video record needs exactly one <video> or <image>, found {placeholders}")
        expanded = IMAGE_PLACEHOLDER * len(frames)
        marker = VIDEO_PLACEHOLDER if any(VIDEO_PLACEHOLDER in t.text for t in turns) \
            else IMAGE_PLACEHOLDER
        turns = [Turn(t.role, t.text.replace(marker, expanded)) for t in turns]
        resolved = tuple(frames)
    else:
        if any(VIDEO_PLACEHOLDER in t.text for t in turns):
            raise RecordError("image_count_mismatch", where, "<video> placeholder without a video field")
        count = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        if count != len(paths):
            raise RecordError("image_count_mismatch", where,
                              f"{count} <image> placeholders for {len(paths)} images")
        resolved = tuple(resolve(p) for p in paths)
    record_id = record.get("id", where)
    return Conversation(str(record_id), tuple(turns), resolved, where)


# --- tokenizer set-up -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the renderer and the model agree on; saved with the checkpoint's config."""
    image_start_id: int
    image_end_id: int
    placeholder_id: int
    vocab_size: int

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, values: dict) -> "SpecialIds":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(values))
        if missing:
            raise ValueError(f"special token config lacks {missing}")
        return cls(**{k: int(values[k]) for k in fields})

    def check(self, tokenizer) -> None:
        """Raise if `tokenizer` maps the image tokens to other ids than the checkpoint."""
        vocab = tokenizer.get_vocab()
        for token, expected in ((IMAGE_START, self.image_start_id), (IMAGE_END, self.image_end_id)):
            if vocab.get(token) != expected:
                raise ValueError(f"tokenizer has {token} = {vocab.get(token)}, the checkpoint "
                                 f"expects {expected}; call add_image_tokens on the tokenizer "
                                 "the checkpoint was trained with")


def add_image_tokens(tokenizer, placeholder_id: int | None = None) -> SpecialIds:
    """Add `<image_start>`/`<image_end>` as special tokens (if absent); return their ids.

    On LLaMA-3 (128256 ids) they become 128256 and 128257. The visual placeholder id
    defaults to the pad id, else 0 (its value never reaches the model's embeddings:
    those positions are overwritten with image features).
    """
    from tokenizers import AddedToken

    missing = [t for t in (IMAGE_START, IMAGE_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    start = tokenizer.convert_tokens_to_ids(IMAGE_START)
    end = tokenizer.convert_tokens_to_ids(IMAGE_END)
    if placeholder_id is None:
        placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return SpecialIds(start, end, int(placeholder_id), len(tokenizer))


# --- templates --------------------------------------------------------------------------

# A piece is ("text", str, trained) or ("image", image_number, in_response).
Piece = tuple


def _content_pieces(text: str, trained: bool, counter: list[int]) -> list[Piece]:
    pieces: list[Piece] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for index, part in enumerate(parts):
        if part:
            pieces.append(("text", part, trained))
        if index < len(parts) - 1:
            pieces.append(("image", counter[0], trained))
            counter[0] += 1
    return pieces


def _llama3_pieces(turns: Sequence[Turn], newlines: str, trim: bool) -> list[Piece]:
    pieces: list[Piece] = [("text", "<|begin_of_text|>", False)]
    counter = [0]
    for turn in turns:
        trained = turn.role == "assistant"
        pieces.append(("text", f"<|start_header_id|>{turn.role}<|end_header_id|>{newlines}", False))
        pieces += _content_pieces(turn.text.strip() if trim else turn.text, trained, counter)
        pieces.append(("text", "<|eot_id|>", trained))
    return pieces


_SENTINEL = "\u2063IMG\u2063"  # invisible separator; survives jinja trim and never tokenized


def _tokenizer_template_pieces(turns: Sequence[Turn], tokenizer, where: str) -> list[Piece]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' but the tokenizer has no chat_template")
    messages = [{"role": t.role, "content": t.text.replace(IMAGE_PLACEHOLDER, _SENTINEL)}
                for t in turns]

    def apply(msgs, generation):
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=generation)

    full = apply(messages, False)
    spans = []  # (start, end) character spans that are trained
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply(messages[:index], True) if index else apply([], True)
        through = apply(messages[: index + 1], False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise RecordError("bad_field", where, "the tokenizer's chat template does not render "
                              "conversation prefixes as prefixes; use template='llama3'")
        spans.append((len(before), len(through)))
    # Cut the string at span borders, then at image sentinels.
    borders = sorted({0, len(full), *[b for span in spans for b in span]})
    pieces: list[Piece] = []
    counter = [0]
    for start, end in zip(borders[:-1], borders[1:]):
        trained = any(s <= start and end <= e for s, e in spans)
        pieces += _content_pieces(full[start:end].replace(_SENTINEL, IMAGE_PLACEHOLDER), trained, counter)
    return pieces


def template_pieces(turns: Sequence[Turn], template: str, tokenizer=None, where: str = "?") -> list[Piece]:
    """Lay out a conversation as text pieces (trained or not) and image slots."""
    if template == "llama3":
        return _llama3_pieces(turns, "\n", trim=False)
    if template == "llama3_official":
        return _llama3_pieces(turns, "\n\n", trim=True)
    if template == "tokenizer":
        return _tokenizer_template_pieces(turns, tokenizer, where)
    raise ValueError(f"unknown chat template {template!r}; choose one of {TEMPLATES}")


def generation_prompt_pieces(turns: Sequence[Turn], template: str, tokenizer=None) -> list[Piece]:
    """The pieces of `turns` followed by the assistant's header, as a model is prompted
    to answer: the same layout training renders, cut where the reply would start."""
    if template in ("llama3", "llama3_official"):
        newlines = "\n" if template == "llama3" else "\n\n"
        return (template_pieces(turns, template) +
                [("text", f"<|start_header_id|>assistant<|end_header_id|>{newlines}", False)])
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='tokenizer' but the tokenizer has no chat_template")
        messages = [{"role": t.role, "content": t.text.replace(IMAGE_PLACEHOLDER, _SENTINEL)}
                    for t in turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _content_pieces(text.replace(_SENTINEL, IMAGE_PLACEHOLDER), False, [0])
    raise ValueError(f"unknown chat template {template!r}; choose one of {TEMPLATES}")


def prompt_tokens(turns: Sequence[Turn], tokenizer, template: str) -> list[int]:
    """Token ids of a text-only prompt for generation, tokenized piece by piece exactly as
    `render` tokenizes training records (so a model sees the prompt it was trained on)."""
    tokens: list[int] = []
    for piece in generation_prompt_pieces(turns, template, tokenizer):
        if piece[0] != "text":
            raise ValueError("prompt_tokens takes text-only turns; images in prompts are "
                             "rendered by the VPiT generator")
        tokens += tokenizer(piece[1], add_special_tokens=False)["input_ids"]
    return tokens


# --- rendering ---------------------------------------------------------------------------

RENDERED_KEYS = ("tokens", "text_targets", "text_mask", "image_index", "vision_mask",
                 "vision_target_index")


def render(conversation: Conversation, tokenizer, ids: SpecialIds, *, template: str = "llama3",
           num_image_tokens: int = 64, max_length: int | None = None,
           max_images: int | None = None) -> dict[str, np.ndarray]:
    """Render a Conversation into the int32 [L] arrays described in the module docstring.

    Raises RecordError ("too_long", "too_many_images", "no_trained_tokens").
    """
    where = conversation.where
    if max_images is not None and len(conversation.image_paths) > max_images:
        raise RecordError("too_many_images", where,
                          f"{len(conversation.image_paths)} images, a row holds at most {max_images}")
    tokens: list[int] = []
    trained: list[bool] = []
    visual: list[int] = []          # image_index per position
    starts_in_response: list[tuple[int, int]] = []  # (position of <image_start>, image number)
    for piece in template_pieces(conversation.turns, template, tokenizer, where):
        if piece[0] == "text":
            _, text, is_trained = piece
            piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens += piece_ids
            trained += [is_trained] * len(piece_ids)
            visual += [-1] * len(piece_ids)
        else:
            _, number, in_response = piece
            if in_response:
                starts_in_response.append((len(tokens), number))
            tokens += [ids.image_start_id] + [ids.placeholder_id] * num_image_tokens + [ids.image_end_id]
            trained += [in_response] + [False] * num_image_tokens + [in_response]
            visual += [-1] + [number * num_image_tokens + k for k in range(num_image_tokens)] + [-1]
    length = len(tokens)
    if max_length is not None and length > max_length:
        raise RecordError("too_long", where, f"{length} tokens, seq_len is {max_length}")
    tokens_arr = np.asarray(tokens, np.int32)
    image_index = np.asarray(visual, np.int32)
    text_targets = np.zeros(length, np.int32)
    text_targets[:-1] = tokens_arr[1:]
    text_mask = np.zeros(length, np.int32)
    text_mask[:-1] = np.asarray(trained[1:], np.int32)
    vision_mask = np.zeros(length, np.int32)
    vision_target_index = np.full(length, -1, np.int32)
    for start, number in starts_in_response:
        positions = np.arange(start, start + num_image_tokens)
        vision_mask[positions] = 1
        vision_target_index[positions] = number * num_image_tokens + np.arange(num_image_tokens)
    if not text_mask.any() and not vision_mask.any():
        raise RecordError("no_trained_tokens", where,
                          "the record has no assistant response to learn from")
    return {"tokens": tokens_arr, "text_targets": text_targets, "text_mask": text_mask,
            "image_index": image_index, "vision_mask": vision_mask,
            "vision_target_index": vision_target_index}
