"""What the text stage of configs/shapes.py (stage 0) teaches, and what it costs.

  python -m benchmarks.text_stage [--assets runs/shapes_assets_v2] [--work-dir /tmp/text_stage] \
      [--steps N] [--lr X] [--batch B] [--llm '{"num_layers": 4, "hidden_size": 128}']

Makes that config's assets when absent (tiny.ensure_assets, with the text corpus), runs
the text stage alone (steps / lr default to the config's), and prints the
answer-token accuracy (evaluation/answer_accuracy.py) of the LLM before (the random
assets LLM) and after, on the text corpus's evaluation records (data/shapes_text.py
eval_records): questions about held-out scenes (test-split scenes, never in the corpus) per
question kind, and the knowledge facts (held-out facts and the others, both taught by the
corpus). Also the stage's seconds and CPU seconds.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path


def shapes_config(assets: str):
    spec = importlib.util.spec_from_file_location(
        "shapes_config", Path(__file__).resolve().parents[1] / "configs" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recipe(assets)


def measure(llm_dir, tokenizer_dir, records) -> dict:
    from metamorph_jax.evaluation.answer_accuracy import answer_accuracy
    scenes = [r for r in records if r["kind"] == "question_chat"]
    facts = [dict(r, group="held_out" if r["held_out_fact"] else "taught")
             for r in records if r["kind"] == "fact_chat"]
    return {"held_out_scenes": answer_accuracy(llm_dir, scenes, "question_kind", tokenizer_dir),
            "facts": answer_accuracy(llm_dir, facts, "group", tokenizer_dir)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="runs/shapes_assets_v2")
    parser.add_argument("--work-dir", default="/tmp/text_stage")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None, help="rows per step")
    parser.add_argument("--llm", default=None,
                        help="JSON of assets.llm sizes (tiny.LLM_FIELDS); a new --assets folder")
    args = parser.parse_args(argv)

    from metamorph_jax import tiny
    from metamorph_jax.data import shapes_text
    from metamorph_jax.training import runner

    config = copy.deepcopy(shapes_config(args.assets))
    config.work_dir = args.work_dir
    config.order = ("text",)
    if args.steps is not None:
        config.stages.text.steps = args.steps
    if args.lr is not None:
        config.stages.text.optim.lr = args.lr
    if args.batch is not None:
        config.stages.text.data.batch_size = args.batch
    if args.llm is not None:
        with config.unlocked():
            config.assets.llm = json.loads(args.llm)
    start = time.time()
    paths = tiny.ensure_assets(config.assets)
    print(f"assets: {time.time() - start:.1f} s", flush=True)
    records = [json.loads(line) for line in
               (paths["text"] / shapes_text.EVAL_FILE).read_text().splitlines()]
    before = measure(paths["llm"], paths["tokenizer"], records)
    print("before:", json.dumps(before), flush=True)
    result = runner.run(config)[0]
    after = measure(result.final_dir, paths["tokenizer"], records)
    print("after:", json.dumps(after))
    print(json.dumps({"steps": int(config.stages.text.steps),
                      "lr": float(config.stages.text.optim.lr),
                      "batch": int(config.stages.text.data.batch_size),
                      "llm": config.assets.get("llm") and config.assets.llm.to_dict(),
                      "seconds": result.seconds, "cpu_seconds": result.cpu_seconds}))


if __name__ == "__main__":
    main()
