"""What each kind of stage trains and how: model, trainable paths, data, loss, export.

Kinds (a stage's `kind` field):

    adapter   VPiT stage 1: the adapter (mm_projector) and the two new token INPUT rows
              train; everything else is frozen. The rows are a small trainable
              [2, d] leaf, `new_token_rows`, written into the frozen embedding table by the
              forward (and merged back by the export): no optimizer state for the table.
    instruct  VPiT stage 2: everything but the vision tower (LLM, adapter, vision head).
    decoder   the visualiser: projector + UNet train with the denoising MSE (epsilon or v)
              (decoder_step.decoder_loss) on real images, conditioned on the frozen SigLIP
              tower's tokens of the same images (computed inside the step); VAE and SigLIP
              are frozen.
    text      the LLM alone on text-only records.
    tower     SigLIP's own pretraining for a small tower: the vision tower (with its
              attention-pool head) and a text tower (models/siglip_text.py) train with the
              sigmoid image-text loss (contrastive_loss.py) on image-caption pairs
              (data/caption_pairs.py); the export is a `siglip` folder that VPiT stages
              take as init.vision_dir (frozen there), the text tower beside it.

An objective is built from a stage's config without touching parameters (`boxed_parts`
gives the abstract trees the shardings and the --plan compile need); `load_parts` reads or
initialises the parameters, `export` writes the stage's result as a model folder (tokenizer
and chat template inside) that the next stage starts from. Every process calls `export`:
the parameters are saved by all processes together (each writes its shards); process 0
writes the tokenizer.

Losses come as sums over a micro-batch divided by normalisers of the whole (accumulated)
batch, `normalizers(batch)` being computed from the stacked micro-batches' masks, so that
k accumulated micro-batches give the gradient of the large batch: each term is averaged
over all its targets, the convention of vpit_loss.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax import pretrained, sharding
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.input_errors import InputError

Array = jax.Array
logger = logging.getLogger("metamorph_jax.training")

KINDS = ("adapter", "instruct", "decoder", "text", "tower")
NEW_TOKEN_ROWS = "new_token_rows"
ARCH_FIELDS = ("model_arch", "llm_arch", "vision_arch")
# An init folder field "@name" means stage `name`'s result in this run (Objective.initial_dir).
STAGE_REFERENCE = "@"


@dataclasses.dataclass(frozen=True)
class Folders:
    """How an objective reaches its model folders, and what its models are built for.

    A run (plan=False) reads the folders as the stage names them: configs, tokenizers,
    weights; a missing folder is an error. A plan (plan=True, training/plan.py) builds the
    stage from shapes alone: it reads a folder's config.json where the folder exists, else
    the architecture (architectures.py) the stage's `init.llm_arch` / `init.vision_arch` /
    `init.model_arch` names; it never loads tokenizers or weights, so `load_parts` and
    `batches` are not for planned objectives. `platform`: the devices the models are
    compiled for (sharding.mesh_platform of the stage's mesh; None: jax.default_backend()),
    which picks the attention kernels and the dense layers' backward.
    """
    plan: bool = False
    platform: str | None = None
    # The plan's cost compiles (XLA's cost analysis counts a loop body once): the layer
    # stacks at these depths (None: the model's), every stack and the loss chunks unrolled.
    unroll: bool = False
    llm_layers: int | None = None
    vision_layers: int | None = None
    # (name, final folder) of the stages that run before this one in the run's `order`:
    # what a stage reference `@name` in an init folder field means (Objective.initial_dir).
    earlier_stages: tuple[tuple[str, str], ...] = ()

    def llm_changes(self) -> dict:
        changes = {} if self.llm_layers is None else {"num_layers": self.llm_layers}
        return dict(changes, scan_layers=False) if self.unroll else changes

    def vision_changes(self) -> dict:
        changes = {} if self.vision_layers is None else {"num_hidden_layers": self.vision_layers}
        return dict(changes, scan_layers=False) if self.unroll else changes


RUN = Folders()


class StageConfigError(InputError, ValueError):
    """A stage config that cannot run (the message names the stage and the field)."""


# --- shared helpers -----------------------------------------------------------------------

def data_from_config(data, where: str) -> tuple[list[pipeline.Source], pipeline.DataConfig]:
    """pipeline.from_config, also accepting `sources` as a mapping name -> source fields (so
    that `--config.stages.S.data.sources.NAME.path=F` works; a list does not allow it)."""
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    sources = values.get("sources")
    if isinstance(sources, dict):
        values["sources"] = list(sources.values())
    if not values.get("sources"):
        raise StageConfigError(f"{where}: field 'sources' is empty")
    try:
        return pipeline.from_config(values)
    except (TypeError, ValueError) as error:
        raise StageConfigError(f"{where}: {error}") from None


def source_names(data) -> list[str]:
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    sources = values.get("sources") or {}
    return list(sources) if isinstance(sources, dict) else [f"source{i}" for i in range(len(sources))]


def token_store_of(stage, where: str):
    """The stage's precomputed-token store (data.visual_tokens), or None; eval_data must
    agree (the step is compiled for one batch layout)."""
    from metamorph_jax.data import token_store
    path = stage.data.get("visual_tokens") or None
    eval_data = stage.get("eval_data")
    if eval_data and eval_data.get("sources"):
        if bool(eval_data.get("visual_tokens")) != bool(path):
            raise StageConfigError(
                f"{where}: field 'eval_data.visual_tokens' is "
                f"{eval_data.get('visual_tokens')!r} but 'data.visual_tokens' is {path!r}; "
                "both give precomputed tokens or neither does")
    if path is None:
        return None
    try:
        return token_store.TokenStore(path)
    except token_store.TokenStoreError as error:
        raise StageConfigError(f"{where}: field 'data.visual_tokens': {error}") from None


def check_token_store(store, vision_config, where: str) -> None:
    """A store must come from the stage's tower: image size, token count, width, config."""
    from metamorph_jax.data import token_store
    try:
        store.check(image_size=vision_config.image_size,
                    num_tokens=vision_config.num_visual_tokens, width=vision_config.hidden_size,
                    where=f"{where}: field 'data.visual_tokens'")
        store.check_tower(vision_config.to_dict(), where=f"{where}: field 'data.visual_tokens'")
    except token_store.TokenStoreError as error:
        raise StageConfigError(str(error)) from None


def _folder(path: str | Path, where: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageConfigError(f"{where}: folder {path} does not exist")
    return path


def _safe_mean(total: Array, count: Array) -> Array:
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _host(tree: Any) -> Any:
    """Host numpy copies of a tree. Arrays sharded over several processes are gathered
    (a collective: every process must call it), so each process gets the whole tree."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(fetch, tree)


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(out_dir))


def place(params: Any, shardings: Any) -> Any:
    """Host (numpy) params -> global arrays with the given shardings (every process holds
    the whole host tree and contributes its addressable shards)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        np.shape(x), s, lambda index: np.asarray(x)[index]), params, shardings)


