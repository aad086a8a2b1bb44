"""`train.py --plan TOPOLOGY` (training/plan.py): a tiny text stage planned for a 4-chip
v5e through train.py's main, its JSON checked; a stage that cannot fit exits 3 naming the
stage and the overflow; the FLOP hand count against a hand calculation; the topology
names; the errors for a missing architecture and a missing libtpu; the VPiT and decoder
stages built from named architectures without any folder."""
import json
from pathlib import Path

import pytest

import train
from metamorph_jax import architectures
from metamorph_jax.input_errors import run_command
from metamorph_jax.training import plan, runner

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
                  max_position_embeddings=512)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=16, patch_size=4, use_head=False,
                   num_visual_tokens=4)
ROWS, SEQ = 4, 256


@pytest.fixture(autouse=True)
def tiny_architectures():
    architectures.register("test_tiny_llama", "llama", TINY_LLAMA)
    architectures.register("test_tiny_siglip", "siglip", TINY_SIGLIP)
    yield
    for name in ("test_tiny_llama", "test_tiny_siglip"):
        architectures.ARCHITECTURES.pop(name, None)


def text_argv(tmp_path, *extra, arch="test_tiny_llama", chunk=64):
    """configs/text_tiny.py with its folders absent: planned from test_tiny_llama."""
    stage = "--config.stages.text."
    return ["train.py", "--config", str(REPO / "configs" / "text_tiny.py"),
            "--workdir", str(tmp_path / "work"), "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            f"{stage}init.llm_dir={tmp_path / 'absent_llm'}",
            f"{stage}init.tokenizer_dir={tmp_path / 'absent_tokenizer'}",
            f"{stage}data.sources.text.path={tmp_path / 'absent.jsonl'}",
            f"{stage}data.batch_size={ROWS}", f"{stage}data.seq_len={SEQ}",
            f"{stage}dtype=bfloat16", f"{stage}remat_policy=full",
            f"{stage}init.llm_arch={arch}", f"{stage}loss_chunk_tokens={chunk}", *extra]


def hand_count_text(rows, seq):
    d, f, layers, heads, kv, hd, vocab = 128, 256, 3, 4, 2, 32, 512
    per_layer = (d * heads * hd + 2 * d * kv * hd + heads * hd * d) + 3 * d * f + 2 * d
    non_embedding = layers * per_layer + d + vocab * d     # final norm + LM head
    assert non_embedding == 508800
    tokens = rows * seq
    return 6 * non_embedding * tokens, 12 * layers * heads * hd * seq / 2 * tokens


