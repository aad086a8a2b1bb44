"""FID and CLIP score of generated images: FID against a folder of reference images
(fid.py, pytorch-fid's Inception weights file), CLIP score of each image with its caption
(clip_score.py, a local CLIPModel folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from metamorph_jax.input_errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_images(folder) -> list[Path]:
    """The image files of a reference folder (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) < 2:
        raise BadInput(f"reference folder {folder}: FID needs at least 2 images, found "
                       f"{len(found)} ({', '.join(IMAGE_SUFFIXES)})")
    return found


def score_images(generated: Sequence[Path], captions: Sequence[str], *, references=None,
                 inception=None, clip=None, batch_size: int = 50) -> dict:
    """{"fid", "clip_score", "n", ...} for the generated images; FID needs `references`
    (a folder) and `inception` (the weights file), CLIP score needs `clip` (a folder)."""
    if len(generated) != len(captions):
        raise ValueError(f"{len(generated)} images for {len(captions)} captions")
    out: dict = {"n": len(generated)}
    if (references is None) != (inception is None):
        raise BadInput("FID needs both the reference folder and the Inception weights file")
    if references is not None:
        from metamorph_jax.evaluation import fid
        real = reference_images(references)
        params = fid.load_weights(inception)
        out.update(fid=fid.fid(params, [str(p) for p in real], [str(p) for p in generated],
                               batch_size), fid_references=len(real))
    if clip is not None:
        from metamorph_jax.evaluation import clip_score
        model, processor = clip_score.load_clip(clip)
        scored = clip_score.clip_score(model, processor, [str(p) for p in generated],
                                       list(captions))
        out.update(clip_score=scored["score"], clip_negative=scored["negative"])
    return out
