"""Train and evaluate what the requested findings need, resuming what an earlier command did.

    OUT/assets/            the world, tokenizer and random models (tiny.ensure_assets)
    OUT/shared/<llm>/      the shared stages of each LLM (runs.shared_config); runner
                           work directories: a finished stage (its DONE file) is skipped
    OUT/shared/llm_large/  finding 3's larger random LLM
    OUT/data/              the runs' subset files (data_subsets.py)
    OUT/runs/<name>/       one VPiT run: the runner's work directory (config.json, the
                           instruct stage), run.json (its definition and record counts),
                           final_metrics.json and samples.png (its held-out evaluation with
                           the shared decoder), knowledge_metrics.json (finding 4)

A run whose metrics files exist is never trained or evaluated again; an interrupted one
resumes (the runner restores its stage's newest checkpoint; an evaluation that did not
finish runs again). Nothing compares a finished run or stage with a changed recipe or
scale: after changing them, use a new OUT (OUT/scale.json refuses another --scale).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from metamorph_jax.findings import data_subsets, metrics as metrics_lib, runs as runs_lib
from metamorph_jax.findings.scales import Scale

RUN_FILE = "run.json"


@dataclasses.dataclass
class Plan:
    """What the findings need: each run once (by name), whether it is scored on knowledge
    prompts, and the LLMs whose shared stages they start from."""
    runs: dict          # name -> RunSpec
    knowledge: set      # names of runs finding 4 scores

    @classmethod
    def of(cls, findings) -> "Plan":
        runs, knowledge = {}, set()
        for finding in findings:
            for cell in finding.cells:
                runs.setdefault(cell.run.name, cell.run)
                if finding.knowledge:
                    knowledge.add(cell.run.name)
        return cls(runs, knowledge)

    def llms(self) -> list[str]:
        """"text" first: the others read its tower, and every run its decoder."""
        used = {run.llm for run in self.runs.values()}
        return ["text"] + [llm for llm in runs_lib.LLMS if llm in used and llm != "text"]


def is_done(work_dir: Path, knowledge: bool) -> bool:
    """run.json (written last) and the metrics files the run needs are there."""
    files = [RUN_FILE, metrics_lib.FINAL_FILE] + ([metrics_lib.KNOWLEDGE_FILE] if knowledge
                                                  else [])
    return all((Path(work_dir) / name).is_file() for name in files)


def is_finished(out: Path, finding) -> bool:
    """Every run of `finding` is done in OUT (an earlier command's)."""
    return all(is_done(runs_lib.run_dir(out, cell.run), finding.knowledge)
               for cell in finding.cells)


SCALE_FILE = "scale.json"


def claim_output(out: Path, scale: Scale) -> None:
    """OUT/scale.json names the scale OUT was made at; another scale's command is refused
    (its world and shared stages would not fit the runs)."""
    from metamorph_jax.input_errors import BadInput
    path = Path(out) / SCALE_FILE
    if path.is_file():
        made = json.loads(path.read_text()).get("scale")
        if made != scale.name:
            raise BadInput(f"{out} was made at --scale {made} ({path}); give --scale {made} "
                           f"or another --out for --scale {scale.name}")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scale": scale.name, "fields": scale.describe()}, indent=1)
                    + "\n")


def write_large_llm(base, out: Path, scale: Scale) -> Path:
    """Finding 3's larger random LLM: the base LLM's width and depth times the scale's
    factors (kept when it exists)."""
    from metamorph_jax import pretrained, tiny
    target = runs_lib.large_llm_dir(out)
    if target.exists():
        return target
    root = Path(base.assets.root)
    sizes = pretrained.read_model_config(root / "llm")["config"]
    width, depth = int(scale.larger_llm["width"]), int(scale.larger_llm["depth"])
    larger = dict(hidden_size=sizes["hidden_size"] * width,
                  intermediate_size=sizes["intermediate_size"] * width,
                  num_layers=sizes["num_layers"] * depth, num_heads=sizes["num_heads"],
                  num_kv_heads=sizes["num_kv_heads"], head_dim=sizes["head_dim"] * width)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    tiny.write_random_llm(partial, root / "tokenizer", larger)
    partial.rename(target)
    return target


def train_shared(base, out: Path, plan: Plan, scale: Scale, log=print) -> dict:
    """The shared stages of every LLM the plan uses; {llm: work dir}."""
    from metamorph_jax import tiny
    from metamorph_jax.training import runner
    tiny.ensure_assets(base.assets)
    dirs = {}
    for llm in tqdm(plan.llms(), desc="shared stages", unit="llm"):
        if llm == "large":
            write_large_llm(base, out, scale)
        config = runs_lib.shared_config(base, out, llm)
        log(f"shared stages of the {llm!r} LLM: {', '.join(config.order)} -> {config.work_dir}")
        runner.run(config)
        dirs[llm] = config.work_dir
    return dirs


def eval_config(base):
    from metamorph_jax.evaluation import shapes_eval
    fields = base.final_eval.to_dict()
    fields.pop("world")
    return shapes_eval.ShapesEvalConfig.from_config(fields)


def train_and_evaluate(base, out: Path, run, knowledge: bool, scale: Scale) -> dict:
    """One run (resumed; skipped when done); returns its run.json content."""
    from metamorph_jax.evaluation import knowledge_eval, shapes_eval
    from metamorph_jax.training import runner
    work_dir = runs_lib.run_dir(out, run)
    world = runs_lib.world_dir(base)
    if is_done(work_dir, knowledge):
        return json.loads((work_dir / RUN_FILE).read_text())
    started = time.time()
    files = data_subsets.write_subsets(world, out, run.records())
    config = runs_lib.run_config(base, out, run, files)
    results = runner.run(config)
    stage_seconds = {r.name: {"seconds": round(r.seconds, 1),
                              "cpu_seconds": round(r.cpu_seconds, 1),
                              **({} if r.ran else {"earlier_run": True})}
                     for r in results if r.ran or r.cpu_seconds}
    decoder = runs_lib.decoder_dir(base, out)
    evaluation = eval_config(base)
    if not (work_dir / metrics_lib.FINAL_FILE).is_file():
        shapes_eval.evaluate_shapes(work_dir, world, evaluation, stage_seconds=stage_seconds,
                                    visualizer_dir=decoder,
                                    incomplete_stages={r.name: {"steps": r.steps,
                                                                "planned_steps": r.planned_steps}
                                                       for r in results if not r.complete})
    if knowledge and not (work_dir / metrics_lib.KNOWLEDGE_FILE).is_file():
        knowledge_eval.evaluate_knowledge(work_dir, evaluation, visualizer_dir=decoder,
                                          per_fact=scale.knowledge_per_fact)
    info = {"name": run.name, "llm": run.llm, "epochs": run.epochs,
            "records": {kind: data_subsets.count_records(path) for kind, path in files.items()},
            "data_files": {kind: str(path) for kind, path in files.items()},
            "adapter": config.stages[config.order[0]].init.model_dir,
            "decoder": str(decoder), "steps": {r.name: r.steps for r in results},
            "seconds_this_command": round(time.time() - started, 1)}
    # Written last: with it the run counts as done (is_done).
    (work_dir / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info
