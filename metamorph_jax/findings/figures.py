"""The findings' figures (OUT/finding<N>*.png): our runs on the left, the paper's numbers on
the right. matplotlib with the Agg backend (no display needed). Each function takes a
finding's `runs` entries of results.json and returns the file names it wrote under OUT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metamorph_jax.findings import paper
from metamorph_jax.findings.metrics import BY_FIELD, GENERATION_METRICS, METRICS


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=110)
    _pyplot().close(fig)
    return name


def _chance_line(ax, entries, field):
    chance = BY_FIELD[field].chance
    ax.axhline(entries[0]["metrics"][chance], color="grey", linestyle=":", label="chance")


def figure1(entries: list[dict], out: Path) -> list[str]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(GENERATION_METRICS) + 1,
                             figsize=(4.2 * (len(GENERATION_METRICS) + 1), 3.6))
    for ax, field in zip(axes, GENERATION_METRICS):
        for setting, style in (("joint", "o-"), ("generation_only", "s--")):
            rows = sorted((e["role"]["generation"], e["metrics"][field]) for e in entries
                          if e["role"]["setting"] == setting)
            line, = ax.plot([r[0] for r in rows], [r[1] for r in rows], style, label=setting)
            if BY_FIELD[field].chance_per_run:   # each run's own chance level
                chance = sorted((e["role"]["generation"], e["metrics"][BY_FIELD[field].chance])
                                for e in entries if e["role"]["setting"] == setting)
                ax.plot([c[0] for c in chance], [c[1] for c in chance], ":",
                        color=line.get_color(), label=f"{setting} chance")
        if not BY_FIELD[field].chance_per_run:
            _chance_line(ax, entries, field)
        ax.set_xscale("log")
        amounts = sorted({e["role"]["generation"] for e in entries})
        ax.set_xticks(amounts, [str(a) for a in amounts])
        ax.minorticks_off()
        ax.set_xlabel("generation records (Shapes)")
        ax.set_title(f"ours: {BY_FIELD[field].label}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for setting, style in (("joint", "o-"), ("generation_only", "s--")):
        ax.plot(paper.TABLE4["amounts"], paper.TABLE4[setting], style, label=setting)
    ax.set_xscale("log")
    ax.set_xlabel("generation samples (paper)")
    ax.set_title(f"paper {paper.TABLE4['ref']}: FID (lower better)")
    ax.legend(fontsize=7)
    return [_save(fig, out, "finding1.png")]


def _heatmap(ax, matrix, rows, cols, title, row_label, col_label, reverse=False):
    image = ax.imshow(np.asarray(matrix, float), cmap="Blues_r" if reverse else "Blues",
                      origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="black")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def figure2(entries: list[dict], out: Path) -> list[str]:
    plt = _pyplot()
    grid = [e for e in entries if e["role"]["part"] == "grid"]
    vqas = sorted({e["role"]["vqa"] for e in grid})
    gens = sorted({e["role"]["generation"] for e in grid})
    value = {(e["role"]["vqa"], e["role"]["generation"]): e["metrics"] for e in grid}
    fig, axes = plt.subplots(1, len(METRICS) + 2, figsize=(4.0 * (len(METRICS) + 2), 3.6))
    for ax, metric in zip(axes, METRICS):
        _heatmap(ax, [[value[(v, g)][metric.field] for g in gens] for v in vqas], vqas, gens,
                 f"ours: {metric.label}", "image_qa records", "generation records")
    million = [f"{a / 1e6:g}M" for a in paper.TABLE6_VQA]
    thousands = [f"{a / 1e3:g}k" for a in paper.TABLE6_GENERATION]
    _heatmap(axes[-2], paper.TABLE6["vqa_average"], million, thousands,
             f"paper {paper.TABLE6['ref']}: average VQA", "VQA samples", "generation samples")
    _heatmap(axes[-1], paper.TABLE6["fid"], million, thousands,
             f"paper {paper.TABLE6['ref']}: FID (lower better)", "VQA samples",
             "generation samples", reverse=True)
    names = [_save(fig, out, "finding2_grid.png")]
    kinds = [e for e in entries if e["role"]["part"] == "kinds"]
    if kinds:
        fig, axes = plt.subplots(1, len(GENERATION_METRICS) + 1,
                                 figsize=(4.6 * (len(GENERATION_METRICS) + 1), 3.8))
        labels = [e["role"]["added"] for e in kinds]
        for ax, field in zip(axes, GENERATION_METRICS):
            ax.bar(range(len(kinds)), [e["metrics"][field] for e in kinds])
            _chance_line(ax, kinds, field)
            ax.set_xticks(range(len(kinds)), labels, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"ours: {BY_FIELD[field].label}\n(generation {kinds[0]['role']['generation']}"
                         " + one kind)", fontsize=9)
        listed = [k for k in labels if k in paper.TABLE5["fid"]]
        axes[-1].bar(range(len(listed)), [paper.TABLE5["fid"][k] for k in listed], color="C1")
        axes[-1].set_xticks(range(len(listed)), listed, rotation=35, ha="right", fontsize=7)
        axes[-1].set_title(f"paper {paper.TABLE5['ref']}: FID, 200k generation\n(lower better)",
                           fontsize=9)
        names.append(_save(fig, out, "finding2_kinds.png"))
    return names


def figure3(entries: list[dict], out: Path) -> list[str]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS) + 2, figsize=(3.6 * (len(METRICS) + 2), 3.6))
    labels = [e["role"]["llm"] for e in entries]
    for ax, metric in zip(axes, METRICS):
        ax.bar(range(len(entries)), [e["metrics"][metric.field] for e in entries])
        _chance_line(ax, entries, metric.field)
        ax.set_xticks(range(len(entries)), labels, fontsize=8)
        ax.set_title(f"ours: {metric.label}", fontsize=9)
    rows = list(paper.TABLE7["rows"])
    for ax, (key, title) in zip(axes[-2:], (("vqa_average", "average VQA"),
                                            ("fid", "FID (lower better)"))):
        values = [paper.TABLE7["rows"][r][key] for r in rows]
        ax.bar(range(len(rows)), values, color="C1")
        ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"paper {paper.TABLE7['ref']}: {title}", fontsize=9)
    return [_save(fig, out, "finding3.png")]


def figure4(entries: list[dict], out: Path) -> list[str]:
    from metamorph_jax.findings.metrics import KNOWLEDGE_METRICS
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(KNOWLEDGE_METRICS), figsize=(4.4 * len(KNOWLEDGE_METRICS), 3.6))
    for ax, metric in zip(np.atleast_1d(axes), KNOWLEDGE_METRICS):
        labels = [e["role"]["llm"] for e in entries] + ["chance"]
        values = [e["knowledge"][metric.field] for e in entries]
        values.append(entries[0]["knowledge"][metric.chance])
        ax.bar(range(len(values)), values, color=["C0"] * len(entries) + ["grey"])
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(f"ours: {metric.label}\n(held-out facts; the paper: Figs. 9-10, "
                     "examples only)", fontsize=8)
    return [_save(fig, out, "finding4.png")]


FIGURES = {1: figure1, 2: figure2, 3: figure3, 4: figure4}
