"""Memory injection (§2.2): [Enc(X); Enc(q); m_1..m_N; y] through the explicit KV cache against transformers run on
inputs_embeds with the memory inserted, teacher forced and greedy, and train/generation parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.medsynapse.medsynapse_fixtures import IM_END, IMG, build_backbone, make_batch
from vital_jax.generation import SamplingConfig
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.models.qwen3_vl import cached

TOL = 1e-4
N_MEMORY = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_backbone(tmp_path_factory.mktemp("medsynapse_backbone"))


@pytest.fixture(scope="module")
def batch(tiny):
    data = make_batch(tiny.config, seed=1)
    rng = np.random.RandomState(11)
    # Random memory at a few times the token-embedding scale, so that it visibly moves the answer.
    data["memory"] = (0.1 * rng.randn(2, N_MEMORY, tiny.config.text.hidden_size)).astype(np.float32)
    return data


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


class HFRow:
    """One example in transformers, unpadded: the prompt's ids, image and HF's own MRoPE positions / rope delta."""

    def __init__(self, hf, data, row, prompt_tail=0):
        self.hf = hf
        ids = data["prompt_ids"][row][data["prompt_valid"][row]].astype(np.int64)
        # prompt_tail > 0: `ids` is the prompt's head and `tail_ids` its last prompt_tail tokens ("user_turn").
        self.ids = torch.tensor(ids[:len(ids) - prompt_tail][None])
        self.tail_ids = ids[len(ids) - prompt_tail:]
        grids = data["image_grid_thw"]
        start = int(sum(np.prod(g) for g in grids[:row]))
        self.grid = torch.tensor(grids[row:row + 1].astype(np.int64))
        self.pixels = torch.tensor(data["pixel_patches"][start:start + int(np.prod(grids[row]))])
        self.positions, delta = hf.model.get_rope_index(
            self.ids, mm_token_type_ids=(self.ids == IMG).long(), image_grid_thw=self.grid)
        self.delta = int(delta.reshape(-1)[0])

    def logits(self, tail_embeds):
        """Logits (1, Tp + S, V) of inputs_embeds = [embeds(prompt); tail (1, S, D)], one full forward; the tail
        takes positions t + rope_delta on all three axes."""
        tp, s = self.ids.shape[1], tail_embeds.shape[1]
        x = torch.cat([self.hf.get_input_embeddings()(self.ids), tail_embeds], 1)
        tail_pos = (torch.arange(tp, tp + s) + self.delta).view(1, 1, s).expand(3, 1, s)
        with torch.no_grad():
            return self.hf(inputs_embeds=x, pixel_values=self.pixels, image_grid_thw=self.grid,
                           position_ids=torch.cat([self.positions, tail_pos], 2)).logits

    def embed(self, ids):
        return self.hf.get_input_embeddings()(torch.tensor(np.asarray(ids, np.int64)).view(1, -1))


def test_teacher_forced_answer_logits_match_transformers_with_memory_in_inputs_embeds(tiny, batch):
    """The block write of m_1..m_N into the cache, then the parallel teacher-forced answer, equals one transformers
    forward over inputs_embeds = [prompt (image features scattered, deepstack added); memory; answer]."""
    logits = jax.jit(lambda p, pre, m, a, v: memory_lib.answer_logits(tiny.model, p, pre, m, a, v))(
        tiny.params, batch["prefix"], jnp.asarray(batch["memory"]), jnp.asarray(batch["answer_ids"]),
        jnp.asarray(batch["answer_valid"]))
    assert logits.shape == batch["answer_ids"].shape + (tiny.config.text.vocab_size,)
    assert logits.dtype == jnp.float32
    for row in range(2):
        ref = HFRow(tiny.hf, batch, row)
        n = int(batch["answer_valid"][row].sum())
        with torch.no_grad():
            answer = ref.embed(batch["answer_ids"][row, :n - 1])
            theirs = ref.logits(torch.cat([torch.tensor(batch["memory"][row:row + 1]), answer], 1))
            theirs = theirs[0, ref.ids.shape[1] + N_MEMORY - 1:]
        assert theirs.shape[0] == n
        assert _diff(logits[row, :n], theirs) <= TOL
        # The memory is really in the context: without it the answer distribution differs.
        with torch.no_grad():
            plain = ref.logits(ref.embed(batch["answer_ids"][row, :n - 1]))[0, ref.ids.shape[1] - 1:]
        assert _diff(logits[row, :n], plain) > 1e-3
    log_probs = memory_lib.answer_log_probs(tiny.model, tiny.params, batch["prefix"], jnp.asarray(batch["memory"]),
                                            jnp.asarray(batch["answer_ids"]), jnp.asarray(batch["answer_valid"]))
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["answer_ids"][..., None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, np.where(batch["answer_valid"], expected, 0.0), atol=1e-5)


def test_generation_with_memory_matches_a_greedy_transformers_loop_and_the_teacher_forced_path(tiny, batch):
    """Generation (prefill, memory block, while_loop decode) equals greedy decoding in transformers that re-runs
    [prompt; memory; generated so far] as inputs_embeds every step; teacher forcing the generated answer through
    the training path reproduces the same tokens (train/generation share the memory path)."""
    sampling = SamplingConfig(max_new_tokens=6, eos_token_ids=(IM_END,))
    tokens, lengths = jax.jit(lambda p, pre, m: memory_lib.generate(tiny.model, p, pre, m, sampling))(
        tiny.params, batch["prefix"], jnp.asarray(batch["memory"]))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row in range(2):
        ref = HFRow(tiny.hf, batch, row)
        generated = []
        for _ in range(sampling.max_new_tokens):
            with torch.no_grad():
                tail = torch.cat([torch.tensor(batch["memory"][row:row + 1]), ref.embed(generated)], 1)
                generated.append(int(ref.logits(tail)[0, -1].argmax()))
            if generated[-1] == IM_END:
                break
        assert tokens[row, :lengths[row]].tolist() == generated
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    forced = memory_lib.answer_logits(tiny.model, tiny.params, batch["prefix"], jnp.asarray(batch["memory"]),
                                      jnp.asarray(tokens), jnp.asarray(valid))
    np.testing.assert_array_equal(np.where(valid, np.argmax(np.asarray(forced), -1), 0), np.where(valid, tokens, 0))


PROMPT_TAIL = 2   # the fixture prompts end with 3 and 5 text tokens after the image


def test_user_turn_memory_matches_transformers_with_memory_before_the_prompt_tail(tiny, batch):
    """memory_position "user_turn": the prompt's head, then [m_1..m_N; the prompt's last S tokens] as one block,
    then the teacher-forced answer, equals one transformers forward over inputs_embeds = [head; memory; tail;
    answer]; and it is not the "assistant_turn" placement."""
    args = (tiny.params, batch["prefix"], jnp.asarray(batch["memory"]), jnp.asarray(batch["answer_ids"]),
            jnp.asarray(batch["answer_valid"]))
    logits = jax.jit(lambda p, pre, m, a, v: memory_lib.answer_logits(tiny.model, p, pre, m, a, v,
                                                                      prompt_tail=PROMPT_TAIL))(*args)
    after = memory_lib.answer_logits(tiny.model, *args)
    for row in range(2):
        ref = HFRow(tiny.hf, batch, row, prompt_tail=PROMPT_TAIL)
        n = int(batch["answer_valid"][row].sum())
        with torch.no_grad():
            block = [torch.tensor(batch["memory"][row:row + 1]), ref.embed(ref.tail_ids),
                     ref.embed(batch["answer_ids"][row, :n - 1])]
            theirs = ref.logits(torch.cat(block, 1))[0, ref.ids.shape[1] + N_MEMORY + PROMPT_TAIL - 1:]
        assert theirs.shape[0] == n
        assert _diff(logits[row, :n], theirs) <= TOL
        assert _diff(logits[row, :n], after[row, :n]) > 1e-3


def test_user_turn_split_without_memory_is_the_plain_prompt(tiny, batch):
    """Prefilling the head and appending the tail as embeddings gives the whole prompt's state and cache: the
    tail continues the head's MRoPE positions."""
    prefix = batch["prefix"]
    cache_len = prefix.input_ids.shape[1] + 4
    no_memory = jnp.zeros((2, 0, tiny.config.text.hidden_size))
    plain_cache, plain_last = memory_lib.inject(tiny.model, tiny.params, prefix, no_memory, cache_len)
    head, tail_ids = memory_lib.split_prompt(prefix, PROMPT_TAIL)
    assert tail_ids.shape == (2, PROMPT_TAIL)
    np.testing.assert_array_equal(tail_ids, batch["prompt_ids"][:, -PROMPT_TAIL:])
    cache, last = cached.encode_prefix(tiny.model, tiny.params, head, cache_len)
    cache, last = memory_lib.write_memory(tiny.model, tiny.params, cache, last, no_memory, tail_ids)
    assert _diff(last, plain_last) <= 1e-5
    np.testing.assert_array_equal(cache.lengths, plain_cache.lengths)
    np.testing.assert_array_equal(cache.valid, plain_cache.valid)
    # The valid slots (the left padding's keys are written but never read, and their positions differ).
    seen = np.asarray(plain_cache.valid)[None, :, :, None, None]
    cache, plain_cache = cache.stacked(), plain_cache.stacked()
    assert _diff(np.where(seen, cache.k, 0), np.where(seen, plain_cache.k, 0)) <= 1e-5
    assert _diff(np.where(seen, cache.v, 0), np.where(seen, plain_cache.v, 0)) <= 1e-5
    # Positions continue: the next token is placed where it would be after the whole prompt.
    np.testing.assert_array_equal(cache.position_offset, plain_cache.position_offset)