@pytest.mark.slow
def test_tiny_text_stage_planned_for_v5e_4(tmp_path, capsys):
    pytest.importorskip("libtpu", reason=plan.INSTALL)
    out = tmp_path / "plan.json"
    assert train.main(text_argv(tmp_path, "--plan", "v5e-4", "--plan-out", str(out))) == 0
    result = json.loads(out.read_text())
    assert (result["topology"], result["topology_desc"], result["chips"],
            result["processes"]) == ("v5e-4", "v5e:2x2", 4, 1)
    assert result["fits"] and list(result["stages"]) == ["text"]
    stage = result["stages"]["text"]
    assert stage["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert (stage["rows_per_micro_batch"], stage["seq_len"], stage["loss_chunk_tokens"]) == \
        (ROWS, SEQ, 64)
    # 574336 fp32 parameters (508800 + the 512 x 128 embedding) over 4 chips; Adam: 2x
    assert stage["param_bytes_per_chip"] == 574336
    assert stage["optimizer_state_bytes_per_chip"] >= 2 * 574336
    assert 0 < stage["peak_bytes_per_chip"] < stage["hbm_bytes_per_chip"] == 16 * 10**9
    assert stage["compiler_temp_bytes_per_chip"] > 0
    lm, attention = hand_count_text(ROWS, SEQ)
    assert stage["model_flops_terms"] == {"lm": lm, "attention": attention,
                                          "total": lm + attention}
    # the compiler's count (remat recomputes the forward) is above the model's, not far
    total = stage["compiler_flops_per_chip"] * 4
    assert lm + attention < total < 2.5 * (lm + attention)
    assert stage["est_step_s"] > 0 and 0 < stage["mfu"] < 1
    # splash attention, which XLA costs at nothing, enters as its hand count; the roofline
    # from those FLOPs and the compiler's bytes on v5e's 197 TFLOP/s and 819 GB/s
    kernel = stage["uncosted_kernel_flops_per_chip"]
    assert kernel == attention / 4
    assert stage["roofline_step_s"] == pytest.approx(max(
        (stage["compiler_flops_per_chip"] + kernel) / 197e12,
        stage["compiler_bytes_accessed_per_chip"] / 819e9))
    assert stage["roofline_step_s"] <= stage["est_step_s"] and stage["est_step_s_note"] is None
    assert stage["mfu"] <= stage["mfu_roofline"] < 1
    assert set(stage["cost_samples"]) == {"base", "llm"}
    assert "1 and 2 layers" in stage["cost_method"]
    printed = capsys.readouterr().out
    assert "stage text" in printed and "fits" in printed and "MFU" in printed
    assert "6 x non-embedding" in printed   # the FLOP convention is printed
    assert f"{ROWS} rows x {SEQ} tokens x {stage['grad_accum_steps']} micro-batches" in printed
    # a decoder stage has images, not token rows
    assert plan.batch_description(16, 0, 2, 512) == "16 images of 512 px x 2 micro-batches"
    assert not (tmp_path / "work").exists()   # planning writes nothing but --plan-out


@pytest.mark.slow
def test_a_stage_that_cannot_fit_exits_3_naming_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("libtpu", reason=plan.INSTALL)
    # a 4 MB chip: the tiny step needs ~14 MB per chip
    monkeypatch.setitem(plan.CHIPS, "v5e", plan.Chip("v5e", 4 * 10**6, 197e12, 4, 819e9))
    out = tmp_path / "plan.json"
    argv = text_argv(tmp_path, "--plan", "v5e-4", "--plan-out", str(out), chunk=0)
    assert train.main(argv) == 3
    stage = json.loads(out.read_text())["stages"]["text"]
    assert not stage["fits"]
    assert stage["overflow_bytes"] == stage["peak_bytes_per_chip"] - 4 * 10**6 > 0
    assert stage["cost_method"] == "not costed: the stage does not fit"
    err = capsys.readouterr().err
    assert "stage text does not fit v5e-4" in err and f"over by {stage['overflow_bytes']} bytes" in err


def test_the_compilers_two_out_of_memory_wordings_give_the_overflow():
    # libtpu's wordings, as a plan of 70B on v6e-256 with remat dots_no_batch met the second
    temps = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (48.59G) exceeds available HBM (31.25G).")
    oom = plan.out_of_memory(temps)
    assert oom["used_bytes"] is None
    assert oom["temp_bytes"] == int(48.59 * 2**30) and oom["limit_bytes"] == int(31.25 * 2**30)
    assert oom["overflow_bytes"] == int(48.59 * 2**30) - int(31.25 * 2**30)
    used = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                        "memory in memory space hbm. Used 20.5G of 15.75G hbm. Exceeded "
                        "hbm capacity by 4.75G.")
    oom = plan.out_of_memory(used)
    assert (oom["used_bytes"], oom["limit_bytes"], oom["temp_bytes"]) == (
        int(20.5 * 2**30), int(15.75 * 2**30), None)
    assert oom["overflow_bytes"] == int(20.5 * 2**30) - int(15.75 * 2**30)
    assert plan.out_of_memory(RuntimeError("INVALID_ARGUMENT: a shape")) is None
    # the closing line names what is known
    assert plan._need({"peak_bytes_per_chip": None, "compiler_temp_bytes_per_chip": 7}) == \
        "temporaries alone 7 bytes per chip"


