"""A compile-only plan: `python train.py --config CONFIG --plan TOPOLOGY [--plan-out F.json]`.

Every stage of the config (config.order) is built from shapes alone (objectives.Folders
with plan=True: a model folder's config.json where it exists, else the stage's named
architecture, architectures.py; no tokenizer, weights or data are read) on a mesh made
of the TPU topology's devices (jax.experimental.topologies, which needs libtpu:
requirements-tpu.txt), and its train step (runner.Stage.lower) is compiled for that
topology on this host. Nothing runs and nothing is written but --plan-out. Per stage:

- bytes per chip: parameters, optimizer state and the batch (from the state's and the
  batch's shardings), and the compiler's memory_analysis (arguments, outputs, aliased,
  temporaries); the peak per chip (arguments + outputs - aliased + temporaries + code)
  against the chip's HBM; a compile the compiler itself refuses for memory counts as
  not fitting, with its own numbers;
- FLOPs per step: the model's by hand (`model_flops`, the convention below) and the
  compiler's; the compiler's estimated step time (cost_analysis "optimal_seconds") and the
  MFU it implies: model FLOPs / (chips x peak bf16 FLOP/s x estimated seconds), where that
  estimate behaves as a time (`combine_costs`; libtpu's v6e model gives negative seconds);
  and always a roofline from the compiler's FLOPs and bytes accessed against the chip's
  peak and HBM bandwidth, with the MFU it bounds (communication not counted).

Costing. XLA's cost analysis counts the body of a loop once, whatever its trip count: the
scanned layers, the scanned micro-batches of gradient accumulation and the scanned loss
chunks. The memory numbers come from the real step (scanned, all micro-batches). The
costs come from further compiles of one micro-batch with every loop unrolled: the stack(s)
of layers at 1 and at 2 layers (one stack changed at a time: the LLM's, the SigLIP
tower's), their difference being one layer, extrapolated linearly to the real depth, and
multiplied by grad_accum_steps (which counts the optimizer update, a few FLOPs per
parameter, k times instead of once).

FLOP convention (MaxText's, per trained token): 6 x the LLM's non-embedding parameters
(the LM head included) + attention 12 x layers x heads x head_dim x seq_len, halved for
causal masking; with the LLM frozen (the adapter stage) 4 x instead of 6 x (no weight
gradients, the activation gradients still flow through it). Plus the adapter (6 x its
parameters per visual slot), the vision head (6 x its parameters per position) and the
frozen SigLIP forward: 2 x its parameters + 4 x layers x width x patches per patch, over
every image slot of the batch. The decoder stage (SD 1.5 UNet + VAE) has no hand count:
its MFU uses the compiler's FLOPs (which count rematerialisation: a hardware utilisation).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metamorph_jax.input_errors import InputError

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3
INSTALL = "pip install -r requirements-tpu.txt"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float   # per chip, per second
    chips_per_host: int
    hbm_bytes_per_s: float   # per chip: the memory side of the roofline


# Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v5p, /v5e, /v6e):
# v5p 95 GB HBM2e and 459 TFLOP/s bf16 per chip; v5e 16 GB and 197 TFLOP/s; v6e (Trillium)
# 32 GB and 918 TFLOP/s. Decimal GB, so a little under what the compiler allows (its
# out-of-memory message on v5p says 95.74G). HBM bandwidth from the same pages: v5p
# 2765 GB/s, v5e 819 GB/s, v6e 1638 GB/s.
CHIPS = {
    "v5p": Chip("v5p", 95 * 10**9, 459e12, 4, 2765e9),
    "v5e": Chip("v5e", 16 * 10**9, 197e12, 4, 819e9),
    "v6e": Chip("v6e", 32 * 10**9, 918e12, 4, 1638e9),
}
# chips -> the topology string jax.experimental.topologies (libtpu) takes.
V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TWO_D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                256: "16x16"}


class PlanError(InputError, ValueError):
    """A plan that cannot be made (bad topology, libtpu missing); the message says why."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str        # "v5p-128"
    chip: Chip
    chips: int
    desc: str        # "v5p:4x4x4"


