"""Host-side data: record files -> packed, sharded batches (numpy; no JAX models here).

Modules: conversation (records, chat templates, VPiT masks), tasks (the six data kinds,
CLI `python -m metamorph_jax.data.tasks`), images (SigLIP preprocessing, 1 fps video
frames), sources (JSONL / JSON / ArrayRecord / TFDS), packing (first-fit batches and the
batch layout), bad_records (counting and reporting), pipeline (the grain pipeline:
`make_iterator`), shapes (the synthetic Shapes world and its oracle, CLI
`python -m metamorph_jax.data.shapes`), testing (a tiny LLaMA-3-style tokenizer).
"""
