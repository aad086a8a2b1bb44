"""python -m metamorph_jax.findings: the four findings' miniature (--scale mini: a 96-scene
world, two amounts per axis, a few steps per stage) end to end, its resume, its dry run and
its errors; and the pieces (run definitions, subsets, shared configs, verdicts, knowledge
scores) on their own."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metamorph_jax.findings import data_subsets, orchestrate, paper, report, runs
from metamorph_jax.findings.scales import SCALES

REPO = Path(__file__).resolve().parents[1]


def findings_command(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)   # one CPU device: the miniature is faster unsharded
    result = subprocess.run([sys.executable, "-m", "metamorph_jax.findings", *args], cwd=REPO,
                            env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("findings") / "out"
    result = findings_command("--scale", "mini", "--out", str(out))
    return out, result


def results_of(out: Path) -> dict:
    return json.loads((out / report.RESULTS_FILE).read_text())


# --- end to end (slow) ----------------------------------------------------------------------

@pytest.mark.slow
def test_the_miniature_writes_the_report_results_and_figures(mini):
    out, result = mini
    results = results_of(out)
    assert sorted(results["findings"]) == ["1", "2", "3", "4"]
    text = (out / report.REPORT_FILE).read_text()
    for number, finding in results["findings"].items():
        assert f"## Finding {number}: {finding['title']}" in text
        assert finding["verdicts"], number
        for verdict in finding["verdicts"]:
            assert verdict["text"] in text
            assert verdict["text"].endswith(("agrees with the paper.",
                                             "DISAGREES with the paper."))
        assert finding["figures"]
        for name in finding["figures"]:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in text
        for run in finding["runs"]:
            config = json.loads(Path(run["config_file"]).read_text())
            assert config["work_dir"] == run["work_dir"]
            # the records a run trained on are the counts of its subset files, as asked
            stage = config["stages"][config["order"][0]]
            for kind, count in run["definition"]["records"].items():
                path = Path(stage["data"]["sources"][kind]["path"])
                assert data_subsets.count_records(path) == count
            assert run["paper"]["ref"]
    scale = SCALES["mini"]
    one = results["findings"]["1"]["runs"]
    assert sorted({r["role"]["generation"] for r in one}) == sorted(scale.generation_amounts)
    grid = [r for r in results["findings"]["2"]["runs"] if r["role"]["part"] == "grid"]
    assert len(grid) == len(scale.grid_vqa) * len(scale.grid_generation)
    assert "wrote" in result.stdout


@pytest.mark.slow
def test_results_numbers_are_the_runs_own_metrics(mini):
    out, _ = mini
    for finding in results_of(out)["findings"].values():
        for run in finding["runs"]:
            final = json.loads((Path(run["work_dir"]) / "final_metrics.json").read_text())
            assert run["metrics"], run["name"]
            for field, value in run["metrics"].items():
                assert value == final[field], (run["name"], field)
            if "knowledge" in run:
                knowledge = json.loads(
                    (Path(run["work_dir"]) / "knowledge_metrics.json").read_text())
                for field, value in run["knowledge"].items():
                    assert value == knowledge[field], (run["name"], field)
    # finding 4 scores both of its runs on the held-out facts' prompts
    four = results_of(out)["findings"]["4"]["runs"]
    assert {r["role"]["llm"] for r in four} == {"text", "control"}
    assert all(r["knowledge"]["counts"]["facts"] == 9 for r in four)


@pytest.mark.slow
def test_a_second_command_trains_nothing_again_and_finishes_an_interrupted_run(mini):
    out, _ = mini
    run_dirs = sorted((out / "runs").iterdir())
    stamps = {p: p.stat().st_mtime_ns for d in run_dirs + sorted((out / "shared").iterdir())
              for p in d.rglob("*") if p.is_file()}
    # an evaluation cut short: a grid run's training is done, its metrics and run.json not
    grid_run = runs.findings((2,), SCALES["mini"])[0].cells[0].run
    cut = runs.run_dir(out, grid_run)
    (cut / "final_metrics.json").unlink()
    (cut / orchestrate.RUN_FILE).unlink()
    done_file = cut / "instruct" / "final" / "DONE"
    result = findings_command("--scale", "mini", "--out", str(out), "--finding", "2")
    # no stage ran: no stage's progress bar
    assert not re.search(r"(^|[\r\n])(text|tower|adapter|instruct|decoder): +\d+%", result.stderr)
    assert (cut / "final_metrics.json").is_file() and (cut / orchestrate.RUN_FILE).is_file()
    assert done_file.stat().st_mtime_ns == stamps[done_file]
    changed = [p for p, stamp in stamps.items()
               if p.exists() and p.stat().st_mtime_ns != stamp and p.parent != cut]
    # runner.run rewrites each work directory's config.json; nothing else changed
    assert all(p.name == "config.json" for p in changed), changed
    # the report keeps the findings the first command finished
    assert sorted(results_of(out)["findings"]) == ["1", "2", "3", "4"]


def test_an_output_folder_made_at_another_scale_is_refused(tmp_path):
    orchestrate.claim_output(tmp_path, SCALES["mini"])
    result = findings_command("--scale", "laptop", "--out", str(tmp_path), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--scale mini" in lines[0] and "scale.json" in lines[0], lines


# --- the command line -----------------------------------------------------------------------

def test_dry_run_lists_every_run_and_trains_nothing(tmp_path):
    result = findings_command("--scale", "mini", "--out", str(tmp_path / "out"), "--dry-run")
    plan = orchestrate.Plan.of(runs.findings((1, 2, 3, 4), SCALES["mini"]))
    for name in plan.runs:
        assert f"  {name}: llm " in result.stdout
    assert f"{len(plan.runs)} distinct runs" in result.stdout
    for llm in ("text", "random", "large", "control"):
        assert f"shared {llm}:" in result.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_of_the_pod_scale_prints_its_sizes(tmp_path):
    result = findings_command("--scale", "pod", "--finding", "1", "--out", str(tmp_path),
                              "--dry-run")
    assert '"train": 400000' in result.stdout
    for amount in SCALES["pod"].generation_amounts:
        assert f'"text_to_image": {amount}' in result.stdout


def test_an_unknown_finding_is_one_line_error(tmp_path):
    result = findings_command("--finding", "7", "--out", str(tmp_path), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "7" in lines[0], result.stderr


# --- the pieces -----------------------------------------------------------------------------

def test_runs_shared_between_findings_are_one_run():
    scale = SCALES["laptop"]
    found = runs.findings((1, 2, 3, 4), scale)
    plan = orchestrate.Plan.of(found)
    cells = sum(len(f.cells) for f in found)
    # finding 2's "none", "image_qa" and "all" rows are finding 1's and the grid's runs;
    # findings 3 and 4's text-pretrained run is finding 1's joint run at the reference amount
    assert cells - len(plan.runs) == 3 + 2
    reference = runs.spec("text", runs.joint_records(scale, scale.reference_generation),
                          scale.epochs)
    assert reference.name in plan.knowledge
    assert plan.llms() == ["text", "random", "large", "control"]


def test_rank_matching_spreads_our_amounts_over_the_papers():
    assert paper.rank_matched((5, 1), (10, 20, 30)) == {1: 10, 5: 30}
    assert paper.rank_matched((1, 2, 3), (10, 20, 30, 40, 50)) == {1: 10, 2: 30, 3: 50}
    with pytest.raises(ValueError):
        paper.rank_matched((1, 2, 3), (10, 20))


def test_subsets_take_generation_from_the_head_and_other_kinds_from_the_tail(tmp_path):
    world = tmp_path / "world"
    (world / "train").mkdir(parents=True)
    for kind in ("text_to_image", "image_qa"):
        (world / "train" / f"{kind}.jsonl").write_text(
            "".join(json.dumps({"id": f"{kind}-{i}"}) + "\n" for i in range(5)))
    files = data_subsets.write_subsets(world, tmp_path / "out",
                                       {"text_to_image": 2, "image_qa": 2})
    ids = {k: [json.loads(line)["id"] for line in p.read_text().splitlines()]
           for k, p in files.items()}
    assert ids == {"text_to_image": ["text_to_image-0", "text_to_image-1"],
                   "image_qa": ["image_qa-3", "image_qa-4"]}
    with pytest.raises(ValueError, match=r"image_qa\.jsonl holds 5 records; a finding asks for 6"):
        data_subsets.write_subsets(world, tmp_path / "out", {"image_qa": 6})


def test_shared_and_run_configs_vary_only_what_the_finding_varies(tmp_path):
    scale = SCALES["mini"]
    base = runs.base_config(str(tmp_path / "assets"), scale)
    out = tmp_path / "out"
    text = runs.shared_config(base, out, "text")
    assert list(text.order) == [n for n in base.order if base.stages[n].kind != "instruct"]
    assert list(text.stages.adapter.data.sources) == ["image_qa"]
    tower = str(runs.shared_dir(out, "text") / "tower" / "final")
    control = runs.shared_config(base, out, "control")
    assert control.stages.text.data.sources.corpus.path.endswith(
        "corpus_without_held_out_facts.jsonl")
    assert control.stages.adapter.init.vision_dir == tower
    random = runs.shared_config(base, out, "random")
    assert list(random.order) == ["adapter"]
    assert random.stages.adapter.init.llm_dir == base.stages.text.init.llm_dir
    large = runs.shared_config(base, out, "large")
    assert large.stages.text.init.llm_dir == str(runs.large_llm_dir(out))
    run = runs.spec("control", {"text_to_image": 8, "image_qa": 16}, 2)
    config = runs.run_config(base, out, run, {"text_to_image": "a.jsonl", "image_qa": "b.jsonl"})
    stage = config.stages.instruct
    assert list(config.order) == ["instruct"]
    assert stage.init.model_dir == str(runs.shared_dir(out, "control") / "adapter" / "final")
    assert (stage.steps, stage.data.num_epochs) == (0, 2)
    assert {k: s.path for k, s in stage.data.sources.items()} == {
        "text_to_image": "a.jsonl", "image_qa": "b.jsonl"}
    assert stage.optim.lr == base.stages.instruct.optim.lr
    assert config.final_eval.max_questions == scale.final_eval["max_questions"]


def _entry(metrics, **role):
    return {"role": role, "metrics": metrics}


def test_finding2_verdict_names_the_axis_that_moves_a_metric_more():
    from metamorph_jax.findings.metrics import METRICS

    def cell(vqa, gen, value):
        metrics = {m.field: value for m in METRICS}
        metrics.update({m.chance: 0.1 for m in METRICS})
        return _entry(metrics, part="grid", vqa=vqa, generation=gen)
    # the VQA axis adds 0.2, the generation axis 0.05: the paper's direction, for every
    # metric and for the token cosine's margin over its chance
    entries = [cell(v, g, 0.2 * (v == 2) + 0.05 * (g == 2)) for v in (1, 2) for g in (1, 2)]
    verdicts = report.verdicts2(entries)
    assert [v["metric"] for v in verdicts] == [
        "vqa_accuracy", "visual_token_cosine", "visual_token_cosine_above_chance",
        "generation_oracle_accuracy"]
    assert all(v["agrees"] for v in verdicts)
    assert "the VQA axis improves it more" in verdicts[0]["text"]
    # no difference at all: no direction, so no agreement
    flat = report.verdicts2([cell(v, g, 0.5) for v in (1, 2) for g in (1, 2)])
    assert not any(v["agrees"] for v in flat)
    assert "neither improves it more" in flat[0]["text"]


def test_knowledge_scores_read_each_attribute_the_prompt_fixes():
    from metamorph_jax.data import shapes, shapes_text
    from metamorph_jax.evaluation import knowledge_eval
    prompt = shapes_text.knowledge_prompts(shapes_text.HELD_OUT_FACTS[:1], per_fact=1)[0]
    expected = prompt.expected   # a colour fact: colour, size and position
    assert set(expected) == {"colour", "size", "position"}
    reading = shapes.Reading(expected["colour"], "square", expected["size"], "centre")
    right = knowledge_eval.reading_matches(reading, expected)
    assert right == {"colour": True, "size": True, "position": expected["position"] == "centre"}
    assert knowledge_eval.reading_matches(None, expected) == dict.fromkeys(expected, False)
    assert knowledge_eval.prompt_chance(expected) == pytest.approx(
        1 / (len(shapes.COLOURS) * len(shapes.SIZES) * len(shapes.POSITIONS)))
