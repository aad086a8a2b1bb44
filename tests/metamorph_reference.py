"""A PyTorch version of the authors' MetaMorph forward and loss, for parity tests.

Written from REFERENCE.md's facts: transformers' LlamaForCausalLM and SiglipVisionModel, the
visual tokens as SigLIP hidden_states[-1] resized bilinearly (F.interpolate) and
F.normalize'd, an nn.Sequential(Linear, GELU, Linear) adapter whose outputs replace the
embeddings of the visual positions (found from the <image_start> ids), and the same shape
of vision head. Its loss is the authors': shifted cross-entropy over labels that are -100
outside responses, and -cos between the normalised head output at t and the visual token at
t + 1 of response images. `authors_state_dict` names the tensors as the authors' checkpoint.
"""
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from metamorph_jax.data import conversation
from tests.helpers import tiny_llama_hf_config

IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 40, 8, 9   # 5x5 patch grid -> 3x3 visual tokens
VISION_COEF = 0.5  # not 1, so that a missing or doubled coefficient shows


def vision_hf_config() -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
                patch_size=PATCH)


def authors_hf_config(vocab_size: int, **llama_changes) -> dict:
    """A config.json as the authors' code writes it (a LlamaConfig plus the mm_* fields)."""
    config = tiny_llama_hf_config(vocab_size=vocab_size, **llama_changes)
    config.update(model_type="metamorph_llama", architectures=["MetaMorphLlamaForCausalLM"],
                  mm_vision_tower="siglip/CLIP-ViT-SO400M-14-384", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=24, mm_vision_select_layer=-1, mm_vision_select_feature="patch",
                  mm_patch_merge_type="flat", mm_use_im_start_end=True, vision_head_type="mlp",
                  image_token_reduction="interpolation", num_image_tokens=TOKENS_PER_IMAGE,
                  freeze_vision=True, normalize_vision=True, apply_softmax=False,
                  vision_coef=VISION_COEF)
    return config