def parse_topology(name: str) -> Topology:
    """"v5p-N" (N TensorCores, 2 per chip: Google's naming), "v5e-N", "v6e-N" (N chips)."""
    match = re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name)
    if not match:
        raise PlanError(f"--plan {name!r}: use v5p-N (N TensorCores = 2 x chips), v5e-N or "
                        f"v6e-N (N chips)")
    kind, count = match.group(1), int(match.group(2))
    chips = count // 2 if kind == "v5p" else count
    shapes = V5P_SHAPES if kind == "v5p" else TWO_D_SHAPES
    if chips not in shapes or (kind == "v5p" and count % 2):
        sizes = sorted(2 * c for c in shapes) if kind == "v5p" else sorted(shapes)
        raise PlanError(f"--plan {name!r}: no {kind} slice of that size; sizes: "
                        f"{', '.join(f'{kind}-{n}' for n in sizes)}")
    return Topology(name, CHIPS[kind], chips, f"{kind}:{shapes[chips]}")


def topology_devices(topology: Topology) -> list:
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"compiling for {topology.name} needs libtpu: {INSTALL}")
    import os
    # Only compiling here: let a plan load libtpu beside another process that holds it
    # (a run on this TPU VM, another plan) instead of failing on libtpu's lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM libtpu asks the metadata server for the host's workers and accelerator,
    # fails, and prints errors; naming them (this one host, the planned slice) keeps it quiet
    # and changes nothing in the described topology (its devices are the slice's either way).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology.desc).devices)
    except Exception as error:   # libtpu's own words
        raise PlanError(f"libtpu cannot describe {topology.desc} ({topology.name}): "
                        f"{error}") from None


# --- FLOPs by hand ---------------------------------------------------------------------

def _leaf_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def llama_non_embedding_params(config) -> int:
    """Parameters of a LlamaConfig without the input embedding (the LM head included)."""
    d, f, h, k, hd = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim)
    attention = d * h * hd + 2 * d * k * hd + h * hd * d
    if config.attention_bias:
        attention += h * hd + 2 * k * hd + d
    mlp = 3 * d * f + (2 * f + d if config.mlp_bias else 0)
    layer = attention + mlp + 2 * d
    return config.num_layers * layer + d + config.vocab_size * d   # + final norm + head


def siglip_params(config) -> int:
    """Parameters of the SigLIP encoder a visual token needs (patch and position
    embeddings, the layers; not the post-norm or pooling head)."""
    d, f = config.hidden_size, config.intermediate_size
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    embed = config.patch_size ** 2 * config.num_channels * d + d + config.num_patches * d
    return config.num_hidden_layers * layer + embed


def lm_flops_per_token(config, seq_len: int, trainable: bool = True) -> dict:
    """(6 or 4) x non-embedding params + causal attention 12 L H hd T / 2, per token."""
    n = llama_non_embedding_params(config)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len / 2
    return {"params": (6 if trainable else 4) * n, "attention": attention}


def batch_description(rows: int, seq_len: int, accum: int, image_size: int) -> str:
    """'R rows x S tokens x A micro-batches', or 'R images of P px x A ...' (the decoder)."""
    what = f"{rows} rows x {seq_len} tokens" if seq_len else f"{rows} images of {image_size} px"
    return f"{what} x {accum} micro-batches"


def model_flops(objective, rows: int, seq_len: int, accum: int) -> dict | None:
    """FLOPs per step by the convention of the module docstring: {"lm", "attention",
    "adapter", "vision_head", "vision_tower", "total"} for `rows` rows per micro-batch
    of `seq_len` tokens and `accum` micro-batches; None for the decoder (no hand count)."""
    kind = objective.kind
    if kind == "text":
        per_token = lm_flops_per_token(objective.model.config, seq_len)
        tokens = rows * seq_len * accum
        out = {"lm": per_token["params"] * tokens, "attention": per_token["attention"] * tokens}
    elif kind in ("adapter", "instruct"):
        cfg = objective.config
        data = objective.stage.data
        images = int(data.max_images_per_row)
        tokens = rows * seq_len * accum
        slots = rows * images * accum
        per_token = lm_flops_per_token(cfg.llm, seq_len, trainable=kind == "instruct")
        d, c = cfg.llm.hidden_size, cfg.vision.hidden_size
        adapter = c * d + d + d * d + d
        head = d * d + d + d * c + c
        vision = cfg.vision
        tower = 2 * siglip_params(vision) + 4 * vision.num_hidden_layers * \
            vision.hidden_size * vision.num_patches
        out = {"lm": per_token["params"] * tokens, "attention": per_token["attention"] * tokens,
               "adapter": 6 * adapter * slots * cfg.num_image_tokens,
               "vision_head": (6 if kind == "instruct" else 4) * head * tokens,
               "vision_tower": tower * vision.num_patches * slots}
    else:
        return None
    out["total"] = float(sum(out.values()))
    return {key: float(value) for key, value in out.items()}


