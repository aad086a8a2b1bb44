"""The grain pipeline: record files -> packed, per-process batches with resumable state.

    sources (JSONL / JSON / ArrayRecord / TFDS)                       sources.py
      -> num_epochs k: the sources concatenated, seeded shuffle (reshuffled each epoch),
                       k epochs: every record of every source read exactly k times
         num_epochs None: per source a seeded shuffle repeated forever, the sources
                       sampled by `weight` (grain's weighted mixture)
      -> this process's shard: elements process_index, +process_count, ...
      -> parse + render + load images  (worker processes)            conversation.py, images.py
      -> count bad records, first-fit pack, batch                    packing.py, bad_records.py

The returned iterator (`make_iterator`) is a grain `DatasetIterator`: `get_state()` /
`set_state()` give and take JSON-able state, and Orbax saves it through grain's handler::

    import grain, orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator), ...))
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(iterator), ...))

A restored iterator yields exactly the batches the saved one would have yielded next
(same sources, config and worker count).

Epochs and processes: with `num_epochs=k` each process reads elements i, i+P, i+2P, ...
of the k shuffled epochs laid end to end, so across P processes every record is read
exactly once per epoch. Processes may end with different batch counts (packing depends on
lengths); with `num_epochs=None` the data never ends. `weight` applies only there: with a
finite `num_epochs` the sources are read as one concatenation (the paper trains on the
concatenation), and unequal weights are an error naming the field.

Bad records are counted per reason and per source, reported every `report_every` batches
and at the end (`iterator.bad_records.summary()`); `strict=True` raises at the first one,
naming its file and line. A source that loses more than `max_bad_fraction` of its records
(default 1%) stops the pipeline with an error naming the source, the reasons and the counts
(when it is judged: `bad_records.BadRecordLog.check`).

Videos are sampled at `video_fps`; a clip that would give more frames than
`video_frame_budget()` is subsampled to that many, spread evenly over the whole clip
(images.sample_frames), so long clips are read, not refused as too_many_images.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import token_store
from metamorph_jax.data.bad_records import bad_marker
from metamorph_jax.data.packing import PackedBatchDataset, PackedBatchIterator
from metamorph_jax.data.sources import open_source
from metamorph_jax.input_errors import BadInput


@dataclasses.dataclass(frozen=True)
class Source:
    """One record file (or `tfds:name/split`) and its share of the mixture."""
    path: str
    weight: float = 1.0              # sampling share where num_epochs is None; with a finite
                                     # num_epochs all sources must have the same weight
    image_root: str | None = None   # default: the record file's folder
    tfds_data_dir: str | None = None  # for "tfds:name/split" paths


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 4096
    batch_size: int = 8                  # rows per process per batch
    num_image_tokens: int = 64           # visual positions per image
    image_size: int = 384                # square input resolution of the vision encoder
    image_dtype: str = "float32"         # "float32": normalised; "uint8": resized only, 4x
                                         # smaller; normalise with images.normalize(x, jnp)
    max_images_per_row: int = 16
    template: str = "llama3"             # see conversation.TEMPLATES
    seed: int = 0
    num_epochs: int | None = 1           # k: every record of every source read k times;
                                         # None: repeat forever, sources sampled by weight
    worker_count: int = 0                # processes decoding images; 0 = in this process
    worker_buffer_size: int = 4          # samples buffered per worker
    read_threads: int = 1                # threads per process running the render/load map
    read_buffer_size: int = 16
    strict: bool = False
    max_bad_fraction: float = 0.01       # a source losing a larger share of its records is
                                         # an error (bad_records.py: when it is judged);
                                         # 1.0: never
    report_every: int = 100              # batches between bad-record reports
    video_fps: float = 1.0
    video_source_fps: float | None = None
    max_video_frames: int | None = None  # frames per clip; a longer clip is subsampled
                                         # evenly over its whole length; None: see
                                         # video_frame_budget()
    shard_index: int | None = None       # None: jax.process_index()
    shard_count: int | None = None       # None: jax.process_count()
    visual_tokens: str | None = None     # a token store (data/token_store.py): batches carry
                                         # its tokens [B, N, V, C] instead of images

    def video_frame_budget(self) -> int:
        """Frames a video is sampled to at most: `max_video_frames`, or by default as many
        as fit a row while leaving at least half of it to the text: min(max_images_per_row,
        seq_len // 2 // (num_image_tokens + 2)), at least 1 (each frame costs its visual
        positions plus <image_start> and <image_end>). Paper recipe: min(16, 4096 // 2 // 66)
        = 16 frames = 1056 of the 4096 positions."""
        if self.max_video_frames is not None:
            return self.max_video_frames
        per_frame = self.num_image_tokens + 2
        return max(1, min(self.max_images_per_row, self.seq_len // 2 // per_frame))


class SampleMaker:
    """Record element -> rendered sample with decoded images, or a bad-record marker.

    Runs inside grain's worker processes (it pickles: tokenizer, ids and config only).
    """
    lengths_only = False   # counting.SlotSampleMaker: placeholders in place of images

    def __init__(self, tokenizer, ids: conv.SpecialIds, config: DataConfig):
        self.tokenizer = tokenizer
        self.ids = ids
        self.config = config
        self._store = None   # opened on first use, in the process that reads

    def __getstate__(self):
        return dict(self.__dict__, _store=None)

    def stored_tokens(self, element: dict, conversation) -> np.ndarray:
        """The record's images as stored tokens [n, V, C]; an image without tokens is an
        error naming the record and the image (never dropped)."""
        if self._store is None:
            self._store = token_store.TokenStore(self.config.visual_tokens)
        store, where = self._store, element["where"]
        found = []
        for key, path, field in token_store.record_keys(
                conversation.image_paths, element["raw"], where):
            if key not in store:
                raise token_store.TokenStoreError(
                    f"{where}: field {field!r}: image {key!r} ({path}) has no tokens in "
                    f"{store.path}; encode this record file into the store "
                    "(python -m metamorph_jax.data.encode)")
            found.append(store[key])
        return (np.stack(found) if found else np.zeros((0,) + store.shape, store.dtype))

    def __call__(self, element: dict) -> dict:
        config = self.config
        where = element["where"]
        source = element.get("source", "?")   # the record file, for per-source accounting
        try:
            conversation = conv.parse_record(
                element["raw"], where=where, image_root=element["image_root"],
                video_fps=config.video_fps, video_source_fps=config.video_source_fps,
                max_video_frames=config.video_frame_budget())
            sample = conv.render(conversation, self.tokenizer, self.ids, template=config.template,
                                 num_image_tokens=config.num_image_tokens,
                                 max_length=config.seq_len, max_images=config.max_images_per_row)
        except conv.RecordError as error:
            return bad_marker(error.reason, error.where, error.message, source)
        record_id = f"{conversation.id} ({where})" if conversation.id != where else where
        if self.lengths_only:   # a counting pass (counting.py): image slots, no pixels
            return self.image_slots(sample, conversation, record_id, where)
        if config.visual_tokens:
            sample["record_id"] = record_id
            sample["visual_tokens"] = self.stored_tokens(element, conversation)
            return sample
        pixels = []
        for path in conversation.image_paths:
            try:
                if isinstance(path, np.ndarray):
                    from PIL import Image
                    image = Image.fromarray(path)
                    pixels.append(images_lib.resize_uint8(image, config.image_size)
                                  if config.image_dtype == "uint8"
                                  else images_lib.preprocess(image, config.image_size))
                else:
                    pixels.append(images_lib.load_image(path, config.image_size, config.image_dtype))
            except (images_lib.ImageError, TypeError, ValueError) as error:
                missing = isinstance(error, images_lib.ImageError) and error.reason == "file does not exist"
                return bad_marker("missing_image" if missing else "corrupt_image", where,
                                  str(error), source)
        size = config.image_size
        # Host-side provenance, carried through packing into the batch's `record_ids`.
        sample["record_id"] = record_id
        sample["source"] = source
        sample["images"] = (np.stack(pixels) if pixels
                            else np.zeros((0, size, size, 3), np.dtype(config.image_dtype)))
        return sample


def _shard(config: DataConfig) -> tuple[int, int]:
    if config.shard_index is not None and config.shard_count is not None:
        return config.shard_index, config.shard_count
    import jax
    return jax.process_index(), jax.process_count()


def finite_mixture_error(sources: Sequence[Source], config: DataConfig) -> str | None:
    """Why `sources` cannot be read as a finite concatenation, or None: with a finite
    `num_epochs` every record is read `num_epochs` times, so unequal weights (a sampling
    ratio) would be ignored; saying so beats ignoring them."""
    if config.num_epochs is None or len(sources) < 2:
        return None
    weights = [float(s.weight) for s in sources]
    if len(set(weights)) == 1:
        return None
    listed = ", ".join(f"{s.path}: {w:g}" for s, w in zip(sources, weights))
    return (f"field 'weight' differs between the sources ({listed}) while field "
            f"'num_epochs' = {config.num_epochs}: a finite stage reads every record of every "
            "source num_epochs times (weights do not apply); give every source the same "
            "weight, or set num_epochs to None to sample the sources by weight forever")


def record_dataset(sources: Sequence[Source], config: DataConfig) -> grain.MapDataset:
    """Shuffled, mixed, process-sharded record elements (before rendering).

    num_epochs None: each source shuffled and repeated forever, sampled by `weight`.
    num_epochs k: the sources concatenated, shuffled as one (reshuffled each epoch) and
    read k times, so every record of every source is read exactly k times."""
    if not sources:
        raise BadInput("no data sources given")
    problem = finite_mixture_error(sources, config)
    if problem:
        raise BadInput(problem)
    opened = []
    for source in sources:
        kwargs = {"data_dir": source.tfds_data_dir} if source.path.startswith("tfds:") else {}
        dataset = grain.MapDataset.source(open_source(source.path, source.image_root, **kwargs))
        if len(dataset) == 0:
            raise BadInput(f"{source.path}: the source holds no records")
        opened.append(dataset)
    if len(opened) == 1:
        dataset = opened[0].shuffle(seed=config.seed % 2**32)
        if config.num_epochs != 1:
            dataset = dataset.repeat(config.num_epochs)
    elif config.num_epochs is not None:
        # The concatenation, shuffled before repeat: a fresh order each epoch.
        dataset = grain.MapDataset.concatenate(opened).shuffle(seed=config.seed % 2**32)
        if config.num_epochs != 1:
            dataset = dataset.repeat(config.num_epochs)
    else:
        weights = [float(s.weight) for s in sources]
        if min(weights) <= 0:
            raise BadInput(f"source weights must be positive, got {weights}")
        dataset = grain.MapDataset.mix(
            [d.shuffle(seed=(config.seed + 7919 * index) % 2**32).repeat(None)
             for index, d in enumerate(opened)], weights)
    shard_index, shard_count = _shard(config)
    if not 0 <= shard_index < shard_count:
        raise BadInput(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    return dataset[shard_index::shard_count]


def source_records(sources: Sequence[Source]) -> list[int]:
    """The number of records in each source (opens them; reads no record)."""
    counts = []
    for source in sources:
        kwargs = {"data_dir": source.tfds_data_dir} if source.path.startswith("tfds:") else {}
        counts.append(len(open_source(source.path, source.image_root, **kwargs)))
    return counts


def _absl_flags_ready() -> None:
    # grain's multiprocessing reads absl flags; outside an absl app they are unparsed,
    # so take their defaults.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(sources: Sequence[Source], tokenizer, ids: conv.SpecialIds,
                  config: DataConfig, record_check=None) -> PackedBatchDataset:
    """The whole pipeline as a grain IterDataset of packed batches (see module docstring).

    record_check: optional map applied to each raw record before rendering (e.g. a stage
    that accepts only text records raises there, naming the file and line)."""
    if config.image_dtype not in ("float32", "uint8"):
        raise BadInput(f"image_dtype must be float32 or uint8, got {config.image_dtype!r}")
    if config.template not in conv.TEMPLATES:
        raise BadInput(f"unknown template {config.template!r}; choose from {conv.TEMPLATES}")
    if config.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise BadInput("template='tokenizer' but the tokenizer has no chat_template")
    if not 0 < config.max_bad_fraction <= 1:
        raise BadInput(f"data field max_bad_fraction must be in (0, 1], got "
                       f"{config.max_bad_fraction!r} (1.0: bad records are never an error)")
    if config.max_video_frames is not None and not (
            1 <= config.max_video_frames <= max(1, config.max_images_per_row)):
        raise BadInput(f"data field max_video_frames={config.max_video_frames} must be in "
                       f"1..max_images_per_row ({config.max_images_per_row}): a clip of more "
                       "frames never fits a row")
    token_shape = token_dtype = None
    if config.visual_tokens:
        store = token_store.TokenStore(config.visual_tokens)
        store.check(image_size=config.image_size, num_tokens=config.num_image_tokens,
                    where="data config field 'visual_tokens'")
        token_shape, token_dtype = store.shape, store.dtype
    dataset = record_dataset(sources, config)
    if record_check is not None:
        dataset = dataset.map(record_check)
    dataset = dataset.map(SampleMaker(tokenizer, ids, config))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                         prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        _absl_flags_ready()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return PackedBatchDataset(iterable, batch_size=config.batch_size, seq_len=config.seq_len,
                              max_images_per_row=config.max_images_per_row,
                              num_image_tokens=config.num_image_tokens,
                              image_size=config.image_size, image_dtype=config.image_dtype,
                              token_shape=token_shape, token_dtype=token_dtype,
                              strict=config.strict,
                              max_bad_fraction=config.max_bad_fraction,
                              report_every=config.report_every)


def make_iterator(sources: Sequence[Source], tokenizer, ids: conv.SpecialIds,
                  config: DataConfig, record_check=None) -> PackedBatchIterator:
    """An iterator of packed batches with get_state/set_state and `.bad_records`."""
    return iter(build_dataset(sources, tokenizer, ids, config, record_check))


def from_config(config) -> tuple[list[Source], DataConfig]:
    """(sources, DataConfig) from a mapping / ConfigDict with a "sources" list (path,
    weight, image_root, tfds_data_dir) and any DataConfig fields; unknown keys are an error."""
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    sources = [Source(**dict(s)) for s in values.pop("sources")]
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"unknown data config fields {unknown}; known: {sorted(known)}")
    return sources, DataConfig(**values)
