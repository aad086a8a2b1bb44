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