# --- bytes -----------------------------------------------------------------------------

def bytes_per_chip(tree: Any) -> int:
    """The largest per-device share of a tree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


# libtpu refuses a program in one of two wordings: the whole footprint against the HBM,
# or (before it lays out the rest) the temporaries alone against what is left for them.
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_OOM_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds "
                        r"available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(error: Exception) -> dict | None:
    """The compiler's out-of-memory refusal as {"used_bytes" (the whole footprint) or
    "temp_bytes" (the temporaries alone), "limit_bytes" (what the compiler had for them),
    "overflow_bytes", "message"}; unknown numbers are None. None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    out = {"used_bytes": None, "temp_bytes": None, "limit_bytes": None,
           "overflow_bytes": None, "message": text[:500]}
    for pattern, key in ((_OOM_USED, "used_bytes"), (_OOM_TEMPS, "temp_bytes")):
        match = pattern.search(text)
        if match:
            needed = int(float(match.group(1)) * _UNITS[match.group(2)])
            limit = int(float(match.group(3)) * _UNITS[match.group(4)])
            out.update({key: needed, "limit_bytes": limit,
                        "overflow_bytes": max(needed - limit, 1)})
            break
    return out


# --- compiling a stage -------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _variant(config, name: str, **stage_changes):
    """A copy of the run config with fields of stage `name` changed."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, value in stage_changes.items():
            config.stages[name][key] = value
    return config


def _stage(config, index, name, mesh, processes, **folders):
    """The runner's Stage built for planning (Folders: plan=True, TPU kernels)."""
    from metamorph_jax.training import objectives, runner
    previous = (Path(config.work_dir) / config.order[index - 1] / "final") if index else None
    return runner.Stage(config, index, name, previous, mesh, None,
                        folders=objectives.Folders(plan=True, platform="tpu", **folders),
                        process_count=processes)


def _compile(stage):
    with jax.default_matmul_precision("default"):   # Mosaic refuses bf16 under "highest"
        return stage.lower().compile()


