"""VPiT train step, ours (the runner's jitted step) against a PyTorch version of the authors'.

  python -m benchmarks.vpit_step [--repeats 3] [--batch 4] [--seq-len 256] [--batches 2]
                                [--llm-layers 4]

Both sides train the same MetaMorph shape: the LLaMA of llama_vs_torch.HF_CONFIG at 4 of
its 12 layers by default (--llm-layers; our pad-to-longest side compiles every batch shape)
(vocabulary ~32k: a word-level tokenizer over the Shapes words padded with unused words),
a small SigLIP tower (frozen), the two-layer GELU adapter and vision head; fp32, AdamW
(lr 1e-4, weight decay 0.01: torch's default) behind global-norm clipping at 1.0 (the
transformers Trainer's default max_grad_norm, which the authors train with).

Ours is what `train.py` runs: objectives.build(kind "instruct") + steps.make_train_step +
steps.jit_train_step (state donated) on a one-device mesh, fed by the data pipeline's
packed batches (first-fit packing into B rows of T tokens). Theirs, written here from
REFERENCE.md: transformers' LlamaForCausalLM on inputs_embeds whose visual positions hold
adapter(F.normalize(interpolate(SigLIP hidden_states[-1]))), a padding attention mask,
cross-entropy over the trained text targets plus vision_coef * mean(1 - cos) of the head
against the next visual token, torch.optim.AdamW.

Both batchings carry the same rendered samples (the pipeline's stream, in order):
  packed          - the pipeline's batches: first-fit packing into B rows of T tokens;
  pad-to-longest  - the authors' collator: B samples per batch, each alone in its row,
                    padded to the longest sample of the batch (widths vary batch to batch).
A pass steps every batch of one batching once, so both passes train on the same samples.

Rows:
  packing vs pad-to-longest, our step - useful (non-padding) tokens/s of a pass, ours on
      the packed batches against ours on the padded ones: the gain of packing alone.
  our step vs torch, same padded batches - useful tokens/s of a pass over the identical
      pad-to-longest batches, ours against the torch step: the framework ratio alone.
Our step on padded batches is the same jitted function; each distinct batch shape is
compiled once in the untimed warm-up pass (the runner's fixed [B, T] never recompiles).
Timings exclude compilation; passes alternate between the three runs (one untimed pass
each first) and each row's number is the median pass.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = (("image_qa", 6.0), ("video_qa", 1.0), ("text_to_image", 2.0), ("image_to_image", 1.0),
         ("video", 1.0), ("visual_thinking", 1.0))   # configs/tiny.py's Shapes mixture
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=6, patch_size=8)     # a small SigLIP: 8x8 patches at 64 px
VISION_COEF = 1.0
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


# --- the authors' batching ----------------------------------------------------------------

def pad_to_longest(samples, batch_size: int, num_image_tokens: int, image_size: int):
    """The authors' batches: `batch_size` rendered samples each, one per row, padded to the
    longest of the batch (no packing). Same arrays as a packed batch, so one step reads both."""
    from metamorph_jax.data.packing import empty_batch, fill_row
    samples = list(samples)
    for start in range(0, len(samples), batch_size):
        group = samples[start:start + batch_size]
        width = max(len(s["tokens"]) for s in group)
        images = max(1, max(len(s["images"]) for s in group))
        batch = empty_batch(len(group), width, images, image_size)
        for row, sample in enumerate(group):
            fill_row(batch, row, [sample], num_image_tokens)
        yield batch


def useful_tokens(batch: dict) -> int:
    """Non-padding tokens of a batch (packed or padded)."""
    return int(np.count_nonzero(batch["segment_ids"]))


# --- assets -------------------------------------------------------------------------------

def make_assets(root: Path, args) -> dict:
    """A Shapes world, a ~32k-word tokenizer with the image tokens, the LLM and the tower."""
    import flax.linen as nn
    import jax

    from benchmarks.llama_vs_torch import HF_CONFIG
    from metamorph_jax import pretrained
    from metamorph_jax.data import conversation as conv
    from metamorph_jax.data import shapes
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from metamorph_jax.models import siglip
    from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from metamorph_jax.tiny import _shapes_words

    paths = {name: root / name for name in ("shapes", "tokenizer", "llm", "siglip")}
    shapes.write_world(str(paths["shapes"]), shapes.WorldConfig(
        seed=0, image_size=args.image_size, scenes=(("train", 300), ("validation", 2), ("test", 0)),
        clips=(("train", 20), ("validation", 1), ("test", 0))), progress=False)
    words = _shapes_words(paths["shapes"])
    base = len(build_tiny_tokenizer(words))
    fillers = [f"unused{i}" for i in range(max(0, HF_CONFIG["vocab_size"] - base))]
    tokenizer = build_tiny_tokenizer(words + fillers)
    ids = conv.add_image_tokens(tokenizer)
    tokenizer.save_pretrained(str(paths["tokenizer"]))

    hf = dict(HF_CONFIG, vocab_size=ids.image_start_id,  # the image tokens come after it
              num_hidden_layers=args.llm_layers)
    llm = LlamaConfig.from_hf(hf, scan_layers=args.scan_layers)
    dummy = np.zeros((1, 1), np.int32)
    params = jax.jit(lambda r: nn.unbox(LlamaForCausalLM(llm).init(r, dummy, positions=dummy))
                     ["params"])(jax.random.key(1))
    pretrained.save_pretrained(paths["llm"], "llama", llm.to_dict(), jax.device_get(params))
    tower = siglip.SiglipConfig(**VISION, image_size=args.image_size, use_head=False,
                                num_visual_tokens=args.image_tokens)
    pretrained.save_pretrained(paths["siglip"], "siglip", tower.to_dict(), jax.device_get(
        nn.unbox(siglip.init_params(tower, jax.random.key(2)))))
    return dict(paths, hf=hf, tower=tower)


def stage_config(paths: dict, args):
    import ml_collections
    stage = ml_collections.ConfigDict()
    stage.kind = "instruct"
    stage.steps = 1000
    stage.init = ml_collections.ConfigDict(dict(
        llm_dir=str(paths["llm"]), vision_dir=str(paths["siglip"]),
        tokenizer_dir=str(paths["tokenizer"]), model_dir="", from_previous=False, seed=0))
    stage.data = ml_collections.ConfigDict(dict(
        sources={kind: dict(path=f"{paths['shapes']}/train/{kind}.jsonl", weight=weight,
                            image_root=str(paths["shapes"])) for kind, weight in KINDS},
        seq_len=args.seq_len, batch_size=args.batch, num_image_tokens=args.image_tokens,
        image_size=args.image_size, image_dtype="float32",
        max_images_per_row=args.max_images, template="llama3", seed=0, num_epochs=None,
        worker_count=0, strict=True))
    stage.optim = ml_collections.ConfigDict(dict(lr=LR, schedule="constant",
                                                 weight_decay=WEIGHT_DECAY, grad_clip=CLIP))
    stage.grad_accum_steps = 1
    stage.dtype = "float32"
    stage.remat_policy = "none"
    stage.vision_coef = VISION_COEF
    return stage


def sample_stream(objective, stage):
    """The rendered samples in the order the packed iterator consumes them."""
    from metamorph_jax.data import pipeline
    from metamorph_jax.data.bad_records import is_bad
    from metamorph_jax.training.objectives import data_from_config
    sources, config = data_from_config(stage.data, "benchmark data")
    dataset = pipeline.record_dataset(sources, config).map(
        pipeline.SampleMaker(objective.tokenizer, objective.ids, config))
    for sample in dataset.to_iter_dataset():
        if is_bad(sample):
            raise ValueError(f"bad Shapes record: {sample}")
        yield sample


# --- ours ---------------------------------------------------------------------------------

def our_steps(objective, stage, batch_lists: list[list[dict]]):
    """The runner's jitted step (donated state), one trained state for all lists: per list,
    run(k) steps batch k of that list and waits. A new batch shape compiles on first use."""
    import jax
    from metamorph_jax import sharding
    from metamorph_jax.training import optim
    from metamorph_jax.training import state as state_lib
    from metamorph_jax.training import steps as steps_lib

    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    tx, schedule = optim.build_optimizer(stage.optim.to_dict(), int(stage.steps))
    boxed = state_lib.abstract_state(*objective.boxed_parts(), tx)
    shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
    trainable, frozen = objective.load_parts(shardings.trainable, shardings.frozen)
    state = [state_lib.init_state(trainable, frozen, tx, state_lib.rng_data(0), shardings, mesh)]
    keys = objective.batch_keys
    stacked = [[steps_lib.stack_micro_batches([b], keys) for b in batches]
               for batches in batch_lists]
    step = steps_lib.jit_train_step(steps_lib.make_train_step(objective, tx, schedule, False),
                                    mesh, shardings, objective.rules,
                                    {k: v.ndim for k, v in stacked[0][0].items()})

    def runner(placed):
        def run(k: int) -> None:
            state[0], metrics = step(state[0], placed[k % len(placed)])
            jax.block_until_ready(metrics["loss"])
        return run
    return [runner([steps_lib.global_batch(s, mesh, objective.rules) for s in lists])
            for lists in stacked]


# --- theirs -------------------------------------------------------------------------------

class TorchVPiT:
    """The authors' model in torch: LLaMA + frozen SigLIP + mlp2x_gelu adapter and head."""

    def __init__(self, hf: dict, tower, seed: int = 0):
        import torch
        import transformers
        torch.manual_seed(seed)
        fields = {k: v for k, v in hf.items() if k != "model_type"}
        self.llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **dict(fields, vocab_size=hf["vocab_size"] + 2)))
        self.tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=tower.hidden_size, intermediate_size=tower.intermediate_size,
            num_hidden_layers=tower.num_hidden_layers,
            num_attention_heads=tower.num_attention_heads, image_size=tower.image_size,
            patch_size=tower.patch_size)).eval()
        self.tower.requires_grad_(False)
        self.tokens_per_image = tower.num_visual_tokens
        d, c = hf["hidden_size"], tower.hidden_size
        self.projector = torch.nn.Sequential(torch.nn.Linear(c, d), torch.nn.GELU(),
                                             torch.nn.Linear(d, d))
        self.head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(),
                                        torch.nn.Linear(d, c))
        self.trained = (list(self.llama.parameters()) + list(self.projector.parameters())
                        + list(self.head.parameters()))
        self.optimizer = torch.optim.AdamW(self.trained, lr=LR, weight_decay=WEIGHT_DECAY)

    def visual_tokens(self, images_nhwc):
        import torch
        import torch.nn.functional as F
        with torch.no_grad():   # frozen tower, detached targets
            pixels = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
            feats = self.tower(pixels, output_hidden_states=True).hidden_states[-1]
            n, count, dim = feats.shape
            side, out = int(count ** 0.5), int(self.tokens_per_image ** 0.5)
            grid = feats.view(n, side, side, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(out, out), mode="bilinear", align_corners=False)
            return F.normalize(grid.permute(0, 2, 3, 1).flatten(1, 2), p=2, dim=-1)

    def step(self, batch: dict) -> None:
        import torch
        import torch.nn.functional as F
        tokens = torch.from_numpy(batch["tokens"]).long()
        valid = batch["image_valid"] > 0
        embeds = self.llama.model.embed_tokens(tokens)
        feats = None
        if valid.any():
            # A row's images sit at its first slots: flat index = images before the row x V
            # + the row's own image_index.
            feats = self.visual_tokens(batch["images"][valid]).flatten(0, 1)
            before = (np.cumsum(valid.sum(1)) - valid.sum(1))[:, None] * self.tokens_per_image
            where = batch["image_index"] >= 0
            flat = torch.from_numpy((batch["image_index"] + before)[where])
            embeds = embeds.clone()
            embeds[torch.from_numpy(where)] = self.projector(feats[flat])
        mask = torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64))
        hidden = self.llama.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = self.llama.lm_head(hidden).float()
        text = torch.from_numpy(batch["text_mask"] > 0)
        loss = F.cross_entropy(logits[text], torch.from_numpy(batch["text_targets"]).long()[text])
        vision = batch["vision_mask"] > 0
        if feats is not None and vision.any():
            before = (np.cumsum(valid.sum(1)) - valid.sum(1))[:, None] * self.tokens_per_image
            target = torch.from_numpy((batch["vision_target_index"] + before)[vision])
            preds = F.normalize(self.head(hidden[torch.from_numpy(vision)]), p=2, dim=-1)
            loss = loss + VISION_COEF * (1 - F.cosine_similarity(preds, feats[target], dim=-1)).mean()
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, CLIP)
        self.optimizer.step()


