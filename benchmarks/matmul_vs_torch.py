"""The LLaMA train step's matmuls alone: XLA's CPU matmul (jit) against torch's, same run.

  python -m benchmarks.matmul_vs_torch [--batch 4] [--seq-len 256] [--rounds 3]

For the config of llama_vs_torch.py, lists every projection and LM-head product of one
training step (forward x @ W, and the backward's input gradient g @ W^T and weight
gradient x^T @ g, each as a plain row-major [M,K] @ [K,N] product), times each shape on
both sides and prints GFLOP/s, the ratio, and the step's total matmul seconds per side.
This is the floor under the training row of llama_vs_torch.py: both sides run the same
products, so a gap here is a gap in the matmul library, not in the model code.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter


import jax
import numpy as np
import torch

from benchmarks.llama_vs_torch import HF_CONFIG


def step_products(config: dict, tokens: int) -> Counter:
    """(M, K, N) -> how many such products one training step runs."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    # Forward products of one layer as (fan_in, fan_out): q, k, v, o, gate, up, down.
    per_layer = [(hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden),
                 (hidden, inter), (hidden, inter), (inter, hidden)]
    weights = [(w, layers) for w in per_layer] + [((hidden, config["vocab_size"]), 1)]
    counts = Counter()
    for (fan_in, fan_out), count in weights:
        counts[(tokens, fan_in, fan_out)] += count   # forward: x @ W
        counts[(tokens, fan_out, fan_in)] += count   # input gradient: g @ W^T
        counts[(fan_in, tokens, fan_out)] += count   # weight gradient: x^T @ g
    return counts


def median_seconds(run, calls: int = 7) -> float:
    run()
    spent = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        spent.append(time.perf_counter() - start)
    return float(np.median(spent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per shape; the fastest round counts")
    args = parser.parse_args()
    products = step_products(HF_CONFIG, args.batch * args.seq_len)
    print(f"{jax.default_backend()} jax {jax.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'M x K x N':>20} {'per step':>8} {'ours GF/s':>10} {'torch GF/s':>11} {'ratio':>6}")
    matmul = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    total_flops = ours_total = torch_total = 0.0
    for (m, k, n), count in sorted(products.items()):
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ours_a, ours_b = jax.numpy.asarray(a), jax.numpy.asarray(b)
        torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(median_seconds(lambda: matmul(ours_a, ours_b).block_until_ready()))
            theirs.append(median_seconds(lambda: torch_a @ torch_b))
        flops = 2.0 * m * k * n
        ours_s, torch_s = min(ours), min(theirs)
        total_flops += count * flops
        ours_total += count * ours_s
        torch_total += count * torch_s
        print(f"{f'{m} x {k} x {n}':>20} {count:>8} {flops / ours_s / 1e9:>10.0f} "
              f"{flops / torch_s / 1e9:>11.0f} {torch_s / ours_s:>5.2f}x")
    print(f"one step: {total_flops / 1e9:.0f} GFLOP of matmuls, ours {ours_total:.3f} s, "
          f"torch {torch_total:.3f} s, ratio {torch_total / ours_total:.2f}x")


if __name__ == "__main__":
    main()
