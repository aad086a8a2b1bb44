"""What eval.py does with a MetaMorph checkpoint: benchmark answers with the VPiT
generator, text-to-image generation scored by FID and CLIP score, scoring existing
predictions, and the loss modes. A command-line module: nothing in the library imports it.

OUT holds results.json ({"benchmarks": {name: scores}, "average", and "generation" when
--generation was given}), predictions/<benchmark>.jsonl (id, prompt, raw_answer,
extracted, score; a rerun answers only the samples not yet there) and generated/<id>.png.

Processes: each process loads the model; the samples of a batch are split by index
across processes (vpit_answers.VPiTAnswerer), answers are all-gathered and only process 0
writes OUT, which must be one folder every process sees. --generation splits the captions
still to render the same way (each process writes its own PNGs; process 0 scores them).
A process decodes its rows over its local devices (`local_devices`), the batch split by
row, the parameters replicated on each.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from metamorph_jax import pretrained
from metamorph_jax.evaluation import benchmarks, results, runner
from metamorph_jax.input_errors import BadInput

GENERATION_KEYS = ("prompts", "references", "inception", "clip")


def parse_pairs(text: str, flag: str, allowed=None) -> dict:
    """"a=X,b=Y" -> {"a": "X", "b": "Y"}; errors name the flag."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            raise BadInput(f"{flag} {text!r}: give NAME=PATH[,NAME=PATH...]")
        if allowed is not None and name not in allowed:
            raise BadInput(f"{flag}: unknown name {name!r}; choose from {tuple(allowed)}")
        if name in out:
            raise BadInput(f"{flag}: {name} given twice")
        out[name] = value
    return out


def parse_benchmarks(text: str) -> dict:
    return parse_pairs(text, "--benchmarks", benchmarks.NAMES)


def parse_generation(text: str) -> dict:
    spec = parse_pairs(text, "--generation", GENERATION_KEYS)
    if "prompts" not in spec:
        raise BadInput("--generation needs prompts=FILE (the captions)")
    if ("references" in spec) != ("inception" in spec):
        raise BadInput("--generation: FID needs both references=DIR and inception=FILE")
    return spec


@dataclasses.dataclass
class Loaded:
    generator: object
    tokenizer: object
    template: str
    renderer: object | None
    model_dir: Path


def local_devices(count: int | None = None) -> list:
    """The first `count` of this process's devices (None: all of them)."""
    import jax
    devices = jax.local_devices()
    if count is None:
        return devices
    if not 1 <= count <= len(devices):
        raise BadInput(f"--local-devices {count}: this process has {len(devices)} devices")
    return devices[:count]


def load(checkpoint, *, render: bool, render_config=None, visualizer=None,
         dtype: str = "float32", devices=None) -> Loaded:
    """The VPiT generator (and, with render, the visualiser's renderer) for --checkpoint
    (a metamorph model folder or a training work directory). devices: decode with the
    batch split over them (VPiTGenerator's `devices`); None: the default device."""
    from metamorph_jax.inference import checkpoints
    from metamorph_jax.inference import vpit_generate as vg
    from metamorph_jax.inference.render import ImageRenderer, RenderConfig

    model_dir, visualizer_dir = checkpoints.resolve(checkpoint, visualizer)
    model, params, tokenizer, ends = checkpoints.load_metamorph_for_decoding(model_dir, dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = vg.VPiTGenerator(model, params, ends, pad, devices=devices)
    renderer = None
    if render:
        if visualizer_dir is None:
            raise FileNotFoundError(f"--generation needs a visualizer folder for {model_dir} "
                                    "(beside it, in its work directory, or --visualizer DIR)")
        vis_model, vis_params, schedule = checkpoints.load_visualizer(visualizer_dir)
        renderer = ImageRenderer(vis_model, vis_params, schedule, render_config or RenderConfig())
    return Loaded(generator, tokenizer, pretrained.chat_template(model_dir), renderer, model_dir)


def answer_benchmarks(loaded: Loaded, files: dict, out, *, batch_size: int = 8,
                      limit: int | None = None, max_new_tokens: int = 32) -> dict | None:
    """runner.evaluate with the VPiT generator (greedy, no images); None on processes
    other than the first."""
    import jax

    from metamorph_jax.evaluation.vpit_answers import VPiTAnswerer
    from metamorph_jax.inference.vpit_generate import VPiTSampling

    answerer = VPiTAnswerer(loaded.generator, loaded.tokenizer, loaded.template,
                            VPiTSampling(max_new_tokens=max_new_tokens, max_new_images=0),
                            jax.process_index(), jax.process_count())
    main = jax.process_index() == 0
    return runner.evaluate(files, out, generate=answerer, batch_size=batch_size, limit=limit,
                           write=main, progress=main)


def generate_and_score(loaded: Loaded, spec: dict, out, *, batch_size: int = 8,
                       limit: int | None = None) -> dict | None:
    """One image per caption of spec["prompts"] into OUT/generated/, then FID against
    spec["references"] (with spec["inception"]) and CLIP score (spec["clip"]). With
    several processes each renders its share; process 0 scores and returns the scores,
    the others None."""
    import jax

    from metamorph_jax.evaluation.captions import read_captions
    from metamorph_jax.evaluation.image_scores import score_images
    from metamorph_jax.evaluation.vpit_answers import generate_caption_images

    captions = read_captions(spec["prompts"])
    if limit is not None:
        captions = captions[:limit]
    main = jax.process_index() == 0
    paths = generate_caption_images(loaded.generator, loaded.renderer, loaded.tokenizer,
                                    loaded.template, captions, Path(out) / "generated",
                                    batch_size=batch_size, progress=main,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    if not main:
        return None
    scores = score_images(paths, [c for _, c in captions], references=spec.get("references"),
                          inception=spec.get("inception"), clip=spec.get("clip"))
    return dict(scores, prompts=spec["prompts"])


def write_results(out, summary: dict) -> Path:
    path = Path(out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


def print_summary(summary: dict) -> None:
    if summary.get("benchmarks"):
        for line in results.summary_lines(summary):
            print(line)
    generation = summary.get("generation")
    if generation:
        parts = [f"{key} {generation[key]:.4f}" for key in ("fid", "clip_score") if key in generation]
        print(f"generation: {', '.join(parts) or 'no scores asked for'} ({generation['n']} images)")


def evaluate_shapes_world(work_dir, out) -> dict:
    """The no-flag path of eval.py: the Shapes world of a training work directory, scored
    by evaluation/shapes_eval.py with the `final_eval` fields of the run's config.json
    (the world folder and the evaluation settings train.py used)."""
    from metamorph_jax import config_io
    from metamorph_jax.evaluation import shapes_eval
    config_path = Path(work_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: with no --benchmarks, eval.py "
                                "evaluates the Shapes world of a train.py work directory")
    fields = dict(config_io.read_json(config_path).get("final_eval") or {})
    if "world" not in fields:
        raise BadInput(f"{config_path}: field 'final_eval.world' is missing: this run has no "
                       "Shapes world to evaluate; give --benchmarks NAME=PATH[,...] and/or "
                       "--generation prompts=FILE,...")
    world = fields.pop("world")
    return shapes_eval.evaluate_shapes(work_dir, world,
                                       shapes_eval.ShapesEvalConfig.from_config(fields),
                                       out_dir=out)
