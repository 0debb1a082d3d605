"""Speculative decoding (model/speculative.py) against plain decoding: greedy token for
token, and the sampled distribution of the first tokens against the exact one, worked
out here by enumerating every continuation with uncached forward passes."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from model import speculative
from model.config import ModelConfig
from model.decoding import process_logits, sampling_distribution
from model.errors import UserError
from model.generate import SpeculationCounts, generate
from model.gpt import GPT, KVCache
from model.speculative import DraftProposer, Speculation, SpeculativeRow, check_same_tokenizer, lookup_continuation
from model.strategy import DecodingSpec
from model.tokenizer import CharTokenizer
from tests.conftest import ROOT, one_line_error, run_cli

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
GREEDY = DecodingSpec(temperature=0)


def random_model(seed: int, vocab: int = TOKENIZER.vocab_size, scale: float = 1.0, dtype=torch.float64,
                 **shape) -> GPT:
    """A random model; ``scale`` multiplies the (tied) embedding, so the logits spread
    (at init they are nearly equal, and every distribution nearly uniform)."""
    torch.manual_seed(seed)
    values = dict(block_size=32, n_layer=2, n_head=2, n_embd=16) | shape
    model = GPT(ModelConfig(vocab_size=vocab, dropout=0.0, **values)).eval().to(dtype)
    with torch.no_grad():
        model.wte.weight.mul_(scale)
    return model


@pytest.mark.parametrize("window", ["exact", "shift"])
@pytest.mark.parametrize("source", ["random draft", "identical draft", "small draft", "prompt lookup"])
def test_greedy_speculation_gives_plain_greedys_tokens(source, window):
    target = random_model(0, scale=8)
    speculation = {
        "random draft": Speculation(draft=random_model(1, scale=8), gamma=3),
        "identical draft": Speculation(draft=target, gamma=4),
        "small draft": Speculation(draft=random_model(2, scale=8, n_layer=1, n_embd=8, block_size=16), gamma=5),
        "prompt lookup": Speculation(lookup=2, gamma=3),
    }[source]
    prompts = ["the cat sat on the mat. the cat", "a", "z" * 40]  # the last is longer than the window
    options = dict(max_new_tokens=50, window=window, stop=["xq"])
    plain = generate(target, TOKENIZER, prompts, GREEDY, **options)
    spec = generate(target, TOKENIZER, prompts, GREEDY, speculate=speculation, **options)
    for a, b in zip(plain, spec):
        assert b.tokens == a.tokens and b.text == a.text and b.finish == a.finish
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-9)


def test_greedy_speculation_follows_the_penalties_position_by_position():
    # A repetition penalty changes the target's argmax once a proposed token is seen: a
    # proposal checked with the penalty state of the step's start would be accepted wrongly.
    target = random_model(0, scale=8)
    spec = DecodingSpec(temperature=0, repetition_penalty=3.0, frequency_penalty=1.0)
    plain = generate(target, TOKENIZER, ["abc"], spec, max_new_tokens=40)[0]
    for speculation in (Speculation(draft=random_model(1, scale=8), gamma=4), Speculation(draft=target),
                        Speculation(lookup=1, gamma=4)):
        assert generate(target, TOKENIZER, ["abc"], spec, max_new_tokens=40,
                        speculate=speculation)[0].tokens == plain.tokens


def test_an_identical_draft_has_every_proposal_accepted_when_sampling():
    target = random_model(0, scale=4)
    spec = DecodingSpec(temperature=0.9, top_k=10, repetition_penalty=1.3)
    row = SpeculativeRow(target, TOKENIZER.encode("hello"), spec, Speculation(draft=target, gamma=4), seed=3,
                         window="exact", max_new_tokens=25, vocab=TOKENIZER.vocab_size)
    steps = [row.step(25 - 5 * i) for i in range(5)]
    assert [(s.proposed, s.accepted) for s in steps] == [(4, 4)] * 5
    assert row.context.length == 5 + 25


def test_a_sample_counts_its_proposals_and_passes():
    # The target as its own draft accepts all 4 proposals of every step (the test above):
    # 25 tokens in 5 passes of 5, 20 of 20 proposals accepted.
    target = random_model(0, scale=4)
    spec = DecodingSpec(temperature=0.9, top_k=10, repetition_penalty=1.3)
    sample = generate(target, TOKENIZER, ["hello"], spec, max_new_tokens=25, seed=3,
                      speculate=Speculation(draft=target, gamma=4))[0]
    assert sample.finish == "length" and len(sample.tokens) == 25
    assert sample.speculation == SpeculationCounts(proposed=20, accepted=20, passes=5)
    assert sample.speculation.acceptance_rate == 1.0 and sample.speculation.tokens_per_pass == 5.0
    plain = generate(target, TOKENIZER, ["hello"], spec, max_new_tokens=25, seed=3)[0]
    assert plain.speculation is None


def test_each_target_pass_releases_its_accepted_tokens_and_one_more():
    # With a draft that is often rejected, a row that runs to its length released exactly
    # accepted + passes tokens: every pass its accepted proposals and the target's own token.
    target, draft = random_model(0, scale=4), random_model(1, scale=4)
    spec = DecodingSpec(temperature=0.9, top_k=10)
    samples = generate(target, TOKENIZER, ["hello", "ab"], spec, max_new_tokens=30, seed=5, num_samples=2,
                       speculate=Speculation(draft=draft, gamma=3))
    lengths = [s for s in samples if s.finish == "length"]
    assert lengths
    for sample in lengths:
        counts = sample.speculation
        assert len(sample.tokens) == 30 == counts.accepted + counts.passes
        assert counts.proposed <= 3 * counts.passes
    assert sum(s.speculation.accepted for s in samples) < sum(s.speculation.proposed for s in samples)


def test_speculation_counts_add_up_and_summarise():
    total = SpeculationCounts(10, 6, 4) + SpeculationCounts(2, 0, 3)
    assert total == SpeculationCounts(12, 6, 7)
    assert total.acceptance_rate == pytest.approx(0.5) and total.tokens_per_pass == pytest.approx(13 / 7)
    assert total.summary() == ("speculative decoding: 6 of 12 proposed tokens accepted (50.0%), "
                               "1.86 tokens per target pass (7 passes)")
    assert SpeculationCounts().acceptance_rate == 0.0 and SpeculationCounts().tokens_per_pass == 0.0


def test_details_of_speculative_tokens_are_those_of_plain_decoding():
    target = random_model(0, scale=8)
    plain = generate(target, TOKENIZER, ["ab"], GREEDY, max_new_tokens=12, top=3)[0]
    spec = generate(target, TOKENIZER, ["ab"], GREEDY, max_new_tokens=12, top=3,
                    speculate=Speculation(draft=random_model(1, scale=8)))[0]
    assert len(spec.details) == 12
    for a, b in zip(plain.details, spec.details):
        assert b.token == a.token and [t for t, _, _ in b.top] == [t for t, _, _ in a.top]
        assert b.filtered_logprob == pytest.approx(a.filtered_logprob, abs=1e-9)


# ----------------------------------------------------------------------------------------
# The sampled distribution.

SMALL = CharTokenizer("abc")  # 4 tokens with end-of-text (id 3): 4 + 16 + 64 continuations of 3 tokens
PROMPT = [0, 1]
NEW = 3


def exact_continuations(model: GPT, spec: DecodingSpec) -> dict[tuple[int, ...], float]:
    """The probability of every continuation of PROMPT of NEW tokens (shorter when it
    reaches end-of-text) under plain decoding's rule: at each position, the softmax of
    `process_logits` with seen = prompt and output so far, counts = the output's tokens,
    from an uncached forward pass over the whole sequence."""
    vocab = SMALL.vocab_size
    result = {}

    def walk(output: tuple[int, ...], probability: float) -> None:
        if len(output) == NEW or (output and output[-1] == SMALL.eot_id):
            result[output] = result.get(output, 0.0) + probability
            return
        ids = torch.tensor([PROMPT + list(output)])
        with torch.no_grad():
            logits = model(ids)[0][:, -1].double()
        seen = torch.zeros(1, vocab, dtype=torch.bool)
        seen[0, PROMPT + list(output)] = True
        counts = torch.zeros(1, vocab, dtype=torch.float64)
        for token in output:
            counts[0, token] += 1
        probs = torch.softmax(process_logits(logits, spec, seen=seen, counts=counts), dim=-1)[0]
        for token in range(vocab):
            if probs[token] > 0:
                walk(output + (token,), probability * float(probs[token]))

    walk((), 1.0)
    return result


def chi_squared(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; continuations expected fewer than 5
    times are pooled into one cell (an outcome of probability 0 that occurs counts as inf)."""
    if set(counts) - set(expected):
        return math.inf, 1
    cells, pooled_expected, pooled_seen = [], 0.0, 0
    for outcome, p in expected.items():
        if n * p >= 5:
            cells.append((counts.get(outcome, 0), n * p))
        else:
            pooled_expected += n * p
            pooled_seen += counts.get(outcome, 0)
    if pooled_expected > 0:
        cells.append((pooled_seen, pooled_expected))
    return sum((seen - e) ** 2 / e for seen, e in cells), len(cells) - 1


