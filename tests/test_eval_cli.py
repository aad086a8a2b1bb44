"""eval.py --checkpoint end to end on a tiny MetaMorph folder: benchmark answers from the
VPiT generator (results.json, predictions files, resuming after an interrupted run,
scoring existing predictions), --generation (FID and CLIP score of generated images), the
VPiT-records loss with the vision cosine, and the process split of a batch."""
from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_tiny_clip
import torch
from PIL import Image

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.evaluation import benchmarks, fid, prompts, runner, scoring, vpit_answers
from metamorph_jax.evaluation.predictions import read_predictions
from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.input_errors import UsageError
from tests.test_eval_benchmarks import mmbench_file
from tests.vpit_helpers import IMAGE_SIZE, save_tiny_folders

eval_cli = importlib.import_module("eval")
FAST_RENDER = ["--sampler", "ddim", "--diffusion-steps", "2", "--guidance-scale", "2.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_folders(tmp_path_factory.mktemp("models"))


def write_png(path, seed, size=IMAGE_SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(path)
    return path


def generic_jsonl(root):
    rows = [{"id": f"q{i}", "image": f"img/{i}.png", "question": "what colour is the circle ?",
             "choices": ["red", "blue"], "answer": "A", "category": "colour"} for i in range(3)]
    rows += [{"id": f"s{i}", "image": f"img/{i}.png", "question": "how many shapes",
              "answer": "two"} for i in range(3, 5)]
    for i in range(5):
        write_png(root / "img" / f"{i}.png", i)
    path = root / "shapes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class CountingGenerate:
    """Wraps VPiTGenerator.generate to count the prompts decoded."""

    def __init__(self, monkeypatch):
        self.rows = 0
        original = vg.VPiTGenerator.generate

        def counted(generator, prompts_, sampling=vg.VPiTSampling()):
            self.rows += len(prompts_)
            return original(generator, prompts_, sampling)
        monkeypatch.setattr(vg.VPiTGenerator, "generate", counted)


@pytest.mark.slow
def test_benchmarks_resume_and_score_existing_predictions(folders, tmp_path, monkeypatch, capsys):
    model_dir, _ = folders
    files = {"jsonl": generic_jsonl(tmp_path), "mmbench": mmbench_file(tmp_path)}
    spec = ",".join(f"{name}={path}" for name, path in files.items())
    out = tmp_path / "out"
    counter = CountingGenerate(monkeypatch)
    # An interrupted run: only the first sample of each benchmark (MMBench: the first
    # question with its rotation).
    assert eval_cli.main(["--checkpoint", str(model_dir), "--benchmarks", spec, "--out", str(out),
                          "--limit", "1", "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    assert counter.rows == 3
    partial = {name: read_predictions(out / "predictions" / f"{name}.jsonl")[0] for name in files}
    assert [list(p) for p in partial.values()] == [["q0"], ["1", "1000001"]]
    # The rerun answers only the rest (4 + 2) and keeps the finished lines as they were.
    counter.rows = 0
    assert eval_cli.main(["--checkpoint", str(model_dir), "--benchmarks", spec, "--out", str(out),
                          "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    assert counter.rows == 6
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["benchmarks"]) == set(files) and "limit" not in summary
    assert summary["benchmarks"]["jsonl"]["n"] == 5 and summary["benchmarks"]["mmbench"]["n"] == 4
    printed = capsys.readouterr().out
    assert f"average over 2 benchmarks: {summary['average']:.2f}" in printed

    # Each line: the prompt as the benchmark words it, the greedy reply of the model to that
    # prompt alone (batch 1, built here from the image file), and its extraction and score.
    samples = {s.id: s for s in benchmarks.read("jsonl", files["jsonl"])[0]}
    records = read_predictions(out / "predictions" / "jsonl.jsonl")[0]
    assert list(records) == ["q0", "q1", "q2", "s3", "s4"]
    assert {k: records[k] for k in partial["jsonl"]} == partial["jsonl"]
    from metamorph_jax.evaluation.eval_cli import load
    loaded = load(model_dir, render=False)
    for sample_id, record in records.items():
        sample = samples[sample_id]
        text, _ = prompts.build_prompt("jsonl", sample)
        assert record["prompt"] == text
        pixels = [images_lib.load_image(path, IMAGE_SIZE) for path in sample.images]
        prompt = vg.prompt_from_turns([conv.Turn("user", text)], pixels, loaded.tokenizer,
                                      "llama3", loaded.generator.config)
        alone = loaded.generator.generate([prompt], vg.VPiTSampling(max_new_tokens=4,
                                                                    max_new_images=0))[0]
        assert record["raw_answer"] == vg.reply_text(alone, loaded.tokenizer,
                                                     loaded.generator.config).strip()
        rule = scoring.rule_for("jsonl", sample)
        assert [record["extracted"], record["score"]] == list(
            scoring.score_sample(rule, sample, record["raw_answer"]))

    # --predictions scores the same files without a model.
    rescored = tmp_path / "rescored"
    assert eval_cli.main(["--predictions", str(out / "predictions"), "--benchmarks", spec,
                          "--out", str(rescored)]) == 0
    assert json.loads((rescored / "results.json").read_text()) == summary


def test_no_benchmark_flags_evaluate_a_work_directory_s_shapes_world(folders, tmp_path):
    """Without --benchmarks eval.py scores a train.py work directory's Shapes world (its
    config.json's final_eval; the evaluation itself is tested through train.py in
    test_runner.py); a model folder, or a run without a world, is one clear error."""
    model_dir, _ = folders
    with pytest.raises(FileNotFoundError, match="evaluates the Shapes world of a train.py"):
        eval_cli.main(["--checkpoint", str(model_dir), "--out", str(tmp_path)])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"order": []}))
    with pytest.raises(ValueError, match="field 'final_eval.world' is missing"):
        from metamorph_jax.evaluation.eval_cli import evaluate_shapes_world
        evaluate_shapes_world(tmp_path / "run", tmp_path / "out")


def test_bad_flags(folders):
    model_dir, _ = folders
    messages = []
    for flags in (["--benchmarks", "nope=x.tsv"], ["--benchmarks", "jsonl"],
                  ["--generation", "references=d"]):
        with pytest.raises(UsageError) as raised:
            eval_cli.main(["--checkpoint", str(model_dir), *flags])
        messages.append(str(raised.value))
    assert "unknown name 'nope'" in messages[0]
    # Process and device flags: one clear error each, before any model is loaded.
    for flags, message in ((["--coordinator", "localhost:1"], "missing: --num-processes"),
                           (["--local-devices", "0"], "--local-devices must be at least 1"),
                           (["--local-devices", "99", "--benchmarks", "jsonl=x.jsonl"],
                            "--local-devices 99: this process has 8 devices")):
        with pytest.raises(UsageError, match=message):
            eval_cli.main(["--checkpoint", str(model_dir), *flags])


@pytest.mark.slow
def test_generation_fid_and_clip(folders, tmp_path):
    from tests.test_fid import random_torch_inception

    model_dir, _ = folders
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "a", "caption": "a red circle"}) + "\n"
                        + json.dumps({"id": "b", "caption": "a blue square"}) + "\n")
    references = tmp_path / "refs"
    for i in range(3):
        write_png(references / f"{i}.png", 10 + i, size=8)
    inception = tmp_path / "pt_inception.pth"
    torch.save(random_torch_inception().state_dict(), inception)
    clip_dir = write_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    spec = f"prompts={captions},references={references},inception={inception},clip={clip_dir}"
    assert eval_cli.main(["--checkpoint", str(model_dir), "--generation", spec, "--out", str(out),
                          *FAST_RENDER]) == 0
    generation = json.loads((out / "results.json").read_text())["generation"]
    paths = [out / "generated" / "a.png", out / "generated" / "b.png"]
    for path in paths:
        assert np.asarray(Image.open(path)).shape == (8, 8, 3)
    # The numbers are fid.py's and clip_score.py's on the files written.
    params = fid.load_weights(inception)
    expected = fid.fid(params, sorted(str(p) for p in references.iterdir()), [str(p) for p in paths])
    assert generation["fid"] == pytest.approx(expected, rel=1e-9) and generation["fid_references"] == 3
    from metamorph_jax.evaluation import clip_score
    model, processor = clip_score.load_clip(str(clip_dir))
    clip_expected = clip_score.clip_score(model, processor, [str(p) for p in paths],
                                          ["a red circle", "a blue square"])
    assert generation["clip_score"] == pytest.approx(clip_expected["score"], rel=1e-9)
    assert generation["n"] == 2 and np.isfinite(generation["fid"])




