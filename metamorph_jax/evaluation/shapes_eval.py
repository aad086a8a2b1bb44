"""The Shapes world's held-out evaluation of a trained work directory (train.py runs it after
the stages when the config has `final_eval`):

    vqa_accuracy               exact match on held-out image_qa questions (greedy answers)
    visual_token_cosine        mean cosine between the visual tokens generated for held-out
                               text-to-image prompts and the SigLIP tokens of the true images
    generation_oracle_accuracy share of rendered images for held-out single-shape prompts
                               whose colour, shape and position the oracle
                               (data/shapes.read_shape) reads right

Each comes with a prompt-blind chance level:
    VQA: answering every question with the most frequent training answer of its kind
         (colour, shape, count of all, count of one shape, position, yes/no);
    cosine: the generated tokens of each prompt against the true tokens of another held-out
         prompt (mismatched pairs); also reported, `visual_token_cosine_mean_image`: the
         mean training SigLIP token (per position) for every prompt, a stronger
         prompt-blind reference;
    oracle: guessing colour, shape and position uniformly, 1 / (6 * 3 * 9).

Text-to-image prompts are the user turn followed by the assistant's fixed response prefix
(data/tasks.TEXT_TO_IMAGE_RESPONSE_PREFIX) and `<image_start>` (inference/vpit_generate's
image_prompt, as eval.py --generation prompts): the image is always generated.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import shapes

QUESTION_KINDS = (("colour", r"^What colour is the "), ("shape", r"^What shape is the "),
                  ("count_all", r"^How many shapes are there"), ("count_shape", r"^How many "),
                  ("position", r"^Where is the "), ("yesno", r"^Is there "))


@dataclasses.dataclass(frozen=True)
class ShapesEvalConfig:
    split: str = "test"
    max_questions: int = 0        # 0: every held-out question
    max_prompts: int = 0          # 0: every held-out text-to-image prompt
    batch_size: int = 32
    max_answer_tokens: int = 8
    sampler: str = "ddim"
    diffusion_steps: int = 25
    guidance_scale: float = 3.0
    samples: int = 8              # rows in samples.png

    @classmethod
    def from_config(cls, fields) -> "ShapesEvalConfig":
        values = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config field 'final_eval': unknown field(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**values)


# --- metric pieces (pure functions) ---------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, surrounding white space and a final full stop dropped."""
    return text.strip().lower().rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def question_kind(question: str) -> str:
    text = question.replace(conv.IMAGE_PLACEHOLDER, "").strip()
    for kind, pattern in QUESTION_KINDS:
        if re.match(pattern, text):
            return kind
    raise ValueError(f"not a Shapes question: {question!r}")


def majority_answers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{question kind: most frequent answer} over (question, answer) pairs (ties: the
    alphabetically first)."""
    counts: dict[str, dict[str, int]] = {}
    for question, answer in pairs:
        kind_counts = counts.setdefault(question_kind(question), {})
        kind_counts[normalize_answer(answer)] = kind_counts.get(normalize_answer(answer), 0) + 1
    return {kind: sorted(c.items(), key=lambda item: (-item[1], item[0]))[0][0]
            for kind, c in counts.items()}


def blind_vqa_accuracy(train: Sequence[tuple[str, str]], held_out: Sequence[tuple[str, str]]
                       ) -> float:
    """Accuracy on `held_out` of the majority training answer of each question's kind."""
    majority = majority_answers(train)
    hits = [majority.get(question_kind(q)) == normalize_answer(a) for q, a in held_out]
    return float(np.mean(hits)) if hits else 0.0


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis of two [..., C] arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def mismatched_cosine(generated: np.ndarray, true: np.ndarray) -> float:
    """Mean cosine of prompt i's generated tokens with the true tokens of prompt i+1 (a
    cyclic shift): what the cosine is when the tokens do not depend on the prompt."""
    if len(generated) < 2:
        raise ValueError("the mismatched-pair chance level needs at least two prompts")
    return float(token_cosine(generated, np.roll(true, 1, axis=0)).mean())


def oracle_correct(pixels: np.ndarray, target: dict) -> bool:
    """The oracle reads colour, shape and position of `pixels` (uint8 HWC) as `target` says."""
    reading = shapes.read_shape(pixels)
    return reading is not None and (reading.colour, reading.shape, reading.position) == (
        target["colour"], target["shape"], target["position"])


CHANCE_FIELDS = {"vqa_accuracy": "vqa_chance", "visual_token_cosine": "visual_token_cosine_chance",
                 "generation_oracle_accuracy": "generation_oracle_chance"}
ORACLE_CHANCE = 1.0 / (len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.POSITIONS))


# --- reading the world ----------------------------------------------------------------------

def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is the Shapes world written?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _qa_pair(record: dict, where: str) -> tuple[str, str, str]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2:
        raise ValueError(f"{where}: record {record.get('id')!r}: field 'conversations' must "
                         "hold one question and one answer")
    return record["image"], turns[0]["value"], turns[1]["value"]