def chi_squared_critical(df: int, z: float = 3.719) -> float:
    """The chi-squared quantile at the normal quantile z (3.719: a 1e-4 chance of a larger
    statistic when the distributions agree), by Wilson and Hilferty's cube-root approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sampled_continuations(target: GPT, spec: DecodingSpec, speculation: Speculation | None, n: int):
    samples = generate(target, SMALL, [PROMPT], spec, num_samples=n, max_new_tokens=NEW, seed=11,
                       speculate=speculation)
    counts: dict[tuple[int, ...], int] = {}
    for sample in samples:
        counts[tuple(sample.tokens)] = counts.get(tuple(sample.tokens), 0) + 1
    return counts


DISTRIBUTION_CASES = {
    "sampling, draft": (DecodingSpec(), "draft"),
    "top-k, penalties, draft": (DecodingSpec(temperature=0.9, top_k=3, repetition_penalty=1.6,
                                             frequency_penalty=0.7), "draft"),
    "top-p, prompt lookup": (DecodingSpec(top_p=0.9, presence_penalty=0.5), "lookup"),
}


def small_pair():
    """A target and a draft that disagrees with it often (different random weights)."""
    target = random_model(0, vocab=SMALL.vocab_size, scale=6, block_size=8, n_layer=1, n_head=1, n_embd=8)
    draft = random_model(5, vocab=SMALL.vocab_size, scale=6, block_size=8, n_layer=1, n_head=1, n_embd=8)
    return target, draft


def check_distribution(case: str, n: int, p_min: float = 0.0) -> tuple[float, float]:
    spec, source = DISTRIBUTION_CASES[case]
    target, draft = small_pair()
    speculation = (Speculation(draft=draft, gamma=2, p_min=p_min) if source == "draft"
                   else Speculation(lookup=1, gamma=2))
    statistic, df = chi_squared(sampled_continuations(target, spec, speculation, n),
                                exact_continuations(target, spec), n)
    return statistic, chi_squared_critical(df)


def test_speculative_sampling_draws_the_first_three_tokens_from_plain_samplings_distribution():
    statistic, critical = check_distribution("top-k, penalties, draft", 800)
    assert statistic < critical


@pytest.mark.slow  # 2,000 generations of one row each per case: about 4 s a case
@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_every_proposal_source_keeps_the_distribution(case):
    statistic, critical = check_distribution(case, 2000)
    assert statistic < critical


def test_the_exact_distribution_is_what_plain_sampling_draws():
    # the enumeration above is the truth the speculative tests are held to: plain
    # sampling (generate without speculation) must pass it too
    target, _ = small_pair()
    spec = DISTRIBUTION_CASES["top-k, penalties, draft"][0]
    n = 3000
    statistic, df = chi_squared(sampled_continuations(target, spec, None, n), exact_continuations(target, spec), n)
    assert statistic < chi_squared_critical(df)


def resample_from_p(p, q, proposal, generator):
    """A broken acceptance rule: on rejection it draws from p instead of the residual."""
    for i, token in enumerate(proposal):
        u = torch.rand((), dtype=torch.float64, generator=generator)
        if u * q[i, token] >= p[i, token]:
            return i, speculative._draw(p[i], generator)
    return len(proposal), speculative._draw(p[len(proposal)], generator)


def always_accept(p, q, proposal, generator):
    """Another broken rule: the draft's tokens are taken as they come."""
    return len(proposal), speculative._draw(p[len(proposal)], generator)


