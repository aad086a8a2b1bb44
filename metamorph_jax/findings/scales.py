"""The sizes of the findings' runs: one `Scale` per --scale, the same code at every scale.

- `laptop`: the Shapes world at 6400 training scenes (every amount below fits, the
  generation records taken from the head of the train split and every other kind from its
  tail, so a run's generation and understanding records never share a scene), the base
  recipe's models and shared stages unchanged, VPiT runs of 3 passes over their records;
  minutes per run on 2 CPU cores. Unique runs: finding 1 8, finding 2 13 (9 grid cells + 4
  kinds; "none", "image_qa" and "all" are runs of finding 1 and the grid), finding 3 2 more,
  finding 4 1 more (the text-pretrained run is finding 1's joint run at 800).
- `pod`: the same experiment with the data and model sizes of a pod run (documented, not
  run here): 400k training scenes, the paper's ratios of amounts (finding 1 from 1k to
  200k generation samples; a 3x3 grid up to 200k x 200k), a 8-layer 512-wide LLM (and the
  2x larger one for finding 3), the shared stages trained 25-50x longer, one pass over the
  data as the paper trains; `python -m metamorph_jax.findings --scale pod --dry-run` prints
  every run.
- `mini`: the tests' miniature (tests/test_findings.py): a 96-scene world, two amounts per
  axis, a few steps per stage, 8 evaluation questions and prompts.

The Shapes world has 160 distinct training clips at most (a clip is one shape crossing the
grid), so video_qa (one record per clip) and video (five per clip) stay at 160 / 800 at
every scale. Every amount is a count of records of the world's train split; a scale that
asks for more records than the split holds is an error naming the file.
"""
from __future__ import annotations

import dataclasses

GENERATION = "text_to_image"
KINDS = ("image_qa", "video_qa", "video", "visual_thinking", "image_to_image")


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    # assets fields (tiny.ensure_assets) over the base recipe's: the world's sizes
    assets: dict
    # stage kind -> steps over the base recipe's shared stages' (empty: the recipe's)
    stage_steps: dict
    # the base LLM's sizes (tiny.LLM_FIELDS; empty: the recipe's)
    llm: dict
    # finding 3's larger LLM: the base LLM's width and depth times these
    larger_llm: dict
    # VPiT runs: passes over their records (data.num_epochs; steps = one counted pass)
    epochs: int
    batch_size: int | None          # VPiT rows per batch (None: the recipe's)
    final_eval: dict                # ShapesEvalConfig fields over the recipe's
    # finding 1: generation records, each trained alone and with `other`
    generation_amounts: tuple
    other: dict                     # kind -> records: "the other data" of a joint run
    # finding 2: the grid (image_qa records x generation records), and the kinds row
    grid_vqa: tuple
    grid_generation: tuple
    reference_generation: int       # the kinds row's generation records (and findings 3, 4)
    kinds: dict                     # kind -> records, added one at a time
    # finding 4: knowledge prompts per held-out fact
    knowledge_per_fact: int

    def describe(self) -> dict:
        return dataclasses.asdict(self)


SCALES = {
    "laptop": Scale(
        name="laptop",
        assets=dict(train=6400, validation=100, test=300, clips=160),
        stage_steps={}, llm={}, larger_llm=dict(width=2, depth=2),
        epochs=3, batch_size=None, final_eval={},
        generation_amounts=(50, 200, 800, 3200),
        other=dict(image_qa=3200, video_qa=160, video=800, visual_thinking=800,
                   image_to_image=800),
        grid_vqa=(200, 800, 3200), grid_generation=(200, 800, 3200),
        reference_generation=800,
        kinds=dict(image_qa=800, video_qa=160, video=800, visual_thinking=800,
                   image_to_image=800),
        knowledge_per_fact=8),
    "pod": Scale(
        name="pod",
        assets=dict(train=400_000, validation=1000, test=2000, clips=160, text_corpus=100_000),
        stage_steps=dict(text=20_000, tower=10_000, adapter=2_000, decoder=20_000),
        llm=dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64),
        larger_llm=dict(width=2, depth=2),
        epochs=1, batch_size=64, final_eval=dict(max_questions=0, max_prompts=0),
        generation_amounts=(1_000, 5_000, 20_000, 50_000, 200_000),
        other=dict(image_qa=200_000, video_qa=160, video=800, visual_thinking=100_000,
                   image_to_image=100_000),
        grid_vqa=(25_000, 100_000, 200_000), grid_generation=(10_000, 50_000, 200_000),
        reference_generation=50_000,
        kinds=dict(image_qa=100_000, video_qa=160, video=800, visual_thinking=100_000,
                   image_to_image=100_000),
        knowledge_per_fact=32),
    "mini": Scale(
        name="mini",
        assets=dict(train=96, validation=8, test=24, clips=8, text_corpus=40),
        stage_steps=dict(text=2, tower=2, adapter=2, decoder=4), llm={},
        larger_llm=dict(width=2, depth=2),
        epochs=1, batch_size=8,
        final_eval=dict(max_questions=8, max_prompts=8, batch_size=8, diffusion_steps=2,
                        samples=2),
        generation_amounts=(8, 16),
        other=dict(image_qa=16, video_qa=4, video=8, visual_thinking=8, image_to_image=8),
        grid_vqa=(8, 16), grid_generation=(8, 16),
        reference_generation=16,
        kinds=dict(image_qa=16),
        knowledge_per_fact=1),
}
