"""Counting and reporting records that cannot be used.

The pipeline's worker processes turn a record that fails (see
`conversation.REASONS`) into a marker `{"bad": reason, "where": "file:line", "message": ...}`.
The packer, in the main process, hands each marker to a `BadRecordLog`: in normal mode it
is counted per reason (with the first few examples kept) and reported periodically and at
the end of the data; in strict mode the first one raises `BadRecordError` naming the file
and line. The counts are part of the iterator state, so a resumed run keeps counting.
"""
from __future__ import annotations

import logging
from typing import Any

from metamorph_jax.data.conversation import REASONS
from metamorph_jax.input_errors import InputError

logger = logging.getLogger("metamorph_jax.data")

EXAMPLES_PER_REASON = 3


class BadRecordError(InputError, ValueError):
    """Strict mode: the first unusable record stops the pipeline."""


def is_bad(element: Any) -> bool:
    return isinstance(element, dict) and "bad" in element


def bad_marker(reason: str, where: str, message: str) -> dict:
    return {"bad": reason, "where": where, "message": message}


class BadRecordLog:
    """Per-reason counts of refused records, with examples (`where: message`)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._reported_total = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, marker: dict) -> None:
        reason, where, message = marker["bad"], marker["where"], marker["message"]
        if self.strict:
            raise BadRecordError(f"{where}: {reason}: {message} (strict mode stops at the first bad record)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where}: {message}")

    def summary(self) -> str:
        if not self.counts:
            return "bad records: none"
        lines = [f"bad records: {self.total} skipped"]
        for reason in sorted(self.counts, key=lambda r: REASONS.index(r) if r in REASONS else 99):
            lines.append(f"  {reason}: {self.counts[reason]}, e.g. " + " | ".join(self.examples[reason]))
        return "\n".join(lines)

    def report(self, final: bool = False) -> None:
        """Log the summary if anything new was refused since the last report (always if
        final and anything was refused)."""
        if self.total > self._reported_total or (final and self.total):
            logger.warning(("[end of data] " if final else "") + self.summary())
            self._reported_total = self.total

    def as_dict(self) -> dict:
        return {reason: {"count": self.counts[reason], "examples": list(self.examples[reason])}
                for reason in self.counts}

    def get_state(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def set_state(self, state: dict) -> None:
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        self._reported_total = self.total
