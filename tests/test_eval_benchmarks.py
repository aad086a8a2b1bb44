"""Benchmark readers on small fixtures in their published formats, the scoring rules on
hand-computed cases, resumable predictions and scoring existing predictions."""
from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from metamorph_jax.evaluation import answers, benchmarks, prompts, runner
from metamorph_jax.evaluation.predictions import PredictionsWriter, read_predictions
from metamorph_jax.evaluation.samples import BenchmarkFileError, sample_images
from metamorph_jax.input_errors import UsageError


def png_b64(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="") as handle:  # as pandas' to_csv(sep="\t") writes it
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def by_id(answers_by_id):
    return lambda batch: [answers_by_id[r.id] for r in batch]


# --- rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("B", "B"), ("(B)", "B"), ("B. dog", "B"), ("The answer is B.", "B"), ("Answer: C", "C"),
    ("dog", "B"), ("It is a dog.", "B"),          # option text, once
    ("A or B", None),                             # two letters named, no option text
    ("cat and dog", None),                        # two option texts
    ("no idea", None),
    ("A dog", "A"),                               # the harness's rule: a leading "A" is the letter
    ("A cat, I think", "A"),                      # ... when at most three words follow it
    # VLMEvalKit's can_infer: several letters, or an "A" followed by more than three words
    # (an article), fall back to the option texts
    ("B or C: a dog", "B"),
    ("A dog sits on a mat", "B"),
    ("The answer is A because it has whiskers", None),  # too long for the option texts
    ("B, because birds fly and a cat cannot", "B"),     # only "A" can be an article
])
def test_letter_extraction(raw, expected):
    assert answers.extract_choice(raw, {"A": "cat", "B": "dog", "C": "bird"}) == expected


@pytest.mark.parametrize("raw, expected", [
    ("B", "B"), ("(C)", "C"), ("B.", "B"), ("The answer is B.", "B"),
    ("(A) is wrong, so (C)", "C"),                 # several bracketed letters: the last one
    ("A or maybe C is right", "C"),                # several "X " mentions: the last one
    ("I would say that it is a dog here", "B"),    # more than five words: the option text
    ("a dog", None),                               # five words or fewer: no text matching
    ("cannot tell", None),                         # unparsed: scoring picks at random
])
def test_mmmu_extraction(raw, expected):
    assert answers.extract_choice_mmmu(raw, {"A": "cat", "B": "dog", "C": "bird"}) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the Cat", "cat"), ("an apple.", "apple"), ("dont", "don't"),
    ("couldnt've", "couldn't've"), ("yes!", "yes"), ("x-ray", "x ray"), ("2.5", "2.5"),
    ("10,000", "10000"), ("it's", "it 's"), ("none", "0"),
])
def test_vqa_normalisation(raw, expected):
    assert answers.normalize_vqa(raw) == expected


def test_vqa_accuracy_hand_computed():
    humans = ["Two"] * 2 + ["3"] * 8
    # leaving out a "two": 1 match of 3 -> 1/3 (2 subsets); leaving out a "3": 2/3 (8 subsets)
    assert answers.vqa_accuracy("2", humans) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    # "3" appears 8 times: every subset has >= 7 matches -> 1
    assert answers.vqa_accuracy("three.", humans) == 1.0
    humans = ["cat"] * 3 + ["dog"] * 7
    # leaving out a "cat": 2/3 (3 subsets); leaving out a "dog": 1 (7 subsets)
    assert answers.vqa_accuracy("The cat", humans) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert answers.vqa_accuracy("bird", humans) == 0.0


@pytest.mark.parametrize("prediction, target, expected", [
    ("10.4", "10", True), ("10.5", "10", True), ("10.6", "10", False), ("9.5", "10", True),
    ("5%", "0.05", True), ("0", "0", True), ("0.01", "0", False), ("Yes", "yes", True),
    ("blue", "Blue ", False),
])
def test_relaxed_accuracy(prediction, target, expected):
    assert answers.relaxed_match(prediction, target) is expected


# --- readers, prompts and aggregation --------------------------------------------------------

MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def mmbench_file(tmp_path):
    red, blue = png_b64("red"), png_b64("blue")
    rows = [  # question 1 and its rotation (image referenced by index), question 2 likewise
        [1, "Color?", "Look.", "red", "blue", "", "", "A", "color", red],
        [1000001, "Color?", "Look.", "blue", "red", "", "", "B", "color", "1"],
        [2, "Shape?", "nan", "box", "ball", "cone", "", "C", "shape", blue],
        [1000002, "Shape?", "nan", "ball", "cone", "box", "", "B", "shape", "2"],
    ]
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMBENCH_HEADER, rows)


def test_mmbench_circular(tmp_path):
    path = mmbench_file(tmp_path)
    samples, skipped = benchmarks.read("mmbench", path)
    assert [s.group for s in samples] == ["1", "1", "2", "2"] and skipped == {}
    assert sample_images(samples[1])[0].getpixel((0, 0)) == (255, 0, 0)  # shared by reference
    assert samples[0].choices == {"A": "red", "B": "blue"}
    text, images = prompts.build_prompt("mmbench", samples[0])
    assert text == ("<image>\nLook. Color? There are several options:\nA. red\nB. blue\n"
                    "Answer with the option's letter from the given choices directly.")
    assert len(images) == 1
    # question 1 right in both rotations; question 2 right in one only
    answered = {"1": "A", "1000001": "B", "2": "C", "1000002": "A"}
    result = runner.run_benchmark("mmbench", samples, by_id(answered), tmp_path / "out")
    assert result["score"] == 50.0 and result["vanilla"] == 75.0 and result["questions"] == 2
    assert result["categories"] == {"color": 100.0, "shape": 0.0}


def test_limit_takes_whole_mmbench_groups(tmp_path):
    """MMBench's files list the questions, then their rotations: --limit N answers the first
    N questions with every rotation, so the circular score is over whole groups."""
    red = png_b64("red")
    rows = [[1, "Color?", "nan", "red", "blue", "", "", "A", "color", red],
            [2, "Shape?", "nan", "box", "ball", "", "", "B", "shape", red],
            [1000001, "Color?", "nan", "blue", "red", "", "", "B", "color", "1"],
            [1000002, "Shape?", "nan", "ball", "box", "", "", "A", "shape", "2"]]
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMBENCH_HEADER, rows)
    asked = []

    def generate(batch):
        asked.extend(request.id for request in batch)
        return ["A" for _ in batch]  # right in question 1, wrong in its rotation
    summary = runner.evaluate({"mmbench": path}, tmp_path / "out", generate=generate, limit=1)
    assert asked == ["1", "1000001"]
    result = summary["benchmarks"]["mmbench"]
    assert result["questions"] == 1 and result["n"] == 2
    assert result["score"] == 0.0 and result["vanilla"] == 50.0 and summary["limit"] == 1


def test_mmmu_multi_image_and_skips(tmp_path):
    images = json.dumps([png_b64("red"), png_b64("green")])
    header = ["index", "question", "A", "B", "C", "answer", "category", "split", "image"]
    rows = [
        ["v1", "Compare <image 2> with <image 1>.", "same", "different", "", "B", "Art", "validation",
         images],
        ["v2", "What year?", "", "", "", "1990", "History", "validation", png_b64("red")],
        ["d1", "Dev question <image 1>", "x", "y", "", "A", "Art", "dev", png_b64("red")],
    ]
    samples, skipped = benchmarks.read("mmmu", write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, rows))
    assert [s.id for s in samples] == ["v1"]
    assert skipped == {"open_question": 1, "not_validation_split": 1}
    text, ordered = prompts.build_prompt("mmmu", samples[0])
    assert text == ("<image>\n<image>\nCompare <image 2> with <image 1>.\nA. same\nB. different\n\n"
                    "Answer with the option's letter from the given choices directly.")
    colors = [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in ordered]
    assert colors == [(255, 0, 0), (0, 128, 0)]  # images in tag order: <image 1>, <image 2>
    result = runner.run_benchmark("mmmu", samples, by_id({"v1": "(B) different"}), tmp_path / "o",
                                  skipped=skipped)
    assert result["score"] == 100.0 and result["skipped"] == skipped
    samples[0].question = "Compare <image 3>."
    with pytest.raises(ValueError, match=r"row 2: the question names images \[3\] but the row has 2"):
        prompts.build_prompt("mmmu", samples[0])