def _costs(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    return {"flops": float(cost.get("flops", 0.0)),
            "seconds": float(cost.get("optimal_seconds", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def combine_costs(samples: dict, stacks: dict, accum: int, chip: Chip,
                  uncosted_flops: float = 0.0) -> dict:
    """One step's costs per chip from the costing compiles: `samples` are {"base": costs at
    one layer per stack, STACK: costs with that stack at two}, `stacks` the real depths.
    Returns flops (the compiler's + `uncosted_flops`), compiler_flops, bytes_accessed,
    roofline_s (compute or HBM, whichever is slower; no communication: a lower bound),
    seconds (the compiler's optimal_seconds, or None) and seconds_note (why the compiler's time was not used). The compiler's time is kept
    only where it behaves as a time: positive in every compile, growing with each layer
    and not below the roofline. libtpu's v6e cost model gives negative seconds (-49.95
    for one layer of 8B on v6e-256, -67.94 for two), so there the roofline is all there is.
    `uncosted_flops` (per chip and step) are those of kernels XLA's analysis gives no cost
    (Pallas custom calls: splash attention): added to the FLOPs, and their time at the
    chip's peak to the compiler's seconds, a lower bound for them."""
    total = {}
    for key in ("flops", "seconds", "bytes_accessed"):
        value = samples["base"][key]
        for stack, depth in stacks.items():
            value += (depth - 1) * (samples[stack][key] - samples["base"][key])
        total[key] = value * accum
    compiler_seconds, compiler_flops = total["seconds"], total["flops"]
    total["flops"] += uncosted_flops
    total["seconds"] += uncosted_flops / chip.peak_bf16_flops
    roofline = max(total["flops"] / chip.peak_bf16_flops,
                   total["bytes_accessed"] / chip.hbm_bytes_per_s)
    note = None
    bad = {label: cost["seconds"] for label, cost in samples.items() if cost["seconds"] <= 0}
    shrinking = [stack for stack in stacks
                 if samples[stack]["seconds"] <= samples["base"]["seconds"]]
    if bad:
        note = (f"libtpu's cost model gave optimal_seconds "
                f"{', '.join(f'{v:.4g} ({k})' for k, v in bad.items())} for {chip.name}: not a time")
    elif shrinking:
        note = (f"libtpu's optimal_seconds did not grow with a layer of {', '.join(shrinking)}"
                f" on {chip.name}")
    elif total["seconds"] < 0.99 * roofline:
        note = (f"libtpu's optimal_seconds ({compiler_seconds:.3g} s) is below the roofline "
                f"({roofline:.3g} s) on {chip.name}")
    return {"flops": total["flops"], "compiler_flops": compiler_flops,
            "bytes_accessed": total["bytes_accessed"],
            "roofline_s": roofline, "seconds": None if note else total["seconds"],
            "seconds_note": note}


def _stacks(objective) -> dict:
    """Layer stacks of the stage's model: name -> real depth."""
    if objective.kind == "text":
        return {"llm": objective.model.config.num_layers}
    if objective.kind in ("adapter", "instruct"):
        return {"llm": objective.config.llm.num_layers,
                "vision": objective.config.vision.num_hidden_layers}
    return {"vision": objective.vision_config.num_hidden_layers}


def plan_stage(config, index: int, name: str, topology: Topology, devices: list,
               processes: int) -> dict:
    """One stage's numbers (the keys of --plan-out's "stages" entries)."""
    from metamorph_jax import sharding
    from metamorph_jax.training import state as state_lib
    stage_config = config.stages[name]
    mesh = sharding.make_mesh(**config.mesh.to_dict(), devices=devices)
    started = time.time()
    stage = _stage(config, index, name, mesh, processes)
    objective = stage.objective
    batch = stage.abstract_batch()
    rows = int(stage_config.data.batch_size) * stage.shard_count
    seq_len = int(stage_config.data.get("seq_len", 0) or 0)
    accum = stage.accum
    placed = state_lib.with_shardings(stage.abstract, stage.shardings)
    out: dict[str, Any] = {
        "kind": objective.kind, "mesh": dict(mesh.shape), "rows_per_micro_batch": rows,
        "seq_len": seq_len, "grad_accum_steps": accum,
        "image_size": int(stage_config.data.get("image_size", 0) or 0),
        "loss_chunk_tokens": objective.loss_chunk_tokens,
        "remat_policy": str(stage_config.get("remat_policy")), "dtype": str(stage_config.dtype),
        "param_bytes_per_chip": bytes_per_chip((placed.trainable, placed.frozen)),
        "trainable_param_bytes_per_chip": bytes_per_chip(placed.trainable),
        "optimizer_state_bytes_per_chip": bytes_per_chip(placed.opt_state),
        "batch_bytes_per_chip": bytes_per_chip(batch),
        "hbm_bytes_per_chip": topology.chip.hbm_bytes,
    }
    _say(f"plan: stage {name} ({objective.kind}): compiling the train step for "
         f"{topology.name} ({topology.desc}, {topology.chips} chips), mesh {dict(mesh.shape)}, "
         f"{batch_description(rows, seq_len, accum, out['image_size'])} ...")
    try:
        compiled = _compile(stage)
    except Exception as error:   # the compiler's refusal is the answer when it is for memory
        oom = out_of_memory(error)
        if oom is None:
            raise
        # the overflow against what the compiler had, which is what must be saved
        out.update(compiler_out_of_memory=oom["message"], fits=False,
                   peak_bytes_per_chip=oom["used_bytes"],
                   compiler_temp_bytes_per_chip=oom["temp_bytes"],
                   overflow_bytes=oom["overflow_bytes"])
        _say(f"plan: stage {name}: the compiler ran out of memory: {oom['message'][:200]}")
    else:
        memory = compiled.memory_analysis()
        fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
                  "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
                  "code": "generated_code_size_in_bytes"}
        numbers = {key: int(getattr(memory, attr, 0) or 0) for key, attr in fields.items()}
        peak = (numbers["argument"] + numbers["output"] - numbers["alias"] + numbers["temp"]
                + numbers["code"])
        out.update({f"compiler_{key}_bytes_per_chip": value for key, value in numbers.items()})
        out.update(peak_bytes_per_chip=peak, fits=peak <= topology.chip.hbm_bytes,
                   overflow_bytes=max(peak - topology.chip.hbm_bytes, 0))
        del compiled
        _say(f"plan: stage {name}: peak {_gb(peak)} per chip (temporaries "
             f"{_gb(numbers['temp'])}) of {_gb(topology.chip.hbm_bytes)}: "
             f"{'fits' if out['fits'] else 'does not fit'} ({time.time() - started:.0f} s)")
    out["compile_s"] = round(time.time() - started, 1)

    # Costs: one micro-batch, every loop unrolled, each stack at 1 and 2 layers. A stage
    # that does not fit is not costed (its step time would be of a step that cannot run).
    stacks = _stacks(objective)
    one_micro = _variant(config, name, grad_accum_steps=1)
    base_depth = {key: 1 for key in stacks}
    costs, kernels = {}, False
    for label, depth in [] if not out["fits"] else [("base", base_depth)] + [
            (key, dict(base_depth, **{key: 2})) for key in stacks]:
        _say(f"plan: stage {name}: costing with the layers unrolled at "
             f"{', '.join(f'{k} {v}' for k, v in depth.items())} ...")
        variant = _stage(one_micro, index, name, mesh, processes, unroll=True,
                         llm_layers=depth.get("llm"), vision_layers=depth.get("vision"))
        try:
            compiled = _compile(variant)
            costs[label] = _costs(compiled)
            if label == "base":   # splash attention is a Pallas call XLA costs at nothing
                kernels = "splash_mha" in compiled.as_text()
            del compiled
        except Exception as error:
            if out_of_memory(error) is None:
                raise
            costs = None
            break
    hand = model_flops(objective, rows, seq_len, accum)
    if costs:
        # the hand-counted attention FLOPs (causal, forward and backward) where the kernel ran
        uncosted = hand["attention"] / topology.chips if kernels and hand else 0.0
        total = combine_costs(costs, stacks, accum, topology.chip, uncosted)
        out.update(compiler_flops_per_chip=total["compiler_flops"], est_step_s=total["seconds"],
                   uncosted_kernel_flops_per_chip=uncosted,
                   est_step_s_note=total["seconds_note"], roofline_step_s=total["roofline_s"],
                   compiler_bytes_accessed_per_chip=total["bytes_accessed"],
                   cost_samples=costs,
                   cost_method=(f"one micro-batch compiled with every loop unrolled and each "
                                f"layer stack ({', '.join(f'{k} {v}' for k, v in stacks.items())}"
                                f" layers) at 1 and 2 layers; the per-layer difference "
                                f"extrapolated to the real depth, x {accum} micro-batches"
                                + ("; splash attention, which XLA does not cost, added as its "
                                   "hand-counted FLOPs at the chip's peak" if uncosted else "")))
    out["model_flops_per_step"] = None if hand is None else hand["total"]
    out["model_flops_terms"] = hand
    numerator = hand["total"] if hand is not None else (
        out.get("compiler_flops_per_chip", 0.0) * topology.chips)
    out["mfu_flops"] = "model (hand count)" if hand is not None else "compiler"
    peak = topology.chips * topology.chip.peak_bf16_flops
    seconds, roofline = out.get("est_step_s"), out.get("roofline_step_s")
    out["mfu"] = numerator / (peak * seconds) if seconds else None
    out["mfu_roofline"] = numerator / (peak * roofline) if roofline else None
    if not out["fits"]:
        out["cost_method"] = "not costed: the stage does not fit"
    out["plan_s"] = round(time.time() - started, 1)
    return out


def _gb(value) -> str:
    """Bytes in the unit that reads best (decimal units, as the chip table's)."""
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _need(stage: dict) -> str:
    """What a stage that does not fit needs, in the compiler's terms."""
    if stage.get("peak_bytes_per_chip") is not None:
        return f"peak {stage['peak_bytes_per_chip']} bytes per chip"
    if stage.get("compiler_temp_bytes_per_chip") is not None:
        return f"temporaries alone {stage['compiler_temp_bytes_per_chip']} bytes per chip"
    return "the compiler's need unknown (see compiler_out_of_memory)"


def report_lines(plan: dict, only: str | None = None) -> list[str]:
    """The printed plan; `only`: that stage's lines alone."""
    lines = [] if only else [f"plan for {plan['topology']} ({plan['topology_desc']}: {plan['chips']} "
             f"{plan['chip']['name']} chips, {plan['chip']['hbm_bytes'] / 1e9:.0f} GB HBM and "
             f"{plan['chip']['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 each, "
             f"{plan['processes']} hosts)",
             f"FLOPs: {plan['flop_convention']}",
             f"step time: {plan['cost_method']}"]
    for name, stage in plan["stages"].items():
        if only and name != only:
            continue
        verdict = "fits" if stage["fits"] else (
            f"DOES NOT FIT: over by {stage['overflow_bytes']} bytes"
            if stage.get("overflow_bytes") is not None else "DOES NOT FIT")
        lines.append(f"stage {name} ({stage['kind']}, mesh {stage['mesh']}, "
                     + batch_description(stage['rows_per_micro_batch'], stage['seq_len'],
                                         stage['grad_accum_steps'], stage.get('image_size', 0))
                     + f", remat {stage['remat_policy']}, "
                     f"loss chunks {stage['loss_chunk_tokens'] or 'off'}): {verdict}")
        lines.append(f"  per chip: parameters {_gb(stage['param_bytes_per_chip'])}, optimizer "
                     f"state {_gb(stage['optimizer_state_bytes_per_chip'])}, batch "
                     f"{_gb(stage['batch_bytes_per_chip'])}, compiler temporaries "
                     f"{_gb(stage.get('compiler_temp_bytes_per_chip'))}; peak "
                     f"{_gb(stage['peak_bytes_per_chip'])} of {_gb(stage['hbm_bytes_per_chip'])}")
        flops = stage.get("model_flops_per_step")
        seconds, roofline = stage.get("est_step_s"), stage.get("roofline_step_s")
        mfu, mfu_roofline = stage.get("mfu"), stage.get("mfu_roofline")
        compiler = stage.get("compiler_flops_per_chip")
        lines.append(
            f"  FLOPs per step: model {'-' if flops is None else f'{flops:.3e}'}, compiler "
            f"{'-' if compiler is None else format(compiler * plan['chips'], '.3e')}"
            + (f" + splash attention {stage['uncosted_kernel_flops_per_chip'] * plan['chips']:.3e}"
               if stage.get("uncosted_kernel_flops_per_chip") else "") +
            f"; estimated step {'-' if seconds is None else f'{seconds:.3g} s'}, MFU "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'}"
            f"{'' if stage['mfu_flops'].startswith('model') else ' (compiler FLOPs)'}")
        if roofline is not None:
            lines.append(f"  roofline (compute or HBM, no communication): {roofline:.3g} s, "
                         f"MFU at most {100 * mfu_roofline:.1f}%")
        if stage.get("est_step_s_note"):
            lines.append(f"  no compiler estimate: {stage['est_step_s_note']}")
    return lines


def plan(config, topology_name: str, out_path: str | None = None) -> int:
    """Compile every stage of `config` for `topology_name`; print the plan; write it to
    `out_path` (JSON) when given. Returns EXIT_FITS or EXIT_DOES_NOT_FIT."""
    from metamorph_jax.training import runner
    runner.check_config(config)
    topology = parse_topology(topology_name)
    devices = topology_devices(topology)
    processes = max(int(getattr(d, "process_index", 0)) for d in devices) + 1
    stages = {}
    result = _result(topology, processes, stages)
    for index, name in enumerate(config.order):
        stages[name] = plan_stage(config, index, name, topology, devices, processes)
        result = _result(topology, processes, stages)
        for line in report_lines(result, only=name):   # as each stage is done: compiles
            _say(line)                                  # of 8B take minutes
        if out_path:
            Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    for line in report_lines(result):
        print(line)
    if out_path:
        print(f"wrote {out_path}")
    if not result["fits"]:
        for name, stage in stages.items():
            if not stage["fits"]:
                print(f"stage {name} does not fit {topology.name}: {_need(stage)}, over by "
                      f"{stage['overflow_bytes']} bytes", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


def _result(topology: Topology, processes: int, stages: dict) -> dict:
    return {
        "topology": topology.name, "topology_desc": topology.desc, "chips": topology.chips,
        "processes": processes, "chip": dataclasses.asdict(topology.chip),
        "flop_convention": ("MaxText's: 6 x non-embedding LLM params (LM head incl.; 4 x when "
                            "the LLM is frozen) + causal attention 12 L H hd T / 2 per token, "
                            "+ adapter and vision head, + the frozen SigLIP forward (2 N + "
                            "attention per patch); the decoder uses the compiler's FLOPs"),
        "cost_method": ("XLA counts a loop body once: costs from one micro-batch compiled "
                        "with the loops unrolled at 1 and 2 layers per stack, extrapolated to "
                        "the real depth, x grad_accum_steps; memory from the real step"),
        "stages": dict(stages), "fits": all(stage["fits"] for stage in stages.values()),
    }


