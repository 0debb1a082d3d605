"""The token loop: KV cache == recomputation, window modes, batches, seeds, streaming, beams."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.strategy import DecodingSpec, parse_strategy
from model.errors import UserError
from model.generate import Context, TextStream, beam_search, decode_steps, generate
from model.gpt import GPT
from model.tokenizer import BPETokenizer, CharTokenizer
from tests.conftest import ROOT, one_line_error, run_cli, tiny_config

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
CHARS = CharTokenizer(ALPHABET)  # 30 characters + end-of-text = 31 tokens


@pytest.fixture(params=["learned", "rope"])
def model(request):
    """The tiny model with GPT-2's learned positions, and with rotary ones: every cache,
    window and batch test below must hold for both."""
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=CHARS.vocab_size, block_size=16, position=request.param)).eval()


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The suite's one thread, and two, as on a user's multi-core machine (where torch's
    kernels split their work): every cache, window and batch property must hold for both."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def reference_logits(model, tokens: list[int], window_start: int) -> torch.Tensor:
    """The definition: run the model, without a cache, on tokens[window_start:]."""
    with torch.no_grad():
        return model(torch.tensor([tokens[window_start:]]))[0][0, -1]


def follow(model, prompt, window, steps, choose=lambda logits: int(logits.argmax())):
    """Run a Context for `steps` tokens; return the tokens and each step's logits."""
    context = Context(model, [prompt], steps, window)
    tokens, logits_seen = list(prompt), []
    for _ in range(steps):
        logits = context.next_logits()[0]
        logits_seen.append(logits)
        token = choose(logits)
        tokens.append(token)
        context.append(torch.tensor([token]))
    return tokens, logits_seen


@pytest.mark.parametrize("prompt_length", [1, 9, 16])
def test_cache_matches_recomputation_inside_the_window(model, prompt_length, threads):
    prompt = list(range(prompt_length))
    steps = 16 - prompt_length + 1 if prompt_length < 16 else 1
    cached_tokens, cached = follow(model, prompt, "exact", steps)
    plain_tokens, plain = follow(model, prompt, "none", steps)
    assert cached_tokens == plain_tokens  # greedy tokens identical
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_length", [1, 20])
def test_exact_mode_matches_the_cropping_reference_past_the_window(model, prompt_length, threads):
    prompt = [i % 30 for i in range(prompt_length)]
    tokens, seen = follow(model, prompt, "exact", 40)
    for step, logits in enumerate(seen):
        length = prompt_length + step
        expected = reference_logits(model, tokens[:length], max(0, length - 16))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_length", [1, 20])
def test_shift_mode_matches_its_definition(model, prompt_length, threads):
    # Definition: the window starts as the prompt's last 16 tokens; whenever one more
    # token would make it longer than 16, it restarts from the most recent 8 tokens.
    prompt = [i % 30 for i in range(prompt_length)]
    tokens, seen = follow(model, prompt, "shift", 40)
    window_start = max(0, prompt_length - 16)
    for step, logits in enumerate(seen):
        length = prompt_length + step
        if length - window_start > 16:
            window_start = length - 8
        expected = reference_logits(model, tokens[:length], window_start)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", ["exact", "shift", "none"])
def test_batched_prompts_give_what_each_prompt_gives_alone(model, window, threads):
    prompts = ["a", "hello there", "the quick brown fox"]
    spec = parse_strategy("top-k:k=5,t=0.9")
    together = generate(model, CHARS, prompts, spec, max_new_tokens=25, num_samples=2, seed=3, window=window)
    for row, sample in enumerate(together):  # row = prompt * 2 + sample, seeded 3 + row
        alone = generate(model, CHARS, [prompts[sample.prompt_index]], spec, max_new_tokens=25,
                         seed=3 + row, window=window)[0]
        assert sample.tokens == alone.tokens


def test_same_seed_same_text_and_samples_differ(model):
    spec = DecodingSpec()
    first = generate(model, CHARS, ["the "], spec, max_new_tokens=30, num_samples=3, seed=11)
    again = generate(model, CHARS, ["the "], spec, max_new_tokens=30, num_samples=3, seed=11)
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len({tuple(s.tokens) for s in first}) > 1


def test_greedy_is_argmax_of_the_model(model):
    samples = generate(model, CHARS, ["ab"], DecodingSpec(temperature=0), max_new_tokens=5)
    tokens = CHARS.encode("ab")
    for token in samples[0].tokens:
        assert token == int(reference_logits(model, tokens, 0).argmax())
        tokens.append(token)