@pytest.mark.parametrize("broken", [resample_from_p, always_accept])
def test_a_broken_acceptance_rule_fails_the_distribution_test(monkeypatch, broken):
    monkeypatch.setattr(speculative, "accept", broken)
    statistic, critical = check_distribution("top-k, penalties, draft", 800)
    assert statistic > critical


# ----------------------------------------------------------------------------------------
# The draft's confidence stop (p_min).


@pytest.fixture
def proposals(monkeypatch):
    """Every draft proposal made while the test runs, as (tokens asked for, tokens proposed)."""
    made = []
    propose = DraftProposer.propose

    def recorded(self, g, *args):
        tokens, q = propose(self, g, *args)
        assert q.shape == (len(tokens), self.vocab)
        made.append((g, len(tokens)))
        return tokens, q

    monkeypatch.setattr(DraftProposer, "propose", recorded)
    return made


def stopped_early(made: list[tuple[int, int]]) -> int:
    return sum(proposed < asked for asked, proposed in made)


def test_greedy_speculation_with_a_p_min_gives_plain_greedys_tokens(proposals):
    # the random draft's largest probability is 0.15-0.27 here: p_min 0.2 stops it about half the time
    target = random_model(0, scale=8)
    speculation = Speculation(draft=random_model(1, scale=8), gamma=3, p_min=0.2)
    prompts = ["the cat sat on the mat. the cat", "a", "z" * 40]
    for window in ("exact", "shift"):
        plain = generate(target, TOKENIZER, prompts, GREEDY, max_new_tokens=50, window=window)
        spec = generate(target, TOKENIZER, prompts, GREEDY, max_new_tokens=50, window=window, speculate=speculation)
        assert [s.tokens for s in spec] == [s.tokens for s in plain]
    assert 0 < stopped_early(proposals) < len(proposals)
    assert any(proposed == 0 for _, proposed in proposals)  # a stop before the first proposal: a plain step