def test_costs_extrapolated_per_layer_and_a_negative_compiler_time_refused():
    chip = plan.CHIPS["v6e"]
    def cost(flops, seconds, bytes_accessed):
        return {"flops": flops, "seconds": seconds, "bytes_accessed": bytes_accessed}
    # 1 layer: 10 units; each further layer adds 3: a 32-layer stack is 10 + 31 x 3 = 103,
    # a 27-layer tower 10 + 26 x 1; both x 2 micro-batches
    samples = {"base": cost(10e12, 0.5, 1e9), "llm": cost(13e12, 0.8, 2e9),
               "vision": cost(11e12, 0.6, 1.5e9)}
    total = plan.combine_costs(samples, {"llm": 32, "vision": 27}, 2, chip)
    flops = (10 + 31 * 3 + 26 * 1) * 1e12 * 2
    assert total["flops"] == pytest.approx(flops)
    assert total["bytes_accessed"] == pytest.approx((1 + 31 * 1 + 26 * 0.5) * 1e9 * 2)
    assert total["seconds"] == pytest.approx((0.5 + 31 * 0.3 + 26 * 0.1) * 2)
    assert total["roofline_s"] == pytest.approx(flops / 918e12)   # compute-bound here
    assert total["seconds_note"] is None
    # a kernel XLA does not cost: its FLOPs, and their time at peak
    with_kernel = plan.combine_costs(samples, {"llm": 32, "vision": 27}, 2, chip, 9.18e12)
    assert with_kernel["flops"] == pytest.approx(flops + 9.18e12)
    assert with_kernel["compiler_flops"] == pytest.approx(flops)
    assert with_kernel["seconds"] == pytest.approx(total["seconds"] + 0.01)
    # libtpu's v6e cost model: negative seconds, falling with depth (measured, 8B layers)
    samples["base"]["seconds"], samples["llm"]["seconds"] = -49.95, -67.94
    total = plan.combine_costs(samples, {"llm": 32, "vision": 27}, 2, chip)
    assert total["seconds"] is None and "-49.95 (base)" in total["seconds_note"]
    assert total["roofline_s"] == pytest.approx(flops / 918e12)
    # a time under the roofline cannot be one either
    samples = {"base": cost(10e12, 1e-3, 1e9), "llm": cost(13e12, 2e-3, 2e9)}
    total = plan.combine_costs(samples, {"llm": 2}, 1, chip)
    assert total["seconds"] is None and "below the roofline" in total["seconds_note"]


def test_flop_hand_count_for_a_tiny_text_stage(tmp_path):
    from metamorph_jax.models.llama import LlamaConfig
    config = LlamaConfig(**TINY_LLAMA)
    assert plan.llama_non_embedding_params(config) == 508800
    per_token = plan.lm_flops_per_token(config, SEQ)
    lm, attention = hand_count_text(1, SEQ)
    assert (per_token["params"] * SEQ, per_token["attention"] * SEQ) == (lm, attention)
    assert plan.lm_flops_per_token(config, SEQ, trainable=False)["params"] == 4 * 508800


def test_siglip_param_count_matches_the_model():
    import flax.linen as nn
    import jax

    from metamorph_jax.models import siglip
    config = siglip.SiglipConfig(**TINY_SIGLIP)
    params = nn.unbox(jax.eval_shape(lambda: siglip.init_params(config, jax.random.key(0))))
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    post_norm = 2 * config.hidden_size   # the post-layernorm, which visual tokens skip
    assert plan.siglip_params(config) == total - post_norm