def test_logprobs_are_the_models_raw_log_probabilities(model):
    sample = generate(model, CHARS, ["ab"], parse_strategy("top-k:k=3"), max_new_tokens=4, seed=0)[0]
    tokens = CHARS.encode("ab")
    for token, logprob in zip(sample.tokens, sample.logprobs):
        expected = F.log_softmax(reference_logits(model, tokens, 0), dim=-1)[token]
        assert logprob == pytest.approx(expected.item(), abs=1e-5)
        tokens.append(token)


def test_end_of_text_ends_a_sample(model):
    # Make end-of-text overwhelmingly likely after the first step.
    with torch.no_grad():
        model.lm_head.weight[CHARS.eot_id] *= 0  # tied: also the eot embedding
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight[CHARS.eot_id, 0] = 100.0
    sample = generate(model, CHARS, ["a"], DecodingSpec(temperature=0), max_new_tokens=10)[0]
    assert sample.finish == "eot" and sample.tokens == [CHARS.eot_id] and sample.text == ""


def stream_pieces(tokenizer, tokens, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.feed(t) for t in tokens]
    if not stream.stopped:
        pieces.append(stream.finish())
    return pieces, stream


def test_stream_holds_back_a_split_utf8_character():
    byte_level = BPETokenizer({bytes([b]): b for b in range(256)})  # no merges: one token per byte
    tokens = byte_level.encode("aé€b")  # é is 2 bytes, € is 3
    assert len(tokens) == 7
    pieces, stream = stream_pieces(byte_level, tokens)
    assert pieces == ["a", "", "é", "", "", "€", "b", ""]
    assert stream.text == "aé€b"


def test_stream_never_prints_a_prefix_of_a_stop_string():
    tokens = CHARS.encode("one, two, three")
    pieces, stream = stream_pieces(CHARS, tokens, stop=["two,", "thr"])
    assert "".join(pieces) == "one, " and stream.stopped
    # "t" and "tw" were held back: they could have been (and were) the start of a stop
    assert pieces[:8] == ["o", "n", "e", ",", " ", "", "", ""]


def test_stream_releases_a_false_alarm():
    pieces, stream = stream_pieces(CHARS, CHARS.encode("ab ac"), stop=["abc"])
    assert pieces == ["", "", "ab ", "", "ac", ""]
    assert not stream.stopped


def test_one_token_completing_two_stops_cuts_at_the_earlier():
    # "abc" is one token: after "x" + "abc" both stops are complete; 'ab' starts first.
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    tokenizer = BPETokenizer(ranks)
    tokens = tokenizer.encode("xabc")
    assert tokens == [ord("x"), 257]
    for stop in (["bc", "ab"], ["ab", "bc"]):
        pieces, stream = stream_pieces(tokenizer, tokens, stop=stop)
        assert "".join(pieces) == "x" and stream.text == "x" and stream.stopped


