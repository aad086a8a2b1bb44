"""Small helpers for tests and examples: a tiny LLaMA-3-style tokenizer built offline.

The tokenizer is a WordLevel model (one token per whitespace/punctuation-separated word)
over a fixed vocabulary, wrapped in `transformers.PreTrainedTokenizerFast` with the
LLaMA-3 special tokens and Meta's LLaMA-3 chat template. One word = one token makes
hand-written expectations in tests easy to state.
"""
from __future__ import annotations

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# Meta's LLaMA-3 Instruct chat template (two newlines after each header, trimmed content).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

DEFAULT_WORDS = (
    "what is the colour of shape ? a red green blue yellow circle square triangle "
    "describe image here an based on your request : generate of . there are two one "
    "three shapes in top left right bottom centre middle yes no i will think about it "
    "visually , predict next frame frames video reverse order move make show how many "
    "you are helpful hello world user assistant system"
).split()


def build_tiny_tokenizer(extra_words=(), *, chat_template: str | None = LLAMA3_CHAT_TEMPLATE):
    """Return a PreTrainedTokenizerFast with a word-level vocabulary and LLaMA-3 specials.

    Ids: 0 = "[UNK]", then the words in order, then the special tokens. Newlines are
    kept as their own token ("\\n") so that chat templates tokenize deterministically.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "\n"]
    for word in list(DEFAULT_WORDS) + list(extra_words):
        if word not in words:
            words.append(word)
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # Newlines become tokens, other whitespace separates words, punctuation splits off.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="[UNK]",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIAL_TOKENS)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def write_test_video(path, frames, fps: float) -> None:
    """Encode uint8 HWC frames as an MPEG-4 video at `fps` (PyAV); for tests and demos."""
    import av
    import numpy as np

    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(pixels, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
