"""What generate.py does with a MetaMorph checkpoint: find the model and visualiser folders,
decode prompts (one, a JSONL batch, or an interactive chat), render the generated images and
write the results.

A command-line module: nothing in the library imports it.

Per prompt, OUT holds:
    result.json         {"text", "tokens", "images", "finish_reason"}: the reply text with
                        "[image N: PATH]" where image N was generated; the new token ids
                        (-1 at each generated visual position, see vpit_generate); the PNG
                        paths in order
    image_N.png         the rendered images (unless rendering is off)
    visual_tokens.npy   [images, V, C] float32: the generated visual tokens

Several processes (--prompts): prompt k goes to process k mod P (inference/processes.py),
which decodes its share as one batch over its local devices and alone writes those
prompts' folders, OUT/prompt_NNNN/ numbered by the prompt's line in the file, so no two
processes write the same file; the reply texts are gathered and process 0 prints them in
order.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence, TextIO

import numpy as np

from metamorph_jax import config_io, pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.inference import checkpoints
from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.inference.processes import barrier, gather_texts, process_rows
from metamorph_jax.inference.render import ImageRenderer, RenderConfig
from metamorph_jax.input_errors import BadInput


@dataclasses.dataclass
class Session:
    generator: vg.VPiTGenerator
    tokenizer: object
    template: str
    renderer: ImageRenderer | None
    model_dir: Path
    visualizer_dir: Path | None


def load_session(checkpoint: str | Path, visualizer: str | Path | None = None, *,
                 render: bool = True, render_config: RenderConfig = RenderConfig(),
                 template: str | None = None, dtype: str = "float32",
                 devices=None) -> Session:
    """The generator (and renderer) for --checkpoint / --visualizer. Without a visualiser
    folder, rendering must be turned off explicitly (render=False). devices: decode with
    the batch split over them (VPiTGenerator's `devices`); None: the default device."""
    model_dir, visualizer_dir = checkpoints.resolve(checkpoint, visualizer)
    model, params, tokenizer, ends = checkpoints.load_metamorph_for_decoding(model_dir, dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = vg.VPiTGenerator(model, params, ends, pad, devices=devices)
    renderer = None
    if render:
        if visualizer_dir is None:
            raise FileNotFoundError(
                f"no visualizer folder for {model_dir} (none given with --visualizer, none "
                f"beside it, none in its work directory); pass --visualizer DIR, or "
                f"--no-render to keep the generated images as visual tokens only")
        vis_model, vis_params, schedule = checkpoints.load_visualizer(visualizer_dir)
        renderer = ImageRenderer(vis_model, vis_params, schedule, render_config)
        want = (model.config.num_image_tokens, model.config.mm_hidden_size)
        if renderer.token_shape != want:
            raise BadInput(f"{visualizer_dir}: the visualizer takes visual tokens "
                           f"{list(renderer.token_shape)} (num_tokens, token_dim), {model_dir} "
                           f"makes {list(want)}")
    return Session(generator, tokenizer, template or pretrained.chat_template(model_dir),
                   renderer, model_dir, visualizer_dir)


def with_placeholders(text: str, image_count: int) -> str:
    """The prompt text with one `<image>` per image: as written, or all at its start (the
    LLaVA convention) when the text has none."""
    found = text.count(conv.IMAGE_PLACEHOLDER)
    if found == image_count:
        return text
    if found == 0:
        return conv.IMAGE_PLACEHOLDER * image_count + "\n" + text
    raise BadInput(f"the prompt has {found} {conv.IMAGE_PLACEHOLDER} placeholders for "
                   f"{image_count} images")


def load_prompt_images(session: Session, paths: Sequence[str | Path]) -> list[np.ndarray]:
    size = session.generator.config.vision.image_size
    return [images_lib.load_image(path, size) for path in paths]


def write_result(out_dir: Path, session: Session, generation: vg.Generation,
                 first_image: int = 0) -> dict:
    """Writes result.json, the PNGs and visual_tokens.npy of one reply; returns the
    result dict. Images are numbered from `first_image` (a chat numbers them across turns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(generation.visual_tokens)
    paths = [out_dir / f"image_{first_image + n}.png" for n in range(count)]
    if session.renderer is not None and count:
        session.renderer.save(generation.visual_tokens, paths)
    written = [str(p) for p in paths] if session.renderer is not None else []

    def image_text(n: int) -> str:
        where = written[n] if written else "not rendered"
        return f" [image {first_image + n}: {where}] "
    text = vg.reply_text(generation, session.tokenizer, session.generator.config,
                         image_text).strip()
    result = {"text": text, "tokens": [int(t) for t in generation.tokens], "images": written,
              "finish_reason": generation.finish_reason}
    np.save(out_dir / "visual_tokens.npy", generation.visual_tokens.astype(np.float32))
    config_io.write_json(out_dir / "result.json", result)
    return result


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    text: str
    images: tuple = ()   # paths


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    """A JSONL file of {"prompt": str, "images": [paths]} (images optional; relative paths
    are relative to the file's folder)."""
    path = Path(path)
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadInput(f"{where}: not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BadInput(f"{where}: field 'prompt' must be a string")
        images = record.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise BadInput(f"{where}: field 'images' must be a list of paths")
        specs.append(PromptSpec(record["prompt"], tuple(
            p if Path(p).is_absolute() else str(path.parent / p) for p in images)))
    if not specs:
        raise BadInput(f"{path}: no prompts")
    return specs


def run_prompts(session: Session, specs: Sequence[PromptSpec], out_dir: str | Path,
                sampling: vg.VPiTSampling, stream: TextIO | None = None,
                process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Decodes the prompts as one batch. One prompt writes into out_dir; several into
    out_dir/prompt_0000, out_dir/prompt_0001, ... With several processes each decodes
    and writes its share (prompts k with k mod P == process_index) and returns the results
    of those; process 0 prints every reply text in order."""
    out_dir, stream = Path(out_dir), stream or sys.stdout
    config = session.generator.config
    mine = process_rows(len(specs), process_index, process_count)
    prompts = []
    for number in mine:
        images = load_prompt_images(session, specs[number].images)
        turns = [conv.Turn("user", with_placeholders(specs[number].text, len(images)))]
        prompts.append(vg.prompt_from_turns(turns, images, session.tokenizer, session.template,
                                            config, session.generator.pad_token_id))
    generations = session.generator.generate(prompts, sampling) if prompts else []
    results = []
    for number, generation in zip(mine, generations):
        target = out_dir if len(specs) == 1 else out_dir / f"prompt_{number:04d}"
        results.append(write_result(target, session, generation))
    texts = gather_texts([r["text"] for r in results], len(specs), process_index, process_count)
    if process_index == 0:
        for text in texts:
            print(text, file=stream)
    barrier("prompts written", process_count)
    return results


def chat(session: Session, lines: Iterable[str], out_dir: str | Path,
         sampling: vg.VPiTSampling, first_images: Sequence[str] = (),
         stream: TextIO | None = None) -> list[dict]:
    """An interactive session over `lines` (stdin): each line is a user turn; a line
    `/image PATH` attaches an image to the next turn; `/quit` ends. Generated images stay
    in the context. Writes out_dir/turn_K/ per reply (images numbered across the session)
    and out_dir/chat.json."""
    out_dir, stream = Path(out_dir), stream or sys.stdout
    conversation = vg.ChatSession(session.generator, session.tokenizer, session.template)
    pending = list(first_images)
    results, image_count = [], 0
    print("chat: type a message; '/image PATH' attaches an image; '/quit' ends", file=stream)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            continue
        images = load_prompt_images(session, pending)
        generation = conversation.ask(with_placeholders(line, len(images)), images, sampling)
        result = write_result(out_dir / f"turn_{len(results)}", session, generation, image_count)
        image_count += len(generation.visual_tokens)
        result = {"user": line, "user_images": pending, **result}
        pending = []
        results.append(result)
        print(f"assistant: {result['text']}", file=stream)
        config_io.write_json(out_dir / "chat.json", results)
    return results