class Objective:
    """The interface the runner drives; see the module docstring."""
    kind: str = ""
    rules: tuple = sharding.DEFAULT_RULES
    batch_keys: tuple[str, ...] = ()
    folders: Folders = RUN
    planning: bool = False
    loss_chunk_tokens: int = 0

    def __init__(self, stage, name: str, previous_dir: Path | None, folders: Folders = RUN):
        self.stage = stage
        self.name = name
        self.where = f"stage {name!r}"
        self.previous_dir = previous_dir
        self.folders = folders
        self.planning = folders.plan
        self.loss_chunk_tokens = int(stage.get("loss_chunk_tokens", 0) or 0)
        if self.loss_chunk_tokens < 0:
            raise StageConfigError(f"{self.where}: field 'loss_chunk_tokens' must be 0 (off) "
                                   f"or more, got {self.loss_chunk_tokens}")

    # model
    def boxed_parts(self) -> tuple[Any, Any]:
        """(trainable, frozen) abstract params, boxed with logical axis names."""
        raise NotImplementedError

    def load_parts(self, trainable_shardings: Any, frozen_shardings: Any) -> tuple[Any, Any]:
        """(trainable, frozen) params placed with the given shardings."""
        raise NotImplementedError

    def model_params(self, trainable: Any, frozen: Any) -> Any:
        from metamorph_jax.training.state import merge
        return merge(trainable, frozen)

    # data
    def batches(self, data, seed_offset: int = 0):
        raise NotImplementedError

    def check_batch(self, batch: dict) -> None:
        pass

    def batch_shapes(self, data, rows: int) -> dict:
        """{key: (shape, dtype)} of one micro-batch of `rows` rows as the step reads it,
        from the data config alone (so a step can be compiled without data or params)."""
        raise NotImplementedError

    def tokens_in(self, batch: dict) -> int:
        return int(np.count_nonzero(batch["segment_ids"]))

    # loss
    def normalizers(self, batch: dict) -> dict:
        raise NotImplementedError

    def loss(self, params: Any, batch: dict, normalizers: dict, rng: Array
             ) -> tuple[Array, dict]:
        raise NotImplementedError

    def summarize(self, sums: dict) -> tuple[Array, dict]:
        raise NotImplementedError

    # result
    def export(self, out_dir: Path, trainable: Any, frozen: Any) -> None:
        raise NotImplementedError

    def initial_dir(self, field: str) -> Path | None:
        """The folder init.`field` names (None when empty). `@name` names the result
        (WORK_DIR/name/final) of the run's stage `name`, which must run before this one
        (e.g. `init.llm_dir="@text"`: the LLM the text stage exported)."""
        init = self.stage.init
        value = init.get(field)
        if isinstance(value, str) and value.startswith(STAGE_REFERENCE):
            value = self.stage_result(field, value)
            if value is None:
                return None
        if value:
            if self.planning and not Path(value).is_dir():
                return None   # a plan takes the stage's architecture instead
            return _folder(value, f"{self.where}: field 'init.{field}'")
        return None

    def stage_result(self, field: str, value: str) -> Path | None:
        """The final folder of the stage `value` ("@name") refers to; an error naming the
        field when that stage does not run before this one or has not finished. A plan
        gets None for a result that does not exist yet (it takes the architecture)."""
        from metamorph_jax.training.runner import DONE_FILE
        name = value[len(STAGE_REFERENCE):]
        where = f"{self.where}: field 'init.{field}' = {value!r}"
        earlier = dict(self.folders.earlier_stages)
        if name not in earlier:
            if name == self.name:
                raise StageConfigError(f"{where} names this stage itself; a stage starts "
                                       "from the result of a stage that runs before it")
            raise StageConfigError(
                f"{where}: stage {name!r} does not run before stage {self.name!r} in the "
                f"run's 'order' (stages before it: {', '.join(earlier) or 'none'})")
        folder = Path(earlier[name])
        if not (folder / DONE_FILE).exists():
            if self.planning:
                return None
            raise StageConfigError(f"{where}: stage {name!r} has not finished ({folder} has "
                                   f"no {DONE_FILE} file)")
        return folder

    def saved_config(self, folder: Path | None, arch_field: str, model: str,
                     folder_fields: str) -> dict:
        """{"model", "config"} of `folder` (its config.json), or, when planning without
        the folder, of the architecture named by init.`arch_field`."""
        from metamorph_jax import architectures
        if folder is not None:
            return pretrained.read_model_config(folder)
        name = self.stage.init.get(arch_field) or ""
        if not self.planning:
            raise StageConfigError(f"{self.where}: give {folder_fields}")
        if not name:
            raise StageConfigError(
                f"{self.where}: field 'init.{arch_field}' is empty and {folder_fields} names "
                f"no existing folder; a plan needs one of them (an architecture name: "
                f"{', '.join(architectures.names())})")
        try:
            saved = architectures.get(name)
        except architectures.UnknownArchitecture as error:
            raise StageConfigError(f"{self.where}: field 'init.{arch_field}': "
                                   f"{error.args[0]}") from None
        if saved["model"] != model:
            raise StageConfigError(f"{self.where}: field 'init.{arch_field}' = {name!r} is a "
                                   f"{saved['model']!r} architecture, expected {model!r}")
        return saved