# The draft of small_pair is at least this sure of its first token in the "top-k,
# penalties" case (0.454), and below it at some of the second ones (0.35-0.4).
P_MIN = 0.39


def test_speculative_sampling_with_a_p_min_keeps_the_distribution(proposals):
    statistic, critical = check_distribution("top-k, penalties, draft", 600, P_MIN)
    assert statistic < critical
    assert 0 < stopped_early(proposals) < len(proposals)


class DropsUnlikelyProposals(DraftProposer):
    """A broken stop: it draws d_i, then drops it (and stops) when q_i(d_i) < p_min. The
    decision then depends on d_i itself, so the proposals kept are not draws from q_i."""

    def propose(self, g, history, penalties, generator):
        trial = copy.deepcopy(penalties)
        tokens, dists = [], []
        for _ in range(g):
            processed = trial.process(self.context.next_logits()[:, : self.vocab], self.spec)
            q = sampling_distribution(processed, self.spec, torch.float64)[0]
            token = speculative._draw(q, generator)
            if q[token] < self.p_min:
                break
            tokens.append(token)
            dists.append(q)
            trial.add(torch.tensor([token]))
            self.context.append(torch.tensor([token]))
        return tokens, torch.stack(dists) if dists else torch.zeros(0, self.vocab, dtype=torch.float64)


def test_dropping_a_drawn_proposal_for_its_low_probability_fails_the_distribution_test(monkeypatch):
    monkeypatch.setattr(speculative, "DraftProposer", DropsUnlikelyProposals)
    statistic, critical = check_distribution("top-k, penalties, draft", 600, P_MIN)
    assert statistic > critical