def test_caption_prompts_always_generate_one_image(folders):
    from metamorph_jax.evaluation.eval_cli import load
    loaded = load(folders[0], render=False)
    prompt = vpit_answers.caption_prompt("a red circle", loaded.tokenizer, "llama3",
                                         loaded.generator.config, loaded.generator.pad_token_id)
    assert prompt.tokens[-1] == loaded.generator.config.image_start_id
    generation = loaded.generator.generate([prompt], vg.VPiTSampling(max_new_tokens=2))[0]
    assert generation.visual_tokens.shape[0] == 1


@pytest.mark.parametrize("template", ["llama3", "tokenizer"])
def test_caption_prompts_are_the_training_records_up_to_their_image(template):
    """eval.py --generation asks for an image with the tokens a rendered text-to-image
    training record (data/tasks.py) has before its image: the user turn, the assistant
    header, the reply's text prefix and <image_start>."""
    import dataclasses

    from metamorph_jax.data import tasks
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from tests.vpit_helpers import tiny_vpit_config

    tokenizer = build_tiny_tokenizer(extra_words=["Generate", "Here"])  # no [UNK] below
    ids = conv.add_image_tokens(tokenizer)
    tiny = tiny_vpit_config()[1]
    config = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, vocab_size=len(tokenizer)),
                                 image_start_id=ids.image_start_id, image_end_id=ids.image_end_id)
    caption = "a red circle."
    request = tasks.text_to_image_request(caption)
    # a training record drawn with the wording evaluation asks with
    records = (tasks.text_to_image("t", "t.png", caption, np.random.default_rng(seed))
               for seed in range(64))
    record = next(r for r in records if r["conversations"][0]["value"] == request)
    rendered = conv.render(conv.parse_record(record, image_root="/x"), tokenizer, ids,
                           template=template, num_image_tokens=config.num_image_tokens)
    start = int(np.flatnonzero(rendered["tokens"] == ids.image_start_id)[0])
    expected = rendered["tokens"][:start + 1].tolist()
    assert tokenizer.unk_token_id not in expected
    assert tokenizer.decode(expected).endswith("request : <image_start>")

    prompt = vpit_answers.caption_prompt(caption, tokenizer, template, config, ids.placeholder_id)
    assert prompt.tokens.tolist() == expected
    assert (prompt.image_index == -1).all() and prompt.images == ()


