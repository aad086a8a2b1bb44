"""The benchmarks by name: how each is read (readers.py), prompted (prompts.py) and scored
(scoring.py, results.py).

| name        | file given                        | rule    | categories          |
| ----------- | --------------------------------- | ------- | ------------------- |
| mmbench     | VLMEvalKit MMBench_DEV_EN.tsv     | choice, circular | category   |
| seed        | VLMEvalKit SEEDBench_IMG.tsv      | choice  | category            |
| scienceqa   | VLMEvalKit ScienceQA_TEST.tsv (image questions) | choice | category |
| mmmu        | VLMEvalKit MMMU_DEV_VAL.tsv (validation, multiple choice) | choice | category |
| realworldqa | VLMEvalKit RealWorldQA.tsv        | choice  | -                   |
| vstar       | VLMEvalKit VStarBench.tsv         | choice  | category            |
| mmvp        | VLMEvalKit MMVP.tsv               | choice, pairs | category      |
| textvqa     | VLMEvalKit TextVQA_VAL.tsv        | vqa     | -                   |
| chartqa     | VLMEvalKit ChartQA_TEST.tsv       | relaxed | category if given   |
| mvbench     | the MVBench folder (json/, video/) | choice | task                |
| jsonl       | generic JSONL                     | choice or exact | category if given |
"""
from __future__ import annotations

from functools import partial

from metamorph_jax.evaluation import readers
from metamorph_jax.input_errors import BadInput

TSV_BENCHMARKS = ("mmbench", "seed", "scienceqa", "mmmu", "realworldqa", "vstar", "mmvp",
                  "textvqa", "chartqa")
READERS = {name: partial(readers.read_vlmevalkit_tsv, benchmark=name) for name in TSV_BENCHMARKS}
READERS["mvbench"] = readers.read_mvbench
READERS["jsonl"] = readers.read_jsonl
NAMES = tuple(READERS)


def read(benchmark: str, path):
    """(samples, skipped) of a benchmark file."""
    if benchmark not in READERS:
        raise BadInput(f"unknown benchmark {benchmark!r}; choose one of {NAMES}")
    return READERS[benchmark](path)