@pytest.mark.parametrize("spec", [GREEDY, DecodingSpec(temperature=0.9, top_k=10, repetition_penalty=1.3)])
def test_a_p_min_near_one_proposes_nothing_and_decodes_as_plain_decoding(proposals, spec):
    # With no proposal each step draws one token from p with the row's generator, as plain
    # decoding does: the same tokens for the same seed, sampling included.
    target = random_model(0, scale=8)
    options = dict(max_new_tokens=20, seed=5, num_samples=1 if spec.is_greedy else 2)
    plain = generate(target, TOKENIZER, ["the cat", "a"], spec, **options)
    speculation = Speculation(draft=target, gamma=3, p_min=0.999)
    spec_samples = generate(target, TOKENIZER, ["the cat", "a"], spec, speculate=speculation, **options)
    assert [s.tokens for s in spec_samples] == [s.tokens for s in plain]
    for a, b in zip(plain, spec_samples):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-9)
    assert proposals and all(proposed == 0 for _, proposed in proposals)


def test_steps_of_an_identical_draft_with_a_p_min_accept_what_it_proposes(proposals):
    # The target as its own draft accepts every proposal; p_min 0.2 (its confidence is
    # 0.13-0.27 here) makes steps of none, some and all of the gamma proposals.
    # Each step releases its proposals and one token, and the draft's context follows.
    target = random_model(0, scale=4)
    spec = DecodingSpec(temperature=0.9, top_k=10, repetition_penalty=1.3)
    row = SpeculativeRow(target, TOKENIZER.encode("hello"), spec, Speculation(draft=target, gamma=4, p_min=0.2),
                         seed=3, window="exact", max_new_tokens=25, vocab=TOKENIZER.vocab_size)
    made = 0
    while made < 25:
        step = row.step(25 - made)
        assert step.accepted == step.proposed and len(step.tokens) == step.proposed + 1
        made += len(step.tokens)
        draft = row.proposer.context
        assert draft.length == row.context.length == 5 + made
        assert torch.equal(draft.tokens[:, : draft.length], row.context.tokens[:, : row.context.length])
        assert draft.cache.length == draft.length - 1  # the cache lags the context by one token between steps
    assert made == 25
    assert [asked for asked, _ in proposals if asked] and all(0 <= proposed <= asked for asked, proposed in proposals)
    assert {"none", "some", "all"} <= {"none" if proposed == 0 else "all" if proposed == asked else "some"
                                        for asked, proposed in proposals}


# ----------------------------------------------------------------------------------------
# The pieces.


@pytest.mark.parametrize("history, n, g, expected", [
    ("abcxabcy" + "abc", 3, 4, "yabc"),  # the latest earlier occurrence wins, and overlapping the tail is fine
    ("abcxab", 2, 3, "cxa"),
    ("aaaa", 2, 5, "a"),  # the occurrence at index 1 overlaps the tail; one token follows it
    ("abcd", 2, 3, ""),  # "cd" never occurred before
    ("ab", 2, 3, ""),  # nothing before the n-gram
    ("abab", 1, 1, "a"),
])
def test_prompt_lookup_proposes_what_followed_the_latest_occurrence(history, n, g, expected):
    ids = torch.tensor(TOKENIZER.encode(history))
    assert TOKENIZER.decode(lookup_continuation(ids, n, g)) == expected


def test_a_rolled_back_cache_continues_like_a_fresh_one():
    model = random_model(0, scale=4)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    cache = KVCache(model.config, 1, 32, "cpu", torch.float64)
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)
        model(torch.tensor([[9, 9]]), cache=cache)  # two tokens that get rejected
        cache.rollback(3)
        rolled = model(tokens[:, 3:], cache=cache)[0]
        fresh = model(tokens)[0][:, 3:]
    assert cache.length == 7
    assert torch.allclose(rolled, fresh, atol=1e-10)
    with pytest.raises(ValueError, match="cannot roll"):
        cache.rollback(8)


