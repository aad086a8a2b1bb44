"""CLIP score of (image, caption) pairs with a local CLIP checkpoint (a transformers
CLIPModel folder holding its processor files): per pair 100 * max(cos(image embedding,
text embedding), 0), the embeddings from the projection heads (`get_image_features`,
`get_text_features`), the inputs prepared by the folder's CLIPProcessor and token ids
past the text tower's positions cut off (as torchmetrics does: the end token goes too).
The benchmark number is the mean over pairs. (torchmetrics' CLIPScore clamps the mean of the unclamped scores instead;
the two agree unless some pair has a negative cosine, which `clip_score` reports.)

Runs CLIP with PyTorch on the host (transformers ships no JAX CLIP), imported on use.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def load_clip(folder):
    """(model, processor) from a CLIPModel folder."""
    from transformers import CLIPModel, CLIPProcessor

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CLIP folder {folder} does not exist")
    model = CLIPModel.from_pretrained(folder).eval()
    return model, CLIPProcessor.from_pretrained(folder)


def _pil(image):
    from PIL import Image

    from metamorph_jax.evaluation.samples import decode_image

    if isinstance(image, Image.Image):
        return image
    return decode_image(image, image if isinstance(image, str) else "an image array")


def cosines(model, processor, images: Sequence, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Cosine similarity of each (image, caption) pair; images are paths, PIL images or
    uint8 arrays."""
    import torch

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    max_len = model.config.text_config.max_position_embeddings
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pil = [_pil(i) for i in images[start:start + batch_size]]
            text = list(captions[start:start + batch_size])
            inputs = processor(text=text, images=pil, return_tensors="pt", padding=True)
            # torchmetrics cuts token ids past the text tower's positions (end token included)
            inputs["input_ids"] = inputs["input_ids"][:, :max_len]
            inputs["attention_mask"] = inputs["attention_mask"][:, :max_len]
            image_emb = model.get_image_features(pixel_values=inputs["pixel_values"])
            text_emb = model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs["attention_mask"])
            image_emb = getattr(image_emb, "pooler_output", image_emb)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
            out.append((image_emb * text_emb).sum(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0,))


def clip_score(model, processor, images: Sequence, captions: Sequence[str], batch_size: int = 32) -> dict:
    """{"score": mean of 100 * max(cos, 0), "per_pair": [...], "negative": count of pairs
    with cos < 0, "n"}."""
    cos = cosines(model, processor, images, captions, batch_size)
    per_pair = 100.0 * np.maximum(cos, 0.0)
    return {"score": float(per_pair.mean()) if len(cos) else float("nan"),
            "per_pair": per_pair.tolist(), "negative": int((cos < 0).sum()), "n": int(len(cos))}