# --- VPiT (adapter, instruct) ---------------------------------------------------------------

class VPiTObjective(Objective):
    """The MetaMorph model with the VPiT loss; see the kinds in the module docstring."""
    batch_keys = ("tokens", "positions", "segment_ids", "text_targets", "text_mask",
                  "image_index", "vision_mask", "vision_target_index", "images")

    def __init__(self, stage, name, previous_dir, folders: Folders = RUN):
        super().__init__(stage, name, previous_dir, folders)
        from metamorph_jax.models import metamorph
        from metamorph_jax.models.llama import LlamaConfig
        from metamorph_jax.models.siglip import SiglipConfig
        init = stage.init
        runtime = dict(dtype=stage.dtype, param_dtype="float32", remat_policy=stage.remat_policy,
                       platform=folders.platform)
        model_dir = self.initial_dir("model_dir")
        if model_dir is None and init.get("from_previous", False):
            if previous_dir is None and not self.planning:   # a plan may plan it alone
                raise StageConfigError(f"{self.where}: field 'init.from_previous' is set but "
                                       "no stage runs before it")
            # a plan: the previous stage's result does not exist yet
            if not (self.planning and (previous_dir is None
                                       or not Path(previous_dir).is_dir())):
                model_dir = previous_dir
        self.model_dir = model_dir
        self.llm_dir = self.vision_dir = None
        if model_dir is not None or (self.planning and init.get("model_arch")):
            saved = self.saved_config(model_dir, "model_arch", "metamorph", "init.model_dir")
            if saved["model"] != "metamorph":
                raise StageConfigError(f"{self.where}: {model_dir} holds a {saved['model']!r} "
                                       "model, expected 'metamorph'")
            config = metamorph.MetaMorphConfig.from_dict(saved["config"])
            self.tokenizer_dir = (self.initial_dir("tokenizer_dir") or model_dir
                                  if model_dir is not None else None)
        else:
            self.llm_dir = self.initial_dir("llm_dir")
            self.vision_dir = self.initial_dir("vision_dir")
            if not self.planning and (self.llm_dir is None or self.vision_dir is None):
                raise StageConfigError(f"{self.where}: give init.model_dir (a MetaMorph folder), "
                                       "init.from_previous, or init.llm_dir and init.vision_dir")
            llm_saved = self.saved_config(self.llm_dir, "llm_arch", "llama", "init.llm_dir")
            vision_saved = self.saved_config(self.vision_dir, "vision_arch", "siglip",
                                             "init.vision_dir")
            llm = LlamaConfig.from_dict(llm_saved["config"])
            vision = SiglipConfig.from_dict(vision_saved["config"])
            vocab = llm.vocab_size
            config = metamorph.MetaMorphConfig(
                llm=llm.replace(vocab_size=vocab + metamorph.NUM_NEW_TOKENS), vision=vision,
                num_image_tokens=vision.num_visual_tokens,
                normalize_vision=vision.normalize_visual_tokens,
                image_start_id=vocab, image_end_id=vocab + 1)
            self.tokenizer_dir = self.initial_dir("tokenizer_dir") or self.llm_dir
        coef = stage.get("vision_coef")
        self.config = config.replace(
            llm=config.llm.replace(**runtime, **folders.llm_changes()),
            vision=config.vision.replace(dtype=stage.dtype, param_dtype="float32",
                                         platform=folders.platform, **folders.vision_changes()),
            **({} if coef is None else {"vision_coef": float(coef)}))
        self.model = metamorph.MetaMorph(self.config)
        self.tokenizer = self.ids = None
        if not self.planning:   # a plan needs no tokenizer (the vocabulary is the model's)
            self.tokenizer = pretrained.load_tokenizer(self.tokenizer_dir)
            self.ids = conv.add_image_tokens(self.tokenizer)
            want = (self.config.image_start_id, self.config.image_end_id)
            if (self.ids.image_start_id, self.ids.image_end_id) != want:
                raise StageConfigError(
                    f"{self.where}: the tokenizer in {self.tokenizer_dir} has <image_start>, "
                    f"<image_end> = {self.ids.image_start_id}, {self.ids.image_end_id}; the "
                    f"model uses {want[0]}, {want[1]} (its LLM's vocabulary plus two); use "
                    "the tokenizer the LLM was made with")
        self.template = stage.data.get("template", "llama3")
        # Precomputed tokens (data.visual_tokens) replace the images in every batch.
        self.token_store = token_store_of(stage, self.where)
        if self.token_store is not None:
            check_token_store(self.token_store, self.config.vision, self.where)
            self.batch_keys = tuple("visual_tokens" if key == "images" else key
                                    for key in VPiTObjective.batch_keys)

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        if self.kind == "adapter":
            return path[0] == "mm_projector"
        return path[0] != "vision_tower"

    def _split(self, params: Any) -> tuple[Any, Any]:
        from metamorph_jax.training.state import split
        return split(params, self.is_trainable)

    def boxed_parts(self):
        from metamorph_jax.models import metamorph
        boxed = jax.eval_shape(lambda: metamorph.init_params(self.config, jax.random.key(0)))
        trainable, frozen = self._split(boxed)
        if self.kind == "adapter":
            d = self.config.llm.hidden_size
            trainable[NEW_TOKEN_ROWS] = nn.LogicallyPartitioned(
                jax.ShapeDtypeStruct((metamorph.NUM_NEW_TOKENS, d), jnp.float32),
                (None, "embed"))
        return trainable, frozen

    def load_parts(self, trainable_shardings, frozen_shardings):
        from metamorph_jax.models import metamorph
        from metamorph_jax.models.siglip import SiglipConfig
        if self.model_dir is not None:
            params = pretrained.load_params(self.model_dir, dtype=np.float32)
        else:
            llm = pretrained.load_params(self.llm_dir, dtype=np.float32)
            vision = pretrained.load_params(self.vision_dir, dtype=np.float32)
            vision_config = SiglipConfig.from_dict(
                pretrained.read_model_config(self.vision_dir)["config"])
            llm_config = self.config.llm.replace(
                vocab_size=self.config.llm.vocab_size - metamorph.NUM_NEW_TOKENS)
            _, params = metamorph.from_pretrained_parts(
                llm, llm_config, vision, vision_config,
                jax.random.key(int(self.stage.init.get("seed", 0))))
            params = _host(params)
        trainable, frozen = self._split(params)
        if self.kind == "adapter":
            table = params["llm"]["embed_tokens"]["embedding"]
            start = self.config.image_start_id
            trainable[NEW_TOKEN_ROWS] = np.asarray(table[start:start + metamorph.NUM_NEW_TOKENS])
        return place(trainable, trainable_shardings), place(frozen, frozen_shardings)

    def model_params(self, trainable, frozen):
        from metamorph_jax.training.state import merge
        if self.kind != "adapter":
            return merge(trainable, frozen)
        rows = trainable[NEW_TOKEN_ROWS]
        params = merge({k: v for k, v in trainable.items() if k != NEW_TOKEN_ROWS}, frozen)
        table = params["llm"]["embed_tokens"]["embedding"]
        table = jax.lax.dynamic_update_slice(table, rows.astype(table.dtype),
                                             (self.config.image_start_id, 0))
        llm = dict(params["llm"], embed_tokens=dict(params["llm"]["embed_tokens"],
                                                    embedding=table))
        return dict(params, llm=llm)

    def batches(self, data, seed_offset: int = 0):
        sources, config = data_from_config(data, f"{self.where}: data")
        if seed_offset:
            config = dataclasses.replace(config, seed=config.seed + seed_offset)
        if config.num_image_tokens != self.config.num_image_tokens:
            raise StageConfigError(f"{self.where}: field 'data.num_image_tokens' = "
                                   f"{config.num_image_tokens}, the model's is "
                                   f"{self.config.num_image_tokens}")
        if config.image_size != self.config.vision.image_size:
            raise StageConfigError(f"{self.where}: field 'data.image_size' = {config.image_size}, "
                                   f"the vision tower's is {self.config.vision.image_size}")
        return pipeline.make_iterator(sources, self.tokenizer, self.ids, config)

    def batch_shapes(self, data, rows):
        _, config = data_from_config(data, f"{self.where}: data")
        shapes = {key: ((rows, config.seq_len), np.int32) for key in self.batch_keys
                  if key not in ("images", "visual_tokens")}
        if self.token_store is not None:
            shapes["visual_tokens"] = ((rows, config.max_images_per_row,
                                        *self.token_store.shape), self.token_store.dtype)
            return shapes
        size = config.image_size
        shapes["images"] = ((rows, config.max_images_per_row, size, size, 3),
                            np.dtype(config.image_dtype))
        return shapes

    def normalizers(self, batch):
        return {"text_tokens": jnp.sum(batch["text_mask"] > 0, dtype=jnp.float32),
                "vision_tokens": jnp.sum(batch["vision_mask"] > 0, dtype=jnp.float32)}

    def loss(self, params, batch, normalizers, rng):
        from metamorph_jax.training.vpit_loss import vpit_loss_sums
        sums = vpit_loss_sums(self.model, params, batch, self.loss_chunk_tokens,
                              unroll_chunks=self.folders.unroll)
        loss = (_safe_mean(sums["text_loss_sum"], normalizers["text_tokens"])
                + self.config.vision_coef * _safe_mean(sums["vision_loss_sum"],
                                                       normalizers["vision_tokens"]))
        return loss, sums

    def summarize(self, sums):
        from metamorph_jax.training.vpit_loss import vpit_loss_mean
        return vpit_loss_mean(sums, self.config.vision_coef)

    def export(self, out_dir, trainable, frozen):
        # sharded global arrays: every process writes its shards of the folder
        params = jax.jit(self.model_params)(trainable, frozen)
        config = self.config.replace(
            llm=self.config.llm.replace(dtype="float32", remat_policy="none"),
            vision=self.config.vision.replace(dtype="float32"))
        pretrained.save_pretrained(out_dir, "metamorph", config.to_dict(), params,
                                   chat_template=self.template)
        _save_tokenizer(self.tokenizer, out_dir)


