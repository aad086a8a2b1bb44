"""Tiny random models and a word-level tokenizer, for the demo and for tests.

Nothing here is downloaded: the tokenizer is built from a fixed word list with LLaMA-3's
special tokens and chat template.
"""
from __future__ import annotations

from pathlib import Path
from metamorph_jax.input_errors import BadInput

def tiny_tokenizer(save_dir: str | Path | None = None):
    """The word-level LLaMA-3-style tokenizer of data/testing.py, optionally saved."""
    from metamorph_jax.data.testing import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer()
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer LLaMA sized to the tokenizer, ending on its end-of-turn token."""
    from metamorph_jax.models.llama import LlamaConfig
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                  eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=None)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_siglip_config(**overrides):
    """A 2-layer SigLIP tower: a 4x4 patch grid (at any image_size divisible by 4) reduced
    to 2x2 = 4 visual tokens."""
    from metamorph_jax.models.siglip import SiglipConfig
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, use_head=False,
                  num_visual_tokens=4)
    fields.update(overrides)
    fields.setdefault("patch_size", fields["image_size"] // 4)
    return SiglipConfig(**fields)


def zero_background_patches(params, patch_size: int, background: float = 1.0):
    """Set the patch embedding's bias to minus the kernel's response to a uniform patch of
    normalised value `background` (1.0: white), so that background patches embed to zero.

    With the default zero bias, a random tower's patch embedding maps the Shapes world's
    white background (most of every image) to one large shared vector, and the tokens of
    different images are nearly parallel (cosine ~0.96 per token); with background patches
    at zero a token's direction comes from the shapes it covers and its position embedding
    (~0.68). The architecture is unchanged: this is an initial value of an existing
    parameter of the frozen tower. Returns a copy of `params`."""
    import numpy as np
    params = {**params, "embeddings": dict(params["embeddings"])}
    patch = dict(params["embeddings"]["patch_embedding"])
    kernel = np.asarray(patch["kernel"])          # [p, p, channels, hidden]
    if kernel.shape[:2] != (patch_size, patch_size):
        raise ValueError(f"patch kernel {kernel.shape} does not match patch_size={patch_size}")
    patch["bias"] = (-background * kernel.sum(axis=(0, 1, 2))).astype(kernel.dtype)
    params["embeddings"]["patch_embedding"] = patch
    return params


def _shapes_words(world: Path, text: Path | None = None) -> list[str]:
    """Every word and punctuation mark of the world's records (and of the text corpus's
    records in `text`, when given), sorted."""
    import json
    import re
    words: set[str] = set()
    paths = sorted(world.glob("*/*.jsonl")) + (sorted(text.glob("*.jsonl")) if text else [])
    for path in paths:
        for line in path.read_text().splitlines():
            for turn in json.loads(line).get("conversations", ()):
                words.update(re.findall(r"\w+|[^\w\s]", turn["value"]))
    words.discard("image")  # "<image>" is a placeholder, not text
    return sorted(words)


def _build_into(target: Path, make) -> None:
    """make(folder) into a temporary sibling, renamed to `target` when complete (a run
    killed half-way leaves no half-made folder behind under the real name)."""
    import shutil
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    make(partial)
    partial.rename(target)


def _check_world(folder: Path, world) -> None:
    """An existing world folder must have been written with the settings asked for now (a
    folder kept from an older config would otherwise be trained on silently)."""
    import dataclasses
    import json
    settings = folder / "world.json"
    if not settings.is_file():
        raise BadInput(f"{settings}: missing; {folder} is not a finished Shapes world (delete it "
                       "to write it again)")
    written = json.loads(settings.read_text()).get("config", {})
    wanted = json.loads(json.dumps(dataclasses.asdict(world)))
    differ = sorted(k for k in set(written) | set(wanted) if written.get(k) != wanted.get(k))
    if differ:
        raise BadInput(
            f"{settings}: field(s) {differ} are {[written.get(k) for k in differ]}, but the "
            f"config asks for {[wanted.get(k) for k in differ]} (config fields 'assets.*'); "
            f"delete {folder.parent} or choose another assets.root to write the world again")


# The LLaMA sizes `assets.llm` may set (the rest follow the tokenizer).
LLM_FIELDS = {"hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim"}


def write_random_llm(out, tokenizer_dir, sizes: dict | None = None) -> None:
    """A random LLaMA (tiny_llama_config with `sizes`, LLM_FIELDS) into the model folder
    `out`, its vocabulary the tokenizer's words stopping just before the image tokens (as a
    text LLM's, before VPiT adds them), with that tokenizer. The assets' `llm/`, and the
    larger LLM of finding 3 (metamorph_jax/findings)."""
    import jax
    import flax.linen as nn
    import numpy as np

    from metamorph_jax import pretrained
    from metamorph_jax.data import conversation as conv
    from metamorph_jax.models.llama import LlamaForCausalLM

    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - LLM_FIELDS)
    if unknown:
        raise ValueError(f"LLaMA sizes: unknown field(s) {unknown}; known: {sorted(LLM_FIELDS)}")
    tokenizer = pretrained.load_tokenizer(tokenizer_dir)
    vocab = tokenizer.convert_tokens_to_ids(conv.IMAGE_START)
    config = tiny_llama_config(tokenizer, vocab_size=vocab, max_position_embeddings=512,
                               **sizes)
    dummy = np.zeros((1, 1), np.int32)
    params = nn.unbox(LlamaForCausalLM(config).init(jax.random.key(1), dummy,
                                                    positions=dummy))["params"]
    pretrained.save_pretrained(out, "llama", config.to_dict(), jax.tree.map(np.asarray, params))
    tokenizer.save_pretrained(str(out))


def ensure_assets(assets) -> dict:
    """Make the inputs of configs/tiny.py under `assets.root` when absent: the Shapes world
    (`shapes/`), a word-level tokenizer over its words with the two image tokens
    (`tokenizer/`), a tiny random LLaMA whose vocabulary stops just before those tokens
    (`llm/`), and a tiny random SigLIP tower (`siglip/`). Returns their paths.

    `assets.tower` (optional) sets the tower: SiglipConfig fields for tiny_siglip_config
    (e.g. `num_visual_tokens`, `patch_size`) and `zero_background` (True: the patch
    embedding's bias makes white patches embed to zero, zero_background_patches). Without
    it the tower is tiny_siglip_config's at the world's image size, all parameters random.
    `assets.llm` (optional) sets the LLaMA's sizes (LLM_FIELDS) over tiny_llama_config's.

    `assets.text_corpus` (optional, a number of scenes; 0 or absent: none) also writes the
    world's text corpus (data/shapes_text.py: corpus, finding 4's control without the
    held-out facts, and evaluation questions about held-out scenes) under `text/`, and the
    tokenizer then covers its words too (the text stage trains on it); `text_tokenizer/` is
    that tokenizer without the image tokens, for the text stage."""
    import jax
    import flax.linen as nn
    import numpy as np

    from metamorph_jax import pretrained
    from metamorph_jax.data import conversation as conv
    from metamorph_jax.data import shapes, shapes_text
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from metamorph_jax.models import siglip

    if assets.get("kind") != "tiny_shapes":
        raise BadInput(f"config field 'assets.kind' = {assets.get('kind')!r}: the only kind "
                       "is 'tiny_shapes'")
    tower = assets.get("tower") or {}
    tower = dict(tower.to_dict() if hasattr(tower, "to_dict") else tower)
    zero_background = tower.pop("zero_background", False)
    if not isinstance(zero_background, bool):
        raise BadInput(f"config field 'assets.tower.zero_background' = {zero_background!r}: "
                       "must be true or false")
    try:
        tiny_siglip_config(image_size=int(assets.image_size), **tower)
    except (TypeError, ValueError) as error:
        raise BadInput(f"config field 'assets.tower': {error}") from None

    llm = assets.get("llm") or {}
    llm = dict(llm.to_dict() if hasattr(llm, "to_dict") else llm)
    unknown = sorted(set(llm) - LLM_FIELDS)
    if unknown:
        raise ValueError(f"config field 'assets.llm': unknown field(s) {unknown}; known: "
                         f"{sorted(LLM_FIELDS)}")

    root = Path(assets.root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / name for name in ("shapes", "tokenizer", "llm", "siglip")}
    world = shapes.WorldConfig(
        seed=int(assets.get("seed", 0)), image_size=int(assets.image_size),
        scenes=(("train", int(assets.train)), ("validation", int(assets.validation)),
                ("test", int(assets.get("test", 0)))),
        clips=(("train", int(assets.clips)), ("validation", max(1, int(assets.clips) // 4)),
               ("test", max(1, int(assets.clips) // 4))))
    _build_into(paths["shapes"], lambda out: shapes.write_world(str(out), world, progress=False))
    _check_world(paths["shapes"], world)
    corpus_scenes = int(assets.get("text_corpus", 0) or 0)
    if corpus_scenes:
        paths["text"] = root / "text"
        if not paths["text"].exists() and paths["tokenizer"].exists():
            raise ValueError(
                f"config field 'assets.text_corpus' = {corpus_scenes}: {paths['tokenizer']} "
                f"was made without the text corpus, so it lacks the corpus's words; delete "
                f"{root} (or choose another assets.root) to make the assets again")
        _build_into(paths["text"], lambda out: shapes_text.write_text_world(
            out, seed=world.seed, scenes=corpus_scenes))

    def make_tokenizer(out: Path) -> None:
        tokenizer = build_tiny_tokenizer(_shapes_words(paths["shapes"], paths.get("text")))
        conv.add_image_tokens(tokenizer)
        tokenizer.save_pretrained(str(out))
    _build_into(paths["tokenizer"], make_tokenizer)
    if corpus_scenes:
        # The text stage's tokenizer: the same words and ids without the image tokens, as a
        # LLaMA's own tokenizer is before VPiT adds them (the LLM has no rows for them).
        paths["text_tokenizer"] = root / "text_tokenizer"
        _build_into(paths["text_tokenizer"], lambda out: build_tiny_tokenizer(
            _shapes_words(paths["shapes"], paths["text"])).save_pretrained(str(out)))

    _build_into(paths["llm"], lambda out: write_random_llm(out, paths["tokenizer"], llm))

    def make_siglip(out: Path) -> None:
        config = tiny_siglip_config(image_size=int(assets.image_size), **tower)
        params = jax.tree.map(np.asarray, nn.unbox(siglip.init_params(config, jax.random.key(2))))
        if zero_background:
            params = zero_background_patches(params, config.patch_size)
        pretrained.save_pretrained(out, "siglip", config.to_dict(),
                                   jax.tree.map(np.asarray, params))
    _build_into(paths["siglip"], make_siglip)
    return paths
