"""The benchmarks' own bookkeeping (their timings are not tested: speed is measured, not asserted)."""
import transformers

from benchmarks.llama_vs_torch import HF_CONFIG
from benchmarks.matmul_vs_torch import step_products


def test_step_products_are_three_matmuls_per_weight():
    """A train step multiplies every projection and LM-head weight three times (forward,
    input gradient, weight gradient): 6 x tokens x weights FLOPs, counted from the model."""
    tokens = 1024
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    matmul_weights = sum(p.numel() for name, p in model.named_parameters()
                         if p.ndim == 2 and "embed_tokens" not in name)
    counted = sum(2 * m * k * n * count for (m, k, n), count in step_products(HF_CONFIG, tokens).items())
    assert counted == 6 * tokens * matmul_weights


def test_vpit_step_counts_useful_tokens_of_both_batchings():
    """The authors' batching puts one sample per row, padded to the batch's longest; packing
    fills rows of T. Both carry every token of the same samples; only padding differs."""
    import grain
    import numpy as np

    from benchmarks.vpit_step import pad_to_longest, useful_tokens
    from metamorph_jax.data import conversation
    from metamorph_jax.data.packing import PackedBatchDataset
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from tests.metamorph_reference import IMAGE_SIZE, TOKENS_PER_IMAGE, render_samples

    tokenizer = build_tiny_tokenizer()
    ids = conversation.add_image_tokens(tokenizer)
    samples = list(render_samples(tokenizer, ids).values())
    lengths = [len(s["tokens"]) for s in samples]
    assert len(set(lengths)) > 1   # padding happens

    padded = list(pad_to_longest(samples, 2, TOKENS_PER_IMAGE, IMAGE_SIZE))
    assert [b["tokens"].shape for b in padded] == [
        (2, max(lengths[0:2])), (2, max(lengths[2:4])), (1, lengths[4])]
    assert [useful_tokens(b) for b in padded] == [sum(lengths[0:2]), sum(lengths[2:4]), lengths[4]]
    for index, sample in enumerate(samples):   # each sample alone at the start of its row
        batch, row = padded[index // 2], index % 2
        n = lengths[index]
        np.testing.assert_array_equal(batch["tokens"][row, :n], sample["tokens"])
        assert not batch["segment_ids"][row, n:].any() and batch["segment_ids"][row, :n].all()
        assert batch["image_valid"][row].sum() == len(sample["images"])

    seq_len = 2 * max(lengths)
    packed = list(PackedBatchDataset(grain.MapDataset.source(samples).to_iter_dataset(),
                                     batch_size=2, seq_len=seq_len, max_images_per_row=8,
                                     num_image_tokens=TOKENS_PER_IMAGE, image_size=IMAGE_SIZE))
    assert sum(useful_tokens(b) for b in packed) == sum(lengths)
    assert len(packed) < len(padded)   # fewer, fuller batches of the same rows