@dataclasses.dataclass(frozen=True)
class StatefulSpec(DecodingSpec):
    """A spec as the stateful samplers (mirostat) will mark theirs."""

    @property
    def is_stateful(self) -> bool:
        return True


@pytest.mark.parametrize("spec, window, message", [
    (DecodingSpec(num_beams=2), "exact", "beam search"),
    (StatefulSpec(), "exact", "carries state"),
    (DecodingSpec(), "none", "window none has no cache"),
])
def test_what_cannot_be_speculated_exactly_is_refused(spec, window, message):
    target = random_model(0)
    with pytest.raises(UserError, match=message):
        generate(target, TOKENIZER, ["ab"], spec, max_new_tokens=4, window=window,
                 speculate=Speculation(draft=random_model(1)))


def test_bad_speculation_settings_are_refused():
    with pytest.raises(UserError, match="one proposal source"):
        Speculation()
    with pytest.raises(UserError, match="one proposal source"):
        Speculation(draft=random_model(1), lookup=2)
    with pytest.raises(UserError, match="gamma >= 1"):
        Speculation(lookup=2, gamma=0)
    with pytest.raises(UserError, match="more than half the draft's context"):
        Speculation(draft=random_model(1, block_size=8), gamma=5)
    for p_min in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(UserError, match="p-min must be >= 0 and < 1"):
            Speculation(draft=random_model(1), p_min=p_min)
    with pytest.raises(UserError, match="prompt lookup's is deterministic"):
        Speculation(lookup=2, p_min=0.3)
    with pytest.raises(UserError, match="fewer than the tokenizer's"):
        generate(random_model(0), TOKENIZER, ["ab"], GREEDY, max_new_tokens=4,
                 speculate=Speculation(draft=random_model(1, vocab=10)))
    with pytest.raises(UserError, match="another tokenizer"):
        check_same_tokenizer(TOKENIZER, SMALL, "d.pt")
    check_same_tokenizer(TOKENIZER, CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n"), "d.pt")


# ----------------------------------------------------------------------------------------
# The command line.


def test_generate_with_a_draft_or_prompt_lookup_prints_plain_greedys_text(tiny_checkpoint, capsys):
    import sample

    common = [str(tiny_checkpoint), "--strategy", "greedy", "--prompt", "The quick", "--max-new-tokens", "40",
              "--device", "cpu"]
    assert sample.main(common) == 0
    plain = capsys.readouterr().out
    for extra in (["--draft", str(tiny_checkpoint), "--speculate", "3"], ["--prompt-lookup", "2"],
                  ["--draft", str(tiny_checkpoint), "--draft-p-min", "0.5"]):
        assert sample.main([*common, *extra]) == 0
        assert capsys.readouterr().out == plain


def test_serve_takes_the_draft_p_min_as_generate_does(tiny_checkpoint, loaded):
    import sample

    _, tokenizer = loaded
    args = sample.parse_args(["serve", str(tiny_checkpoint), "--draft", str(tiny_checkpoint), "--draft-p-min", "0.4"])
    speculation = sample.speculation_from_args(args, tokenizer, torch.device("cpu"))
    assert speculation.p_min == 0.4 and speculation.draft is not None


@pytest.mark.parametrize("extra, message", [
    (["--speculate", "3"], "--speculate needs --draft or --prompt-lookup"),
    (["--prompt-lookup", "2", "--draft", "D"], "either --draft or --prompt-lookup"),
    (["--prompt-lookup", "2", "--strategy", "beam"], "cannot speculate: beam search"),
    (["--prompt-lookup", "0"], "--prompt-lookup must be >= 1"),
    (["--prompt-lookup", "2", "--speculate", "0"], "--speculate must be >= 1"),
    (["--prompt-lookup", "2", "--draft-p-min", "0.3"], "--draft-p-min needs --draft"),
    (["--draft-p-min", "0.3"], "--draft-p-min needs --draft"),
    (["--draft", "SELF", "--draft-p-min", "1"], "--draft-p-min must be >= 0 and < 1"),
    (["--draft", "NOT-LOADED", "--draft-p-min", "nan"], "--draft-p-min must be >= 0 and < 1"),
])
def test_generate_refuses_bad_speculation_flags_in_one_line(tiny_checkpoint, capsys, extra, message):
    import sample

    capsys.readouterr()
    extra = [str(tiny_checkpoint) if word == "SELF" else word for word in extra]
    assert sample.main([str(tiny_checkpoint), "--max-new-tokens", "5", "--device", "cpu", *extra]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_generate_refuses_a_draft_with_another_tokenizer(tiny_checkpoint, tmp_path):
    # one command in a fresh process, as a user runs it: the draft is a checkpoint of another corpus
    from model.checkpoint import read_checkpoint
    from model.tokenizer import tokenizer_from_state

    checkpoint = read_checkpoint(tiny_checkpoint)
    assert tokenizer_from_state(checkpoint.tokenizer).state() != SMALL.state()
    other = tmp_path / "other.pt"
    saved = torch.load(tiny_checkpoint, weights_only=True)
    saved["tokenizer"] = SMALL.state()
    torch.save(saved, other)
    result = run_cli("sample.py", str(tiny_checkpoint), "--draft", str(other), "--max-new-tokens", "5")
    assert "has another tokenizer" in one_line_error(result)


def test_the_server_with_a_draft_completes_as_plain_greedy(loaded):
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from live_server import LiveServer
    from model.serve import ServeSettings, create_app

    model, tokenizer = loaded
    expected = generate(model, tokenizer, ["The quick"], GREEDY, max_new_tokens=30)[0].text
    app = create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64), Speculation(draft=model, gamma=3))
    with LiveServer(app) as live:
        client = live.client()
        greedy = client.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0)
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="tiny", prompt="The quick", max_tokens=30, temperature=0, stream=True))
        beam = client.completions.create(model="tiny", prompt="The quick", max_tokens=5,
                                         extra_body={"strategy": "beam:n=2"})  # not speculative: decoded plainly
        last = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0,
                                              stream=True))[-1]
    assert greedy.choices[0].text == expected
    assert streamed == expected
    assert beam.choices[0].finish_reason in ("length", "stop")
    # the model as its own draft: every proposal accepted, each of the passes releasing its
    # proposals and one token, 30 in all
    assert greedy.choices[0].finish_reason == "length"
    for counts in (greedy.choices[0].model_extra["speculation"], last.choices[0].model_extra["speculation"]):
        assert counts["accepted"] == counts["proposed"] > 0
        assert counts["accepted"] + counts["target_passes"] == 30
    assert "speculation" not in (beam.choices[0].model_extra or {})


