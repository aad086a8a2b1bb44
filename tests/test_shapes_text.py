"""The Shapes world's text corpus (data/shapes_text.py), its knowledge facts and finding 4's
prompts; the `@stage` reference of init folder fields (objectives.Objective.initial_dir);
a text stage on the corpus whose export the adapter starts from (configs/shapes.py's order).
"""
import json
import re
from pathlib import Path

import ml_collections
import pytest

from metamorph_jax import tiny
from metamorph_jax.data import shapes, shapes_text, text_records
from metamorph_jax.training import objectives, runner

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
SMALL = dict(scenes=60, motions=10, fact_repeats=1)


def texts(records) -> list[str]:
    return [turn["value"] for record in records for turn in record["conversations"]]


def mentions(text: str, fact: shapes_text.Fact) -> bool:
    return re.search(rf"\b{re.escape(fact.noun)}\b", text) is not None


def test_the_corpus_is_deterministic_from_its_seed():
    assert shapes_text.corpus(0, **SMALL) == shapes_text.corpus(0, **SMALL)
    assert shapes_text.corpus(0, **SMALL) != shapes_text.corpus(1, **SMALL)
    assert shapes_text.eval_records(0, 20) == shapes_text.eval_records(0, 20)


def test_the_corpus_covers_every_record_kind_and_question_kind_as_text_and_chat():
    records = shapes_text.corpus(0, **SMALL)
    assert {r["kind"] for r in records} == {
        "caption", "question_text", "question_chat", "edit_text", "edit_chat", "motion_text",
        "motion_chat", "fact_text", "fact_chat"}
    for form in ("question_text", "question_chat"):
        kinds = {r["question_kind"] for r in records if r["kind"] == form}
        assert kinds == set(shapes_text.QUESTION_KINDS), form
    for record in records:
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles == (["human", "gpt"] if record["kind"].endswith("chat") else ["gpt"])
        assert not any(record.get(field) for field in text_records.IMAGE_FIELDS)


def test_every_vqa_question_has_its_statement():
    cases = {("What colour is the circle?", "red"): ("colour", "the colour of the circle is red"),
             ("What shape is the blue object?", "square"): ("shape", "the blue object is a square"),
             ("How many shapes are there?", "two"): ("count_all", "the number of shapes is two"),
             ("How many triangles are there?", "zero"):
                 ("count_shape", "the number of triangles is zero"),
             ("Where is the red circle?", "top left"):
                 ("position", "the red circle is in the top left"),
             ("Is there a green square?", "no"): ("yesno", "there is no green square"),
             ("Is there a green square?", "yes"): ("yesno", "there is a green square")}
    for (question, answer), expected in cases.items():
        assert shapes_text.question_statement(question, answer) == expected
    with pytest.raises(ValueError, match="not a Shapes question"):
        shapes_text.question_statement("What size is the circle?", "small")


def test_the_corpus_holds_every_fact_and_the_control_no_held_out_fact():
    assert len(shapes_text.FACTS) >= 30
    assert set(shapes_text.HELD_OUT_FACTS).isdisjoint(shapes_text.TAUGHT_FACTS)
    assert set(shapes_text.HELD_OUT_FACTS) | set(shapes_text.TAUGHT_FACTS) == set(shapes_text.FACTS)
    full = shapes_text.corpus(0, **SMALL)
    control = shapes_text.corpus(0, **SMALL, held_out_facts=False)
    for records, held_out_present in ((full, True), (control, False)):
        chats = {tuple(turn["value"] for turn in r["conversations"])
                 for r in records if r["kind"] == "fact_chat"}
        all_text = texts(records)
        for fact in shapes_text.FACTS:
            taught = fact in shapes_text.TAUGHT_FACTS or held_out_present
            assert ((f"What {fact.attribute} is {fact.thing}?", fact.value) in chats) == taught
            assert any(mentions(t, fact) for t in all_text) == taught, fact
    # Everything but the held-out facts' records is the same text.
    def turns(records):
        return sorted(tuple(texts([r])) for r in records)
    kept = [r for r in full if not any(mentions(t, f) for t in texts([r])
                                       for f in shapes_text.HELD_OUT_FACTS)]
    assert len(kept) < len(full) and turns(kept) == turns(control)