def test_unparsable_mmmu_answers_get_mmmus_seeded_random_option(tmp_path):
    """MMMU's eval_utils: random.seed(42) once, then random.choice(all_choices) for each
    answer parse_multi_choice_response cannot parse, in order; reported as unparsed."""
    import random
    random.seed(42)   # MMMU's own calls, for the two unparsable answers below
    draws = [random.choice(["A", "B", "C", "D"]) for _ in range(2)]
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "split", "image"]
    answers_of = {"v1": draws[0], "v2": "B", "v3": draws[1], "v4": "C"}
    rows = [[key, f"Question {key}?", "red", "green", "blue", "black", answer, "Art",
             "validation", png_b64("red")] for key, answer in answers_of.items()]
    samples, _ = benchmarks.read("mmmu", write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, rows))
    raw = {"v1": "cannot tell", "v2": "(B)", "v3": "no idea", "v4": "(A)"}
    result = runner.run_benchmark("mmmu", samples, by_id(raw), tmp_path / "out")
    # v1 and v3 take the draws (their answers), v2 is right, v4 wrong
    assert result["score"] == 75.0
    assert result["unparsed"] == 2 and result["unparsed_share"] == 50.0
    # the other benchmarks' unparsable answers score 0 (and count as unparsed too)
    mmbench = runner.run_benchmark("mmbench", benchmarks.read("mmbench", mmbench_file(tmp_path))[0],
                                   lambda batch: ["no idea"] * len(batch), tmp_path / "out")
    assert mmbench["vanilla"] == 0.0 and mmbench["unparsed"] == 4
    assert mmbench["unparsed_share"] == 100.0


def test_seed_scienceqa_realworldqa_vstar(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [[0, "Q0", "Some context", "a", "b", "c", "d", "D", "Scene", png_b64("red")],
            [1, "Q1", "", "a", "b", "", "", "A", "Scene", ""]]
    path = write_tsv(tmp_path / "ScienceQA_TEST.tsv", header, rows)
    samples, skipped = benchmarks.read("scienceqa", path)
    assert len(samples) == 1 and skipped == {"no_image": 1}  # ScienceQA-IMG
    text, _ = prompts.build_prompt("scienceqa", samples[0])
    assert text == ("<image>\nContext: Some context\nQ0\nA. a\nB. b\nC. c\nD. d\n"
                    "Answer with the option's letter from the given choices directly.")
    for name in ("seed", "realworldqa", "vstar"):
        with pytest.raises(BenchmarkFileError, match="row 3, field 'image'"):
            benchmarks.read(name, path)  # only ScienceQA's rule skips image-less rows
    rows[1][-1] = png_b64("blue")
    rows[1][1] = ("Which way?\nPlease answer directly with only the letter of the correct option and "
                  "nothing else.")
    samples, _ = benchmarks.read("realworldqa", write_tsv(tmp_path / "RealWorldQA.tsv", header, rows))
    assert prompts.build_prompt("realworldqa", samples[1])[0] == (
        "<image>\nWhich way?\nA. a\nB. b\n"
        "Answer with the option's letter from the given choices directly.")
    samples, _ = benchmarks.read("seed", write_tsv(tmp_path / "SEEDBench_IMG.tsv", header, rows))
    result = runner.run_benchmark("seed", samples, by_id({"0": "d", "1": "I think B"}), tmp_path / "o")
    assert result["score"] == 50.0 and result["categories"] == {"Scene": 50.0}


def test_mmvp_pairs(tmp_path):
    header = ["index", "question", "A", "B", "answer", "category", "image"]
    rows = [[i, f"Q{i}", "yes", "no", "A" if i % 2 else "B", "color", png_b64("red")] for i in range(1, 5)]
    samples, _ = benchmarks.read("mmvp", write_tsv(tmp_path / "MMVP.tsv", header, rows))
    answered = {"1": "A", "2": "B", "3": "A", "4": "A"}  # pair (1, 2) right, pair (3, 4) half
    result = runner.run_benchmark("mmvp", samples, by_id(answered), tmp_path / "out")
    assert result["score"] == 75.0 and result["pair_score"] == 50.0
    with pytest.raises(BenchmarkFileError, match=r"MMVP3.tsv, row 4, field 'index'.*index 3 has no pair"):
        benchmarks.read("mmvp", write_tsv(tmp_path / "MMVP3.tsv", header, rows[:3]))


def test_textvqa_and_chartqa(tmp_path):
    header = ["index", "question", "answer", "image"]
    humans = ["Two"] * 2 + ["3"] * 8
    rows = [[0, "How many?", repr(humans), png_b64("red")]]
    samples, _ = benchmarks.read("textvqa", write_tsv(tmp_path / "TextVQA_VAL.tsv", header, rows))
    assert samples[0].answer == humans
    assert prompts.build_prompt("textvqa", samples[0])[0] == \
        "<image>\nHow many?\nAnswer the question using a single word or phrase."
    result = runner.run_benchmark("textvqa", samples, by_id({"0": "two"}), tmp_path / "out")
    assert result["score"] == pytest.approx(60.0)
    rows = [[0, "Value?", "10", png_b64("red")], [1, "Color?", "Blue", png_b64("red")]]
    samples, _ = benchmarks.read("chartqa", write_tsv(tmp_path / "ChartQA_TEST.tsv", header, rows))
    result = runner.run_benchmark("chartqa", samples, by_id({"0": " 10.3 ", "1": "red"}), tmp_path / "out")
    assert result["score"] == 50.0


def test_mvbench_video(tmp_path):
    (tmp_path / "json").mkdir()
    entries = [{"video": "clip1", "question": "What happens?", "candidates": ["run", "sit"],
                "answer": "sit"}]
    (tmp_path / "json" / "action_antonym.json").write_text(json.dumps(entries))
    frames = tmp_path / "video" / "ssv2_video" / "clip1"
    frames.mkdir(parents=True)
    for t in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5):
        Image.new("RGB", (4, 4), "red").save(frames / f"t={t:.1f}.png")
    samples, _ = benchmarks.READERS["mvbench"](tmp_path, tasks=["Action Antonym"])
    assert samples[0].answer == "B" and samples[0].category == "Action Antonym"
    request = runner.make_request("mvbench", samples[0])
    # 1 fps from t=0 over 2.5 s: frames at 0, 1, 2 s
    assert [p.rsplit("/", 1)[1] for p in request.images] == ["t=0.0.png", "t=1.0.png", "t=2.0.png"]
    samples[0].extra["bound"] = (0.9, 2.1)  # MV-Bench start/end: sampling times 1 s and 2 s
    assert [p.rsplit("/", 1)[1] for p in runner.video_frames(samples[0])] == ["t=1.0.png", "t=2.0.png"]
    samples[0].extra["bound"] = (1.2, 1.4)  # shorter than a step: the frame nearest 1.3 s
    assert [p.rsplit("/", 1)[1] for p in runner.video_frames(samples[0])] == ["t=1.0.png"]
    assert request.prompt == ("<image><image><image>\nQuestion:What happens?\nOption:\n(A) run\n"
                              "(B) sit\nOnly give the best option.\n")