def test_speculative_speed_bench_runs(tmp_path):
    out = tmp_path / "speculative_speed.json"
    result = run_cli("bench/speculative_speed.py", "--tiny", "--tokens", "24", "--repeats", "1", "--p-min", "0.04",
                     "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    greedy = saved["results"]["greedy"]
    assert greedy["greedy_equals_plain"] == {"plain": True, "draft": True, "prompt lookup": True, "draft p-min": True}
    assert set(greedy["tokens_per_s"]) == {"plain", "draft", "prompt lookup", "draft p-min"}
    assert all(rate > 0 for rate in greedy["tokens_per_s"].values())
    for side in ("draft", "draft p-min"):
        figures = saved["results"]["sample"]["acceptance"][side]
        assert 0 <= figures["accepted"] <= figures["proposed"] and figures["target_passes"] > 0
        assert figures["mean_proposal_length"] == pytest.approx(figures["proposed"] / figures["target_passes"])
        assert 0 <= figures["mean_proposal_length"] <= saved["gamma"]
    passes = saved["results"]["sample"]["acceptance"]["draft"]
    histogram = {int(k): count for k, count in passes["passes_by_proposals"].items()}
    assert sum(histogram.values()) == passes["target_passes"]
    assert sum(k * count for k, count in histogram.items()) == passes["proposed"]
    passes_timed = {f"target_{t}_tokens_ms" for t in range(1, saved["gamma"] + 2)} | {"draft_step_ms"}
    assert set(saved["pass_times"]) == passes_timed
    assert passes["model_ms_per_pass"] > 0 and passes["measured_ms_per_pass"] > 0 and passes["bound"] > 0
    for side in ("draft", "draft p-min"):  # each proposal is a draft step; catch-ups and p-min's stops are more
        figures = saved["results"]["sample"]["acceptance"][side]
        assert figures["draft_steps"] >= figures["proposed"]
    stopped = saved["results"]["sample"]["acceptance"]["draft p-min"]
    assert stopped["draft_steps"] > stopped["proposed"]


def test_the_model_time_bound_weighs_each_pass_by_its_own_length():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from speculative_speed import model_time_bound

    # one plain pass (2 ms) and three 5-token passes (3 ms) after 4 proposals each, with 13
    # draft steps of 0.5 ms in all (12 proposals and a catch-up step):
    # (2 + 3 * 3 + 13 * 0.5) / 4 = 4.375 ms a pass; 3 tokens a pass against 2 ms a token plain
    figures = {"passes_by_proposals": {0: 1, 4: 3}, "tokens_per_pass": 3.0, "draft_steps": 13}
    times = {"target_1_tokens_ms": 2.0, "target_5_tokens_ms": 3.0, "draft_step_ms": 0.5}
    assert model_time_bound(figures, times) == pytest.approx({"model_ms_per_pass": 4.375, "bound": 6 / 4.375})
    # prompt lookup has no draft steps: (2 + 3 * 3) / 4
    lookup = {"passes_by_proposals": {0: 1, 4: 3}, "tokens_per_pass": 3.0}
    assert model_time_bound(lookup, times)["model_ms_per_pass"] == pytest.approx(11 / 4)


def test_pass_times_runs_each_model_as_the_token_loop_does(monkeypatch):
    # On CUDA the loop runs under bf16 autocast with a bf16 cache: pretend the CPU does, and
    # check every timed pass ran so. The draft has half the target's context.
    import sys

    from model.device import Precision

    sys.path.insert(0, str(ROOT / "bench"))
    from speculative_speed import PROMPT as BENCH_PROMPT
    from speculative_speed import pass_times

    tokenizer = CharTokenizer(sorted(set(BENCH_PROMPT)))
    monkeypatch.setattr(Precision, "for_device", classmethod(lambda cls, device: cls(device, torch.bfloat16)))
    torch.manual_seed(0)
    target = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    draft = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=8)).eval()
    seen = []
    for net in (target, draft):
        net.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (kwargs["cache"].keys.dtype, torch.is_autocast_enabled("cpu"))), with_kwargs=True)
    times = pass_times(target, draft, tokenizer, gamma=3, tokens=40, repeats=2)
    assert set(times) == {"target_1_tokens_ms", "target_2_tokens_ms", "target_3_tokens_ms", "target_4_tokens_ms",
                          "draft_step_ms"}
    assert seen and set(seen) == {(torch.bfloat16, True)}


@pytest.mark.parametrize("flags, rate", [(["--draft", "SELF"], "(100.0%)"), (["--prompt-lookup", "1"], "%)")])
def test_generate_prints_how_the_speculation_went(tiny_checkpoint, capsys, flags, rate):
    # the model as its own draft has every proposal accepted; the line goes to stderr, beside the text
    import sample

    capsys.readouterr()
    flags = [str(tiny_checkpoint) if word == "SELF" else word for word in flags]
    assert sample.main([str(tiny_checkpoint), "--max-new-tokens", "12", "--device", "cpu", "--seed", "1",
                        "--num-samples", "2", *flags]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("speculative decoding: ")]
    assert len(lines) == 1 and rate in lines[0] and "tokens per target pass" in lines[0]
    assert "speculative decoding" not in out


def test_plain_generate_prints_no_speculation_line(tiny_checkpoint, capsys):
    import sample

    capsys.readouterr()
    assert sample.main([str(tiny_checkpoint), "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert "speculative decoding" not in capsys.readouterr().err
