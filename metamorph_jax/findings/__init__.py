"""MetaMorph's four findings as experiments on the Shapes world (issue 23, section 3).

    python -m metamorph_jax.findings [--finding 1|2|3|4 ...] [--out runs/findings]
                                     [--scale laptop|pod|mini] [--dry-run]

1. Generation emerges from joint training with little generation data (paper Table 4 /
   Fig. 2-3): generation-only runs against joint runs (+ every other kind) at several
   generation amounts; generation metrics against the amount, one line each.
2. Understanding data helps generation more than generation data does (Fig. 7, Table 6):
   a grid of image_qa x generation amounts, heatmaps of VQA accuracy, token cosine and
   oracle accuracy; and which kind helps generation most (Table 5): the reference
   generation set alone, with one kind added at a time, and with all of them.
3. A stronger LLM gives better understanding and generation (Table 7): a random LLM, the
   text-pretrained LLM and a larger text-pretrained LLM on the same VPiT data.
4. Knowledge from the LLM reaches generation (Figs. 9-10): prompts naming things whose
   colour or shape only the text stage taught (data/shapes_text.HELD_OUT_FACTS; no VPiT
   record names them), scored by the pixel oracle (evaluation/knowledge_eval.py) for the
   text-pretrained model, a model whose text stage lacked those facts, and chance.

Every run is a variation of one base recipe (runs.main_recipe -> runs.base_config); the
shared stages (text LLM, tower, decoder, an adapter per LLM) are trained once under
OUT/shared; each run trains the recipe's instruct stage on subset files of the world's
train split (data_subsets.py) and is evaluated with evaluation/shapes_eval.py (held-out
split, the shared decoder). Sizes per scale: scales.py (laptop: minutes per run on 2 CPU
cores; pod: the sizes of a pod run, documented and printed by --dry-run, not run here;
mini: the tests'). Outputs: OUT/report.md (each comparison with the paper's direction and
whether ours agrees), OUT/results.json (per finding and run: role, definition, config file,
metrics read from the run's final_metrics.json, the paper's numbers), OUT/finding*.png.

Modules: scales.py (sizes), paper.py (the paper's numbers), runs.py (base recipe, run
definitions, configs), data_subsets.py (amounts), orchestrate.py (training and evaluation
with resume), metrics.py (the metric table), report.py (results.json, report.md),
figures.py, __main__.py (the command).
"""
