"""Answer-token accuracy of a LLaMA folder on short-answer chat records (teacher forced).

For each record (a user turn and a one- or few-word assistant answer, e.g. the Shapes
text corpus's held-out-scene questions, data/shapes_text.py eval_records) the record is
rendered with the chat template as in training; it counts as right when the model's
argmax next token is the answer's token at every answer position (the end-of-turn token
after the answer is not scored). Grouped by a record field (e.g. "question_kind"), so a
text stage's effect on each question kind is visible. Used by benchmarks/text_stage.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data.text_records import text_special_ids


def answer_targets(record: dict, tokenizer, template: str = "llama3") -> tuple[np.ndarray, np.ndarray]:
    """(tokens [L], answer positions: indices t whose next token tokens[t+1] is an answer
    token, the final end-of-turn excluded)."""
    conversation = conv.parse_record(record, where=str(record.get("id", "?")))
    rendered = conv.render(conversation, tokenizer, text_special_ids(tokenizer), template=template)
    positions = np.nonzero(rendered["text_mask"])[0]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    positions = positions[rendered["text_targets"][positions] != eot]
    if positions.size == 0:
        raise ValueError(f"record {record.get('id')!r}: no answer token to score")
    return rendered["tokens"], positions


def answer_accuracy(llm_dir: str | Path, records: Sequence[dict], group_by: str,
                    tokenizer_dir: str | Path | None = None, template: str = "llama3",
                    batch_size: int = 64) -> dict:
    """{group: accuracy} over `records` grouped by their field `group_by` (records without
    it are grouped as "other"), plus "all"."""
    import jax
    import jax.numpy as jnp

    model, params, _ = pretrained.load_llama(llm_dir)
    tokenizer = pretrained.load_tokenizer(tokenizer_dir or llm_dir)
    rendered = [answer_targets(record, tokenizer, template) for record in records]
    length = max(len(tokens) for tokens, _ in rendered)

    @jax.jit
    def predict(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return jnp.argmax(model.apply({"params": params}, tokens, positions=positions).logits, -1)

    hits = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start:start + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)   # right padding: causal, unseen
        for row, (ids, _) in enumerate(chunk):
            tokens[row, :len(ids)] = ids
        predicted = np.asarray(predict(params, tokens))
        for row, (ids, where) in enumerate(chunk):
            hits.append(bool(np.all(predicted[row, where] == ids[where + 1])))
    groups: dict[str, list[bool]] = {}
    for record, hit in zip(records, hits):
        groups.setdefault(str(record.get(group_by, "other")), []).append(hit)
    result = {name: float(np.mean(values)) for name, values in sorted(groups.items())}
    result["all"] = float(np.mean(hits))
    return result
