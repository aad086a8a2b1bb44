"""Peak memory of `python -m convert` against the checkpoint's own size, same run.

  python -m benchmarks.convert_memory [--layers 8] [--hidden 2048] [--work-dir DIR]

Writes a random bf16 LLaMA checkpoint (sharded safetensors), converts it to Flax and back in
child processes, and prints each child's peak resident memory divided by the checkpoint
size. A ratio near 1 (plus the Python/JAX baseline, printed too) is what lets an 8B bf16
model (16 GB) convert on a 24 GB machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from convert import safetensors_io


def write_checkpoint(folder: Path, layers: int, hidden: int) -> int:
    heads, kv_heads, head_dim = hidden // 128, max(1, hidden // 512), 128
    mlp, vocab = hidden * 11 // 4, 32000
    config = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": (mlp, hidden),
                       p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp)})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    half = len(names) // 2
    weight_map = {}
    for number, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-0000{number}-of-00002.safetensors"
        safetensors_io.write_file(folder / file, [
            (n, shapes[n], np.dtype(ml_dtypes.bfloat16),
             lambda n=n: rng.standard_normal(shapes[n], np.float32).astype(ml_dtypes.bfloat16))
            for n in part])
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(int(np.prod(s)) * 2 for s in shapes.values())


def peak_of(command: list[str]) -> float:
    """Runs a child; returns its peak RSS in bytes (Linux ru_maxrss is in KiB)."""
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", script, *command], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--work-dir")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="convert_memory_"))
    size = write_checkpoint(work / "hf", args.layers, args.hidden)
    baseline = peak_of([sys.executable, "-c", "import jax, orbax.checkpoint, convert.core"])
    to_flax = peak_of([sys.executable, "-m", "convert", "to-flax", "llama", str(work / "hf"),
                       str(work / "flax")])
    to_hf = peak_of([sys.executable, "-m", "convert", "to-hf", "llama", str(work / "flax"),
                     str(work / "back"), "--max-shard-size", "500MB"])
    gib = 1024 ** 3
    print(f"checkpoint: {size / gib:.2f} GiB bf16; import baseline {baseline / gib:.2f} GiB")
    for name, peak in (("to-flax", to_flax), ("to-hf", to_hf)):
        print(f"{name:8s} peak {peak / gib:.2f} GiB = {peak / size:.2f}x checkpoint "
              f"({(peak - baseline) / size:.2f}x above the import baseline)")


if __name__ == "__main__":
    main()