class AdapterObjective(VPiTObjective):
    kind = "adapter"


class InstructObjective(VPiTObjective):
    kind = "instruct"


# --- text ------------------------------------------------------------------------------------

class TextObjective(Objective):
    """The LLM alone on text-only records (the old text stage)."""
    kind = "text"
    batch_keys = ("tokens", "positions", "segment_ids", "text_targets", "text_mask")

    def __init__(self, stage, name, previous_dir, folders: Folders = RUN):
        super().__init__(stage, name, previous_dir, folders)
        from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM
        llm_dir = self.initial_dir("llm_dir")
        if llm_dir is None and stage.init.get("from_previous", False):
            if not (self.planning and (previous_dir is None or not Path(previous_dir).is_dir())):
                llm_dir = previous_dir
        if llm_dir is None and not self.planning:
            raise StageConfigError(f"{self.where}: give init.llm_dir (a llama model folder) or "
                                   "init.from_previous")
        self.llm_dir = llm_dir
        self.tokenizer_dir = self.initial_dir("tokenizer_dir") or llm_dir
        self.saved = self.saved_config(llm_dir, "llm_arch", "llama", "init.llm_dir")
        if self.saved["model"] != "llama":
            raise StageConfigError(f"{self.where}: {llm_dir} holds a {self.saved['model']!r} "
                                   "model, expected 'llama'")
        stored = LlamaConfig.from_dict(self.saved["config"])
        changes = dict(dtype=stage.dtype, param_dtype="float32", remat_policy=stage.remat_policy,
                       platform=folders.platform)
        scan = stage.get("scan_layers")
        if scan is not None:
            changes["scan_layers"] = bool(scan)
        self.stored_scan = stored.scan_layers
        self.model = LlamaForCausalLM(stored.replace(**changes, **folders.llm_changes()))
        self.tokenizer = None
        if not self.planning:
            self.tokenizer = pretrained.load_tokenizer(self.tokenizer_dir)
            pretrained.check_vocab(self.model.config.vocab_size, self.tokenizer, llm_dir,
                                   self.tokenizer_dir)
        self.template = stage.data.get("template", "llama3")

    def boxed_parts(self):
        from metamorph_jax.models.llama import abstract_boxed_params
        return abstract_boxed_params(self.model), {}

    def load_parts(self, trainable_shardings, frozen_shardings):
        from metamorph_jax.models.llama import with_layer_layout
        params = pretrained.load_params(self.llm_dir, dtype=np.float32)
        params = with_layer_layout(params, self.model.config.num_layers,
                                   self.model.config.scan_layers)
        return place(_host(params), trainable_shardings), {}

    def batches(self, data, seed_offset: int = 0):
        from metamorph_jax.data.text_records import text_batches
        sources, config = data_from_config(data, f"{self.where}: data")
        if seed_offset:
            config = dataclasses.replace(config, seed=config.seed + seed_offset)
        return text_batches(sources, self.tokenizer, config)

    def check_batch(self, batch):
        from metamorph_jax.data.text_records import check_text_only
        check_text_only(batch)

    def batch_shapes(self, data, rows):
        _, config = data_from_config(data, f"{self.where}: data")
        return {key: ((rows, config.seq_len), np.int32) for key in self.batch_keys}

    def normalizers(self, batch):
        return {"text_tokens": jnp.sum(batch["text_mask"] > 0, dtype=jnp.float32)}

    def loss(self, params, batch, normalizers, rng):
        from metamorph_jax.training.text_step import text_loss_sum
        total, count = text_loss_sum(self.model, params, batch, self.loss_chunk_tokens,
                                     unroll_chunks=self.folders.unroll)
        return _safe_mean(total, normalizers["text_tokens"]), {"text_loss_sum": total,
                                                                "text_tokens": count}

    def summarize(self, sums):
        text = _safe_mean(sums["text_loss_sum"], sums["text_tokens"])
        return text, {"loss": text, "text_loss": text, "text_tokens": sums["text_tokens"]}

    def export(self, out_dir, trainable, frozen):
        from metamorph_jax.models.llama import with_layer_layout
        params = with_layer_layout(_host(trainable), self.model.config.num_layers,
                                   self.stored_scan)
        pretrained.save_pretrained(out_dir, "llama", self.saved["config"], params,
                                   hf_config=self.saved.get("hf_config"),
                                   chat_template=self.template)
        _save_tokenizer(self.tokenizer, out_dir)