def test_user_turn_generation_matches_its_teacher_forced_path(tiny, batch):
    """Generation with the "user_turn" placement reproduces its own teacher-forced argmax (one memory path for
    training and decoding)."""
    sampling = SamplingConfig(max_new_tokens=6, eos_token_ids=(IM_END,))
    memory = jnp.asarray(batch["memory"])
    tokens, lengths = jax.jit(lambda p, pre, m: memory_lib.generate(tiny.model, p, pre, m, sampling,
                                                                    prompt_tail=PROMPT_TAIL))(
        tiny.params, batch["prefix"], memory)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    forced = memory_lib.answer_logits(tiny.model, tiny.params, batch["prefix"], memory, jnp.asarray(tokens),
                                      jnp.asarray(valid), prompt_tail=PROMPT_TAIL)
    np.testing.assert_array_equal(np.where(valid, np.argmax(np.asarray(forced), -1), 0), np.where(valid, tokens, 0))


def test_memory_with_the_wrong_shape_is_an_error(tiny, batch):
    wrong = jnp.zeros((2, N_MEMORY, tiny.config.text.hidden_size + 1))
    with pytest.raises(ValueError, match="memory must be"):
        memory_lib.answer_logits(tiny.model, tiny.params, batch["prefix"], wrong, jnp.asarray(batch["answer_ids"]),
                                 jnp.asarray(batch["answer_valid"]))
