"""The findings' runs: every run is a variation of ONE base recipe (`base_config`).

The base recipe is `main_recipe`: the main job's, configs/shapes.py's `recipe(...)` (text
stage -> tower stage -> adapter -> instruct -> decoder). Everything
else is read from it by stage kind, so pointing `main_recipe` at the final main job is
the one change a new recipe needs. From it:

- the shared stages (`shared_config`), trained once under OUT/shared/<llm>/:
    text     the recipe's stages but its instruct stage (text, tower, adapter, decoder):
             the text-pretrained LLM, the pretrained tower, the decoder every run renders
             with, and the adapter every run of that LLM starts from. The adapter reads
             only the recipe's understanding sources (image_qa), as the paper pretrains
             its adapter once on understanding data (LLaVA captions) for every run, so no
             run's generation records are more than its own;
    control  finding 4: the text stage on the corpus without the held-out facts
             (data/shapes_text.CONTROL_FILE), then its adapter;
    random   finding 3: the adapter on the assets' random LLM (no text stage);
    large    finding 3: a random LLM `Scale.larger_llm` times the base LLM's width and
             depth (tiny.write_random_llm), its text stage, then its adapter;
  the tower and decoder of `text` serve them all (stage references `@tower` become that
  folder).
- the runs (`RunSpec` -> `run_config`): the recipe's instruct stage alone, started from
  the LLM's shared adapter (`init.model_dir`), on subsets of the world's train split
  (data_subsets.py: generation records from the head, every other kind from the tail),
  read `Scale.epochs` times (finite data, `steps = 0`: one counted pass), then the
  recipe's held-out evaluation with the shared decoder. A run's name is its definition
  (LLM, records per kind, epochs), so two findings that need the same run share it.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import ml_collections

from metamorph_jax.findings import paper
from metamorph_jax.findings.scales import GENERATION, KINDS, Scale
from metamorph_jax.input_errors import BadInput

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# The understanding sources the shared adapter reads (the paper's adapter pretraining data
# is understanding data).
ADAPTER_KINDS = ("image_qa",)
LLMS = ("text", "random", "large", "control")
ABBREVIATIONS = {GENERATION: "gen", "image_qa": "qa", "video_qa": "videoqa", "video": "video",
                 "visual_thinking": "think", "image_to_image": "edit"}


# --- the base recipe ------------------------------------------------------------------------

def load_config_file(name: str):
    """configs/<name>.py as a module (configs/ is not a package: loaded by path, as
    ml_collections loads train.py's --config)."""
    path = CONFIGS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the findings read the repository's "
                                "configs/; run from a clone)")
    spec = importlib.util.spec_from_file_location(f"findings_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_recipe(assets_root: str) -> ml_collections.ConfigDict:
    """The recipe every finding varies (retarget here when the main job changes)."""
    return load_config_file("shapes").recipe(assets_root, pretrained=True)


def base_config(assets_root: str, scale: Scale) -> ml_collections.ConfigDict:
    """main_recipe on assets under `assets_root` with the scale's sizes applied."""
    config = main_recipe(str(assets_root))
    with config.unlocked():
        config.assets.update(scale.assets)
        if scale.llm:
            config.assets.llm = dict(scale.llm)
        for name in config.order:
            stage = config.stages[name]
            if stage.kind in scale.stage_steps:
                stage.steps = int(scale.stage_steps[stage.kind])
        if scale.batch_size:
            instruct = config.stages[stage_of_kind(config, "instruct")]
            instruct.data.batch_size = int(scale.batch_size)
        config.final_eval.update(scale.final_eval)
    return config


def stage_of_kind(config, kind: str) -> str:
    """The one stage of `config.order` of this kind (an error when there is none or several)."""
    names = [n for n in config.order if config.stages[n].kind == kind]
    if len(names) != 1:
        raise BadInput(f"the findings' base recipe must have one {kind!r} stage in its order "
                       f"{list(config.order)}; it has {len(names)}")
    return names[0]


def world_dir(config) -> Path:
    return Path(config.final_eval.world)


# --- the runs -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One VPiT run: the LLM's shared adapter + the instruct stage on these records."""
    llm: str                       # a key of LLMS
    data: tuple                    # ((kind, records), ...) in a fixed order
    epochs: int

    @property
    def name(self) -> str:
        parts = [f"{ABBREVIATIONS[k]}{n}" for k, n in self.data]
        return f"{self.llm}-{'-'.join(parts)}-e{self.epochs}"

    def records(self) -> dict:
        return dict(self.data)


def spec(llm: str, records: dict, epochs: int) -> RunSpec:
    order = (GENERATION,) + KINDS
    unknown = sorted(set(records) - set(order))
    if unknown:
        raise BadInput(f"unknown data kind(s) {unknown}; known: {list(order)}")
    return RunSpec(llm, tuple((k, int(records[k])) for k in order if records.get(k)), epochs)


@dataclasses.dataclass(frozen=True)
class Cell:
    """A finding's use of a run: its place in the finding (role) and the paper's numbers
    set beside it."""
    role: dict
    run: RunSpec
    paper: dict


@dataclasses.dataclass(frozen=True)
class Finding:
    number: int
    title: str
    claim: str                     # what the paper reports
    paper_refs: str
    cells: tuple
    knowledge: bool = False        # its runs are also scored on knowledge prompts


def joint_records(scale: Scale, generation: int) -> dict:
    return {GENERATION: generation, **scale.other}


def finding1(scale: Scale) -> Finding:
    matched = paper.rank_matched(scale.generation_amounts, paper.TABLE4["amounts"])
    cells = []
    for amount in scale.generation_amounts:
        row = paper.TABLE4["amounts"].index(matched[amount])
        for setting, records in (("generation_only", {GENERATION: amount}),
                                 ("joint", joint_records(scale, amount))):
            cells.append(Cell(
                {"setting": setting, "generation": amount},
                spec("text", records, scale.epochs),
                {"ref": paper.TABLE4["ref"], "generation_samples": matched[amount],
                 "fid": paper.TABLE4[setting][row]}))
    return Finding(1, "Generation emerges from joint training with little generation data",
                   "FID 19.2 with 5k generation samples trained jointly with the other data, "
                   "116.4 with the generation data alone", "Table 4 / Fig. 2-3", tuple(cells))


def finding2(scale: Scale) -> Finding:
    vqa_matched = paper.rank_matched(scale.grid_vqa, paper.TABLE6_VQA)
    gen_matched = paper.rank_matched(scale.grid_generation, paper.TABLE6_GENERATION)
    cells = []
    for vqa in scale.grid_vqa:
        for generation in scale.grid_generation:
            i = paper.TABLE6_VQA.index(vqa_matched[vqa])
            j = paper.TABLE6_GENERATION.index(gen_matched[generation])
            cells.append(Cell(
                {"part": "grid", "vqa": vqa, "generation": generation},
                spec("text", {GENERATION: generation, "image_qa": vqa}, scale.epochs),
                {"ref": paper.TABLE6["ref"], "vqa_samples": vqa_matched[vqa],
                 "generation_samples": gen_matched[generation],
                 "vqa_average": paper.TABLE6["vqa_average"][i][j],
                 "fid": paper.TABLE6["fid"][i][j], "clip": paper.TABLE6["clip"][i][j]}))
    generation = scale.reference_generation
    rows = [("none", {GENERATION: generation})]
    rows += [(kind, {GENERATION: generation, kind: count}) for kind, count in scale.kinds.items()]
    rows.append(("all", joint_records(scale, generation)))
    for added, records in rows:
        table5 = ({"fid": paper.TABLE5["fid"][added], "clip": paper.TABLE5["clip"][added]}
                  if added in paper.TABLE5["fid"] else {})
        cells.append(Cell({"part": "kinds", "added": added, "generation": generation},
                          spec("text", records, scale.epochs),
                          {"ref": paper.TABLE5["ref"] if table5 else "Fig. 3 (all data)",
                           "generation_samples": paper.TABLE5["generation"], **table5}))
    return Finding(2, "Understanding data helps generation more than generation data does; "
                   "which kind helps most",
                   "more VQA data improves VQA and FID more than more generation data (Table 6: "
                   "FID 28.3 -> 18.2 from 1M to 7M VQA at 200k generation, 28.3 -> 18.4 from "
                   "200k to 4M generation at 1M VQA); with 200k generation samples, FID: "
                   "ImageQA 18.9, VideoQA 26.5, pure video 84.7, visual thinking 93.5, "
                   "image-to-image 97.5, none 110.5", "Fig. 7 / Tables 5-6", tuple(cells))


LLM_ROLES = (("random", "random LLM (no text stage)", None),
             ("text", "text-pretrained LLM", "LLaMA-3 8B"),
             ("large", "larger text-pretrained LLM", "LLaMA-3 70B"))


def finding3(scale: Scale) -> Finding:
    records = joint_records(scale, scale.reference_generation)
    cells = tuple(Cell({"llm": llm, "label": label}, spec(llm, records, scale.epochs),
                       {"ref": paper.TABLE7["ref"], "llm": row, **paper.TABLE7["rows"][row]}
                       if row else {"ref": paper.TABLE7["ref"], "llm": None,
                                    "note": "the paper has no run without a pretrained LLM"})
                  for llm, label, row in LLM_ROLES)
    return Finding(3, "A stronger LLM gives better understanding and generation",
                   "LLaMA-3 8B (VQA 55.8, FID 14.5) < LLaMA-3 70B (VQA 60.7, FID 13.8)",
                   "Table 7 / Fig. 6", cells)


def finding4(scale: Scale) -> Finding:
    records = joint_records(scale, scale.reference_generation)
    cells = tuple(Cell({"llm": llm, "label": label}, spec(llm, records, scale.epochs),
                       {"ref": paper.FIG9_10["ref"], "claim": paper.FIG9_10["claim"]})
                  for llm, label in (("text", "text stage with the held-out facts"),
                                     ("control", "text stage without the held-out facts")))
    return Finding(4, "Knowledge from the LLM reaches generation",
                   paper.FIG9_10["claim"], "Figs. 9-10", cells, knowledge=True)


FINDINGS = {1: finding1, 2: finding2, 3: finding3, 4: finding4}


def findings(numbers, scale: Scale) -> list[Finding]:
    return [FINDINGS[n](scale) for n in numbers]


# --- configs --------------------------------------------------------------------------------

def _resolve_references(stage, shared_text: Path, order) -> None:
    """Init fields `@name` naming a stage outside `order` -> that stage's folder in the
    shared text run (the tower)."""
    for field, value in list(stage.init.items()):
        if isinstance(value, str) and value.startswith("@") and value[1:] not in order:
            stage.init[field] = str(shared_text / value[1:] / "final")


def shared_dir(out: Path, llm: str) -> Path:
    return Path(out) / "shared" / llm


def large_llm_dir(out: Path) -> Path:
    return Path(out) / "shared" / "llm_large"


def shared_config(base, out: Path, llm: str) -> ml_collections.ConfigDict:
    """The shared stages of one LLM (module docstring), as a run config."""
    config = copy.deepcopy(base)
    text, adapter = stage_of_kind(base, "text"), stage_of_kind(base, "adapter")
    instruct = stage_of_kind(base, "instruct")
    adapter_stage = config.stages[adapter]
    kept = {k: v for k, v in adapter_stage.data.sources.items() if k in ADAPTER_KINDS}
    if not kept:
        raise BadInput(f"the base recipe's stage {adapter!r} reads none of {ADAPTER_KINDS} "
                       f"(its sources: {sorted(adapter_stage.data.sources)})")
    adapter_stage.data.sources = ml_collections.ConfigDict(kept)
    if llm == "text":
        order = [n for n in base.order if n != instruct]
    elif llm == "random":
        order = [adapter]
        adapter_stage.init.llm_dir = config.stages[text].init.llm_dir
    elif llm in ("control", "large"):
        order = [text, adapter]
        sources = config.stages[text].data.sources
        if llm == "control":
            from metamorph_jax.data import shapes_text
            for source in sources.values():
                path = Path(source.path)
                if path.name != shapes_text.CORPUS_FILE:
                    raise BadInput(f"stage {text!r}: source path {path} is not the world's "
                                   f"{shapes_text.CORPUS_FILE}; finding 4's control needs it")
                source.path = str(path.with_name(shapes_text.CONTROL_FILE))
        else:
            config.stages[text].init.llm_dir = str(large_llm_dir(out))
    else:
        raise BadInput(f"unknown LLM {llm!r}; known: {LLMS}")
    config.order = tuple(order)
    config.stages = ml_collections.ConfigDict({n: config.stages[n] for n in order})
    if llm != "text":
        for name in order:
            _resolve_references(config.stages[name], shared_dir(out, "text"), order)
    config.work_dir = str(shared_dir(out, llm))
    config.final_eval = ml_collections.ConfigDict()
    return config


def decoder_dir(base, out: Path) -> Path:
    return shared_dir(out, "text") / stage_of_kind(base, "decoder") / "final"


def run_dir(out: Path, run: RunSpec) -> Path:
    return Path(out) / "runs" / run.name


def run_config(base, out: Path, run: RunSpec, data_files: dict) -> ml_collections.ConfigDict:
    """The run's config: the base recipe's instruct stage alone from the LLM's shared adapter,
    on `data_files` ({kind: subset file}) read run.epochs times; the recipe's evaluation."""
    config = copy.deepcopy(base)
    instruct = stage_of_kind(base, "instruct")
    adapter = stage_of_kind(base, "adapter")
    stage = config.stages[instruct]
    stage.init.model_dir = str(shared_dir(out, run.llm) / adapter / "final")
    stage.init.from_previous = False
    stage.steps = 0   # one pass over the finite data: run.epochs epochs
    stage.data.num_epochs = int(run.epochs)
    world = str(world_dir(base))
    stage.data.sources = ml_collections.ConfigDict({
        kind: dict(path=str(data_files[kind]), weight=1.0, image_root=world)
        for kind, _ in run.data})
    config.order = (instruct,)
    config.stages = ml_collections.ConfigDict({instruct: stage})
    config.work_dir = str(run_dir(out, run))
    return config


def describe(config) -> str:
    return json.dumps(config.to_dict(), indent=1, default=str)