def _limit(items: list, count: int) -> list:
    return items[:count] if count else items


# --- the evaluation -------------------------------------------------------------------------

def _batches(items: list, size: int):
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


@dataclasses.dataclass
class EvalModels:
    """What an evaluation of a work directory decodes and renders with (load_models)."""
    generator: object          # inference/vpit_generate.VPiTGenerator
    renderer: object           # inference/render.ImageRenderer
    tokenizer: object
    template: str
    mconfig: object            # the MetaMorph model's config
    pad: int


def load_models(work_dir: str | Path, config: ShapesEvalConfig,
                visualizer_dir: str | Path | None = None) -> EvalModels:
    """The work directory's latest MetaMorph and a renderer with its visualiser, or with
    `visualizer_dir` (a decoder stage's folder trained elsewhere, e.g. shared by several
    runs: metamorph_jax/findings) when given."""
    from metamorph_jax.inference import checkpoints
    from metamorph_jax.inference import vpit_generate as vg
    from metamorph_jax.inference.render import ImageRenderer, RenderConfig

    model_dir, visualizer_dir = checkpoints.resolve(work_dir, visualizer_dir)
    if visualizer_dir is None:
        raise FileNotFoundError(f"{work_dir}: no finished decoder stage (visualizer folder)")
    model, params, _ = checkpoints.load_metamorph(model_dir)
    tokenizer = pretrained.load_tokenizer(model_dir)
    mconfig = model.config
    eos = set(int(t) for t in mconfig.llm.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vis_model, vis_params, schedule = checkpoints.load_visualizer(visualizer_dir)
    renderer = ImageRenderer(vis_model, vis_params, schedule, RenderConfig(
        sampler=config.sampler, num_steps=config.diffusion_steps,
        guidance_scale=config.guidance_scale, max_batch=config.batch_size))
    return EvalModels(vg.VPiTGenerator(model, params, sorted(eos), pad), renderer, tokenizer,
                      pretrained.chat_template(model_dir), mconfig, pad)


def generated_image_tokens(models: EvalModels, requests: Sequence[str],
                           batch_size: int) -> np.ndarray:
    """[len(requests), V, C]: the visual tokens generated for each text-to-image request
    (a user turn; vpit_generate.image_prompt: the image is always generated)."""
    from metamorph_jax.inference import vpit_generate as vg
    sampling = vg.VPiTSampling(max_new_tokens=1, max_new_images=1)
    generated = []
    for part in _batches(list(requests), batch_size):
        prompts = [vg.image_prompt(request, models.tokenizer, models.template, models.mconfig,
                                   models.pad) for request in part]
        generated += [g.visual_tokens[0] for g in models.generator.generate(prompts, sampling)]
    return np.stack(generated)


def evaluate_shapes(work_dir: str | Path, world_dir: str | Path,
                    config: ShapesEvalConfig = ShapesEvalConfig(),
                    stage_seconds: dict | None = None, out_dir: str | Path | None = None,
                    log=print, incomplete_stages: dict | None = None,
                    visualizer_dir: str | Path | None = None) -> dict:
    """Evaluate the work directory's latest MetaMorph (and visualiser, or the one in
    `visualizer_dir` when given) on the world's held-out split; writes final_metrics.json
    and samples.png into out_dir (default: work_dir) and returns the metrics.
    incomplete_stages: {stage: {"steps", "planned_steps"}} of stages whose data ran out
    early (allow_short), recorded as such."""
    import jax

    from metamorph_jax.inference import vpit_generate as vg

    started = time.time()
    world_dir = Path(world_dir)
    out_dir = Path(out_dir or work_dir)
    models = load_models(work_dir, config, visualizer_dir)
    generator, renderer, tokenizer = models.generator, models.renderer, models.tokenizer
    template, mconfig, pad = models.template, models.mconfig, models.pad
    size = mconfig.vision.image_size

    def pixels(rel: str) -> np.ndarray:
        return images_lib.load_image(world_dir / rel, size)

    # VQA
    split_dir = world_dir / config.split
    qa = [_qa_pair(r, str(split_dir / "image_qa.jsonl"))
          for r in _limit(_records(split_dir / "image_qa.jsonl"), config.max_questions)]
    train_qa = [_qa_pair(r, "train")[1:] for r in _records(world_dir / "train" / "image_qa.jsonl")]
    answers = []
    answer_sampling = vg.VPiTSampling(max_new_tokens=config.max_answer_tokens, max_new_images=0)
    for part in _batches(qa, config.batch_size):
        prompts = [vg.prompt_from_turns([conv.Turn("user", question)], [pixels(image)],
                                        tokenizer, template, mconfig, pad)
                   for image, question, _ in part]
        for generation in generator.generate(prompts, answer_sampling):
            answers.append(tokenizer.decode(generation.text_tokens(), skip_special_tokens=True))
    hits = [exact_match(p, a) for p, (_, _, a) in zip(answers, qa)]
    vqa_accuracy = float(np.mean(hits)) if hits else 0.0
    vqa_chance = blind_vqa_accuracy(train_qa, [(q, a) for _, q, a in qa])
    by_kind: dict[str, list] = {}
    for (_, question, _), hit in zip(qa, hits):
        by_kind.setdefault(question_kind(question), []).append(hit)
    vqa_seconds = time.time() - started

    # text to image
    t2i = _limit(_records(split_dir / "text_to_image.jsonl"), config.max_prompts)
    image_sampling = vg.VPiTSampling(max_new_tokens=1, max_new_images=1)
    generated, true_tokens = [], []
    for part in _batches(t2i, config.batch_size):
        prompts = [vg.image_prompt(record["conversations"][0]["value"], tokenizer, template,
                                   mconfig, pad) for record in part]
        for generation in generator.generate(prompts, image_sampling):
            generated.append(generation.visual_tokens[0])
        true_tokens += [generator.encode_images(pixels(r["images"][0])) for r in part]
    generated = np.stack(generated)
    true_tokens = np.stack(true_tokens)
    cosine = float(token_cosine(generated, true_tokens).mean())
    cosine_chance = mismatched_cosine(generated, true_tokens)
    train_t2i = _records(world_dir / "train" / "text_to_image.jsonl")
    mean_token = np.mean([generator.encode_images(pixels(r["images"][0]))
                          for r in _limit(train_t2i, 256)], axis=0)
    cosine_mean_image = float(token_cosine(mean_token[None], true_tokens).mean())
    t2i_seconds = time.time() - started - vqa_seconds

    # Only the single-shape prompts (the oracle's) and the grid's rows are rendered.
    single = [i for i, r in enumerate(t2i) if len(r["target"]) == 1]
    shown = (single + [i for i in range(len(t2i)) if i not in set(single)])[:config.samples]
    drawn = sorted(set(single) | set(shown))
    rendered = dict(zip(drawn, renderer.render(generated[drawn]))) if drawn else {}
    oracle_hits = [oracle_correct(rendered[i], t2i[i]["target"][0]) for i in single]
    oracle_accuracy = float(np.mean(oracle_hits)) if oracle_hits else 0.0
    render_seconds = time.time() - started - vqa_seconds - t2i_seconds

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.png"
    write_samples(samples_path, [t2i[i]["conversations"][0]["value"] for i in shown],
                  [rendered[i] for i in shown],
                  [images_lib.resize_uint8(images_lib.open_image(world_dir / t2i[i]["images"][0]),
                                           rendered[i].shape[0]) for i in shown])
    metrics = {
        "vqa_accuracy": vqa_accuracy, "vqa_chance": vqa_chance,
        "visual_token_cosine": cosine, "visual_token_cosine_chance": cosine_chance,
        "visual_token_cosine_mean_image": cosine_mean_image,
        "generation_oracle_accuracy": oracle_accuracy,
        "generation_oracle_chance": ORACLE_CHANCE,
        "vqa_accuracy_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "counts": {"questions": len(qa), "text_to_image_prompts": len(t2i),
                   "single_shape_prompts": len(single), "rendered": len(drawn)},
        "split": config.split,
        "stage_seconds": dict(stage_seconds or {}),
        "incomplete_stages": dict(incomplete_stages or {}),
        "eval_seconds": {"vqa": vqa_seconds, "visual_tokens": t2i_seconds,
                         "render_and_oracle": render_seconds},
        "samples": str(samples_path),
        "devices": jax.device_count(),
    }
    (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def write_samples(path: Path, prompts: Sequence[str], generated: Sequence[np.ndarray],
                  true: Sequence[np.ndarray], scale: int = 4) -> None:
    """One row per prompt: the prompt's text, the generated image, the true image."""
    from PIL import Image, ImageDraw
    if not prompts:
        raise ValueError("no samples to draw")
    side = generated[0].shape[0] * scale
    text_width, pad = 360, 6
    rows = len(prompts)
    canvas = Image.new("RGB", (text_width + 2 * side + 3 * pad, rows * (side + pad) + pad + 14),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((text_width + pad, 2), "generated", fill=(0, 0, 0))
    draw.text((text_width + side + 2 * pad, 2), "true", fill=(0, 0, 0))
    for row, (prompt, gen, real) in enumerate(zip(prompts, generated, true)):
        top = 14 + pad + row * (side + pad)
        words, lines, line = prompt.split(), [], ""
        for word in words:    # wrap to the text column
            if len(line) + len(word) + 1 > 56:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.text((pad, top), "\n".join(lines), fill=(0, 0, 0))
        for column, image in enumerate((gen, real)):
            picture = Image.fromarray(np.asarray(image, np.uint8)).resize((side, side),
                                                                          Image.NEAREST)
            canvas.paste(picture, (text_width + pad + column * (side + pad), top))
    canvas.save(path)