def test_generic_jsonl(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    lines = [{"id": 1, "image": "a.png", "question": "Q?", "choices": ["x", "y"], "answer": "B"},
             {"id": 2, "images": ["a.png", "a.png"], "question": "Name?", "answer": ["The Cat", "kitty"]}]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples, _ = benchmarks.read("jsonl", path)
    assert prompts.build_prompt("jsonl", samples[1])[0].startswith("<image>\n<image>\nName?")
    result = runner.run_benchmark("jsonl", samples, by_id({"1": "y", "2": "cat"}), tmp_path / "out")
    assert result["score"] == 100.0


# --- bad input -----------------------------------------------------------------------------

def test_bad_files(tmp_path):
    not_tsv = tmp_path / "MMBench.json"
    not_tsv.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(BenchmarkFileError, match=r"MMBench.json, row 1, field 'index'.*not a VLMEvalKit TSV"):
        benchmarks.read("mmbench", not_tsv)
    no_image = write_tsv(tmp_path / "a.tsv", ["index", "question", "A", "B", "answer"],
                         [[0, "q", "x", "y", "A"]])
    with pytest.raises(BenchmarkFileError, match=r"a.tsv, row 1, field 'image'"):
        benchmarks.read("seed", no_image)
    header = ["index", "question", "A", "B", "answer", "image"]
    bad_key = write_tsv(tmp_path / "b.tsv", header, [[0, "q", "x", "y", "A", png_b64("red")],
                                                     [1, "q", "x", "y", "C", png_b64("red")]])
    with pytest.raises(BenchmarkFileError, match=r"b.tsv, row 3, field 'answer'.*'C' is not one of"):
        benchmarks.read("seed", bad_key)
    garbage = base64.b64encode(b"not an image at all " * 8).decode()
    undecodable = write_tsv(tmp_path / "c.tsv", header, [[0, "q", "x", "y", "A", garbage]])
    samples, _ = benchmarks.read("seed", undecodable)
    with pytest.raises(ValueError, match=r"c.tsv, row 2, image 0: undecodable image"):
        sample_images(samples[0])
    not_b64 = write_tsv(tmp_path / "d.tsv", header, [[0, "q", "x", "y", "A", "%" * 100]])
    with pytest.raises(BenchmarkFileError, match=r"d.tsv, row 2, field 'image'.*base64"):
        benchmarks.read("seed", not_b64)
    bad_line = tmp_path / "e.jsonl"
    bad_line.write_text('{"id": 1, "question": "q", "answer": "a"}\n{"id": 2, "question": "q"}\n')
    with pytest.raises(BenchmarkFileError, match=r"e.jsonl, row 2, field 'answer'"):
        benchmarks.read("jsonl", bad_line)


# --- predictions: resume and scoring without a model -----------------------------------------

def test_resume_after_kill_and_score_existing(tmp_path):
    samples, _ = benchmarks.read("mmbench", mmbench_file(tmp_path))
    answered = {"1": "A", "1000001": "B", "2": "C", "1000002": "A"}
    out = tmp_path / "out"
    path = out / "predictions" / "mmbench.jsonl"
    with PredictionsWriter(path) as writer:  # a run killed after two answers, mid-third line
        for sample in samples[:2]:
            writer.write({"id": sample.id, "prompt": "p", "raw_answer": answered[sample.id],
                          "extracted": answered[sample.id], "score": 1.0})
    with open(path, "a") as handle:
        handle.write('{"id": "2", "prompt": "p", "raw_ans')
    records, partial = read_predictions(path)
    assert list(records) == ["1", "1000001"] and partial > 0
    with pytest.raises(ValueError, match="2 of 4 samples have no prediction"):
        runner.score_predictions("mmbench", samples, path)

    asked = []

    def generate(batch):
        asked.extend(r.id for r in batch)
        return [answered[r.id] for r in batch]
    result = runner.run_benchmark("mmbench", samples, generate, out, batch_size=1)
    assert asked == ["2", "1000002"]  # only what the killed run had not finished
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["1", "1000001", "2", "1000002"]
    assert result["score"] == 50.0

    # scoring the predictions folder without a model gives the same numbers
    summary = runner.evaluate({"mmbench": mmbench_file(tmp_path)}, tmp_path / "rescored",
                              predictions_dir=out / "predictions")
    assert summary["benchmarks"]["mmbench"] == result and summary["average"] == 50.0
    assert json.loads((tmp_path / "rescored" / "results.json").read_text())["average"] == 50.0

    lines.insert(1, "{broken")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"mmbench.jsonl, line 2: broken predictions line"):
        read_predictions(path)


def test_score_cli(tmp_path, capsys):
    from metamorph_jax.evaluation import score_cli

    samples, _ = benchmarks.read("mmbench", mmbench_file(tmp_path))
    answered = {"1": "A", "1000001": "B", "2": "C"}  # the last rotation was never answered
    runner_dir = tmp_path / "run"
    with PredictionsWriter(runner_dir / "predictions" / "mmbench.jsonl") as writer:
        for sample_id, raw in answered.items():
            writer.write({"id": sample_id, "prompt": "p", "raw_answer": raw, "extracted": None, "score": 0.0})
    argv = ["--bench", f"mmbench={tmp_path / 'MMBench_DEV_EN.tsv'}",
            "--predictions", str(runner_dir / "predictions"), "--out", str(tmp_path / "res")]
    with pytest.raises(ValueError, match="1 of 4 samples have no prediction"):
        score_cli.main(argv)
    assert score_cli.main(argv + ["--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "mmbench: 50.00" in out and "missing 1" in out and "average over 1 benchmarks: 50.00" in out
    with pytest.raises(UsageError, match="unknown benchmark 'nope'"):
        score_cli.main(["--bench", "nope=x", "--predictions", "p", "--out", "o"])