# --- timing -------------------------------------------------------------------------------

def alternating_passes(passes: list, repeats: int, names: list[str]) -> list[list[float]]:
    """Seconds of each side's timed passes: one untimed pass per side (compiles, allocates),
    then `repeats` rounds in which the sides take turns, one whole pass each, so every side
    runs under the same machine conditions (on a shared machine they drift over minutes)."""
    for run_pass, name in zip(passes, names):
        start = time.perf_counter()
        run_pass()
        print(f"  warm-up pass, {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times: list[list[float]] = [[] for _ in passes]
    for round_index in range(repeats):
        for run_pass, spent in zip(passes, times):
            start = time.perf_counter()
            run_pass()
            spent.append(time.perf_counter() - start)
        print(f"  round {round_index + 1}/{repeats}: "
              + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in zip(names, times)), flush=True)
    return times


def whole_pass(run, count: int):
    """A callable stepping batches 0..count-1 once each."""
    def run_pass() -> None:
        for k in range(count):
            run(k)
    return run_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per side (the median is reported)")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch, both batchings")
    parser.add_argument("--seq-len", type=int, default=256, help="T of the packed rows")
    parser.add_argument("--batches", type=int, default=2,
                        help="packed batches in a pass (the padded pass holds their samples)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=16, help="visual tokens per image")
    parser.add_argument("--max-images", type=int, default=8, help="image slots per packed row")
    parser.add_argument("--llm-layers", type=int, default=4,
                        help="LLM layers (default 4, ~75M with the 32k embeddings: every "
                             "padded batch shape compiles; 12: llama_vs_torch's ~125M)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="LLM layers under nn.scan (default unrolled, the faster on CPU)")
    args = parser.parse_args()

    import jax
    import torch

    from metamorph_jax.training import objectives

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_assets(Path(tmp), args)
        stage = stage_config(paths, args)
        objective = objectives.build(stage, "instruct", None)
        packed_iter = objective.batches(stage.data)
        packed = [next(packed_iter) for _ in range(args.batches)]
        consumed = sum(len(b) for batch in packed for b in batch["record_ids"])
        stream = sample_stream(objective, stage)
        samples = [next(stream) for _ in range(consumed)]
        padded = list(pad_to_longest(samples, args.batch, args.image_tokens, args.image_size))
        ours_packed, ours_padded = our_steps(objective, stage, [packed, padded])
    theirs = TorchVPiT(paths["hf"], paths["tower"])
    passes = [whole_pass(ours_packed, len(packed)), whole_pass(ours_padded, len(padded)),
              whole_pass(lambda k: theirs.step(padded[k]), len(padded))]

    llm_count = sum(p.numel() for p in theirs.llama.parameters())
    tower_count = sum(p.numel() for p in theirs.tower.parameters())
    print(f"config: LLM {llm_count / 1e6:.0f}M, SigLIP {tower_count / 1e6:.1f}M "
          f"({args.image_size}px, {args.image_tokens} tokens/image), fp32, "
          f"{'scanned' if args.scan_layers else 'unrolled'} layers, "
          f"{torch.get_num_threads()} torch threads, jax {jax.__version__} on "
          f"{jax.default_backend()}, torch {torch.__version__}")
    total = args.batch * args.seq_len
    useful = sum(useful_tokens(b) for b in packed)
    assert useful == sum(useful_tokens(b) for b in padded)   # the same samples
    print(f"packing: {consumed} samples ({useful} useful tokens) in {len(packed)} batches of "
          f"{args.batch} x {args.seq_len} ({useful / (len(packed) * total):.0%} of the slots)")
    print(f"pad-to-longest: the same {consumed} samples in {len(padded)} batches of "
          f"<= {args.batch} rows, widths {[b['tokens'].shape[1] for b in padded]} "
          f"({useful / sum(b['tokens'].size for b in padded):.0%} of the slots)")

    packed_s, padded_s, torch_s = (float(np.median(t)) for t in alternating_passes(
        passes, args.repeats, ["ours packed", "ours padded", "torch padded"]))
    print(f"median pass, seconds: ours packed {packed_s:.2f}, ours padded {padded_s:.2f}, "
          f"torch padded {torch_s:.2f} ({args.repeats} timed passes each)")
    rows = [("packing vs pad-to-longest, our step", "packed", "padded",
             useful / packed_s, useful / padded_s),
            ("our step vs torch, same padded batches", "ours", "torch",
             useful / padded_s, useful / torch_s)]
    print("useful tokens/s: the pass's non-padding tokens / seconds of the pass")
    print(f"{'row':40s} {'a':>6s} {'tokens/s':>10s} {'b':>6s} {'tokens/s':>10s} {'a/b':>7s}")
    for name, a_name, b_name, a, b in rows:
        print(f"{name:40s} {a_name:>6s} {a:10.1f} {b_name:>6s} {b:10.1f} {a / b:6.2f}x")


if __name__ == "__main__":
    main()
