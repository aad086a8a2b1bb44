"""python -m metamorph_jax.findings [--finding 1|2|3|4 ...] [--out runs/findings]
[--scale laptop|pod|mini] [--dry-run]

Trains the runs the findings need (sharing the text-pretrained LLM, the tower, the decoder
and each LLM's adapter), evaluates each on the world's held-out split and writes
OUT/report.md, OUT/results.json and OUT/finding*.png (metamorph_jax/findings/__init__.py).
Re-running resumes: finished runs are not trained or evaluated again. `--dry-run` lists
the runs and their configs and trains nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from metamorph_jax.input_errors import ArgumentParser, run_command


def parse(argv):
    from metamorph_jax.findings.scales import SCALES
    parser = ArgumentParser(prog="python -m metamorph_jax.findings",
                            description="Reproduce MetaMorph's findings on the Shapes world.")
    parser.add_argument("--finding", type=int, choices=(1, 2, 3, 4), action="append",
                        help="a finding to run (repeatable; default: all four)")
    parser.add_argument("--out", default="runs/findings", help="output folder")
    parser.add_argument("--scale", choices=sorted(SCALES), default="laptop",
                        help="laptop (minutes per run on 2 cores), pod (documented sizes of a "
                             "pod run), mini (the tests' miniature)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and their configs; train nothing")
    return parser.parse_args(argv)


def dry_run(findings, base, out: Path, scale) -> int:
    import json

    from metamorph_jax.findings import orchestrate, runs as runs_lib
    plan = orchestrate.Plan.of(findings)
    print(f"scale {scale.name}: {json.dumps(scale.describe())}")
    print(f"base recipe (runs.main_recipe) stages: {', '.join(base.order)}; world "
          f"{runs_lib.world_dir(base)}: {json.dumps(base.assets.to_dict())}")
    for llm in plan.llms():
        config = runs_lib.shared_config(base, out, llm)
        steps = {n: config.stages[n].steps for n in config.order}
        print(f"shared {llm}: {config.work_dir}: stages {json.dumps(steps)}")
    for finding in findings:
        print(f"finding {finding.number}: {finding.title} ({len(finding.cells)} cells)")
        for cell in finding.cells:
            print(f"  {json.dumps(cell.role)} -> run {cell.run.name}")
    instruct = runs_lib.stage_of_kind(base, "instruct")
    print(f"{len(plan.runs)} distinct runs (each: stage {instruct!r}, one pass over its "
          f"records read {scale.epochs} times, then the held-out evaluation):")
    for name, run in sorted(plan.runs.items()):
        files = {kind: f"OUT/data/{kind}-{count}" for kind, count in run.data}
        config = runs_lib.run_config(base, out, run, files)
        stage = config.stages[instruct]
        print(f"  {name}: llm {run.llm}, records {json.dumps(run.records())}, "
              f"{'knowledge prompts too, ' if name in plan.knowledge else ''}"
              f"init {stage.init.model_dir}, batch {stage.data.batch_size} x "
              f"{stage.data.seq_len}, lr {stage.optim.lr}")
    return 0


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from metamorph_jax.findings import orchestrate, report, runs as runs_lib
    from metamorph_jax.findings.scales import SCALES
    scale = SCALES[args.scale]
    out = Path(args.out).resolve()
    numbers = sorted(set(args.finding or (1, 2, 3, 4)))
    findings = runs_lib.findings(numbers, scale)
    base = runs_lib.base_config(out / "assets", scale)
    if args.dry_run:
        return dry_run(findings, base, out, scale)
    started = time.time()
    orchestrate.claim_output(out, scale)
    plan = orchestrate.Plan.of(findings)
    orchestrate.train_shared(base, out, plan, scale)
    for name in orchestrate.tqdm(sorted(plan.runs), desc="finding runs", unit="run"):
        orchestrate.train_and_evaluate(base, out, plan.runs[name], name in plan.knowledge, scale)
    # the report also keeps the findings an earlier command finished in OUT
    earlier = [f for f in runs_lib.findings(sorted(set(runs_lib.FINDINGS) - set(numbers)), scale)
               if orchestrate.is_finished(out, f)]
    findings = sorted(findings + earlier, key=lambda f: f.number)
    shared = {llm: str(runs_lib.shared_dir(out, llm)) for llm in orchestrate.Plan.of(findings).llms()}
    results = report.build_results(findings, out, scale, base, shared)
    results_path = report.write_results(results, out)
    report_path = report.write_report(results, out, time.time() - started)
    for number, finding in results["findings"].items():
        for verdict in finding["verdicts"]:
            print(f"finding {number}: {verdict['text']}")
    print(f"wrote {report_path}, {results_path} and "
          f"{', '.join(n for f in results['findings'].values() for n in f['figures'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