def test_no_held_out_fact_is_in_any_vpit_record_of_the_world(tmp_path):
    world = shapes.WorldConfig(image_size=16, scenes=(("train", 300), ("validation", 30), ("test", 30)),
                               clips=(("train", 20), ("validation", 4), ("test", 4)))
    shapes.write_world(str(tmp_path), world, progress=False)
    files = sorted(tmp_path.glob("*/*.jsonl"))
    assert len(files) == 18
    record_text = [turn["value"] for path in files for line in path.read_text().splitlines()
                   for turn in json.loads(line)["conversations"]]
    assert len(record_text) > 1000
    for fact in shapes_text.HELD_OUT_FACTS:
        assert not any(mentions(text, fact) for text in record_text), fact


def test_evaluation_scenes_are_never_described_by_the_corpus():
    corpus_prompts = {r["conversations"][0]["value"].split("\n")[0]
                      for r in shapes_text.corpus(0, scenes=400, motions=0, fact_repeats=0)
                      if r["kind"] == "question_chat"}
    eval_prompts = {r["conversations"][0]["value"].split("\n")[0]
                    for r in shapes_text.eval_records(0, 100) if r["kind"] == "question_chat"}
    assert len(eval_prompts) == 100 and eval_prompts.isdisjoint(corpus_prompts)


def test_finding_4_prompts_expect_the_attributes_of_the_fact_table():
    prompts = shapes_text.knowledge_prompts(per_fact=3, seed=0)
    assert prompts == shapes_text.knowledge_prompts(per_fact=3, seed=0)
    assert len(prompts) == 3 * len(shapes_text.HELD_OUT_FACTS)
    assert {p.fact for p in prompts} == set(shapes_text.HELD_OUT_FACTS)
    table = {fact.thing: fact for fact in shapes_text.FACTS}
    for prompt in prompts:
        fact = table[re.search(r"(?:colour of|like) (.+) in the ", prompt.caption).group(1)]
        assert fact == prompt.fact
        assert prompt.expected[fact.attribute] == fact.value
        assert prompt.caption.startswith(f"a {prompt.expected['size']} ")
        assert prompt.caption.endswith(f" in the {prompt.expected['position']}")
        # A colour fact leaves the shape open; a shape fact names the colour it expects.
        if fact.attribute == "colour":
            assert "shape" not in prompt.expected and " shape the colour of " in prompt.caption
        else:
            assert prompt.caption.split()[2] == prompt.expected["colour"]
        # The corpus resolves the same phrase into the world's words, as expected.
        other = prompt.expected["colour"] if fact.attribute == "shape" else "shape"
        phrase, resolved = shapes_text.knowledge_phrase(
            fact, prompt.expected["size"], prompt.expected["position"], other)
        assert phrase == prompt.caption
        words = resolved.split()
        assert words[1] == prompt.expected["size"]
        assert words[2] == prompt.expected["colour"]
        assert resolved.endswith(f"in the {prompt.expected['position']}")
        if fact.attribute == "shape":
            assert words[3] == fact.value


# --- @stage references -------------------------------------------------------------------------

def adapter_stage(tiny_assets, **init):
    """configs/tiny.py's adapter stage with init fields changed."""
    config = runner.parse_flags(["train.py", "--config", f"{TINY}:{tiny_assets}"])
    stage = ml_collections.ConfigDict(config.stages.adapter.to_dict())
    stage.init.update(init)
    return stage


def test_a_stage_reference_names_an_earlier_finished_stage(tiny_assets, tmp_path):
    stage = adapter_stage(tiny_assets, llm_dir="@text")
    final = tmp_path / "text" / "final"

    def build(earlier):
        return objectives.build(stage, "adapter", None, objectives.Folders(earlier_stages=earlier))

    with pytest.raises(objectives.StageConfigError,
                       match=r"stage 'adapter': field 'init.llm_dir' = '@text': stage 'text' "
                             r"does not run before stage 'adapter'.*stages before it: none"):
        build(())
    with pytest.raises(objectives.StageConfigError, match="stages before it: other"):
        build((("other", str(tmp_path / "other" / "final")),))
    final.mkdir(parents=True)
    with pytest.raises(objectives.StageConfigError, match=r"stage 'text' has not finished"):
        build((("text", str(final)),))
    for name in ("model_config.json", "params"):
        source = tiny_assets / "llm" / name
        (final / name).symlink_to(source, target_is_directory=source.is_dir())
    (final / runner.DONE_FILE).write_text("{}")
    assert build((("text", str(final)),)).llm_dir == final
    itself = adapter_stage(tiny_assets, llm_dir="@adapter")
    with pytest.raises(objectives.StageConfigError, match="names this stage itself"):
        objectives.build(itself, "adapter", None, objectives.Folders(earlier_stages=()))


