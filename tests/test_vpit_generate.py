"""VPiT decoding (inference/vpit_generate.py) against the authors' loop written over our
model (tests/vpit_helpers.authors_greedy_decode: batch 1, full recomputation, argmax), and
the batching, mode switching, stopping, multi-turn and compile-count rules.

Where a test needs `<image_start>` at a given step it uses a logits hook that adds 1e4 to
that logit when a row has produced that many text tokens (vpit_helpers.force_image_start_at);
the same hook runs in the reference loop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.data import conversation as conv
from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.models import metamorph
from tests.vpit_helpers import (IMAGE_SIZE, TOKENS_PER_IMAGE, VISION_WIDTH, authors_greedy_decode,
                                force_image_start_at, tiny_vpit)

V = TOKENS_PER_IMAGE


@pytest.fixture(scope="module")
def tiny():
    tokenizer, config, params = tiny_vpit()
    return tokenizer, config, params, metamorph.MetaMorph(config)


def _pixels(seed):
    return np.random.default_rng(seed).uniform(-1, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _tokens_image(seed):
    x = np.random.default_rng(seed).standard_normal((V, VISION_WIDTH)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _prompt(tokenizer, config, text, images=()):
    turns = [conv.Turn("user", text)]
    return vg.prompt_from_turns(turns, images, tokenizer, "llama3", config)


def _generator(tiny, hook=None, eos=None):
    tokenizer, config, params, model = tiny
    eos = [tokenizer.eos_token_id] if eos is None else eos
    return vg.VPiTGenerator(model, params, eos, logits_hook=hook)


def _visual_of_prompt(generator, prompt):
    return np.stack([generator._visual_tokens(image) for image in prompt.images])


@pytest.mark.slow
def test_kv_cache_decoding_equals_the_authors_full_recomputation(tiny):
    """Images in the prompt (pixels through the tower, and precomputed tokens), two images
    generated, <image_end> left to the LM head: token for token and visual vector for
    visual vector (fp32, 1e-5)."""
    tokenizer, config, params, model = tiny
    hook = force_image_start_at(config, [2, 9])
    prompt = _prompt(tokenizer, config, "<image> describe <image> the image",
                     [_pixels(0), _tokens_image(1)])
    generator = _generator(tiny, hook)
    sampling = vg.VPiTSampling(max_new_tokens=16, max_new_images=3, force_image_end=False)
    got = generator.generate([prompt], sampling)[0]
    eos = [tokenizer.eos_token_id]
    expected, visual, eos_at_visual = authors_greedy_decode(
        model, params, prompt.tokens, prompt.image_index, _visual_of_prompt(generator, prompt),
        max_text_tokens=16, eos_ids=eos, hook=hook)
    assert not eos_at_visual  # else the authors' loop would have cut an image short
    assert got.tokens == expected
    assert expected.count(config.image_start_id) == 2 and expected.count(-1) == 2 * V
    assert got.visual_tokens.shape == (2, V, VISION_WIDTH)
    np.testing.assert_allclose(got.visual_tokens.reshape(-1, VISION_WIDTH), visual, atol=1e-5)


@pytest.mark.slow
def test_forced_image_end_follows_every_image(tiny):
    tokenizer, config, params, model = tiny
    prompt = _prompt(tokenizer, config, "generate an image of a red circle")
    hook = force_image_start_at(config, [0, 3])
    generator = _generator(tiny, hook, eos=[])
    got = generator.generate([prompt], vg.VPiTSampling(max_new_tokens=10, max_new_images=2))[0]
    tokens = got.tokens
    for start in [i for i, t in enumerate(tokens) if t == config.image_start_id]:
        assert tokens[start + 1:start + 1 + V] == [vg.VISUAL_POSITION] * V
        assert tokens[start + 1 + V] == config.image_end_id
    assert tokens.count(config.image_start_id) == 2
    assert len(got.text_tokens()) == 10 and got.finish_reason == vg.FINISH_LENGTH

    # Unforced: the LM head's own choice after the V-th visual token, which is the
    # authors' loop's choice too.
    unforced = generator.generate([prompt], vg.VPiTSampling(max_new_tokens=10, max_new_images=2,
                                                            force_image_end=False))[0]
    expected, _, _ = authors_greedy_decode(model, params, prompt.tokens, prompt.image_index,
                                           np.zeros((1, V, VISION_WIDTH), np.float32),
                                           max_text_tokens=10, eos_ids=[], hook=hook)
    assert unforced.tokens == expected
    after = unforced.tokens[1 + V]
    assert after != config.image_end_id  # the random model does not choose it: forcing matters


def test_the_vision_head_drives_visual_steps_and_the_lm_head_resumes(tiny):
    """Each visual output is normalize(head(h)) at the previous position, and re-enters
    through the adapter: check by re-running the full forward over the decoded sequence."""
    tokenizer, config, params, model = tiny
    M = metamorph.MetaMorph
    prompt = _prompt(tokenizer, config, "show a blue square")
    generator = _generator(tiny, force_image_start_at(config, [1]), eos=[])
    got = generator.generate([prompt], vg.VPiTSampling(max_new_tokens=5))[0]
    assert got.tokens[1] == config.image_start_id and got.tokens[2 + V] == config.image_end_id
    # The full sequence: prompt, new tokens; generated images spliced by image_index.
    tokens = np.concatenate([prompt.tokens, [max(t, 0) for t in got.tokens]]).astype(np.int32)
    index = np.concatenate([prompt.image_index,
                            [-1] * 2 + list(range(V)) + [-1] * (len(got.tokens) - 2 - V)])
    hidden = model.apply({"params": params}, jnp.asarray(tokens)[None],
                         positions=jnp.arange(len(tokens))[None],
                         image_index=jnp.asarray(index, jnp.int32)[None],
                         visual_tokens=jnp.asarray(got.visual_tokens)[None]).hidden_states[0]
    start = len(prompt.tokens) + 1   # position of <image_start>
    predicted = model.apply({"params": params}, hidden[start:start + V], method=M.vision_head_outputs)
    np.testing.assert_allclose(got.visual_tokens[0], np.asarray(predicted), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.visual_tokens[0], axis=-1), 1.0, atol=1e-5)
    logits = model.apply({"params": params}, hidden[None], method=M.logits)[0]
    # After the image's <image_end>, text tokens are the LM head's argmax again.
    for t in range(start + V + 1, len(tokens) - 1):
        assert int(jnp.argmax(logits[t])) == tokens[t + 1]


@pytest.mark.slow
def test_a_prediction_re_enters_through_the_adapter(tiny):
    """Change only the adapter: the first visual token (read at <image_start>) stays, the
    second (read at the first visual position, whose input is adapter(z1)) changes."""
    tokenizer, config, params, model = tiny
    prompt = _prompt(tokenizer, config, "show a square")
    sampling = vg.VPiTSampling(max_new_tokens=4)
    hook = force_image_start_at(config, [0])
    base = vg.VPiTGenerator(model, params, [], logits_hook=hook).generate([prompt], sampling)[0]
    changed = jax.tree.map(lambda x: x, params)
    changed["mm_projector"]["linear_2"]["bias"] = params["mm_projector"]["linear_2"]["bias"] + 0.5
    other = vg.VPiTGenerator(model, changed, [], logits_hook=hook).generate([prompt], sampling)[0]
    np.testing.assert_allclose(base.visual_tokens[0, 0], other.visual_tokens[0, 0], atol=1e-6)
    assert np.abs(base.visual_tokens[0, 1] - other.visual_tokens[0, 1]).max() > 1e-3


@pytest.mark.slow
def test_batched_equals_one_at_a_time_with_rows_in_different_modes(tiny):
    tokenizer, config, params, model = tiny
    opened = _prompt(tokenizer, config, "generate an image of a red circle")
    # A prompt that ends on <image_start> starts in visual mode; the others start in text
    # mode and are made to open an image at their text steps 3 and 8.
    opened = vg.VPiTPrompt(np.append(opened.tokens, config.image_start_id),
                           np.append(opened.image_index, -1))
    prompts = [opened,
               _prompt(tokenizer, config, "<image> what is the colour of the shape ?", [_pixels(3)]),
               _prompt(tokenizer, config, "hello"),
               _prompt(tokenizer, config, "<image> <image> move the shape", [_pixels(4), _tokens_image(5)])]
    generator = _generator(tiny, force_image_start_at(config, [3, 8]))
    sampling = vg.VPiTSampling(max_new_tokens=12, max_new_images=3)
    batched = generator.generate(prompts, sampling)
    single = [generator.generate([p], sampling)[0] for p in prompts]
    for row, (b, s) in enumerate(zip(batched, single)):
        assert b.tokens == s.tokens, row
        np.testing.assert_allclose(b.visual_tokens, s.visual_tokens, atol=1e-5)
        assert b.finish_reason == s.finish_reason
    # Every row made one output per step until it ended: output k is step k's.
    visual = [[t == vg.VISUAL_POSITION for t in b.tokens] for b in batched]
    assert visual[0][:V] == [True] * V and batched[0].tokens[V] == config.image_end_id
    mixed = [k for k in range(min(map(len, visual))) if len({row[k] for row in visual}) == 2]
    assert len(mixed) >= V   # steps where some rows were in visual mode and others in text


@pytest.mark.slow
def test_stop_tokens_end_rows_and_lengths_bound_them(tiny):
    tokenizer, config, params, model = tiny
    prompts = [_prompt(tokenizer, config, "hello"), _prompt(tokenizer, config, "what is it ?")]
    free = _generator(tiny, eos=[]).generate(prompts, vg.VPiTSampling(max_new_tokens=20))
    assert [len(g.tokens) for g in free] == [20, 20]
    assert all(g.finish_reason == vg.FINISH_LENGTH for g in free)
    stop = free[0].tokens[5]
    got = _generator(tiny, eos=[stop]).generate(prompts, vg.VPiTSampling(max_new_tokens=20))
    for row, g in zip(free, got):
        end = row.tokens.index(stop) + 1 if stop in row.tokens else len(row.tokens)
        assert g.tokens == row.tokens[:end]
    assert got[0].finish_reason == vg.FINISH_STOP and len(got[0].tokens) <= 6


@pytest.mark.slow
def test_an_image_that_does_not_fit_is_not_started(tiny):
    """<image_start> is masked when no whole image fits: no image budget left, or no text
    budget for the forced <image_end>."""
    tokenizer, config, params, model = tiny
    prompt = _prompt(tokenizer, config, "make a circle")
    generator = _generator(tiny, force_image_start_at(config, range(20)), eos=[])
    got = generator.generate([prompt], vg.VPiTSampling(max_new_tokens=8, max_new_images=1))[0]
    assert got.tokens.count(config.image_start_id) == 1 and len(got.visual_tokens) == 1
    late = _generator(tiny, force_image_start_at(config, [4]), eos=[])
    got = late.generate([prompt], vg.VPiTSampling(max_new_tokens=5))[0]
    assert config.image_start_id not in got.tokens and len(got.tokens) == 5
    got = late.generate([prompt], vg.VPiTSampling(max_new_tokens=6))[0]
    assert got.tokens[4] == config.image_start_id and got.tokens[-1] == config.image_end_id


@pytest.mark.slow
def test_sampling_is_reproducible_by_seed(tiny):
    tokenizer, config, params, model = tiny
    prompts = [_prompt(tokenizer, config, "describe the image"), _prompt(tokenizer, config, "hello")]
    generator = _generator(tiny, force_image_start_at(config, [2]), eos=[])

    def run(seed, **rule):
        return generator.generate(prompts, vg.VPiTSampling(max_new_tokens=12, seed=seed,
                                                           temperature=1.0, **rule))
    first, again, other = run(0, top_k=20), run(0, top_k=20), run(1, top_k=20)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    np.testing.assert_array_equal(first[0].visual_tokens, again[0].visual_tokens)
    assert [g.tokens for g in first] != [g.tokens for g in other]
    # top_k = 1 and a tiny top_p are greedy whatever the seed.
    greedy = generator.generate(prompts, vg.VPiTSampling(max_new_tokens=12))
    for rule in (dict(top_k=1), dict(top_p=1e-6)):
        assert [g.tokens for g in run(5, **rule)] == [g.tokens for g in greedy]


@pytest.mark.slow
def test_one_compile_per_bucket(tiny):
    """Prompts of lengths within one width bucket and batches within one batch bucket
    reuse the compiled prefill and decoding loop."""
    tokenizer, config, params, model = tiny
    generator = _generator(tiny, force_image_start_at(config, [1]))
    sampling = vg.VPiTSampling(max_new_tokens=6)
    texts = ["what is the colour of the shape ?", "show a red circle in the middle",
             "is there a red circle in the top left of the image ?"]
    lengths = {len(_prompt(tokenizer, config, t).tokens) for t in texts}
    assert len(lengths) == 3 and len({vg._pow2(n, 16) for n in lengths}) == 1
    for text in texts:
        generator.generate([_prompt(tokenizer, config, text)], sampling)
    generator.generate([_prompt(tokenizer, config, t) for t in texts[:2]], sampling)
    assert generator.trace_counts["prefill"] == 2 and generator.trace_counts["decode"] == 2
    generator.generate([_prompt(tokenizer, config, t) for t in texts[1:]], sampling)
    generator.generate([_prompt(tokenizer, config, t) for t in (texts[0], texts[2])],
                       vg.VPiTSampling(max_new_tokens=7))  # the same cache bucket
    assert generator.trace_counts["prefill"] == 2 and generator.trace_counts["decode"] == 2


@pytest.mark.slow
def test_multi_turn_context_keeps_generated_images(tiny):
    """Turn 2's prompt holds turn 1's generated image as a prompt image: the same as
    rendering the whole conversation with those visual tokens by hand."""
    tokenizer, config, params, model = tiny
    generator = _generator(tiny, force_image_start_at(config, [1]))
    session = vg.ChatSession(generator, tokenizer, "llama3")
    sampling = vg.VPiTSampling(max_new_tokens=6)
    first = session.ask("generate an image of a red circle", [], sampling)
    assert len(first.visual_tokens) == 1
    assert session.turns[-1].role == "assistant"
    assert session.turns[-1].text.count(conv.IMAGE_PLACEHOLDER) == 1
    second = session.ask("<image> make it blue", [_pixels(7)], sampling)
    prompt = session.last_prompt
    assert [len(np.shape(i)) for i in prompt.images] == [2, 3]  # generated tokens, then pixels
    np.testing.assert_array_equal(prompt.images[0], first.visual_tokens[0])
    expected = vg.prompt_from_turns(session.turns[:-1], prompt.images, tokenizer, "llama3", config)
    np.testing.assert_array_equal(prompt.tokens, expected.tokens)
    again = generator.generate([expected], sampling)[0]
    assert again.tokens == second.tokens
