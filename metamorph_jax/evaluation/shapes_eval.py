"""The Shapes world's held-out evaluation of a trained work directory (train.py runs it after
the stages when the config has `final_eval`):

    vqa_accuracy               exact match on held-out image_qa questions (greedy answers)
    visual_token_cosine        mean cosine between the visual tokens generated for held-out
                               text-to-image prompts and the SigLIP tokens of the true images
    generation_oracle_accuracy share of rendered images for held-out single-shape prompts
                               whose colour, shape, size and position the oracle
                               (data/shapes.read_shape) reads right (issue 23 §2);
                               generation_oracle_without_size: colour, shape and position,
                               the score reported before issue 23
    decoder_true_token_oracle  the same oracle on the decoder's images of the true SigLIP
                               tokens of the same prompts' images: the decoder's share of
                               the error, apart from the LLM's

Each comes with a prompt-blind chance level:
    VQA: answering every question with the most frequent training answer of its kind
         (colour, shape, count of all, count of one shape, position, yes/no);
    cosine: the generated tokens of each prompt against the true tokens of another held-out
         prompt (mismatched pairs); also reported, `visual_token_cosine_mean_image`: the
         mean training SigLIP token (per position) for every prompt, a stronger
         prompt-blind reference;
    oracle: guessing colour, shape, size and position uniformly, 1 / (6 * 3 * 2 * 9).

Beside them (pure pieces in evaluation/shapes_metrics.py):
    vqa_accuracy_by_kind / vqa_chance_by_kind  per question kind, with its majority chance
    generation_attribute_accuracy / _chance    the oracle per attribute (colour, shape, size,
                               position) on the single-shape prompts; chance 1 / the
                               world's number of values
    generation_frechet         Frechet distance between the images rendered for the
                               held-out text-to-image prompts (the first
                               max_frechet_prompts; 0: all) and their true images, in a
                               fixed random conv net's features (shapes_metrics: numpy
                               seed 0, trained on nothing); generation_frechet_reference:
                               as many true training images against the same true images
                               (another sample of the world's scenes; not a floor, since the
                               generated images follow the same prompts as the true ones), and
                               generation_frechet_blank: white images (a decoder that
                               draws nothing)
    edit_oracle, video_oracle  the oracle on the first image generated for each
                               image_to_image record whose edited scene has one shape
                               (max_edits) and each video record whose first predicted
                               frame shows one (max_video): records, accuracy, without_size,
                               attributes, and for reading them the same scores of the
                               true frame (the oracle's own ceiling) and of the prompt's
                               last image copied (a model that changes nothing). With no
                               such records (a world written before video records carried
                               "targets" or had test clips), records 0, nulls and the
                               reason, also logged.

Text-to-image prompts are the user turn followed by the assistant's fixed response prefix
(data/tasks.TEXT_TO_IMAGE_RESPONSE_PREFIX) and `<image_start>` (inference/vpit_generate's
image_prompt, as eval.py --generation prompts): the image is always generated. An edit or
video prompt is its record's user turn with its images and the record's reply up to the
predicted image, then `<image_start>`: the training record's tokens up to that image.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.evaluation import shapes_metrics as sm
# The metric pieces, here under their old names too (train.py, eval.py and tests use them).
from metamorph_jax.evaluation.shapes_metrics import (  # noqa: F401
    ORACLE_CHANCE, QUESTION_KINDS, blind_vqa_accuracy, exact_match, majority_answers,
    mismatched_cosine, normalize_answer, oracle_correct, question_kind, token_cosine)


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
    max_edits: int = 64           # single-shape edits scored (0: every one; each renders)
    max_video: int = 64           # video records scored on their first predicted frame (0: all)
    max_frechet_prompts: int = 0  # prompts in generation_frechet (0: every one; each renders)

    def __post_init__(self):
        if self.max_frechet_prompts == 1 or self.max_frechet_prompts < 0:
            raise ValueError(f"config field 'final_eval.max_frechet_prompts' = "
                             f"{self.max_frechet_prompts}: a Frechet distance needs at least 2 "
                             "images (0: every prompt)")

    @classmethod
    def from_config(cls, fields) -> "ShapesEvalConfig":
        values = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config field 'final_eval': unknown field(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**values)


CHANCE_FIELDS = {"vqa_accuracy": "vqa_chance", "visual_token_cosine": "visual_token_cosine_chance",
                 "generation_oracle_accuracy": "generation_oracle_chance"}


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


@dataclasses.dataclass(frozen=True)
class FrameCase:
    """A record whose first predicted image shows one shape: its user turn (with the
    prompt's `<image>` placeholders), the prompt's images, the reply up to that image, the
    true image and what the oracle should read there."""
    record_id: str
    request: str
    prompt_images: tuple
    reply_prefix: str
    true_image: str
    target: dict


def frame_cases(records: list[dict], kind: str, where: str
                ) -> tuple[list[FrameCase], str | None]:
    """The FrameCases of image_to_image records (their "target": the edited scene's shapes)
    or video records ("targets": per predicted frame); the first predicted image is scored
    where it shows one shape. Returns (cases, why there are none or None)."""
    if kind not in ("image_to_image", "video"):
        raise ValueError(f"frame_cases: kind {kind!r} is not image_to_image or video")
    video = kind == "video"
    if not records:
        return [], f"{where} has no records" + (
            " (tiny.ensure_assets wrote no test clips before issue 23: delete the world "
            "folder to write it again)" if video else "")
    field = "targets" if video else "target"
    if not any(field in record for record in records):
        return [], (f"{where}: no record has the field {field!r} (a world written before the "
                    "records carried it; delete the world folder to write it again)")
    cases = []
    for record in records:
        turns = record.get("conversations")
        if (field not in record or not isinstance(turns, list) or len(turns) != 2
                or [t.get("from") for t in turns] != ["human", "gpt"]):
            raise ValueError(f"{where}: record {record.get('id')!r}: needs field {field!r} and "
                             "field 'conversations' with one human and one gpt turn")
        request, reply = turns[0]["value"], turns[1]["value"]
        shown = request.count(conv.IMAGE_PLACEHOLDER)
        if len(record.get("images") or ()) <= shown:
            raise ValueError(f"{where}: record {record.get('id')!r}: field 'images' needs the "
                             f"prompt's {shown} images and then the predicted one")
        target = record[field][0] if video else record[field]
        if target is None or len(target) != 1:
            continue
        cases.append(FrameCase(str(record.get("id")), request, tuple(record["images"][:shown]),
                               reply.split(conv.IMAGE_PLACEHOLDER)[0],
                               record["images"][shown], target[0]))
    return cases, None if cases else f"{where}: no record's predicted image shows one shape"


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

    # Rendered: the Frechet distance's prompts (the first max_frechet_prompts, 0: all), the
    # oracle's single-shape ones and the grid's rows.
    single = [i for i, r in enumerate(t2i) if len(r["target"]) == 1]
    shown = (single + [i for i in range(len(t2i)) if i not in set(single)])[:config.samples]
    compared = list(range(len(_limit(t2i, config.max_frechet_prompts))))
    drawn = sorted(set(single) | set(shown) | set(compared))
    rendered = dict(zip(drawn, renderer.render(generated[drawn])))
    single_targets = [t2i[i]["target"][0] for i in single]
    single_scores = sm.oracle_scores([rendered[i] for i in single], single_targets)
    # The decoder alone: the same prompts' true tokens rendered and read.
    true_token_scores = sm.oracle_scores(
        list(renderer.render(true_tokens[single])) if single else [], single_targets)
    render_seconds = time.time() - started - vqa_seconds - t2i_seconds

    side = rendered[drawn[0]].shape[0]

    def truth(rel: str) -> np.ndarray:   # uint8 at the rendered images' size
        return images_lib.resize_uint8(images_lib.open_image(world_dir / rel), side)

    true_images = [truth(t2i[i]["images"][0]) for i in compared]
    reference = [truth(r["images"][0]) for r in train_t2i[:len(compared)]]
    frechet = {"generation_frechet": sm.frechet_image_distance([rendered[i] for i in compared],
                                                               true_images),
               "generation_frechet_reference": sm.frechet_image_distance(reference, true_images),
               "generation_frechet_blank": sm.frechet_image_distance(
                   [np.full_like(true_images[0], 255)] * len(compared), true_images),
               "frechet_feature_space": sm.FRECHET_FEATURE_SPACE,
               "frechet_counts": {"generated": len(compared), "reference": len(reference)}}
    frechet_seconds = time.time() - started - vqa_seconds - t2i_seconds - render_seconds

    # Edits and video records: the first predicted image where it shows one shape, all
    # generated in one pass and rendered in one call (the fewest compiles).
    cases, reasons = {}, {}
    for kind, limit in (("image_to_image", config.max_edits), ("video", config.max_video)):
        path = split_dir / f"{kind}.jsonl"
        found, reasons[kind] = frame_cases(_records(path), kind, str(path))
        cases[kind] = _limit(found, limit)
    every_case = cases["image_to_image"] + cases["video"]
    frame_tokens = []
    for part in _batches(every_case, config.batch_size):
        prompts = [vg.image_prompt(case.request, tokenizer, template, mconfig, pad,
                                   images=[pixels(rel) for rel in case.prompt_images],
                                   reply_prefix=case.reply_prefix) for case in part]
        frame_tokens += [g.visual_tokens[0] for g in generator.generate(prompts, image_sampling)]
    frames = iter(renderer.render(np.stack(frame_tokens)) if frame_tokens else ())
    predicted = {}
    for kind, scored in cases.items():
        if not scored:
            log(f"{kind}: no predicted frame scored: {reasons[kind]}")
            predicted[kind] = {"records": 0, "accuracy": None, "without_size": None,
                               "attributes": None, "true_frame": None,
                               "copy_prompt_image": None, "reason": reasons[kind]}
            continue
        targets = [case.target for case in scored]
        brief = lambda images: {k: v for k, v in sm.oracle_scores(images, targets).items()  # noqa: E731
                                if k != "attributes"}
        predicted[kind] = {
            "records": len(scored),
            **sm.oracle_scores([next(frames) for _ in scored], targets),
            "true_frame": brief([truth(case.true_image) for case in scored]),
            "copy_prompt_image": brief([truth(case.prompt_images[-1]) for case in scored])}
    edits, video = predicted["image_to_image"], predicted["video"]
    frames_seconds = (time.time() - started - vqa_seconds - t2i_seconds - render_seconds
                      - frechet_seconds)

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.png"
    write_samples(samples_path, [t2i[i]["conversations"][0]["value"] for i in shown],
                  [rendered[i] for i in shown],
                  [images_lib.resize_uint8(images_lib.open_image(world_dir / t2i[i]["images"][0]),
                                           rendered[i].shape[0]) for i in shown])
    kinds = sorted(by_kind)
    metrics = {
        "vqa_accuracy": vqa_accuracy, "vqa_chance": vqa_chance,
        "visual_token_cosine": cosine, "visual_token_cosine_chance": cosine_chance,
        "visual_token_cosine_mean_image": cosine_mean_image,
        "generation_oracle_accuracy": single_scores["accuracy"] or 0.0,
        "generation_oracle_chance": ORACLE_CHANCE,
        "generation_oracle_without_size": single_scores["without_size"] or 0.0,
        "generation_oracle_without_size_chance": sm.ORACLE_CHANCE_WITHOUT_SIZE,
        "decoder_true_token_oracle": true_token_scores,
        "vqa_accuracy_by_kind": {k: float(np.mean(by_kind[k])) for k in kinds},
        "vqa_chance_by_kind": {k: blind_vqa_accuracy(train_qa, [(q, a) for _, q, a in qa
                                                                if question_kind(q) == k])
                               for k in kinds},
        "generation_attribute_accuracy": single_scores["attributes"],
        "generation_attribute_chance": dict(sm.ATTRIBUTE_CHANCE),
        **frechet,
        "edit_oracle": edits,
        "video_oracle": video,
        "counts": {"questions": len(qa), "text_to_image_prompts": len(t2i),
                   "single_shape_prompts": len(single), "rendered": len(drawn),
                   "edits": edits["records"], "video": video["records"]},
        "split": config.split,
        "stage_seconds": dict(stage_seconds or {}),
        "incomplete_stages": dict(incomplete_stages or {}),
        "eval_seconds": {"vqa": vqa_seconds, "visual_tokens": t2i_seconds,
                         "render_and_oracle": render_seconds, "frechet": frechet_seconds,
                         "edits_and_video": frames_seconds},
        "samples": str(samples_path),
        "devices": jax.device_count(),
    }
    (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """The per-kind, per-attribute, Frechet and predicted-frame numbers, compactly (each
    beside its chance or reference in brackets)."""
    def pairs(values: dict | None, chances: dict) -> str:
        return ", ".join(f"{k} {v:.2f} ({chances[k]:.2f})" for k, v in (values or {}).items())

    lines = ["vqa by kind: " + pairs(metrics["vqa_accuracy_by_kind"], metrics["vqa_chance_by_kind"])]
    if metrics["generation_attribute_accuracy"]:
        lines.append("generation attributes: " + pairs(metrics["generation_attribute_accuracy"],
                                                       metrics["generation_attribute_chance"])
                     + f"; colour, shape and position {metrics['generation_oracle_without_size']:.3f}")
    true_tokens = metrics["decoder_true_token_oracle"]
    if true_tokens["accuracy"] is not None:
        lines.append(f"decoder alone on the true tokens: oracle {true_tokens['accuracy']:.3f}; "
                     + ", ".join(f"{k} {v:.2f}" for k, v in true_tokens["attributes"].items()))
    lines.append(f"generation frechet: {metrics['generation_frechet']:.3f} (true vs true "
                 f"{metrics['generation_frechet_reference']:.3f}, blank "
                 f"{metrics['generation_frechet_blank']:.3f})")
    for name in ("edit_oracle", "video_oracle"):
        scored = metrics[name]
        if scored["records"]:
            lines.append(f"{name}: {scored['accuracy']:.3f} of {scored['records']} (true frame "
                         f"{scored['true_frame']['accuracy']:.3f}, copy of the prompt's image "
                         f"{scored['copy_prompt_image']['accuracy']:.3f}); " +
                         ", ".join(f"{k} {v:.2f}" for k, v in scored["attributes"].items()))
        else:
            lines.append(f"{name}: none scored ({scored['reason']})")
    return lines


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