def test_the_runner_refuses_a_reference_to_a_later_stage(tiny_assets, tmp_path):
    config = runner.parse_flags(["train.py", "--config", f"{TINY}:{tiny_assets}", "--workdir",
                                 str(tmp_path / "run"), "--config.stages.adapter.init.llm_dir=@instruct"])
    with pytest.raises(objectives.StageConfigError,
                       match=r"'@instruct': stage 'instruct' does not run before stage 'adapter'"):
        runner.run(config)
    assert not (tmp_path / "run" / "adapter").exists()


# --- the text stage on the corpus, then the adapter from its export -------------------------------

def text_assets_config(root: Path, work: Path):
    """configs/tiny.py's assets with a small text corpus, a text stage first
    (configs/shapes.py's text_stage, shortened) and the adapter starting from its
    export."""
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("shapes_config", REPO / "configs" / "shapes.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    config = runner.parse_flags(["train.py", "--config", f"{TINY}:{root}", "--workdir", str(work)])
    with config.unlocked():
        config.assets.text_corpus = 40
        config.order = ("text", "adapter")
        config.stages.text = module.text_stage(str(root))
        config.stages.text.steps = 30
        config.stages.text.data.seq_len = 128
        config.stages.text.data.batch_size = 8
        config.stages.adapter.init.llm_dir = "@text"
        config.stages.adapter.steps = 2
        config.eval_every = 0
    return config


@pytest.mark.slow
def test_a_text_stage_on_the_corpus_learns_and_the_adapter_starts_from_it(tmp_path):
    import numpy as np

    from metamorph_jax import pretrained
    root, work = tmp_path / "assets", tmp_path / "run"
    config = text_assets_config(root, work)
    results = runner.run(config)
    paths = tiny.ensure_assets(config.assets)
    # The tokenizers cover the corpus: no unknown word in any record.
    tokenizer = pretrained.load_tokenizer(paths["text_tokenizer"])
    for name in (shapes_text.CORPUS_FILE, shapes_text.CONTROL_FILE, shapes_text.EVAL_FILE):
        for line in (paths["text"] / name).read_text().splitlines():
            for turn in json.loads(line)["conversations"]:
                assert tokenizer.unk_token_id not in tokenizer(turn["value"])["input_ids"], turn
    text, adapter = results
    assert text.name == "text" and len(text.losses) == 30
    first, last = np.mean(text.losses[:5]), np.mean(text.losses[-5:])
    print(f"text stage loss: first 5 steps {first:.3f}, last 5 {last:.3f}")
    assert last < 0.8 * first
    # The adapter's LLM is the text stage's export, not the assets' random LLaMA.
    exported = pretrained.load_params(text.final_dir)
    random = pretrained.load_params(root / "llm")
    adapted = pretrained.load_params(adapter.final_dir)
    def leaf(tree):
        from flax import traverse_util
        found = [v for k, v in traverse_util.flatten_dict(tree).items()
                 if k[-2:] == ("embed_tokens", "embedding")]
        assert len(found) == 1
        return np.asarray(found[0])
    rows = leaf(exported).shape[0]
    assert not np.array_equal(leaf(exported), leaf(random))
    np.testing.assert_array_equal(leaf(adapted)[:rows], leaf(exported))


def test_a_text_corpus_added_to_old_assets_is_refused(tmp_path, tiny_assets):
    import shutil
    root = tmp_path / "assets"
    shutil.copytree(tiny_assets, root)
    config = runner.parse_flags(["train.py", "--config", f"{TINY}:{root}"])
    with config.unlocked():
        config.assets.text_corpus = 10
    with pytest.raises(ValueError, match=r"assets.text_corpus.*was made without the text corpus"):
        tiny.ensure_assets(config.assets)


def test_answer_accuracy_scores_exactly_the_answer_tokens(tiny_assets):
    from metamorph_jax import pretrained
    from metamorph_jax.evaluation.answer_accuracy import answer_targets
    tokenizer = pretrained.load_tokenizer(tiny_assets / "tokenizer")
    record = {"id": "r", "conversations": [
        {"from": "human", "value": "A scene with a small red circle in the top left.\nWhere is the red circle?"},
        {"from": "gpt", "value": "top left"}]}
    tokens, where = answer_targets(record, tokenizer)
    assert tokenizer.convert_ids_to_tokens(tokens[where + 1].tolist()) == ["top", "left"]
    assert tokenizer.convert_ids_to_tokens(tokens[where[-1] + 2:].tolist()) == ["<|eot_id|>"]