# --- decoder ----------------------------------------------------------------------------------

class DecoderObjective(Objective):
    """Projector + UNet of the visualiser on real images; see the module docstring."""
    kind = "decoder"
    # The tower's own input (data/image_batches.py), or "tokens" [B, num_tokens, C] with a
    # token store (a batch that brings "tokens", e.g. in tests, also skips the tower).
    batch_keys = ("images", "tower_images")

    def __init__(self, stage, name, previous_dir, folders: Folders = RUN):
        super().__init__(stage, name, previous_dir, folders)
        from metamorph_jax.models.noise_schedule import NoiseSchedule
        from metamorph_jax.models.siglip import SiglipConfig, SiglipVisionModel
        from metamorph_jax.models.visualizer import Visualizer, VisualizerConfig
        from metamorph_jax.training.decoder_step import DECODER_RULES
        self.rules = DECODER_RULES
        for field in ("model", "noise", "cfg_prob"):
            if field not in stage:
                raise StageConfigError(f"{self.where}: the decoder stage needs field {field!r}")
        model_fields = stage.model.to_dict() if hasattr(stage.model, "to_dict") else dict(stage.model)
        try:
            self.model_config = VisualizerConfig.from_dict(model_fields)
        except (TypeError, ValueError) as error:
            raise StageConfigError(f"{self.where}: field 'model': {error}") from None
        self.model_fields = model_fields
        self.model = Visualizer(self.model_config, dtype=jnp.dtype(stage.dtype),
                                remat=stage.remat_policy not in ("none", None, ""),
                                platform=folders.platform)
        try:
            self.noise = NoiseSchedule(**dict(stage.noise))
        except (TypeError, ValueError) as error:
            raise StageConfigError(f"{self.where}: field 'noise': {error}") from None
        self.cfg_prob = float(stage.cfg_prob)
        if not 0.0 <= self.cfg_prob <= 1.0:
            raise StageConfigError(f"{self.where}: field 'cfg_prob' = {self.cfg_prob} must be in "
                                   "[0, 1]")
        self.vision_dir = self.initial_dir("vision_dir")
        if self.vision_dir is None and not self.planning:
            raise StageConfigError(f"{self.where}: field 'init.vision_dir' (the SigLIP folder "
                                   "whose tokens condition the decoder) is missing")
        vision_config = SiglipConfig.from_dict(self.saved_config(
            self.vision_dir, "vision_arch", "siglip", "init.vision_dir")["config"])
        self.vision_config = vision_config.replace(dtype=stage.dtype, param_dtype="float32",
                                                   platform=folders.platform,
                                                   **folders.vision_changes())
        if (self.vision_config.num_visual_tokens, self.vision_config.hidden_size) != \
                (self.model_config.num_tokens, self.model_config.token_dim):
            raise StageConfigError(
                f"{self.where}: field 'model': num_tokens, token_dim = "
                f"{self.model_config.num_tokens}, {self.model_config.token_dim}, the SigLIP "
                f"tower in {self.vision_dir} gives {self.vision_config.num_visual_tokens}, "
                f"{self.vision_config.hidden_size}")
        self.tower = SiglipVisionModel(self.vision_config)
        # Precomputed tokens (data.visual_tokens) condition the UNet in place of the tower.
        self.token_store = token_store_of(stage, self.where)
        if self.token_store is not None:
            check_token_store(self.token_store, self.vision_config, self.where)
            self.batch_keys = ("images", "tokens")
        self.decoder_dir = self.initial_dir("model_dir")
        if self.decoder_dir is None and stage.init.get("from_previous", False) \
                and not self.planning:
            self.decoder_dir = previous_dir
        self.unet_dir = self.initial_dir("unet_dir")
        self.vae_dir = self.initial_dir("vae_dir")

    def _boxed_visualizer(self):
        cfg = self.model_config
        size = cfg.image_size
        channels = cfg.image_channels
        images = jnp.zeros((1, size, size, channels), jnp.float32)
        tokens = jnp.zeros((1, cfg.num_tokens, cfg.token_dim), jnp.float32)
        return jax.eval_shape(lambda: self.model.init(jax.random.key(0), images,
                                                      jnp.zeros((1,), jnp.int32), tokens))["params"]

    def boxed_parts(self):
        from metamorph_jax.models import siglip
        visualizer = dict(self._boxed_visualizer())
        tower = jax.eval_shape(lambda: siglip.init_params(self.vision_config, jax.random.key(0)))
        trainable = {k: visualizer[k] for k in ("projector", "unet")}
        frozen = {k: v for k, v in visualizer.items() if k not in trainable}
        frozen["siglip"] = tower
        return trainable, frozen

    def load_parts(self, trainable_shardings, frozen_shardings):
        from metamorph_jax.training.decoder_step import check_same_tree
        if self.decoder_dir is not None:
            params = pretrained.load_params(self.decoder_dir, dtype=np.float32)
        else:
            cfg = self.model_config
            size = cfg.image_size
            channels = cfg.image_channels
            # An RBG key: the UNet's init compiles several times faster than with threefry.
            rng = jax.random.key(int(self.stage.init.get("seed", 0)), impl="unsafe_rbg")
            params = _host(nn.unbox(jax.jit(lambda r: self.model.init(
                r, jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, cfg.num_tokens, cfg.token_dim)))["params"])(rng)))
        params = dict(params)
        if self.unet_dir is not None:
            unet = pretrained.load_params(self.unet_dir, dtype=np.float32)
            check_same_tree("unet", unet, params["unet"])
            params["unet"] = unet
        if self.vae_dir is not None:
            if "vae" not in params:
                raise StageConfigError(f"{self.where}: field 'init.vae_dir' is set, but the "
                                       "decoder config is pixel-space (model.vae is None)")
            vae = pretrained.load_params(self.vae_dir, dtype=np.float32)
            check_same_tree("vae", vae, params["vae"])
            params["vae"] = vae
        trainable = {k: params[k] for k in ("projector", "unet")}
        frozen = {k: v for k, v in params.items() if k not in trainable}
        frozen["siglip"] = pretrained.load_params(self.vision_dir, dtype=np.float32)
        return place(trainable, trainable_shardings), place(frozen, frozen_shardings)

    def batches(self, data, seed_offset: int = 0):
        from metamorph_jax.data.image_batches import image_batches
        sources, config = data_from_config(data, f"{self.where}: data")
        if seed_offset:
            config = dataclasses.replace(config, seed=config.seed + seed_offset)
        if config.image_size != self.model_config.image_size:
            raise StageConfigError(f"{self.where}: field 'data.image_size' = {config.image_size}, "
                                   f"the decoder's model.image_size is "
                                   f"{self.model_config.image_size}")
        return image_batches(sources, config, self.vision_config.image_size)

    def tokens_in(self, batch):
        return int(batch["images"].shape[0]) * self.model_config.num_tokens

    def batch_shapes(self, data, rows):
        _, config = data_from_config(data, f"{self.where}: data")
        size = config.image_size
        shapes = {"images": ((rows, size, size, 3), np.float32)}
        if self.token_store is not None:
            shapes["tokens"] = ((rows, *self.token_store.shape), self.token_store.dtype)
        else:
            tower = self.vision_config.image_size
            shapes["tower_images"] = ((rows, tower, tower, 3), np.float32)
        return shapes

    def normalizers(self, batch):
        return {"micro_batches": jnp.asarray(batch["images"].shape[0], jnp.float32)}

    def visual_tokens(self, frozen, images):
        """The tower's tokens of its own input (batch["tower_images"], made from the file
        at the tower's size: never the decoder's cropped pixels resized)."""
        size = self.vision_config.image_size
        if images.shape[1:3] != (size, size):
            raise ValueError(f"{self.where}: the tower's images are {images.shape[1:3]}, "
                             f"the tower takes {size} x {size}")
        tokens = self.tower.apply({"params": frozen["siglip"]}, images,
                                  method=self.tower.visual_tokens)
        return jax.lax.stop_gradient(tokens)

    def loss(self, params, batch, normalizers, rng):
        from metamorph_jax.training.decoder_step import decoder_loss
        frozen = {k: v for k, v in params.items() if k not in ("projector", "unet", "siglip")}
        trained = {k: params[k] for k in ("projector", "unet")}
        # Tokens given with the batch (tests, precomputed sets) stand in for the tower's.
        tokens = (jax.lax.stop_gradient(jnp.asarray(batch["tokens"], jnp.float32))
                  if "tokens" in batch else self.visual_tokens(params, batch["tower_images"]))
        mean, _ = decoder_loss(self.model, trained, frozen,
                               {"images": batch["images"], "tokens": tokens}, rng,
                               jnp.asarray(self.noise.alphas_cumprod()), self.cfg_prob,
                               prediction_type=self.noise.prediction_type)
        return mean / normalizers["micro_batches"], {"mse_sum": mean, "micro_batches": 1.0}

    def summarize(self, sums):
        loss = _safe_mean(sums["mse_sum"], sums["micro_batches"])
        return loss, {"loss": loss}

    def export(self, out_dir, trainable, frozen):
        params = {**trainable, **{k: v for k, v in frozen.items() if k != "siglip"}}
        pretrained.save_pretrained(out_dir, "visualizer",
                                   {"model": self.model_fields, "noise": dict(self.stage.noise),
                                    "vision_dir": str(self.vision_dir)}, params)


