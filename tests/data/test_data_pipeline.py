"""The grain pipeline: packing invariants, determinism, exact resume through Orbax,
per-process sharding, mixtures, every source format and every bad-record reason."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import pipeline as P
from metamorph_jax.data import tasks
from metamorph_jax.data.bad_records import BadRecordError
from metamorph_jax.data.testing import build_tiny_tokenizer

N_RECORDS = 30
V = 4        # visual tokens per image
SIZE = 8     # image side
ID_WORDS = [f"r{i}" for i in range(N_RECORDS)]
BASE = dict(seq_len=64, batch_size=3, num_image_tokens=V, image_size=SIZE, max_images_per_row=3,
            read_threads=1, shard_index=0, shard_count=1)


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tiny_tokenizer(extra_words=ID_WORDS + ["bad"])
    return tokenizer, conv.add_image_tokens(tokenizer)


def make_record(i):
    """Record i: its answer holds the word r{i}; images vary (0, 1 prompt, 1 response, 2)."""
    kind = i % 4
    if kind == 0:
        return {"id": i, "conversations": [{"from": "human", "value": "hello " * (1 + i % 5)},
                                           {"from": "gpt", "value": f"r{i}"}]}
    if kind == 1:
        return {"id": i, "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": f"r{i} red"}]}
    if kind == 2:
        return {"id": i, "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": f"generate r{i}"}, {"from": "gpt", "value": f"r{i} here <image>"}]}
    return {"id": i, "images": [f"img{i}.png", f"img{i}b.png"], "conversations": [
        {"from": "human", "value": "<image> predict next frame"}, {"from": "gpt", "value": f"r{i} <image>"}]}


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    for i in range(N_RECORDS):
        for suffix in ("", "b"):
            pixels = rng.integers(0, 256, (SIZE + 3, SIZE + 5, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"img{i}{suffix}.png")
    records = [make_record(i) for i in range(N_RECORDS)]
    write_jsonl(root / "records.jsonl", records)
    return root, records


def config(**kw):
    return P.DataConfig(**{**BASE, **kw})


def all_batches(sources, tok, cfg):
    tokenizer, ids = tok
    iterator = P.make_iterator(sources, tokenizer, ids, cfg)
    batches = list(iterator)
    return batches, iterator


def segments(batch):
    """Yield (row, segment id, position slice) for every packed sample."""
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            yield row, s, slice(where[0], where[-1] + 1)


def record_word(tokenizer, batch, row, sl):
    words = [w for w in tokenizer.convert_ids_to_tokens(batch["tokens"][row, sl].tolist())
             if w in ID_WORDS]
    assert words, "every sample carries its id word"
    return int(words[0][1:])


def test_packing_invariants_and_images(data, tok):
    root, records = data
    tokenizer, ids = tok
    batches, _ = all_batches([P.Source(str(root / "records.jsonl"))], tok, config())
    seen = []
    for batch in batches:
        assert batch["images"].shape == (3, 3, SIZE, SIZE, 3)
        for row in range(3):
            seg = batch["segment_ids"][row]
            used = int(seg.max())
            # segments are contiguous runs 1..k followed by padding only
            runs = seg[seg > 0]
            assert np.all(np.diff(runs) >= 0) and np.all(seg[len(runs):] == 0)
            assert batch["image_valid"][row].sum() <= 3
            assert np.all(batch["text_mask"][row][seg == 0] == 0)
            assert np.all(batch["image_index"][row][seg == 0] == -1)
            assert np.all(batch["vision_mask"][row][seg == 0] == 0)
            n_images = int(batch["image_valid"][row].sum())
            assert np.all(batch["image_valid"][row][:n_images] == 1)
            assert batch["image_index"][row].max() < n_images * V
            if used == 0:
                assert np.all(batch["images"][row] == 0)
        image_cursor = {}
        for row, s, sl in segments(batch):
            i = record_word(tokenizer, batch, row, sl)
            seen.append(i)
            length = sl.stop - sl.start
            assert np.array_equal(batch["positions"][row, sl], np.arange(length))
            # targets never cross the segment end
            assert batch["text_mask"][row, sl.stop - 1] == 0
            assert np.array_equal(batch["text_targets"][row, sl.start:sl.stop - 1],
                                  batch["tokens"][row, sl.start + 1:sl.stop])
            # vision targets: the next position's visual token, inside this segment
            vm = np.flatnonzero(batch["vision_mask"][row, sl]) + sl.start
            assert np.all(vm + 1 < sl.stop)
            assert np.array_equal(batch["vision_target_index"][row, vm], batch["image_index"][row, vm + 1])
            # this sample's images sit where its image_index points, and are its files
            paths = [root / p for p in (records[i].get("images") or
                                        ([records[i]["image"]] if "image" in records[i] else []))]
            flat = batch["image_index"][row, sl]
            numbers = sorted(set(flat[flat >= 0] // V))
            assert len(numbers) == len(paths)
            for number, path in zip(numbers, paths):
                assert batch["image_valid"][row, number] == 1
                np.testing.assert_array_equal(batch["images"][row, number],
                                              images_lib.load_image(path, SIZE))
            # images of a row are laid out in sample order
            start = image_cursor.get(row, 0)
            assert numbers == list(range(start, start + len(paths)))
            image_cursor[row] = start + len(paths)
            # response images (kinds 2, 3) carry vision targets; prompt-only ones do not
            assert bool(len(vm)) == (i % 4 in (2, 3))
    assert sorted(seen) == list(range(N_RECORDS))  # one epoch: every record once


def ids_of(tok, batches):
    tokenizer, _ = tok
    return [record_word(tokenizer, b, row, sl) for b in batches for row, _, sl in segments(b)]


def test_deterministic_and_seeded(data, tok):
    root, _ = data
    sources = [P.Source(str(root / "records.jsonl"))]
    a, _ = all_batches(sources, tok, config(seed=1))
    b, _ = all_batches(sources, tok, config(seed=1))
    c, _ = all_batches(sources, tok, config(seed=2))
    threaded, _ = all_batches(sources, tok, config(seed=1, read_threads=3))
    assert_same(a, b)
    assert_same(a, threaded)  # reader threads do not change the order
    assert ids_of(tok, a) != ids_of(tok, c)


def test_epochs_reshuffle(data, tok):
    root, _ = data
    batches, _ = all_batches([P.Source(str(root / "records.jsonl"))], tok, config(num_epochs=2))
    seen = ids_of(tok, batches)
    assert sorted(seen) == sorted(list(range(N_RECORDS)) * 2)
    order = [e["where"] for e in P.record_dataset([P.Source(str(root / "records.jsonl"))], config(num_epochs=2))]
    first, second = order[:N_RECORDS], order[N_RECORDS:]
    assert sorted(first) == sorted(second) and first != second  # each epoch reshuffled


@pytest.mark.parametrize("processes", [2, 3])
def test_every_record_once_per_epoch_across_processes(data, tok, processes):
    root, _ = data
    sources = [P.Source(str(root / "records.jsonl"))]
    per_process = []
    for index in range(processes):
        batches, _ = all_batches(sources, tok, config(shard_index=index, shard_count=processes, num_epochs=2))
        per_process.append(ids_of(tok, batches))
    everything = sum(per_process, [])
    assert sorted(everything) == sorted(list(range(N_RECORDS)) * 2)
    # Before packing (which reorders within a batch), epoch by epoch: process i reads global
    # elements i, i+P, ...; each epoch's elements, over all processes, are every record once.
    by_epoch = {}
    for index in range(processes):
        shard = P.record_dataset(sources, config(shard_index=index, shard_count=processes, num_epochs=2))
        for k, element in enumerate(shard):
            epoch = (index + k * processes) // N_RECORDS
            by_epoch.setdefault(epoch, []).append(element["where"])
    assert sorted(by_epoch) == [0, 1]
    for wheres in by_epoch.values():
        assert sorted(wheres) == sorted(f"{root / 'records.jsonl'}:{line}" for line in range(1, N_RECORDS + 1))


def text_records(path, count, word):
    write_jsonl(path, [{"id": f"{word}{i}", "conversations": [
        {"from": "human", "value": "hello " * (1 + i % 3)}, {"from": "gpt", "value": word}]}
        for i in range(count)])
    return str(path)


@pytest.mark.parametrize("epochs,processes", [(1, 1), (2, 1), (1, 3)])
def test_finite_epochs_read_every_record_of_every_source(tmp_path, epochs, processes):
    """A 1000-record and a 10-record source with num_epochs=k: all 1010 records are read
    exactly k times (grain's weighted mixture stopped after 20), interleaved, each epoch in
    a fresh order, and the process shards split each epoch."""
    sources = [P.Source(text_records(tmp_path / "big.jsonl", 1000, "red")),
               P.Source(text_records(tmp_path / "small.jsonl", 10, "blue"))]
    reads = []
    for index in range(processes):
        reads += [e["where"] for e in P.record_dataset(sources, config(
            num_epochs=epochs, shard_index=index, shard_count=processes))]
    expected = [f"{s.path}:{line}" for s, n in zip(sources, (1000, 10)) for line in range(1, n + 1)]
    assert sorted(reads) == sorted(expected * epochs)
    if processes == 1:
        first = reads[:1010]
        small = [k for k, where in enumerate(first) if where.startswith(sources[1].path)]
        assert small[-1] - small[0] > 500   # shuffled together, not one source after the other
        if epochs == 2:
            assert sorted(reads[1010:]) == sorted(first) and reads[1010:] != first


def test_finite_epochs_with_unequal_weights_is_an_error_naming_the_field(tmp_path):
    sources = [P.Source(text_records(tmp_path / "a.jsonl", 5, "red"), weight=3.0),
               P.Source(text_records(tmp_path / "b.jsonl", 5, "blue"), weight=1.0)]
    with pytest.raises(ValueError, match="field 'weight' differs.*a.jsonl: 3.*'num_epochs' = 1"):
        P.record_dataset(sources, config(num_epochs=1))
    # repeating forever, the weights are the sampling shares
    assert len(P.record_dataset(sources, config(num_epochs=None))) > 10


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def orbax_round_trip(iterator_to_save, fresh_iterator, directory):
    import grain
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(directory)
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator_to_save)))
    manager.wait_until_finished()
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh_iterator)))
    manager.close()


def test_exact_resume_through_orbax(data, tok, tmp_path):
    root, _ = data
    tokenizer, ids = tok
    sources = [P.Source(str(root / "records.jsonl"))]
    cfg = config(num_epochs=None, seq_len=40)
    iterator = P.make_iterator(sources, tokenizer, ids, cfg)
    take(iterator, 3)
    orbax_round_trip(iterator, restored := P.make_iterator(sources, tokenizer, ids, cfg), tmp_path / "ckpt")
    assert_same(take(iterator, 6), take(restored, 6))
    # state is plain JSON and survives a second save mid-way
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)
    other = P.make_iterator(sources, tokenizer, ids, cfg)
    other.set_state(state)
    assert_same(expected, take(other, 4))


@pytest.mark.slow
def test_exact_resume_with_worker_processes(data, tok, tmp_path):
    root, _ = data
    tokenizer, ids = tok
    sources = [P.Source(str(root / "records.jsonl"))]
    cfg = config(num_epochs=None, worker_count=2, worker_buffer_size=2)
    reference = take(P.make_iterator(sources, tokenizer, ids, config(num_epochs=None)), 8)
    iterator = P.make_iterator(sources, tokenizer, ids, cfg)
    try:
        first = take(iterator, 3)
        restored = P.make_iterator(sources, tokenizer, ids, cfg)
        orbax_round_trip(iterator, restored, tmp_path / "ckpt")
        rest = take(restored, 5)
        assert_same(take(iterator, 5), rest)
        restored.close()
    finally:
        iterator.close()
    # grain's workers read interleaved slices and hand them back round-robin, so the
    # batches equal those of the single-process pipeline
    assert_same(reference, first + rest)


def test_mixture_weights(tmp_path, tok):
    for name, word in (("a", "red"), ("b", "blue")):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"conversations": [
            {"from": "human", "value": "hello"}, {"from": "gpt", "value": word}]} for _ in range(7)])
    tokenizer, ids = tok
    sources = [P.Source(str(tmp_path / "a.jsonl"), weight=3.0), P.Source(str(tmp_path / "b.jsonl"), weight=1.0)]
    iterator = P.make_iterator(sources, tokenizer, ids, config(num_epochs=None, batch_size=2, seq_len=32))
    batches = take(iterator, 50)
    words = [w for b in batches for w in tokenizer.convert_ids_to_tokens(
        b["text_targets"][b["text_mask"] == 1].tolist()) if w in ("red", "blue")]
    fraction = words.count("red") / len(words)
    assert abs(fraction - 0.75) < 0.03, fraction


def test_json_and_array_record_sources_match_jsonl(data, tok, tmp_path):
    root, records = data
    with open(tmp_path / "records.json", "w") as handle:
        json.dump(records, handle)
    tasks.write_records(records, tmp_path / "records.array_record")
    reference, _ = all_batches([P.Source(str(root / "records.jsonl"))], tok, config())
    for name in ("records.json", "records.array_record"):
        batches, _ = all_batches([P.Source(str(tmp_path / name), image_root=str(root))], tok, config())
        # the same records in the same order; only their provenance (file:line) differs
        ids = lambda bs: [[r.split(" (")[0] for r in row] for b in bs for row in b["record_ids"]]  # noqa: E731
        assert ids(reference) == ids(batches)
        strip = lambda bs: [{k: v for k, v in b.items() if k != "record_ids"} for b in bs]  # noqa: E731
        assert_same(strip(reference), strip(batches))


BAD_LINES = {
    "malformed_json": '{"conversations": [',
    "bad_field": {"conversations": "nope"},
    "unknown_role": {"conversations": [{"from": "robot", "value": "bad"}]},
    "image_count_mismatch": {"image": "img0.png", "conversations": [
        {"from": "human", "value": "bad"}, {"from": "gpt", "value": "bad"}]},
    "missing_image": {"image": "nope.png", "conversations": [
        {"from": "human", "value": "<image> bad"}, {"from": "gpt", "value": "bad"}]},
    "corrupt_image": {"image": "corrupt.png", "conversations": [
        {"from": "human", "value": "<image> bad"}, {"from": "gpt", "value": "bad"}]},
    "too_long": {"conversations": [{"from": "human", "value": "bad " * 80}, {"from": "gpt", "value": "bad"}]},
    "too_many_images": {"images": ["img0.png"] * 4, "conversations": [
        {"from": "human", "value": "<image>" * 4}, {"from": "gpt", "value": "bad"}]},
    "no_trained_tokens": {"conversations": [{"from": "human", "value": "bad"}]},
}


@pytest.fixture()
def bad_file(data, tmp_path):
    root, records = data
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [json.dumps(r) for r in records[:6]]
    line_of = {}
    for reason, value in BAD_LINES.items():
        lines.append(value if isinstance(value, str) else json.dumps(value))
        line_of[reason] = len(lines)
    lines.insert(3, "")  # a blank line is no record
    line_of = {k: v + 1 for k, v in line_of.items()}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root, line_of


def test_every_bad_record_reason_is_counted(bad_file, tok, caplog):
    path, root, line_of = bad_file
    with caplog.at_level(logging.WARNING, logger="metamorph_jax.data"):
        batches, iterator = all_batches([P.Source(str(path), image_root=str(root))], tok, config())
    log = iterator.bad_records
    assert log.counts == {reason: 1 for reason in BAD_LINES}
    for reason, line in line_of.items():
        assert log.examples[reason][0].startswith(f"{path}:{line}: "), (reason, log.examples[reason])
    assert sorted(ids_of(tok, batches)) == list(range(6))  # the good records all arrive
    assert "[end of data] bad records: 9 skipped" in caplog.text and f"{path}:" in caplog.text
    assert set(log.as_dict()) == set(BAD_LINES)


def test_bad_records_reported_periodically(bad_file, tok, caplog):
    path, root, _ = bad_file
    tokenizer, ids = tok
    iterator = P.make_iterator([P.Source(str(path), image_root=str(root))], tokenizer, ids,
                               config(batch_size=1, report_every=1))
    with caplog.at_level(logging.WARNING, logger="metamorph_jax.data"):
        batch = next(iterator)
        while iterator.bad_records.total == 0:
            batch = next(iterator)
    assert batch is not None
    periodic = [r.getMessage() for r in caplog.records if not r.getMessage().startswith("[end of data]")]
    assert periodic and periodic[0].startswith("bad records: ") and f"{path}:" in periodic[0]


def test_strict_mode_stops_at_first_bad_record(bad_file, tok):
    path, root, line_of = bad_file
    tokenizer, ids = tok
    iterator = P.make_iterator([P.Source(str(path), image_root=str(root))], tokenizer, ids,
                               config(strict=True, seed=0))
    with pytest.raises(BadRecordError) as info:
        list(iterator)
    message = str(info.value)
    assert any(f"{path}:{line}: {reason}" in message for reason, line in line_of.items()), message


def test_bad_counts_survive_resume(bad_file, tok):
    path, root, _ = bad_file
    tokenizer, ids = tok
    sources = [P.Source(str(path), image_root=str(root))]
    cfg = config(batch_size=1)
    iterator = P.make_iterator(sources, tokenizer, ids, cfg)
    next(iterator)
    state = iterator.get_state()
    resumed = P.make_iterator(sources, tokenizer, ids, cfg)
    resumed.set_state(state)
    list(resumed)
    list(iterator)
    assert resumed.bad_records.counts == iterator.bad_records.counts == {r: 1 for r in BAD_LINES}
    # per source: every record read once (6 used + 9 refused), whatever was pending at the save
    assert resumed.bad_records.sources == iterator.bad_records.sources
    assert iterator.bad_records.sources[str(path)]["records"] == 6 + len(BAD_LINES)


def test_tfds_source(tmp_path, tok):
    """A real (tiny) TFDS dataset in array_record format, image pixels as a feature."""
    import tensorflow_datasets as tfds

    class TinyVpitRecords(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "record": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(SIZE, SIZE, 3), dtype=np.uint8)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                record = {"conversations": [{"from": "human", "value": "<image> what colour ?"},
                                            {"from": "gpt", "value": f"r{i}"}]}
                yield i, {"record": json.dumps(record), "image": np.full((SIZE, SIZE, 3), 60 * i, np.uint8)}

    TinyVpitRecords(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    batches, iterator = all_batches([P.Source("tfds:tiny_vpit_records/train", tfds_data_dir=str(tmp_path))],
                                    tok, config(batch_size=2))
    assert iterator.bad_records.counts == {}
    tokenizer, _ = tok
    found = {}
    for batch in batches:
        for row, _, sl in segments(batch):
            i = record_word(tokenizer, batch, row, sl)
            number = batch["image_index"][row, sl].max() // V
            found[i] = batch["images"][row, number]
    assert sorted(found) == [0, 1, 2, 3]
    for i, pixels in found.items():
        np.testing.assert_allclose(pixels, 60 * i / 255.0 * 2 - 1, atol=1e-6)


def test_uint8_images_option(data, tok):
    root, _ = data
    sources = [P.Source(str(root / "records.jsonl"))]
    floats, _ = all_batches(sources, tok, config())
    raws, _ = all_batches(sources, tok, config(image_dtype="uint8"))
    for f, r in zip(floats, raws):
        assert r["images"].dtype == np.uint8
        valid = f["image_valid"] == 1
        np.testing.assert_allclose(images_lib.normalize(r["images"][valid]), f["images"][valid], atol=1e-6)
        assert np.array_equal(f["tokens"], r["tokens"])


def test_video_file_record_through_pipeline(tmp_path, tok):
    from metamorph_jax.data.testing import write_test_video
    frames = [np.full((SIZE, SIZE, 3), 25 * i, np.uint8) for i in range(10)]
    write_test_video(tmp_path / "clip.mp4", frames, fps=4)
    write_jsonl(tmp_path / "v.jsonl", [{"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour ?"}, {"from": "gpt", "value": "r1"}]}])
    batches, iterator = all_batches([P.Source(str(tmp_path / "v.jsonl"))], tok, config(max_images_per_row=4))
    assert iterator.bad_records.total == 0 and len(batches) == 1
    batch = batches[0]
    assert batch["image_valid"][0].tolist() == [1, 1, 1, 0]
    means = images_lib.denormalize(batch["images"][0, :3]).reshape(3, -1).mean(-1)
    assert np.allclose(means, [0, 100, 200], atol=6)


def test_video_longer_than_the_row_is_subsampled_not_dropped(tmp_path, tok):
    """max_video_frames None: the budget is derived from the row (DataConfig.video_frame_budget),
    so a clip of more 1 fps frames than a row holds gives exactly the budget, evenly."""
    from metamorph_jax.data.testing import write_test_video
    frames = [np.full((SIZE, SIZE, 3), 20 * i, np.uint8) for i in range(11)]   # 11 s at 1 fps
    write_test_video(tmp_path / "clip.mp4", frames, fps=1)
    write_jsonl(tmp_path / "v.jsonl", [{"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour ?"}, {"from": "gpt", "value": "r1"}]}])
    cfg = config(max_images_per_row=3)        # seq_len 64 // 2 // (4 + 2) = 5 > 3 slots
    assert cfg.video_frame_budget() == 3
    batches, iterator = all_batches([P.Source(str(tmp_path / "v.jsonl"))], tok, cfg)
    assert iterator.bad_records.total == 0 and len(batches) == 1
    assert batches[0]["image_valid"][0].tolist() == [1, 1, 1]
    means = images_lib.denormalize(batches[0]["images"][0]).reshape(3, -1).mean(-1)
    assert np.allclose(means, [0, 100, 200], atol=6)   # seconds 0, 5 and 10
    # the budget also bounds the text's share: at most half of seq_len goes to frames
    assert config(max_images_per_row=16).video_frame_budget() == 64 // 2 // (V + 2)
    assert config(max_video_frames=2).video_frame_budget() == 2
    with pytest.raises(ValueError, match="max_video_frames=4 must be in 1..max_images_per_row"):
        all_batches([P.Source(str(tmp_path / "v.jsonl"))], tok, config(max_video_frames=4))


def mixed_file(path, good: int, bad: int):
    """`good` usable text records, then `bad` that are too long; returns the path."""
    rows = [{"conversations": [{"from": "human", "value": "hello"},
                               {"from": "gpt", "value": f"r{i % N_RECORDS}"}]} for i in range(good)]
    rows += [BAD_LINES["too_long"]] * bad
    write_jsonl(path, rows)
    return path


def test_a_source_losing_more_than_the_share_is_an_error(tmp_path, tok):
    # two sources of one size, so that every record of both is read whatever the mixture
    good = mixed_file(tmp_path / "good.jsonl", 198, 2)      # 2 of 200: 1.0%, not more
    lossy = mixed_file(tmp_path / "lossy.jsonl", 197, 3)    # 3 of 200: 1.5%
    cfg = config(batch_size=8, max_images_per_row=0)
    with pytest.raises(BadRecordError) as info:
        all_batches([P.Source(str(good)), P.Source(str(lossy))], tok, cfg)
    message = str(info.value)
    assert message.startswith(f"{lossy}: 3 of the 200 records read were refused (1.50%)")
    assert "max_bad_fraction=0.01" in message and "too_long 3" in message
    assert any(f"(e.g. {lossy}:{line}: " in message for line in (198, 199, 200))  # file:line
    # the same data within a larger share; the good source alone is within 1%
    batches, iterator = all_batches([P.Source(str(good)), P.Source(str(lossy))], tok,
                                    config(batch_size=8, max_images_per_row=0,
                                           max_bad_fraction=0.02))
    counted = iterator.bad_records.sources
    assert (counted[str(lossy)]["records"], counted[str(lossy)]["bad"]) == (200, {"too_long": 3})
    assert (counted[str(good)]["records"], counted[str(good)]["bad"]) == (200, {"too_long": 2})
    all_batches([P.Source(str(good))], tok, cfg)


def test_a_small_source_is_judged_only_from_1_over_the_share_records(tmp_path, tok):
    # 1 bad of 5: a single record is already 20%; stopping at it is strict mode's job
    small = mixed_file(tmp_path / "small.jsonl", 4, 1)
    batches, iterator = all_batches([P.Source(str(small))], tok, config(max_images_per_row=0))
    assert iterator.bad_records.total == 1 and iterator.bad_records.sources[str(small)]["records"] == 5
    # at f = 0.25 a source is judged from 4 records on: 1 of 5 is within, 2 of 5 are not
    all_batches([P.Source(str(small))], tok, config(max_images_per_row=0, max_bad_fraction=0.25))
    lossy = mixed_file(tmp_path / "lossy.jsonl", 3, 2)
    with pytest.raises(BadRecordError, match="2 of the 5 records read were refused"):
        all_batches([P.Source(str(lossy))], tok, config(max_images_per_row=0, max_bad_fraction=0.25))
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        all_batches([P.Source(str(small))], tok, config(max_bad_fraction=0.0))


def test_a_lossy_source_stops_at_a_report_before_the_end(tmp_path, tok):
    # f = 0.5: judged at a report from 100 / 0.5 = 200 records read on; 60% are bad
    lossy = mixed_file(tmp_path / "lossy.jsonl", 120, 180)
    tokenizer, ids = tok
    iterator = P.make_iterator([P.Source(str(lossy))], tokenizer, ids,
                               config(batch_size=4, report_every=1, max_images_per_row=0,
                                      max_bad_fraction=0.5))
    batches = 0
    with pytest.raises(BadRecordError) as info:
        for _ in iterator:
            batches += 1
    assert batches * 4 < 120 and "at the end of the data" not in str(info.value)
    read = iterator.bad_records.sources[str(lossy)]["records"]
    assert 200 <= read < 300 and str(info.value).startswith(f"{lossy}: ")


@pytest.mark.parametrize("epochs,processes,batch_size,seq_len", [
    (1, 1, 3, 64), (2, 1, 2, 40), (1, 3, 3, 64)])
def test_counting_pass_gives_the_real_pipelines_batch_count(data, tok, tmp_path, epochs,
                                                            processes, batch_size, seq_len):
    """counting.count_packed_batches, which renders text and image slots but reads no
    pixels, equals the number of batches the real pipeline yields, shard by shard, with
    images, two sources, epochs and missing images (a record skipped in both passes)."""
    from metamorph_jax.data import counting
    tokenizer, ids = tok
    root, _ = data
    missing = [{"id": f"m{i}", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image> what ?"}, {"from": "gpt", "value": "r1"}]}
        for i in range(2)]
    write_jsonl(tmp_path / "more.jsonl", [make_record(i) for i in range(7)] + missing)
    sources = [P.Source(str(root / "records.jsonl")),
               P.Source(str(tmp_path / "more.jsonl"), image_root=str(root))]
    for index in range(processes):
        cfg = config(num_epochs=epochs, batch_size=batch_size, seq_len=seq_len,
                     shard_index=index, shard_count=processes)
        real = len(all_batches(sources, tok, cfg)[0])
        assert counting.count_packed_batches(sources, tokenizer, ids, cfg) == real
        assert real > 1
    with pytest.raises(ValueError, match="'num_epochs' is None"):
        counting.count_packed_batches(sources, tokenizer, ids, config(num_epochs=None))
