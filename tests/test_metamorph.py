"""The VPiT model and loss against a PyTorch version of the authors' forward.

The torch side is written here from REFERENCE.md's facts: transformers' LlamaForCausalLM and
SiglipVisionModel, the visual tokens as SigLIP hidden_states[-1] resized bilinearly
(F.interpolate) and F.normalize'd, an nn.Sequential(Linear, GELU, Linear) adapter whose
outputs replace the embeddings of the visual positions (found from the <image_start> ids),
and the same shape of vision head. Its loss is the authors': shifted cross-entropy over
labels that are -100 outside responses, and -cos between the normalised head output at t
and the visual token at t + 1 of response images. Weights go into our params through the
converter's table (convert/metamorph.py), so the table is checked too.

Batches come from the real renderer and packer (data/conversation.py, data/packing.py) with
the tiny tokenizer, so the splice and target positions are the ones training uses.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util

from convert import metamorph as metamorph_convert
from convert.core import state_dict_to_flax
from metamorph_jax.data import conversation, packing
from metamorph_jax.data.testing import build_tiny_tokenizer
from metamorph_jax.models import metamorph
from metamorph_jax.models.siglip import SiglipConfig
from metamorph_jax.training import vpit_loss
from tests.helpers import tiny_llama_hf_config

IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 40, 8, 9   # 5x5 patch grid -> 3x3 visual tokens
VISION_COEF = 0.5  # not 1, so that a missing or doubled coefficient shows
TOLERANCE = 1e-5


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
# Rows of the packed batch: several images per row, prompt and response images, a
# text-only row, and two rows holding two samples each.
ROWS = [["edit_two_turns"], ["prompt_image", "response_image"],
        ["two_response_images", "text_only"], ["text_only"]]
SEQ_LEN, MAX_IMAGES = 72, 3


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    ids = conversation.add_image_tokens(tokenizer)
    hf_config = authors_hf_config(ids.vocab_size)
    reference = TorchMetaMorph(hf_config)
    config = metamorph_convert.config_from_hf(hf_config, SiglipConfig.from_hf(vision_hf_config()))
    assert (config.image_start_id, config.image_end_id) == (ids.image_start_id, ids.image_end_id)
    params = jax.tree.map(jnp.asarray, state_dict_to_flax(metamorph_convert.SPEC, config,
                                                          reference.authors_state_dict()))
    rng = np.random.default_rng(0)
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
    return config, params, reference, samples, ids


def packed_batch(samples: dict, rows: list[list[str]]) -> dict:
    batch = packing.empty_batch(len(rows), SEQ_LEN, MAX_IMAGES, IMAGE_SIZE)
    for row, names in enumerate(rows):
        packing.fill_row(batch, row, [samples[n] for n in names], TOKENS_PER_IMAGE)
    return batch


def ours(config, params, batch):
    model = metamorph.MetaMorph(config)

    def loss_fn(p):
        return vpit_loss.vpit_loss(model, p, {k: jnp.asarray(v) for k, v in batch.items()})
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, metrics, grads


def compare_grads(config, grads, reference) -> float:
    expected = state_dict_to_flax(metamorph_convert.SPEC, config, reference.authors_grads())
    flat_expected = traverse_util.flatten_dict(expected)
    worst = 0.0
    for path, got in traverse_util.flatten_dict(grads).items():
        want = np.asarray(flat_expected[path])
        if path[0] == "vision_tower":  # frozen: no gradient at all
            assert not np.asarray(got).any(), path
            continue
        error = float(np.abs(np.asarray(got) - want).max())
        assert error <= TOLERANCE, (path, error)
        worst = max(worst, error)
    return worst


def test_loss_and_gradients_match_the_authors_forward_on_packed_rows(setup):
    config, params, reference, samples, ids = setup
    batch = packed_batch(samples, ROWS)
    loss, metrics, grads = ours(config, params, batch)

    reference.zero_grad()
    sums = [0.0, 0, 0.0, 0]
    for row, names in enumerate(ROWS):
        for name in names:  # each packed sample alone, as the authors' batch-1 forward
            s = samples[name]
            terms = reference.sample_sums(s["tokens"], s["images"], s["text_mask"],
                                          ids.image_start_id)
            sums = [a + b for a, b in zip(sums, terms)]
    text_sum, text_count, vision_sum, vision_count = sums
    total = text_sum / text_count + VISION_COEF * vision_sum / vision_count
    total.backward()

    assert int(metrics["text_tokens"]) == text_count == int(batch["text_mask"].sum())
    assert int(metrics["vision_tokens"]) == vision_count == 9 * 4  # four response images
    assert abs(float(metrics["text_loss"]) - float(text_sum / text_count)) <= TOLERANCE
    assert abs(float(metrics["vision_loss"]) - float(vision_sum / vision_count)) <= TOLERANCE
    assert abs(float(metrics["vision_cosine"]) - (1 - float(vision_sum / vision_count))) <= TOLERANCE
    assert abs(float(loss) - float(total)) <= TOLERANCE
    compare_grads(config, grads, reference)


def test_one_sample_equals_the_authors_mean_formula(setup):
    """One sample, batch 1: ours = CrossEntropyLoss() mean + coef * (-cos mean) + coef."""
    config, params, reference, samples, ids = setup
    s = samples["edit_two_turns"]  # a prompt image, a response image, text after it
    loss, _, grads = ours(config, params, packed_batch(samples, [["edit_two_turns"]]))
    reference.zero_grad()
    logits, labels, preds, targets = reference.sample_forward(
        s["tokens"], s["images"], s["text_mask"], ids.image_start_id)
    authors = (torch.nn.CrossEntropyLoss()(logits, labels)
               + VISION_COEF * -F.cosine_similarity(targets, preds, dim=-1).mean())
    authors.backward()
    assert abs(float(loss) - (float(authors) + VISION_COEF)) <= TOLERANCE
    compare_grads(config, grads, reference)


def test_text_only_batch_has_no_vision_term(setup):
    config, params, _, samples, _ = setup
    loss, metrics, _ = ours(config, params, packed_batch(samples, [["text_only"], ["prompt_image"]]))
    assert float(metrics["vision_tokens"]) == 0 and float(metrics["vision_loss"]) == 0
    assert float(loss) == pytest.approx(float(metrics["text_loss"]))


def test_pixels_and_precomputed_visual_tokens_agree(setup):
    config, params, _, samples, _ = setup
    batch = {k: jnp.asarray(v) for k, v in packed_batch(samples, ROWS).items()}
    model = metamorph.MetaMorph(config)
    visual = model.apply({"params": params}, batch["images"], method=metamorph.MetaMorph.encode_images)
    assert visual.shape == (len(ROWS), MAX_IMAGES, TOKENS_PER_IMAGE, 24)
    common = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
                  image_index=batch["image_index"], compute_logits=True)
    from_pixels = model.apply({"params": params}, batch["tokens"], images=batch["images"], **common)
    from_tokens = model.apply({"params": params}, batch["tokens"], visual_tokens=visual, **common)
    np.testing.assert_array_equal(np.asarray(from_pixels.hidden_states),
                                  np.asarray(from_tokens.hidden_states))
    loss_pixels, _ = vpit_loss.vpit_loss(model, params, batch)
    loss_tokens, _ = vpit_loss.vpit_loss(model, params, {**{k: v for k, v in batch.items()
                                                            if k != "images"},
                                                         "visual_tokens": visual})
    assert float(loss_pixels) == float(loss_tokens)


def _gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_splice_positions_by_hand():
    """Two rows, two images each, visual tokens placed in a hand-chosen order."""
    llm = tiny_llama_hf_config(vocab_size=20)
    hf = authors_hf_config(20)
    hf.update(llm)
    hf["model_type"] = "metamorph_llama"
    config = metamorph_convert.config_from_hf(hf, SiglipConfig.from_hf(vision_hf_config()))
    params = nn.unbox(metamorph.init_params(config, jax.random.key(0)))
    model = metamorph.MetaMorph(config)
    rng = np.random.default_rng(3)
    visual = rng.standard_normal((2, 2, TOKENS_PER_IMAGE, 24)).astype(np.float32)
    tokens = rng.integers(0, 20, (2, 8)).astype(np.int32)
    index = np.full((2, 8), -1, np.int32)
    index[0, 1:4] = [9, 10, 17]     # row 0: image 1's tokens 0, 1, 8
    index[0, 6] = 0                 # row 0: image 0's token 0
    index[1, 2:4] = [4, 13]         # row 1: image 0's token 4, image 1's token 4
    out = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(index),
                                 jnp.asarray(visual), method=metamorph.MetaMorph.embed_inputs))
    p = jax.tree.map(np.asarray, params["mm_projector"])
    table = np.asarray(params["llm"]["embed_tokens"]["embedding"])
    for b in range(2):
        for t in range(8):
            if index[b, t] < 0:
                want = table[tokens[b, t]]
            else:
                x = visual[b, index[b, t] // TOKENS_PER_IMAGE, index[b, t] % TOKENS_PER_IMAGE]
                h = _gelu(x @ p["linear_0"]["kernel"] + p["linear_0"]["bias"])
                want = h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
            np.testing.assert_allclose(out[b, t], want, atol=1e-5, err_msg=f"row {b} position {t}")


def test_from_pretrained_parts_grows_the_vocabulary_with_mean_rows(setup):
    config, params, _, _, _ = setup
    llm_config = config.llm.replace(vocab_size=config.llm.vocab_size - 2)
    llm = dict(params["llm"])
    llm["embed_tokens"] = {"embedding": params["llm"]["embed_tokens"]["embedding"][:-2]}
    llm["lm_head"] = {"kernel": params["llm"]["lm_head"]["kernel"][:, :-2]}
    built, built_params = metamorph.from_pretrained_parts(
        llm, llm_config, params["vision_tower"], config.vision, jax.random.key(1),
        vision_coef=VISION_COEF)
    assert built == config
    assert (jax.tree.map(np.shape, built_params)
            == jax.tree.map(np.shape, nn.unbox(metamorph.init_params(config, jax.random.key(0)))))
    embedding = np.asarray(built_params["llm"]["embed_tokens"]["embedding"])
    kernel = np.asarray(built_params["llm"]["lm_head"]["kernel"])
    for row in (config.image_start_id, config.image_end_id):
        np.testing.assert_allclose(embedding[row], embedding[:-2].mean(0), atol=1e-7)
        np.testing.assert_allclose(kernel[:, row], kernel[:, :-2].mean(1), atol=1e-7)


@pytest.mark.parametrize("field,value,message", [
    ("mm_projector_type", "linear", "mm_projector_type"),
    ("vision_head_type", "mlp2x_gelu", "vision_head_type"),
    ("mm_hidden_size", 1152, "mm_hidden_size"),
    ("normalize_vision", False, "normalize_vision"),
    ("apply_softmax", True, "apply_softmax"),
    ("image_token_reduction", "mlpmixer", "image_token_reduction"),
    ("num_image_tokens", 8, "num_visual_tokens=8"),
])
def test_unsupported_fields_are_errors(field, value, message):
    hf = authors_hf_config(76)
    hf[field] = value
    with pytest.raises(ValueError, match=message):
        metamorph_convert.config_from_hf(hf, SiglipConfig.from_hf(vision_hf_config()))


def test_config_round_trips_through_a_dict(setup):
    config = setup[0]
    assert metamorph.MetaMorphConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MetaMorphConfig fields"):
        metamorph.MetaMorphConfig.from_dict({**config.to_dict(), "extra": 1})
