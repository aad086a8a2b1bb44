"""Aggregating per-sample scores into a benchmark's score, per-category scores and the
average over benchmarks. Scores are percentages.

* MMBench (circular evaluation): the unit is a question group (the rotated copies sharing
  `index % 1e6`); a group scores 1 only when every copy is right. "vanilla" is the plain
  per-row accuracy.
* MMVP: "score" is per question (as the paper's tables report); "pair_score" counts a pair
  right only when both its questions are.
* Everything else: the mean over samples. Categories, where the benchmark has them, are
  means over the samples (MMBench: groups) of each category.
Rows a benchmark's rule skipped are listed under "skipped"; answers no option letter could
be extracted from are counted under "unparsed" (and "unparsed_share", percent of n; they
score 0 inside the denominator, except MMMU's, which get its harness's random option).
"""
from __future__ import annotations

from collections import defaultdict

from metamorph_jax.evaluation.samples import Sample


def _mean(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _by_category(units: list[tuple[str | None, float]]) -> dict:
    groups = defaultdict(list)
    for category, score in units:
        if category is not None:
            groups[category].append(score)
    return {c: _mean(v) for c, v in sorted(groups.items())}


def _groups(samples: list[Sample], scored: dict) -> dict:
    groups = defaultdict(list)
    for sample in samples:
        groups[sample.group].append((sample, scored[sample.id]))
    return groups


def aggregate(benchmark: str, samples: list[Sample], scored: dict, *, skipped: dict | None = None,
              missing: int = 0) -> dict:
    """scored: {sample id: {"score", "extracted", "missing"?}} for every sample; `missing`
    counts samples without a prediction (scored 0, inside the denominator)."""
    absent = [s.id for s in samples if s.id not in scored]
    if absent:
        raise ValueError(f"{benchmark}: {len(absent)} samples have no score (first: {absent[:3]})")
    rows = [(s.category, scored[s.id]["score"]) for s in samples]
    result = {"n": len(samples), "skipped": dict(skipped or {}), "missing_predictions": missing,
              "unparsed": sum(1 for s in samples if s.choices and not scored[s.id].get("missing")
                              and (scored[s.id].get("unparsed")
                                   or scored[s.id]["extracted"] is None))}
    result["unparsed_share"] = _mean([1.0] * result["unparsed"]
                                     + [0.0] * (len(samples) - result["unparsed"]))
    if benchmark == "mmbench":
        units = []
        for group, members in _groups(samples, scored).items():
            # the group's category is the original question's (index == index % 1e6)
            main = next((s for s, _ in members if s.id == group), members[0][0])
            units.append((main.category, float(all(r["score"] == 1.0 for _, r in members))))
        result.update(score=_mean(u[1] for u in units), questions=len(units),
                      categories=_by_category(units), vanilla=_mean(r[1] for r in rows))
        return result
    result.update(score=_mean(r[1] for r in rows), categories=_by_category(rows))
    if benchmark == "mmvp":
        pairs = _groups(samples, scored).values()
        result["pair_score"] = _mean(float(all(r["score"] == 1.0 for _, r in members)) for members in pairs)
    return result


def summarize(per_benchmark: dict) -> dict:
    """{benchmark: aggregate(...)} -> the same plus "average" over the benchmarks' scores."""
    scores = [entry["score"] for entry in per_benchmark.values()]
    return {"benchmarks": per_benchmark,
            "average": sum(scores) / len(scores) if scores else float("nan")}


def summary_lines(summary: dict) -> list[str]:
    """The summary as printed lines: each benchmark's score (per category below it) and
    the average."""
    lines = []
    for name, entry in summary["benchmarks"].items():
        extra = f"  pairs {entry['pair_score']:.2f}" if "pair_score" in entry else ""
        lines.append(f"{name}: {entry['score']:.2f}{extra}  (n={entry['n']}, unparsed "
                     f"{entry['unparsed']} ({entry['unparsed_share']:.1f}%), missing {entry['missing_predictions']}, skipped "
                     f"{entry['skipped']})")
        lines += [f"    {category}: {score:.2f}" for category, score in entry["categories"].items()]
    lines.append(f"average over {len(summary['benchmarks'])} benchmarks: {summary['average']:.2f}")
    return lines