@pytest.mark.parametrize("name, desc, chips", [
    ("v5p-128", "v5p:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4), ("v5p-1024", "v5p:8x8x8", 512),
    ("v5e-16", "v5e:4x4", 16), ("v5e-4", "v5e:2x2", 4), ("v6e-256", "v6e:16x16", 256),
    ("v6e-64", "v6e:8x8", 64)])
def test_topology_names(name, desc, chips):
    topology = plan.parse_topology(name)
    assert (topology.desc, topology.chips) == (desc, chips)


@pytest.mark.parametrize("name", ["v5p-3", "v4-8", "v6e-12", "tpu"])
def test_bad_topology_names_are_refused(name):
    with pytest.raises(plan.PlanError, match=f"--plan {name!r}"):
        plan.parse_topology(name)


def test_a_missing_architecture_is_one_error_naming_stage_and_field(tmp_path, capsys):
    argv = text_argv(tmp_path, "--plan", "v5e-4", arch="")
    assert run_command(train.main, argv) == 2   # as `python train.py` runs it
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "stage 'text': field 'init.llm_arch' is empty and init.llm_dir names no existing " \
        "folder" in err
    assert not (tmp_path / "work").exists()


def test_missing_libtpu_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(plan.PlanError, match="needs libtpu: pip install -r requirements-tpu.txt"):
        plan.topology_devices(plan.parse_topology("v5e-4"))


def test_describing_a_topology_off_a_tpu_vm_prints_no_libtpu_errors():
    # libtpu asks the metadata server for the host's workers and accelerator type and
    # prints errors when it cannot; a plan names them instead (a fresh process: libtpu
    # reads them once, when it loads).
    pytest.importorskip("libtpu", reason=plan.INSTALL)
    import os
    import subprocess
    import sys
    code = ("from metamorph_jax.training import plan; "
            "devices = plan.topology_devices(plan.parse_topology('v6e-64')); "
            "print(len(devices), devices[0].device_kind)")
    env = {key: value for key, value in os.environ.items()
           if key not in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, JAX_PLATFORMS="cpu"), check=True)
    assert done.stdout.split() == ["64", "TPU", "v6", "lite"]
    for noise in ("could not determine", "unexpected worker hostname", "Failed to find host"):
        assert noise not in done.stderr


def test_plan_out_needs_plan():
    from absl import flags
    with pytest.raises(flags.Error, match="--plan-out needs --plan"):
        runner.parse_command(["train.py", "--config", str(REPO / "configs" / "text_tiny.py"),
                              "--plan-out", "x.json"])


def test_vpit_and_decoder_stages_build_from_architectures_without_folders(tmp_path):
    # configs/tiny.py's stages with no assets made: a plan builds them from the named
    # architectures, reads no tokenizer, and knows its batch from the data config alone.
    import jax

    from metamorph_jax import sharding
    from metamorph_jax.training import objectives
    config = runner.parse_flags(["train.py", "--config",
                                 f"{REPO / 'configs' / 'tiny.py'}:{tmp_path / 'none'}"])
    with config.unlocked():
        for name in ("adapter", "instruct", "decoder"):
            config.stages[name].init.llm_arch = "test_tiny_llama"
            config.stages[name].init.vision_arch = "test_tiny_siglip"
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.devices()[:4])
    folders = objectives.Folders(plan=True, platform="cpu")
    for index, name in enumerate(config.order):
        previous = tmp_path / "none" / "final" if index else None
        stage = runner.Stage(config, index, name, previous, mesh, None, folders=folders,
                             process_count=2)
        assert stage.shard_count == 2
        batch = stage.abstract_batch()
        rows = config.stages[name].data.batch_size * 2
        assert all(value.shape[:2] == (1, rows) for value in batch.values())
        if name == "decoder":
            assert stage.objective.vision_config.hidden_size == 32
            continue
        assert stage.objective.tokenizer is None
        assert stage.objective.config.llm.vocab_size == 512 + 2
        assert stage.objective.config.llm.platform == "cpu"
    # without an architecture: one error naming the stage and the field
    with config.unlocked():
        config.stages.adapter.init.vision_arch = ""
    with pytest.raises(objectives.StageConfigError,
                       match="stage 'adapter': field 'init.vision_arch' is empty"):
        runner.Stage(config, 0, "adapter", None, mesh, None, folders=folders, process_count=1)