class TorchMetaMorph(torch.nn.Module):
    """The authors' forward, in torch, with the authors' tensor names in its state dict."""

    def __init__(self, hf_config: dict, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        llama_fields = {k: v for k, v in hf_config.items()
                        if k not in ("model_type", "architectures")}
        self.llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_fields))
        self.tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            **{k: v for k, v in vision_hf_config().items() if k != "model_type"},
            attn_implementation="eager")).eval()
        d, c = hf_config["hidden_size"], hf_config["mm_hidden_size"]
        self.projector = torch.nn.Sequential(torch.nn.Linear(c, d), torch.nn.GELU(),
                                             torch.nn.Linear(d, d))
        self.head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(),
                                        torch.nn.Linear(d, c))
        with torch.no_grad():  # every tensor away from its default, so each one matters
            for param in self.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        self.coef = hf_config["vision_coef"]

    def authors_state_dict(self) -> dict:
        state = dict(self.llama.state_dict())
        state.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
        state.update({f"vision_head.{k}": v for k, v in self.head.state_dict().items()})
        state.update({f"model.vision_tower.vision_tower.{k}": v
                      for k, v in self.tower.state_dict().items()})
        return state

    def authors_grads(self) -> dict:
        """Gradients under the authors' names; the frozen tower's are zero."""
        pairs = ([(n, p) for n, p in self.llama.named_parameters()]
                 + [(f"model.mm_projector.{n}", p) for n, p in self.projector.named_parameters()]
                 + [(f"vision_head.{n}", p) for n, p in self.head.named_parameters()]
                 + [(f"model.vision_tower.vision_tower.{n}", p)
                    for n, p in self.tower.named_parameters()])
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in pairs}

    def visual_tokens(self, images_nhwc: np.ndarray) -> torch.Tensor:
        with torch.no_grad():  # frozen tower, detached targets
            pixels = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
            feats = self.tower(pixels, output_hidden_states=True).hidden_states[-1]
            n, count, dim = feats.shape
            side, out = int(count ** 0.5), int(TOKENS_PER_IMAGE ** 0.5)
            grid = feats.view(n, side, side, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(out, out), mode="bilinear", align_corners=False)
            return F.normalize(grid.permute(0, 2, 3, 1).flatten(1, 2), p=2, dim=-1)

    def sample_forward(self, tokens: np.ndarray, images: np.ndarray, text_mask: np.ndarray,
                       image_start_id: int):
        """One sample alone (batch 1). Returns (shifted logits, labels, vision preds, targets)."""
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        embeds = self.llama.model.embed_tokens(ids)
        starts = np.flatnonzero(tokens == image_start_id)
        feats = self.visual_tokens(images) if len(starts) else None
        pieces, cursor = [], 0
        for n, start in enumerate(starts):  # image n's visual positions follow its marker
            pieces += [embeds[:, cursor:start + 1], self.projector(feats[n])[None]]
            cursor = start + 1 + TOKENS_PER_IMAGE
        embeds = torch.cat(pieces + [embeds[:, cursor:]], dim=1)
        hidden = self.llama.model(inputs_embeds=embeds).last_hidden_state
        logits = self.llama.lm_head(hidden).float()
        # HF labels: the token where it is trained (text_mask[t] trains token t + 1), else -100.
        labels = torch.full_like(ids, -100)
        trained = np.flatnonzero(text_mask[:-1]) + 1
        labels[0, trained] = ids[0, trained]
        preds, targets = [], []
        for n, start in enumerate(starts):
            if labels[0, start] == -100:   # an image in a prompt: no vision loss
                continue
            # hidden at t predicts the visual token at t + 1: <image_start> .. visual token V-1.
            h = hidden[0, start:start + TOKENS_PER_IMAGE]
            preds.append(F.normalize(self.head(h), p=2, dim=-1))
            targets.append(feats[n])
        if preds:
            preds, targets = torch.cat(preds), torch.cat(targets)
        return logits[0, :-1], labels[0, 1:], preds, targets

    def sample_sums(self, *args):
        """(text loss sum, text count, sum of 1 - cos, vision count) for one sample."""
        logits, labels, preds, targets = self.sample_forward(*args)
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        count = int((labels != -100).sum())
        if len(preds) == 0:
            return ce, count, torch.zeros(()), 0
        cos = F.cosine_similarity(targets, preds, dim=-1)
        return ce, count, (1 - cos).sum(), len(cos)


RECORDS = {
    "prompt_image": {"image": [0], "conversations": [
        {"from": "human", "value": "<image>\nwhat is the colour of the shape ?"},
        {"from": "gpt", "value": "red"}]},
    "response_image": {"image": [0], "conversations": [
        {"from": "human", "value": "generate an image of a red circle ."},
        {"from": "gpt", "value": "here is an image based on your request : <image>"}]},
    "text_only": {"conversations": [
        {"from": "human", "value": "hello world"}, {"from": "gpt", "value": "you are helpful ."}]},
    "edit_two_turns": {"image": [0, 0], "conversations": [
        {"from": "human", "value": "<image>\nmake the circle blue ."}, {"from": "gpt", "value": "<image>"},
        {"from": "human", "value": "what is the colour ?"}, {"from": "gpt", "value": "blue"}]},
    "two_response_images": {"image": [0, 0, 0], "conversations": [
        {"from": "human", "value": "<image>\npredict next frames ."},
        {"from": "gpt", "value": "<image><image>"}]},
}




def render_samples(tokenizer, ids, seed: int = 0) -> dict:
    """RECORDS rendered with the real renderer, each with random SigLIP-normalised images."""
    rng = np.random.default_rng(seed)
    samples = {}
    for name, record in RECORDS.items():
        record = dict(record)
        count = len(record.get("image", []))
        images = rng.uniform(-1, 1, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        if count:
            record["image"] = [np.zeros((2, 2, 3), np.uint8)] * count  # paths are not read
        sample = conversation.render(conversation.parse_record(record, where=name), tokenizer, ids,
                                     num_image_tokens=TOKENS_PER_IMAGE)
        sample["images"] = images
        samples[name] = sample
    return samples
