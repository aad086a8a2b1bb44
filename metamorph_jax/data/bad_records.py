"""Counting and reporting records that cannot be used.

The pipeline's worker processes turn a record that fails (see
`conversation.REASONS`) into a marker `{"bad": reason, "where": "file:line", "message": ...}`.
The packer, in the main process, hands each marker to a `BadRecordLog`: in normal mode it
is counted per reason (with the first few examples kept) and reported periodically and at
the end of the data; in strict mode the first one raises `BadRecordError` naming the file
and line. The counts are part of the iterator state, so a resumed run keeps counting.

Per source (the record file an element came from), the log also counts the records read
(used or refused). A source that loses more than `max_bad_fraction` (f, default 1%) of
the records read from it raises `BadSourceError`, naming the source, the reasons, the
counts and the field to change. When a source is judged (`check`):
- at every report, once it has had at least 100 / f records read (10,000 at 1%: the
  threshold is then 100 refused records, so a few unlucky ones early on do not decide);
- at the end of the data, over all its records, once it has had at least 1 / f (100 at
  1%); below that a single refused record already exceeds the share, and stopping at the
  first bad record is what `strict=True` is for.
Counts are per process (each judges the records of its shard). f = 1.0 never raises.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

from metamorph_jax.data.conversation import REASONS
from metamorph_jax.input_errors import InputError

logger = logging.getLogger("metamorph_jax.data")

EXAMPLES_PER_REASON = 3
DEFAULT_MAX_BAD_FRACTION = 0.01
RECORDS_PER_REPORT_JUDGEMENT = 100   # a source is judged at a report after 100 / f records


class BadRecordError(InputError, ValueError):
    """Strict mode: the first unusable record stops the pipeline."""


class BadSourceError(BadRecordError):
    """A source lost more than `max_bad_fraction` of its records."""


def is_bad(element: Any) -> bool:
    return isinstance(element, dict) and "bad" in element


def bad_marker(reason: str, where: str, message: str, source: str = "?") -> dict:
    return {"bad": reason, "where": where, "message": message, "source": source}


class BadRecordLog:
    """Per-reason counts of refused records, with examples (`where: message`), and per
    source the records read and refused (see the module docstring)."""

    def __init__(self, strict: bool = False, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        self.strict = strict
        self.max_bad_fraction = float(max_bad_fraction)
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        # source -> {"records": read, "bad": {reason: count}, "examples": {reason: first}}
        self.sources: dict[str, dict] = {}
        self._reported_total = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _source(self, source: str) -> dict:
        return self.sources.setdefault(source, {"records": 0, "bad": {}, "examples": {}})

    def used(self, source: str) -> None:
        """One record of `source` was read and used."""
        self._source(source)["records"] += 1

    def add(self, marker: dict) -> None:
        reason, where, message = marker["bad"], marker["where"], marker["message"]
        if self.strict:
            raise BadRecordError(f"{where}: {reason}: {message} (strict mode stops at the first bad record)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where}: {message}")
        entry = self._source(marker.get("source", "?"))
        entry["records"] += 1
        entry["bad"][reason] = entry["bad"].get(reason, 0) + 1
        entry["examples"].setdefault(reason, f"{where}: {message}")

    def check(self, final: bool = False) -> None:
        """Raise BadSourceError for the first source judged (module docstring) that lost
        more than `max_bad_fraction` of the records read from it."""
        fraction = self.max_bad_fraction
        if fraction >= 1.0:
            return
        least = math.ceil((1 if final else RECORDS_PER_REPORT_JUDGEMENT) / fraction - 1e-9)
        for source, entry in self.sources.items():
            records, bad = entry["records"], sum(entry["bad"].values())
            if records >= least and bad > fraction * records:
                reasons = ", ".join(f"{reason} {count} (e.g. {entry['examples'][reason]})"
                                    for reason, count in _by_reason(entry["bad"]))
                raise BadSourceError(
                    f"{source}: {bad} of the {records} records read were refused "
                    f"({bad / records:.2%}), more than data field max_bad_fraction="
                    f"{fraction:g}{' at the end of the data' if final else ''}: {reasons}. "
                    "Fix the records (or the data config: seq_len, max_images_per_row, "
                    "image_root), or raise max_bad_fraction (1.0: never an error)")

    def summary(self) -> str:
        if not self.counts:
            return "bad records: none"
        lines = [f"bad records: {self.total} skipped"]
        for reason, count in _by_reason(self.counts):
            lines.append(f"  {reason}: {count}, e.g. " + " | ".join(self.examples[reason]))
        for source, entry in self.sources.items():
            bad = sum(entry["bad"].values())
            if bad:
                lines.append(f"  {source}: {bad} of {entry['records']} records read "
                             f"({bad / entry['records']:.2%})")
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
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()},
                "sources": copy.deepcopy(self.sources)}

    def set_state(self, state: dict) -> None:
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        # states saved before per-source accounting have none: counting starts afresh
        self.sources = copy.deepcopy(state.get("sources", {}))
        self._reported_total = self.total


def _by_reason(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(reason, count) in the order of conversation.REASONS."""
    return [(reason, counts[reason]) for reason in
            sorted(counts, key=lambda r: REASONS.index(r) if r in REASONS else len(REASONS))]
