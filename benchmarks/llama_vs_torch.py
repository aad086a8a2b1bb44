"""LLaMA speed, ours (JAX, jit) against transformers' LlamaForCausalLM (PyTorch), same run.

  python -m benchmarks.llama_vs_torch [--steps 3] [--seq-len 256] [--batch 4] [--repeats 3]

Rows: training-step tokens/s (AdamW, fp32; our layers unrolled, the faster layout on CPU,
and again under nn.scan) and greedy-decode tokens/s at batch 1 and 8 (prefill included),
plus batch 1 after a long prompt, each with ours/torch. Both sides use the same
~100M-parameter config and the same CPU threads; timings exclude compilation and
warm-up, come in blocks alternating between the sides, and are medians.
Run it on a quiet machine: torch's OpenMP threads slow down sharply under contention.
"""
from __future__ import annotations

import argparse
from functools import partial
import time


import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models.llama import LlamaConfig
import optax
import torch
import transformers

from convert import llama as llama_convert
from convert.core import state_dict_to_flax
from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
from metamorph_jax.models.llama import LlamaForCausalLM, unstack_layers
from metamorph_jax.training.losses import masked_cross_entropy

HF_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def alternating_blocks(runs: list, calls: int, blocks: int = 2) -> list[float]:
    """Median seconds per call of each warmed-up callable, timed in alternating blocks.

    Each block makes one untimed call, then `calls` timed ones, so neither side is timed
    while the other's idle threads still spin (torch's OpenMP threads and XLA's pool
    both do). Alternating blocks puts both sides under the same machine conditions: on
    a shared machine either one drifts by 10-20% over minutes.
    """
    times = [[] for _ in runs]
    for _ in range(blocks):
        for run, spent in zip(runs, times):
            run()
            for _ in range(calls):
                start = time.perf_counter()
                run()
                spent.append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def torch_params_to_flax(model, cfg):
    return jax.tree.map(jnp.asarray, state_dict_to_flax(llama_convert.SPEC, cfg, model.state_dict()))


def our_train_step(params, cfg, tokens, args):
    """Ours: a warmed-up callable running one jitted step (forward, backward, AdamW), with
    the text stage's loss (training/losses.py)."""
    model = LlamaForCausalLM(cfg)
    optimizer = optax.adamw(1e-4)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    positions = jnp.broadcast_to(jnp.arange(args.seq_len), inputs.shape)
    every_token = jnp.ones(inputs.shape, bool)

    @partial(jax.jit, donate_argnums=(0, 1))  # update in place, as torch's optimizer does
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, inputs, positions=positions).logits
            loss_sum, count = masked_cross_entropy(logits, targets, every_token)
            return loss_sum / count
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_params = jax.tree.map(jnp.copy, params)  # donated below; decode rows reuse params
    state = [train_params, optimizer.init(train_params)]

    def run():
        state[0], state[1], loss = step(*state)
        loss.block_until_ready()
    run()
    return run


def torch_train_step(reference, tokens):
    """transformers' model with torch.optim.AdamW (its defaults), warmed up."""
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    inputs, targets = torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:])

    def run():
        optimizer.zero_grad()
        logits = reference(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1))
        loss.backward()
        optimizer.step()
    run()
    return run


def train_rows(reference, params, cfg, args) -> list[tuple[str, float, float]]:
    """Unrolled layers (the faster layout on CPU) and scanned layers, against torch."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    runs = [our_train_step(unstack_layers(params, cfg.num_layers),
                           cfg.replace(scan_layers=False), tokens, args),
            our_train_step(params, cfg.replace(scan_layers=True), tokens, args),
            torch_train_step(reference, tokens)]
    unrolled, scanned, theirs = (args.batch * args.seq_len / t
                                 for t in alternating_blocks(runs, args.steps))
    reference.eval()
    return [("train step tokens/s (AdamW)", unrolled, theirs),
            ("  same, layers under nn.scan", scanned, theirs)]


def decode_rows(reference, params, cfg, batch: int, prompt_len: int, args) -> tuple[float, float]:
    """Greedy decoding tokens/s of both sides, prefill included."""
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len))
    new = args.new_tokens
    # No end token: both sides decode exactly `new` tokens per row.
    generator = TextGenerator(LlamaForCausalLM(cfg), params, eos_token_ids=[-1])
    sampling = SamplingConfig(max_new_tokens=new)
    t_prompts = torch.tensor(prompts)

    def run_ours():
        generator.generate(prompts.tolist(), sampling)

    def run_torch():
        with torch.no_grad():
            reference.generate(t_prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    run_ours()  # compile at the timed shapes
    run_torch()
    ours, theirs = alternating_blocks([run_ours, run_torch], args.repeats)
    return batch * new / ours, batch * new / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed train steps per side and block (two blocks)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-prompt-len", type=int, default=1024,
                        help="prompt of the long-context decode row (batch 1); 0 skips it")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed decode runs per side and block (two blocks)")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    cfg = LlamaConfig.from_hf(HF_CONFIG)
    params = torch_params_to_flax(reference, cfg)
    count = sum(p.numel() for p in reference.parameters())
    print(f"config: {count / 1e6:.0f}M parameters, fp32, {torch.get_num_threads()} torch threads, "
          f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}")
    rows = train_rows(reference, params, cfg, args)
    for batch in (1, 8):
        rows.append((f"greedy decode tokens/s, batch {batch}",
                     *decode_rows(reference, params, cfg, batch, args.prompt_len, args)))
    if args.long_prompt_len:
        rows.append((f"  same, batch 1, {args.long_prompt_len}-token prompt",
                     *decode_rows(reference, params, cfg, 1, args.long_prompt_len, args)))
    print(f"{'row':40s} {'ours':>10s} {'torch':>10s} {'ratio':>7s}")
    for name, ours, theirs in rows:
        print(f"{name:40s} {ours:10.1f} {theirs:10.1f} {ours / theirs:6.2f}x")


if __name__ == "__main__":
    main()