def vpit_records(root):
    rows = []
    for i in range(3):
        write_png(root / f"r{i}.png", 20 + i)
        rows.append({"id": f"t2i{i}", "image": f"r{i}.png", "conversations": [
            {"from": "human", "value": "draw a red circle"}, {"from": "gpt", "value": "here <image>"}]})
        rows.append({"id": f"qa{i}", "image": f"r{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]})
    return rows


@pytest.mark.slow
def test_vpit_records_loss_is_packing_independent(folders, tmp_path):
    """The packed file's sums equal the sums of each record scored alone: records packed
    into one row do not see each other, and the vision cosine covers response images."""
    model_dir, _ = folders
    rows = vpit_records(tmp_path)
    together = tmp_path / "all.jsonl"
    together.write_text("".join(json.dumps(r) + "\n" for r in rows))
    alone = []
    for i, row in enumerate(rows):
        alone.append(tmp_path / f"one{i}.jsonl")
        alone[-1].write_text(json.dumps(row) + "\n")
    out = tmp_path / "loss.json"
    assert eval_cli.main(["--checkpoint", str(model_dir), "--data", str(together), "--seq-len", "256",
                          "--batch-size", "1", "--out", str(out)]) == 0
    packed = json.loads(out.read_text())
    assert packed["records"] == len(rows) and packed["bad_records"] == {}
    from metamorph_jax.evaluation.vpit_loss_eval import evaluate
    single = evaluate(model_dir, [str(p) for p in alone], seq_len=64, batch_size=1, progress=False)
    for key in ("text_tokens", "vision_tokens"):
        assert packed[key] == single[key]
    assert packed["vision_tokens"] == 3 * 4 and packed["text_tokens"] > 0  # 3 response images
    assert packed["text_loss"] == pytest.approx(single["text_loss"], rel=1e-5)
    assert packed["vision_cosine"] == pytest.approx(single["vision_cosine"], rel=1e-5, abs=1e-6)
    # Only question answering: no response image, no vision cosine.
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"].startswith("qa")))
    assert evaluate(model_dir, [str(qa)], seq_len=256, batch_size=1, progress=False)[
        "vision_cosine"] is None


def test_process_split_and_gather(monkeypatch):
    """Four simulated processes answer their rows of a batch of 7; the all-gather puts
    every answer back in row order on every process."""
    from jax.experimental import multihost_utils

    processes, count = 4, 7
    assert sorted(r for p in range(processes)
                  for r in vpit_answers.process_rows(count, p, processes)) == list(range(count))
    barrier = threading.Barrier(processes)
    slots, calls = {}, threading.local()

    def fake_allgather(value):  # each thread is process int(name[1:])
        me = int(threading.current_thread().name[1:])
        calls.n = getattr(calls, "n", 0) + 1
        slots[(calls.n, me)] = np.asarray(value)
        barrier.wait()
        gathered = np.stack([slots[(calls.n, p)] for p in range(processes)])
        barrier.wait()
        return gathered

    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    texts = [f"answer {row} é" * (row + 1) for row in range(count)]
    results = {}

    def run(p):
        local = [texts[r] for r in vpit_answers.process_rows(count, p, processes)]
        results[p] = vpit_answers.gather_texts(local, count, p, processes)

    threads = [threading.Thread(target=run, args=(p,), name=f"p{p}") for p in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[p] == texts for p in range(processes))


def test_only_the_first_process_writes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "x"}) + "\n")
    assert runner.evaluate({"jsonl": path}, tmp_path / "out", generate=lambda b: ["x"] * len(b),
                           write=False) is None
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(folders, tmp_path):
    """eval.py as a real two-process run (2 x 2 CPU devices, gloo) against one process
    with 2 devices: benchmark answers (an odd split of each batch), caption images (3
    captions over 2 processes) and the VPiT-records sums (batches split by index) are
    the same, file for file and number for number; so is the text loss of the LLM alone
    (--llm --data: one global batch over all 4 devices, each process feeding its rows), and
    generate.py --prompts (3 prompts: each process writes its prompts' folders, process 0
    prints every reply in order). The same processes run all five commands."""
    from metamorph_jax import pretrained
    from tests.multiprocess_helpers import run_processes

    model_dir, _ = folders
    llm_dir = tmp_path / "llm"   # the checkpoint's LLM as a 'llama' folder
    pretrained.save_pretrained(llm_dir, "llama", pretrained.read_model_config(model_dir)[
        "config"]["llm"], pretrained.load_params(model_dir)["llm"], chat_template="llama3")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}) + "\n"
        for question, answer in [("what colour is the circle ?", "red"), ("hello", "hello world"),
                                 ("how many shapes", "there are two shapes"),
                                 ("where is the blue circle ?", "bottom right"),
                                 ("is there a yellow square ?", "no")] * 2))
    spec = f"jsonl={generic_jsonl(tmp_path)},mmbench={mmbench_file(tmp_path)}"
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i}", "caption": text}) + "\n"
                                for i, text in enumerate(["a red circle", "a blue square",
                                                          "a green triangle"])))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in vpit_records(tmp_path)))

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in
                               ["hello", "generate an image of a circle", "what is it ?"]))

    def calls(out):
        return [("eval", ["--checkpoint", model_dir, "--benchmarks", spec, "--generation",
                          f"prompts={captions}", "--out", out / "eval", "--batch-size", "3",
                          "--max-new-tokens", "4", *FAST_RENDER]),
                ("eval", ["--checkpoint", model_dir, "--data", records, "--seq-len", "64",
                          "--batch-size", "2", "--out", out / "loss.json"]),
                ("eval", ["--llm", llm_dir, "--tokenizer", model_dir, "--data", texts,
                          "--seq-len", "32", "--batch-size", "4", "--out", out / "text_loss.json"]),
                ("generate", ["--checkpoint", model_dir, "--prompts", prompts,
                              "--out", out / "generated", "--max-new-tokens", "6", "--no-render"])]

    one, two = tmp_path / "one", tmp_path / "two"
    printed_one = run_processes(calls(one), processes=1)
    printed_two = run_processes(calls(two), processes=2)
    # Process 0 prints what one process prints, the others nothing; the --llm loss lines
    # are left out (their last digits follow the 2- vs 4-device reduction, checked below).
    def exact(text):
        return [line for line in text.splitlines()
                if ": loss " not in line and not line.startswith("mean loss")]
    assert exact(printed_two[0]) == exact(printed_one[0]) and printed_two[1] == ""
    assert "[image 0: not rendered]" in printed_one[0]   # generate.py's replies are there
    for n in range(3):
        folder = Path("generated") / f"prompt_{n:04d}"
        assert ((two / folder / "result.json").read_text()
                == (one / folder / "result.json").read_text())
        np.testing.assert_allclose(np.load(two / folder / "visual_tokens.npy"),
                                   np.load(one / folder / "visual_tokens.npy"), atol=1e-5)
    assert (json.loads((two / "eval" / "results.json").read_text())
            == json.loads((one / "eval" / "results.json").read_text()))
    for name in ("predictions/jsonl.jsonl", "predictions/mmbench.jsonl",
                 "generated/captions.json"):
        assert (two / "eval" / name).read_bytes() == (one / "eval" / name).read_bytes(), name
    # Caption i's noise is (seed, i) whoever renders it; batch shapes may move XLA's float
    # rounding by one grey level (tests/test_render.py).
    for name in ("c0.png", "c1.png", "c2.png"):
        np.testing.assert_allclose(
            np.asarray(Image.open(two / "eval" / "generated" / name)).astype(int),
            np.asarray(Image.open(one / "eval" / "generated" / name)).astype(int), atol=1)
    loss_one = json.loads((one / "loss.json").read_text())
    assert json.loads((two / "loss.json").read_text()) == loss_one   # sums bit for bit
    assert loss_one["records"] == 6 and loss_one["vision_tokens"] == 12
    text_one = json.loads((one / "text_loss.json").read_text())
    text_two = json.loads((two / "text_loss.json").read_text())
    assert text_one["records"] == text_two["records"] == 10
    assert text_two["tokens"] == text_one["tokens"] > 0
    # 2 devices against 4: the sums' reduction order differs, nothing else.
    assert text_two["loss_sum"] == pytest.approx(text_one["loss_sum"], rel=1e-6)
