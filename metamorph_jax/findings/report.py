"""OUT/results.json and OUT/report.md from the runs' own metrics files.

results.json: {"scale", "scale_fields", "base_recipe", "paper", "shared", "findings": {"1":
{"title", "claim", "paper_refs", "figures", "verdicts", "runs": [{"name", "role", "work_dir",
"config_file", "definition" (run.json: LLM, records per kind, epochs, steps), "metrics"
(metrics.METRICS read from the run's final_metrics.json), "knowledge" (finding 4:
knowledge_metrics.json), "paper" (the paper's numbers set beside it)}]}}}.

Each finding's `verdicts` compare our direction with the paper's in one sentence each, with
the numbers, and say `agrees` or `DISAGREES`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metamorph_jax.findings import metrics as metrics_lib
from metamorph_jax.findings import paper, runs as runs_lib
from metamorph_jax.findings.metrics import BY_FIELD, METRICS

RESULTS_FILE = "results.json"
# Differences smaller than this are ties (no direction).
TIE = 1e-9
REPORT_FILE = "report.md"


def run_entry(out: Path, cell, knowledge: bool) -> dict:
    work_dir = runs_lib.run_dir(out, cell.run)
    entry = {"name": cell.run.name, "role": cell.role, "work_dir": str(work_dir),
             "config_file": str(work_dir / "config.json"),
             "definition": json.loads((work_dir / "run.json").read_text()),
             "metrics": metrics_lib.run_metrics(work_dir), "paper": cell.paper}
    if knowledge:
        entry["knowledge"] = metrics_lib.knowledge_metrics(work_dir)
    return entry


def _agree(flag: bool) -> str:
    return "agrees with the paper" if flag else "DISAGREES with the paper"


def _f(value: float) -> str:
    return f"{value:.3f}"


def _with_chance(entry: dict, field: str) -> str:
    """The value, with how many items it counts (a share of few items is coarse) and its
    chance level where that is the run's own (the token cosine of mismatched pairs: a
    cosine at its chance does not depend on the prompt)."""
    if field not in BY_FIELD:   # a derived value (metrics.value)
        return f"{metrics_lib.value(entry['metrics'], field):+.3f}"
    metric = BY_FIELD[field]
    values = entry["knowledge"] if metric.file != metrics_lib.FINAL_FILE else entry["metrics"]
    text = _f(values[field])
    notes = []
    total = values.get("counts", {}).get(metric.denominator) if metric.denominator else None
    if total:
        notes.append(f"{round(values[field] * total)} of {total}")
    if metric.chance_per_run:
        notes.append(f"chance {_f(values[metric.chance])}")
    return f"{text} ({', '.join(notes)})" if notes else text


# --- verdicts per finding ------------------------------------------------------------------

def verdicts1(entries: list[dict]) -> list[dict]:
    by = {(e["role"]["setting"], e["role"]["generation"]): e for e in entries}
    amounts = sorted({e["role"]["generation"] for e in entries})
    out = []
    for field in metrics_lib.GENERATION_COMPARISONS:
        pairs = [(a, metrics_lib.value(by[("joint", a)]["metrics"], field),
                  metrics_lib.value(by[("generation_only", a)]["metrics"], field))
                 for a in amounts]
        wins = [a for a, joint, alone in pairs if joint - alone > TIE]
        agrees = len(wins) == len(amounts)
        detail = "; ".join(f"{a}: {_with_chance(by[('joint', a)], field)} vs "
                           f"{_with_chance(by[('generation_only', a)], field)}" for a in amounts)
        out.append({"metric": field, "agrees": agrees, "text": (
            f"{metrics_lib.label(field)}: joint above generation-only at {len(wins)} of "
            f"{len(amounts)} generation amounts (joint vs generation-only, {detail}); the "
            f"paper has joint better at every amount (FID 19.2 vs 116.4 at 5k): "
            f"{_agree(agrees)}.")})
    return out


def _axis_effects(grid: dict, rows, cols) -> tuple[float, float]:
    """(mean over columns of last row - first row, mean over rows of last col - first col)."""
    down = np.mean([grid[(rows[-1], c)] - grid[(rows[0], c)] for c in cols])
    across = np.mean([grid[(r, cols[-1])] - grid[(r, cols[0])] for r in rows])
    return float(down), float(across)


def paper_axis_effects(vqa_amounts, gen_amounts) -> dict:
    """Table 6's axis effects over the cells rank-matched to ours (improvements: VQA up,
    FID down)."""
    vqa = paper.rank_matched(vqa_amounts, paper.TABLE6_VQA)
    gen = paper.rank_matched(gen_amounts, paper.TABLE6_GENERATION)
    rows = [paper.TABLE6_VQA.index(vqa[v]) for v in sorted(vqa_amounts)]
    cols = [paper.TABLE6_GENERATION.index(gen[g]) for g in sorted(gen_amounts)]
    effects = {}
    for name, sign in (("vqa_average", 1.0), ("fid", -1.0)):
        table = {(r, c): sign * paper.TABLE6[name][r][c] for r in rows for c in cols}
        effects[name] = _axis_effects(table, rows, cols)
    return effects


def verdicts2(entries: list[dict]) -> list[dict]:
    grid = [e for e in entries if e["role"]["part"] == "grid"]
    vqas = sorted({e["role"]["vqa"] for e in grid})
    gens = sorted({e["role"]["generation"] for e in grid})
    theirs = paper_axis_effects(vqas, gens)
    out = []
    for key in metrics_lib.COMPARISONS:
        values = {(e["role"]["vqa"], e["role"]["generation"]): metrics_lib.value(e["metrics"], key)
                  for e in grid}
        by_vqa, by_gen = _axis_effects(values, vqas, gens)
        paper_name = "vqa_average" if key == "vqa_accuracy" else "fid"
        p_vqa, p_gen = theirs[paper_name]
        winner = ("neither" if abs(by_vqa - by_gen) < TIE else
                  "the VQA axis" if by_vqa > by_gen else "the generation axis")
        agrees = winner != "neither" and (by_vqa > by_gen) == (p_vqa > p_gen)
        out.append({"metric": key, "agrees": agrees, "text": (
            f"{metrics_lib.label(key)}: more VQA data ({vqas[0]} -> {vqas[-1]}) improves it by "
            f"{by_vqa:+.3f}, more generation data ({gens[0]} -> {gens[-1]}) by {by_gen:+.3f} "
            f"(means over the other axis): {winner} improves it more; the paper's "
            f"rank-matched Table 6 cells "
            f"({'average VQA' if paper_name == 'vqa_average' else 'FID decrease'}): "
            f"VQA axis {p_vqa:+.1f}, generation axis {p_gen:+.1f}: {_agree(agrees)}.")})
    kinds = {e["role"]["added"]: e for e in entries if e["role"]["part"] == "kinds"}
    if "none" in kinds:
        added = [k for k in kinds if k not in ("none", "all")]
        paper_order = sorted((k for k in added if k in paper.TABLE5["fid"]),
                             key=lambda k: paper.TABLE5["fid"][k])
        for field in metrics_lib.GENERATION_COMPARISONS:
            base = metrics_lib.value(kinds["none"]["metrics"], field)
            gains = {k: metrics_lib.value(kinds[k]["metrics"], field) - base for k in added}
            order = sorted(added, key=lambda k: -gains[k])
            # the paper's best kind must help, and more than every other kind
            agrees = (bool(order) and bool(paper_order) and order[0] == paper_order[0]
                      and gains[order[0]] > TIE
                      and all(gains[order[0]] - gains[k] > TIE for k in order[1:]))
            listing = ", ".join(f"{k} {gains[k]:+.3f}" for k in order)
            every = sum(1 for k in added if gains[k] > 0)
            out.append({"metric": field, "agrees": agrees, "text": (
                f"{metrics_lib.label(field)} over generation alone ({_f(base)}): {listing}"
                + (f"; all data {metrics_lib.value(kinds['all']['metrics'], field) - base:+.3f}"
                   if "all" in kinds
                   else "")
                + f". {every} of {len(added)} kinds help; the most: {order[0] if order else '-'}; "
                f"the paper's most (Table 5 FID): {paper_order[0] if paper_order else '-'} "
                f"(order {', '.join(paper_order)}): {_agree(agrees)}.")})
    return out


def verdicts3(entries: list[dict]) -> list[dict]:
    by = {e["role"]["llm"]: e for e in entries}
    out = []
    rows = paper.TABLE7["rows"]
    for key in metrics_lib.COMPARISONS:
        values = {llm: metrics_lib.value(by[llm]["metrics"], key) for llm in by}
        ordered = [llm for llm, _, _ in runs_lib.LLM_ROLES if llm in values]
        rising = all(values[b] - values[a] > TIE for a, b in zip(ordered, ordered[1:]))
        shown = ", ".join(f"{llm} {_with_chance(by[llm], key)}" for llm in ordered)
        if key == "vqa_accuracy":
            theirs = (f"average VQA LLaMA-3 8B {rows['LLaMA-3 8B']['vqa_average']} < 3.1 8B "
                      f"{rows['LLaMA-3.1 8B']['vqa_average']} < 70B "
                      f"{rows['LLaMA-3 70B']['vqa_average']}")
        else:
            theirs = (f"FID LLaMA-3 8B {rows['LLaMA-3 8B']['fid']}, 3.1 8B "
                      f"{rows['LLaMA-3.1 8B']['fid']}, 70B {rows['LLaMA-3 70B']['fid']} "
                      "(both larger or newer LLMs better than LLaMA-3 8B)")
        out.append({"metric": key, "agrees": rising, "text": (
            f"{metrics_lib.label(key)}: {shown}; "
            + ("rises with the LLM" if rising else "does not rise with the LLM at every step")
            + f"; the paper: {theirs}: {_agree(rising)}.")})
    return out


def verdicts4(entries: list[dict]) -> list[dict]:
    by = {e["role"]["llm"]: e for e in entries}
    out = []
    for metric in metrics_lib.KNOWLEDGE_METRICS:
        text, control = by["text"]["knowledge"][metric.field], by["control"]["knowledge"][metric.field]
        chance = by["text"]["knowledge"][metric.chance]
        agrees = text - control > TIE and text - chance > TIE
        out.append({"metric": metric.field, "agrees": agrees, "text": (
            f"{metric.label} on prompts naming held-out facts: text-pretrained "
            f"{_with_chance(by['text'], metric.field)}, control (text stage without those "
            f"facts) {_with_chance(by['control'], metric.field)}, chance {_f(chance)}; "
            f"the paper shows knowledge reaching generation (Figs. 9-10, examples): "
            f"{_agree(agrees)}.")})
    return out


VERDICTS = {1: verdicts1, 2: verdicts2, 3: verdicts3, 4: verdicts4}


# --- the files -----------------------------------------------------------------------------

def build_results(findings, out: Path, scale, base, shared: dict) -> dict:
    """results.json's content (module docstring); draws each finding's figures."""
    from metamorph_jax.findings import figures
    results = {"scale": scale.name, "scale_fields": scale.describe(),
               "base_recipe": "configs/shapes.py recipe() "
                              "(metamorph_jax/findings/runs.py main_recipe)",
               "paper": paper.SOURCE, "shared": {k: str(v) for k, v in shared.items()},
               "decoder": str(runs_lib.decoder_dir(base, out)), "findings": {}}
    for finding in findings:
        entries = [run_entry(out, cell, finding.knowledge) for cell in finding.cells]
        results["findings"][str(finding.number)] = {
            "title": finding.title, "claim": finding.claim, "paper_refs": finding.paper_refs,
            "figures": figures.FIGURES[finding.number](entries, out), "runs": entries,
            "verdicts": VERDICTS[finding.number](entries)}
    return results


def varying_chance(entries: list[dict]) -> list:
    """The metrics whose chance level differs between runs (the token cosine's mismatched
    pairs are the run's own tokens): the table gives those per run."""
    return [m for m in METRICS if len({e["metrics"][m.chance] for e in entries}) > 1]


def _table(entries: list[dict], role_keys, knowledge: bool) -> list[str]:
    columns = []
    for metric in METRICS:
        columns.append((metric.label, metric.field))
        if metric in varying_chance(entries):
            columns.append((f"{metric.label} chance", metric.chance))
    head = role_keys + [label for label, _ in columns]
    if knowledge:
        head += [m.label for m in metrics_lib.KNOWLEDGE_METRICS]
    head += ["instruct steps", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in entries:
        row = [str(e["role"].get(k, "")) for k in role_keys]
        row += [_f(e["metrics"][field]) for _, field in columns]
        if knowledge:
            row += [_f(e["knowledge"][m.field]) for m in metrics_lib.KNOWLEDGE_METRICS]
        row.append(", ".join(str(v) for v in e["definition"]["steps"].values()))
        row.append(", ".join(f"{k} {v}" for k, v in e["paper"].items()
                             if k not in ("ref", "claim")))
        lines.append("| " + " | ".join(row) + " |")
    return lines


ROLE_KEYS = {1: ["setting", "generation"], 2: ["part", "vqa", "added", "generation"],
             3: ["label"], 4: ["label"]}


def write_report(results: dict, out: Path, seconds: float | None = None) -> Path:
    lines = [f"# MetaMorph's findings on the Shapes world ({results['scale']} scale)", "",
             f"Base recipe: {results['base_recipe']}. Paper: {results['paper']}. Every number "
             "below is read from the runs' own final_metrics.json / knowledge_metrics.json "
             "(results.json has the paths); every run's config is its work directory's "
             "config.json. Our amounts are records of the Shapes world, the paper's are "
             "samples of real data: runs are set beside the paper's rows of the same rank.",
             "", "Chance levels (prompt-blind): VQA = majority training answer per kind, "
             "token cosine = mismatched prompt/image pairs, oracle = uniform guess.", ""]
    if seconds is not None:
        lines += [f"This command took {seconds / 60:.1f} min (runs done by an earlier command "
                  "are not counted).", ""]
    for number, finding in results["findings"].items():
        lines += [f"## Finding {number}: {finding['title']}", "",
                  f"The paper ({finding['paper_refs']}): {finding['claim']}.", ""]
        disagreements = [v for v in finding["verdicts"] if not v["agrees"]]
        lines.append("**Verdict:** " + ("every comparison agrees with the paper's direction."
                                        if not disagreements else
                                        f"{len(disagreements)} of {len(finding['verdicts'])} "
                                        "comparisons DISAGREE with the paper (below)."))
        lines.append("")
        lines += [f"- {v['text']}" for v in finding["verdicts"]]
        lines.append("")
        lines += _table(finding["runs"], ROLE_KEYS[int(number)], int(number) == 4)
        first = finding["runs"][0]["metrics"]
        fixed = [m for m in METRICS if m not in varying_chance(finding["runs"])]
        lines += ["", "Chance: " + ", ".join(f"{m.label} {_f(first[m.chance])}" for m in fixed)
                  + ".", ""]
        lines += [f"![finding {number}]({name})" for name in finding["figures"]] + [""]
    path = Path(out) / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def write_results(results: dict, out: Path) -> Path:
    path = Path(out) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path