class PieceTokenizer:
    """Token i is the text pieces[i]: any split of a text into tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token].encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=8),
       st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stream_ends_before_the_earliest_stop_once_any_is_complete(pieces, stops):
    # Definition: the sample ends at the first token after which some stop string occurs
    # in the text; the text is cut before the earliest occurrence of any of them.
    expected, stopped = "".join(pieces), False
    for end in range(1, len(pieces) + 1):
        text = "".join(pieces[:end])
        starts = [text.find(stop) for stop in stops if stop in text]
        if starts:
            expected, stopped = text[: min(starts)], True
            break
    printed, stream = stream_pieces(PieceTokenizer(pieces), range(len(pieces)), stop=stops)
    assert "".join(printed) == expected == stream.text
    assert stream.stopped == stopped


def test_stop_string_ends_the_sample_and_is_not_in_its_text(model):
    tokens = generate(model, CHARS, ["a"], DecodingSpec(temperature=0), max_new_tokens=30)[0].text
    stop = tokens[5:7]
    sample = generate(model, CHARS, ["a"], DecodingSpec(temperature=0), max_new_tokens=30, stop=[stop])[0]
    assert sample.finish == "stop"
    assert sample.text == tokens[: tokens.index(stop)]


def test_beam_search_with_enough_beams_is_exhaustive_search():
    # With V^(T-1) beams no prefix is ever dropped, so beam search must return the
    # sequence of T tokens with the highest log-probability: check against all V^T.
    torch.manual_seed(5)
    model = GPT(tiny_config(vocab_size=5, block_size=8)).eval()
    prompt, V, T = [1, 2], 5, 3
    best = beam_search(model, prompt, DecodingSpec(num_beams=V ** (T - 1)), T, eot_id=None)

    def score(continuation):
        tokens = prompt + list(continuation)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([tokens]))[0][0], dim=-1)
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(continuation))

    exhaustive = max(itertools.product(range(V), repeat=T), key=score)
    assert best.tokens == list(exhaustive)
    assert best.score == pytest.approx(score(exhaustive), abs=1e-4)


def test_beam_search_with_end_of_text_finds_the_best_score_per_token():
    # With an end-of-text token, a sequence ends at it or after T tokens; its score is its
    # total log-probability (end-of-text included) over its length (end-of-text excluded).
    # With more beams than candidates at any step, beam search must return the sequence
    # with the best such score among all of them.
    torch.manual_seed(7)
    model = GPT(tiny_config(vocab_size=4, block_size=8)).eval()
    prompt, V, T, eot = [1, 2], 4, 3, 0
    best = beam_search(model, prompt, DecodingSpec(num_beams=V ** T), T, eot_id=eot)

    def logprobs(continuation):
        tokens = prompt + list(continuation)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([tokens]))[0][0], dim=-1)
        return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(continuation)]

    candidates = [
        seq for length in range(1, T + 1) for seq in itertools.product(range(V), repeat=length)
        if eot not in seq[:-1] and (seq[-1] == eot or length == T)
    ]

    def per_token(seq):
        return sum(logprobs(seq)) / max(len(seq) - (seq[-1] == eot), 1)

    expected = max(candidates, key=per_token)
    assert best.tokens == list(expected)
    assert best.score / max(len(best.tokens) - best.ended, 1) == pytest.approx(per_token(expected), abs=1e-5)


def test_beam_scores_by_hand():
    from model.generate import Beam, _normalised, _search_is_over

    # end-of-text counts in the score but not in the length: -2.0 over 1 token
    assert _normalised(Beam([5, 0], -2.0, [-1.5, -0.5], ended=True)) == -2.0
    assert _normalised(Beam([5, 6], -2.0, [-1.5, -0.5])) == -1.0
    # The worst finished beam scores -1.9 per token. A live beam at -10 after 5 tokens is
    # at -2.0 now, but one more token of log-probability -0.1 would give -10.1 / 6 = -1.68,
    # so with up to 6 tokens the search is not over; with at most 5 it is (-10 / 5 <= -1.9).
    finished = [Beam([1] * 10, -19.0, [])]
    live = [Beam([2] * 5, -10.0, [])]
    assert not _search_is_over(finished, live, 1, max_new_tokens=6)
    assert _search_is_over(finished, live, 1, max_new_tokens=5)


def test_beam_search_is_deterministic_and_one_beam_is_greedy(model):
    # Beam search does not promise a likelier sequence than greedy decoding (a prefix it
    # drops may have led to one), so the properties are: the same call gives the same
    # tokens, and one beam without an end token keeps the argmax at every step.
    spec = DecodingSpec(num_beams=4)
    a = generate(model, CHARS, ["the"], spec, max_new_tokens=12)[0]
    b = generate(model, CHARS, ["the"], spec, max_new_tokens=12)[0]
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    greedy = generate(model, CHARS, ["the"], DecodingSpec(temperature=0), max_new_tokens=12)[0]
    one_beam = beam_search(model, CHARS.encode("the"), DecodingSpec(num_beams=1), 12, eot_id=None)
    assert one_beam.tokens == greedy.tokens


def penalised_by_hand(logits: torch.Tensor, prompt: list[int], generated: list[int],
                      repetition: float = 1.0, frequency: float = 0.0, presence: float = 0.0) -> torch.Tensor:
    """The penalties' definitions, over a token history: repetition (CTRL) once per distinct
    token of prompt and output; frequency and presence over generated tokens only."""
    out = logits.clone()
    for token in set(prompt + generated):
        out[token] = out[token] * repetition if out[token] < 0 else out[token] / repetition
    for token in set(generated):
        out[token] -= generated.count(token) * frequency + presence
    return out


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=3.0), dict(frequency_penalty=1.5),
                                       dict(presence_penalty=2.0), dict(repetition_penalty=1.5, frequency_penalty=0.7,
                                                                        presence_penalty=0.4)])
def test_penalties_inside_generate_follow_their_definitions(model, penalties):
    prompt, steps = CHARS.encode("aaab"), 12
    sample = generate(model, CHARS, ["aaab"], DecodingSpec(temperature=0, **penalties), max_new_tokens=steps)[0]
    plain = generate(model, CHARS, ["aaab"], DecodingSpec(temperature=0), max_new_tokens=steps)[0]
    assert sample.tokens != plain.tokens  # strong enough to matter, or the test would show nothing
    names = dict(repetition_penalty="repetition", frequency_penalty="frequency", presence_penalty="presence")
    generated = []
    for token in sample.tokens:
        logits = reference_logits(model, prompt + generated, 0)
        expected = penalised_by_hand(logits, prompt, generated, **{names[k]: v for k, v in penalties.items()})
        assert token == int(expected.argmax())
        generated.append(token)


def test_beam_search_reorders_the_penalty_history_with_its_beams():
    # With enough beams to keep every prefix, beam search with a repetition and a
    # frequency penalty must find the sequence whose penalised log-probabilities (each
    # step penalised by that sequence's own history) sum highest: a beam that kept
    # another beam's history after a reshuffle would score differently.
    torch.manual_seed(3)
    model = GPT(tiny_config(vocab_size=4, block_size=8)).eval()
    prompt, V, T = [1, 2], 4, 3
    spec = DecodingSpec(num_beams=V ** (T - 1), repetition_penalty=4.0, frequency_penalty=2.0)
    best = beam_search(model, prompt, spec, T, eot_id=None)

    def score(continuation):
        total = 0.0
        for i, token in enumerate(continuation):
            logits = penalised_by_hand(reference_logits(model, prompt + list(continuation[:i]), 0), prompt,
                                       list(continuation[:i]), repetition=4.0, frequency=2.0)
            total += F.log_softmax(logits, dim=-1)[token].item()
        return total

    exhaustive = max(itertools.product(range(V), repeat=T), key=score)
    unpenalised = beam_search(model, prompt, DecodingSpec(num_beams=V ** (T - 1)), T, eot_id=None)
    assert unpenalised.tokens != list(exhaustive)  # the penalties change the answer
    assert best.tokens == list(exhaustive)
    assert best.score == pytest.approx(score(exhaustive), abs=1e-4)


def test_decode_steps_refuses_beams_and_generate_checks_arguments(model):
    with pytest.raises(ValueError):
        next(decode_steps(model, [[1]], DecodingSpec(num_beams=2), 1, [0]))
    with pytest.raises(UserError, match="stop string must not be empty"):
        generate(model, CHARS, ["a"], DecodingSpec(), max_new_tokens=1, stop=[""])
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, CHARS, ["a"], DecodingSpec(), max_new_tokens=-1)
    with pytest.raises(UserError, match="deterministic"):
        generate(model, CHARS, ["a"], DecodingSpec(num_beams=2), max_new_tokens=1, num_samples=2)


def test_padding_vocabulary_ids_are_never_sampled():
    torch.manual_seed(6)
    padded = GPT(tiny_config(vocab_size=CHARS.vocab_size + 33)).eval()  # e.g. rounded up to 64
    with torch.no_grad():
        padded.lm_head.weight[CHARS.vocab_size:] += 5.0  # make the padding ids very likely
    samples = generate(padded, CHARS, ["a"], DecodingSpec(), max_new_tokens=20, num_samples=4)
    assert all(t < CHARS.vocab_size for s in samples for t in s.tokens)


def parameter_layout(model) -> dict:
    return {name: (p.shape, p.stride(), p.data_ptr(), p.dtype, p.device) for name, p in model.named_parameters()}


def test_generation_leaves_the_callers_model_as_it_was(two_threads):
    torch.manual_seed(4)
    model = GPT(tiny_config(vocab_size=CHARS.vocab_size)).eval()
    before, modules = parameter_layout(model), [(name, type(m)) for name, m in model.named_modules()]
    idx = torch.tensor([CHARS.encode("the quick")])
    with torch.no_grad():
        logits = model(idx)[0]
    generate(model, CHARS, ["the", "a"], DecodingSpec(), max_new_tokens=6, num_samples=2)
    generate(model, CHARS, ["the"], DecodingSpec(num_beams=2), max_new_tokens=4)
    assert parameter_layout(model) == before
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(idx)[0], logits)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_cache_accepts_chunks_of_any_length(attention):
    # prefill 5 tokens, then a chunk of 4 (4 queries over 9 keys), then 1: the same
    # logits as one pass over all 10 tokens.
    from model.gpt import KVCache

    torch.manual_seed(8)
    cfg = tiny_config(vocab_size=31, block_size=16, attention=attention)
    model = GPT(cfg).eval()
    idx = torch.randint(31, (2, 10))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(cfg, 2, 16, "cpu")
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 9), (9, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_details_show_what_the_strategy_sampled_from(model):
    # top-k with k=2: after filtering, only 2 tokens have probability, and they sum to 1;
    # greedy: the chosen token has probability 1 after "filtering", every other 0.
    for spec, kept in ((DecodingSpec(top_k=2), 2), (DecodingSpec(temperature=0), 1)):
        sample = generate(model, CHARS, ["the"], spec, max_new_tokens=5, top=4)[0]
        for detail in sample.details:
            filtered = [math.exp(f) for _, _, f in detail.top]
            assert sum(p > 0 for p in filtered) == kept
            assert sum(filtered) == pytest.approx(1.0, abs=1e-6)
            assert detail.logprob == pytest.approx(detail.top[[t for t, _, _ in detail.top].index(detail.token)][1])
        if kept == 1:
            assert all(d.filtered_logprob == 0.0 for d in sample.details)


def test_seeds_must_fit_the_generator(model):
    with pytest.raises(UserError, match="seed must be in"):
        generate(model, CHARS, ["a"], DecodingSpec(), max_new_tokens=1, seed=2**63 - 1, num_samples=2)
    generate(model, CHARS, ["a"], DecodingSpec(), max_new_tokens=1, seed=2**63 - 2, num_samples=2)  # the last fit


def test_the_token_buffer_grows_past_its_first_size(model):
    # The buffer starts at prompt + 1024 tokens and doubles when full; what was appended stays.
    context = Context(model, [[1, 2], [3, 4]], max_new_tokens=10**12, window="exact")
    appended = torch.randint(0, CHARS.vocab_size, (2, 3000), generator=torch.Generator().manual_seed(0))
    for column in appended.T:
        context.append(column)
    assert torch.equal(context.tokens[:, : context.length], torch.cat([torch.tensor([[1, 2], [3, 4]]), appended], 1))


def test_a_batch_too_large_for_memory_is_refused_before_any_work(model):
    with pytest.raises(UserError, match=r"a batch of 1,000,000,000 rows needs about .* GiB"):
        generate(model, CHARS, ["a"], DecodingSpec(), max_new_tokens=5, num_samples=10**9)
    with pytest.raises(UserError, match="a batch of 500,000,000 rows"):  # beams: a batch of num_beams per prompt
        beams = DecodingSpec(num_beams=5 * 10**8)
        generate(model, CHARS, ["a", "b"], beams, max_new_tokens=5)


@pytest.mark.slow  # a fresh sample.py process
def test_sample_cli_refuses_an_absurd_number_of_samples_in_one_line(tiny_checkpoint):
    result = run_cli("sample.py", str(tiny_checkpoint), "--num-samples", "1000000000", "--max-new-tokens", "5",
                     timeout=60)
    assert "a batch of 1,000,000,000 rows" in one_line_error(result)
    assert result.stdout == ""


@pytest.mark.slow  # a fresh sample.py process
def test_sample_cli_says_in_one_line_when_stdout_cannot_show_the_text(tiny_checkpoint, tmp_path):
    # A byte-level tokenizer takes any prompt; an ASCII stdout cannot show a Japanese one.
    payload = load_checkpoint(tiny_checkpoint)
    byte_level = BPETokenizer({bytes([b]): b for b in range(256)})
    payload["config"]["model"]["vocab_size"] = byte_level.vocab_size
    torch.manual_seed(0)
    path = tmp_path / "bytes.pt"
    save_checkpoint(path, model=GPT(ModelConfig(**payload["config"]["model"])), config=payload["config"],
                    tokenizer=byte_level.state())
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run([sys.executable, "sample.py", str(path), "--prompt", "日本語", "--max-new-tokens", "3",
                             "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    # the text it could not show starts with the echoed prompt; what the random model added after it varies
    assert f"encoding (ascii) cannot show {ascii('日本語')[:-1]}" in one_line_error(result)