# --- tower ------------------------------------------------------------------------------------

TOWER_MODEL_FIELDS = {
    "vision": "SiglipConfig fields of a random tower (used only without init.vision_dir)",
    "text": "SiglipTextConfig fields of the text tower; vocab_size defaults to the "
            "tokenizer's, max_position_embeddings to data.seq_len, projection_size to the "
            "vision tower's width",
    "logit_scale_init": "t' (t = exp(t')); SigLIP's log 10",
    "logit_bias_init": "b; SigLIP's -10",
}
TEXT_TOWER_DIR = "text_tower"     # beside the exported vision tower, for reference
LOGITS_FILE = "logits.json"       # the learned logit scale and bias, in TEXT_TOWER_DIR


class TowerObjective(Objective):
    """SigLIP's sigmoid image-text pretraining of the vision tower; see the module docstring.

    init.vision_dir: the siglip folder to start from (e.g. tiny.ensure_assets' random
    tower); without it, a random tower of model.vision. A folder saved without the
    attention-pool head (use_head false) gets a fresh one: the loss pools images with it.
    init.tokenizer_dir: the captions' tokenizer. Every parameter trains; nothing is frozen.
    """
    kind = "tower"
    batch_keys = ("images", "input_ids")

    def __init__(self, stage, name, previous_dir, folders: Folders = RUN):
        super().__init__(stage, name, previous_dir, folders)
        import math
        from metamorph_jax.models import siglip_text
        from metamorph_jax.models.siglip import SiglipConfig
        model = stage.get("model") or {}
        model = dict(model.to_dict() if hasattr(model, "to_dict") else model)
        unknown = sorted(set(model) - set(TOWER_MODEL_FIELDS))
        if unknown:
            raise StageConfigError(f"{self.where}: field 'model' has unknown field(s) {unknown}; "
                                   f"the tower stage's are {sorted(TOWER_MODEL_FIELDS)}")
        self.vision_dir = self.initial_dir("vision_dir")
        try:
            if self.vision_dir is not None:
                vision = SiglipConfig.from_dict(self.saved_config(
                    self.vision_dir, "vision_arch", "siglip", "init.vision_dir")["config"])
            else:
                vision = SiglipConfig(**dict(model.get("vision") or {}))
        except (TypeError, ValueError) as error:
            raise StageConfigError(f"{self.where}: field 'model.vision': {error}") from None
        self.had_head = vision.use_head
        self.vision_config = vision.replace(use_head=True, dtype=stage.dtype,
                                            param_dtype="float32", platform=folders.platform,
                                            **folders.vision_changes())
        self.tokenizer = None
        tokenizer_dir = self.initial_dir("tokenizer_dir")
        if tokenizer_dir is None and not self.planning:
            raise StageConfigError(f"{self.where}: field 'init.tokenizer_dir' (the captions' "
                                   "tokenizer) is missing")
        self.tokenizer_dir = tokenizer_dir
        text = dict(model.get("text") or {})
        if tokenizer_dir is not None:
            self.tokenizer = pretrained.load_tokenizer(tokenizer_dir)
            text.setdefault("vocab_size", len(self.tokenizer))
            text.setdefault("pad_token_id", self.tokenizer.pad_token_id
                            if self.tokenizer.pad_token_id is not None
                            else self.tokenizer.eos_token_id)
            text.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            text.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        text.setdefault("max_position_embeddings", int(stage.data.seq_len))
        text.setdefault("projection_size", self.vision_config.hidden_size)
        text.update(dtype=stage.dtype, param_dtype="float32", remat_policy=stage.remat_policy,
                    platform=folders.platform)
        try:
            self.text_config = siglip_text.SiglipTextConfig(**text)
        except (TypeError, ValueError) as error:
            raise StageConfigError(f"{self.where}: field 'model.text': {error}") from None
        if self.text_config.vocab_size < (len(self.tokenizer) if self.tokenizer else 0):
            raise StageConfigError(f"{self.where}: field 'model.text.vocab_size' = "
                                   f"{self.text_config.vocab_size}, the tokenizer in "
                                   f"{tokenizer_dir} has {len(self.tokenizer)} tokens")
        try:
            self.model = siglip_text.SiglipDualEncoder(
                self.vision_config, self.text_config,
                logit_scale_init=float(model.get("logit_scale_init", math.log(10.0))),
                logit_bias_init=float(model.get("logit_bias_init", -10.0)))
            self._boxed = jax.eval_shape(self._init, jax.random.key(0))
        except ValueError as error:
            raise StageConfigError(f"{self.where}: field 'model': {error}") from None

    def _init(self, rng):
        size = self.vision_config.image_size
        return self.model.init(rng, jnp.zeros((1, size, size, self.vision_config.num_channels)),
                               jnp.zeros((1, self.text_config.max_position_embeddings),
                                         jnp.int32))["params"]

    def boxed_parts(self):
        return dict(self._boxed), {}

    def load_parts(self, trainable_shardings, frozen_shardings):
        from metamorph_jax.training.decoder_step import check_same_tree
        rng = jax.random.key(int(self.stage.init.get("seed", 0)))
        params = dict(_host(nn.unbox(jax.jit(self._init)(rng))))
        if self.vision_dir is not None:
            vision = dict(pretrained.load_params(self.vision_dir, dtype=np.float32))
            if not self.had_head:   # a fresh attention-pool head for the loss
                vision["head"] = params["vision_model"]["head"]
            check_same_tree("vision_model", vision, params["vision_model"])
            params["vision_model"] = vision
        return place(params, trainable_shardings), {}

    def batches(self, data, seed_offset: int = 0):
        from metamorph_jax.data.caption_pairs import caption_batches
        sources, config = data_from_config(data, f"{self.where}: data")
        if seed_offset:
            config = dataclasses.replace(config, seed=config.seed + seed_offset)
        if config.image_size != self.vision_config.image_size:
            raise StageConfigError(f"{self.where}: field 'data.image_size' = {config.image_size}, "
                                   f"the vision tower's is {self.vision_config.image_size}")
        if config.seq_len > self.text_config.max_position_embeddings:
            raise StageConfigError(f"{self.where}: field 'data.seq_len' = {config.seq_len}, the "
                                   "text tower's max_position_embeddings is "
                                   f"{self.text_config.max_position_embeddings}")
        return caption_batches(sources, self.tokenizer, config)

    def batch_shapes(self, data, rows):
        _, config = data_from_config(data, f"{self.where}: data")
        size = config.image_size
        return {"images": ((rows, size, size, self.vision_config.num_channels), np.float32),
                "input_ids": ((rows, config.seq_len), np.int32)}

    def tokens_in(self, batch):
        return int(np.size(batch["input_ids"]))

    def normalizers(self, batch):
        # [micro-batches, rows, ...]: the pairs of the whole accumulated batch
        shape = batch["input_ids"].shape
        return {"pairs": jnp.asarray(shape[0] * shape[1], jnp.float32)}

    def loss(self, params, batch, normalizers, rng):
        from metamorph_jax.training import contrastive_loss as closs
        logits = self.model.apply({"params": params}, batch["images"],
                                  batch["input_ids"])["logits"]
        total = closs.sigmoid_loss_sum(logits)
        rows = jnp.asarray(logits.shape[0], jnp.float32)
        sums = {"loss_sum": total, "pairs": rows, "micro_batches": 1.0,
                "pair_correct": closs.pair_accuracy(logits) * rows * rows,
                "pair_count": rows * rows,
                "retrieval_correct": closs.retrieval_accuracy(logits) * rows,
                "logit_scale": jnp.exp(params["logit_scale"][0]),
                "logit_bias": params["logit_bias"][0]}
        return total / normalizers["pairs"], sums

    def summarize(self, sums):
        loss = _safe_mean(sums["loss_sum"], sums["pairs"])
        return loss, {"loss": loss,
                      "pair_accuracy": _safe_mean(sums["pair_correct"], sums["pair_count"]),
                      "retrieval_accuracy": _safe_mean(sums["retrieval_correct"], sums["pairs"]),
                      "temperature": _safe_mean(sums["logit_scale"], sums["micro_batches"]),
                      "bias": _safe_mean(sums["logit_bias"], sums["micro_batches"])}

    def export(self, out_dir, trainable, frozen):
        """out_dir: the vision tower as a `siglip` folder (with its head; a VPiT stage's
        init.vision_dir); out_dir/text_tower: the text tower (`siglip_text`), its tokenizer
        and logits.json (the learned t and b)."""
        import json
        vision = self.vision_config.replace(dtype="float32", remat_policy="none")
        pretrained.save_pretrained(out_dir, "siglip", vision.to_dict(),
                                   trainable["vision_model"], hf_config=vision.to_hf())
        text = self.text_config.replace(dtype="float32", remat_policy="none")
        text_dir = Path(out_dir) / TEXT_TOWER_DIR
        pretrained.save_pretrained(text_dir, "siglip_text", text.to_dict(),
                                   trainable["text_model"], hf_config=text.to_hf())
        scalars = _host({k: trainable[k] for k in ("logit_scale", "logit_bias")})
        if jax.process_index() == 0:
            (text_dir / LOGITS_FILE).write_text(json.dumps(
                {"logit_scale": float(scalars["logit_scale"][0]),
                 "logit_bias": float(scalars["logit_bias"][0])}) + "\n")
        _save_tokenizer(self.tokenizer, text_dir)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "adapter": AdapterObjective, "instruct": InstructObjective, "text": TextObjective,
    "decoder": DecoderObjective, "tower": TowerObjective,
}


def build(stage, name: str, previous_dir: Path | None, folders: Folders = RUN) -> Objective:
    """The stage's objective; `folders` says how it reads its model folders (Folders: a
    run's, or a plan's that falls back to the stage's named architectures)."""
    kind = stage.get("kind")
    if kind not in OBJECTIVES:
        raise StageConfigError(f"stage {name!r}: field 'kind' = {kind!r} is not one of {KINDS}")
    return OBJECTIVES[kind](stage, name, previous_dir, folders)
