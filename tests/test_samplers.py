"""Tests for the samplers since 2020 in model/decoding.py: eta, epsilon, top-n-sigma,
top-H, XTC, mirostat (versions 2 and 1), DRY, and the order of the sampling chain.

Truth comes from examples worked by hand (arithmetic in the comments), plain-Python
references written here from each sampler's definition, statistical properties (the
exact mixture XTC samples from, mirostat's convergence to its target surprise), and
transformers' own warpers for eta, epsilon and top-H (run in the .venv-hf Python).
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model.decoding import (
    PenaltyState,
    apply_dry_penalty,
    choose_tokens,
    dry_repeat_lengths,
    epsilon_filter,
    eta_filter,
    mirostat_filter,
    mirostat_v1_filter,
    process_logits,
    sequence_breaker_ids,
    top_h_filter,
    top_n_sigma_filter,
    xtc_filter,
)
from model.errors import UserError
from model.generate import generate
from model.gpt import GPT
from model.strategy import CHAIN_ORDERS, DecodingSpec, parse_strategy
from model.tokenizer import CharTokenizer
from tests.conftest import HF_PYTHON, tiny_config

INF = math.inf
FAST = settings(max_examples=60, deadline=None)


def kept(row_out: torch.Tensor) -> set[int]:
    """Token ids a filter left finite."""
    return {i for i, x in enumerate(row_out.tolist()) if x != -INF}


def logs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def softmax64(row: list[float]) -> list[float]:
    top = max(row)
    weights = [math.exp(x - top) for x in row]
    total = math.fsum(weights)
    return [w / total for w in weights]


@st.composite
def random_rows(draw, vocab: tuple[int, int] = (2, 80)) -> torch.Tensor:
    """(B, V) float32 logits drawn from a seeded normal distribution of a drawn scale."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    rows, size = draw(st.integers(1, 4)), draw(st.integers(*vocab))
    return torch.randn(rows, size, generator=generator) * draw(st.floats(0.1, 8.0))


# ----------------------------------------------------------------------------------------
# epsilon and eta


def test_epsilon_worked_examples():
    assert kept(epsilon_filter(logs([0.5, 0.3, 0.15, 0.05]), 0.1)) == {0, 1, 2}  # .05 < .1
    assert kept(epsilon_filter(logs([0.5, 0.3, 0.15, 0.05]), 0.16)) == {0, 1}
    assert kept(epsilon_filter(logs([0.3, 0.3, 0.4]), 0.5)) == {2}  # none reaches .5: the most likely stays
    assert kept(epsilon_filter(logs([0.45, 0.45, 0.1]), 0.5)) == {0, 1}  # ... with every token tied with it
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(UserError, match="epsilon_cutoff"):
            epsilon_filter(logs([0.5, 0.5]), bad)


def test_eta_worked_examples():
    # H = -(.5 ln .5 + .3 ln .3 + .15 ln .15 + .05 ln .05) = 1.1422 nats, exp(-H) = 0.3191
    logits = logs([0.5, 0.3, 0.15, 0.05])
    assert kept(eta_filter(logits, 0.1)) == {0, 1, 2}  # min(.1, .3162 * .3191 = .1009) = .1
    # min(.16, .4 * .3191 = .1276) = .1276: the entropy term keeps .15, which epsilon .16 drops
    assert kept(eta_filter(logits, 0.16)) == {0, 1, 2}
    assert kept(eta_filter(logits, 0.25)) == {0, 1}  # min(.25, .5 * .3191 = .1596)
    assert kept(eta_filter(logs([0.3, 0.3, 0.4]), 0.9)) == {2}
    with pytest.raises(UserError, match="eta_cutoff"):
        eta_filter(logits, 1.0)


def reference_eta_epsilon(row: list[float], cutoff: float, eta: bool) -> set[int]:
    """The definitions of Hewitt et al. in plain Python: keep p_i >= the cutoff (eta's:
    min(eta, sqrt(eta) exp(-H))), and the most likely tokens always."""
    probs = softmax64(row)
    if eta:
        entropy = -math.fsum(p * math.log(p) for p in probs if p > 0)
        cutoff = min(cutoff, math.sqrt(cutoff) * math.exp(-entropy))
    top = max(row)
    return {i for i, (x, p) in enumerate(zip(row, probs)) if p >= cutoff or x == top}


@FAST
@given(logits=random_rows(), cutoff=st.floats(1e-4, 0.9), eta=st.booleans())
def test_eta_and_epsilon_match_their_definitions(logits, cutoff, eta):
    out = (eta_filter if eta else epsilon_filter)(logits, cutoff)
    for row, row_out in zip(logits.double().tolist(), out):
        assert kept(row_out) == reference_eta_epsilon(row, cutoff, eta)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits unchanged


# ----------------------------------------------------------------------------------------
# top-n-sigma


def test_top_n_sigma_worked_example_uses_the_population_deviation():
    # [0, -1, -2, -3]: mean -1.5, population variance (2.25 + .25 + .25 + 2.25) / 4 = 1.25,
    # sigma 1.118; n = 1.7 keeps logits >= -1.901: tokens 0 and 1. The sample deviation
    # (divided by 3: 1.291) would give -2.195 and keep token 2 too.
    logits = torch.tensor([0.0, -1.0, -2.0, -3.0])
    assert kept(top_n_sigma_filter(logits, 1.7)) == {0, 1}
    assert kept(top_n_sigma_filter(logits, 2.8)) == {0, 1, 2, 3}  # -3.13
    # -inf (filtered) logits are not part of the mean and sigma: [0, -1, -inf]: mean -.5, sigma .5
    assert kept(top_n_sigma_filter(torch.tensor([0.0, -1.0, -INF]), 1.9)) == {0}
    assert kept(top_n_sigma_filter(torch.tensor([0.0, -1.0, -INF]), 2.0)) == {0, 1}
    assert kept(top_n_sigma_filter(torch.tensor([5.0, -INF]), 1.0)) == {0}  # sigma 0
    assert torch.equal(top_n_sigma_filter(logits, 0), logits)  # n <= 0: off, as in llama.cpp
    assert torch.equal(top_n_sigma_filter(logits, -1), logits)
    with pytest.raises(UserError, match="top_n_sigma"):
        top_n_sigma_filter(logits, math.inf)


def test_top_n_sigma_matches_its_definition_on_random_rows():
    logits = torch.randn(50, 65, generator=torch.Generator().manual_seed(3)) * 3
    logits[::7, ::5] = -INF
    for n in (0.5, 1.0, 2.0):
        out = top_n_sigma_filter(logits, n)
        for row, row_out in zip(logits.double().tolist(), out):
            finite = [x for x in row if x != -INF]
            mean = math.fsum(finite) / len(finite)
            sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in finite) / len(finite))
            assert kept(row_out) == {i for i, x in enumerate(row) if x >= max(finite) - n * sigma}


@FAST
@given(logits=random_rows(), n=st.floats(0.05, 4.0), t=st.floats(0.05, 20.0),
       order=st.sampled_from(sorted(CHAIN_ORDERS)))
def test_top_n_sigma_keeps_the_same_set_at_every_temperature(logits, n, t, order):
    wide = logits.double()
    sigma = wide.std(dim=-1, unbiased=False, keepdim=True)
    distance = (wide.amax(dim=-1, keepdim=True) - wide) / sigma
    assume(bool(((distance - n).abs() > 1e-6).all()))  # not on the boundary, where rounding decides
    plain = process_logits(logits, DecodingSpec(top_n_sigma=n))
    order = order if t != 1 else "temperature-first"
    tempered = process_logits(logits, DecodingSpec(top_n_sigma=n, temperature=t, order=order))
    assert torch.equal(torch.isfinite(plain), torch.isfinite(tempered))


# ----------------------------------------------------------------------------------------
# top-H


def reference_top_h(row: list[float], top_h: float, candidates: int = 100) -> set[int] | None:
    """transformers' TopHLogitsWarper in plain Python: among the 100 most likely tokens,
    renormalised, keep the prefix whose partial entropy is <= top_h * their entropy.
    None when a partial entropy is within 1e-9 (relative) of the bound: there the order
    of the float64 additions decides, and the two sums may rightly disagree."""
    ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))[:candidates]
    q = softmax64([row[i] for i in ranked])
    terms = [-p * math.log(p) if p > 0 else 0.0 for p in q]
    tau = top_h * math.fsum(terms)
    keep, partial = {ranked[0]}, 0.0
    for index, term in zip(ranked, terms):
        partial += term
        if abs(partial - tau) <= 1e-9 * tau:
            return None
        if partial <= tau:
            keep.add(index)
    return keep


def test_top_h_worked_example():
    # q = [.5, .25, .25]: terms .3466, .3466, .3466 nats, H = 1.0397. top_h .5: tau .5199,
    # partial entropies .3466 (kept), .6931 (dropped). top_h .7: tau .7278: two tokens.
    logits = logs([0.5, 0.25, 0.25])
    assert kept(top_h_filter(logits, 0.5)) == {0}
    assert kept(top_h_filter(logits, 0.7)) == {0, 1}
    assert kept(top_h_filter(logits, 1.0)) == {0, 1, 2}
    assert kept(top_h_filter(logs([0.9, 0.1]), 0.01)) == {0}  # the most likely always stays
    with pytest.raises(UserError, match="top_h"):
        top_h_filter(logits, 0.0)


def test_top_h_looks_at_the_100_most_likely_tokens_only():
    logits = torch.zeros(150)  # flat: 100 candidates of q = 1 / 100, whatever the tie order
    assert len(kept(top_h_filter(logits, 1.0))) == 100
    assert len(kept(top_h_filter(logits, 0.5))) == 50  # partial entropy r/100 * ln 100 <= .5 ln 100


@FAST
@given(logits=random_rows(vocab=(2, 160)), top_h=st.floats(0.01, 1.0))
def test_top_h_matches_the_reference(logits, top_h):
    out = top_h_filter(logits, top_h)
    for row, row_out in zip(logits.double().tolist(), out):
        expected = reference_top_h(row, top_h)
        if expected is not None:
            assert kept(row_out) == expected


# ----------------------------------------------------------------------------------------
# Parity with transformers' warpers.

HF_SCRIPT = """
import json, sys, torch
from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper, TopHLogitsWarper
cases = torch.load(sys.argv[1])
warpers = {"eta": EtaLogitsWarper, "epsilon": EpsilonLogitsWarper, "top_h": TopHLogitsWarper}
out = [warpers[name](value)(None, logits.clone()) for name, value, logits in cases]
torch.save(out, sys.argv[2])
"""
OURS = {"eta": eta_filter, "epsilon": epsilon_filter, "top_h": top_h_filter}
# top_h = 1 is left out: there transformers' float32 partial sums overshoot the entropy
# and drop some of the least likely tokens (see top_h_filter), where top_h_filter keeps all.
PARITY_SETTINGS = {"eta": (3e-4, 2e-3, 0.01, 0.1), "epsilon": (3e-4, 2e-3, 0.01, 0.1), "top_h": (0.2, 0.4, 0.8, 0.95)}
PARITY_SHAPES = ((400, 65), (8, 50257))  # a char vocabulary and GPT-2's


def distance_to_cutoff(row: torch.Tensor, token: int, name: str, value: float) -> float:
    """How far (relative) token's float64 probability is from the eta / epsilon cutoff."""
    log_probs = torch.log_softmax(row.double(), dim=-1)
    cutoff = value
    if name == "eta":
        entropy = -(log_probs.exp() * log_probs).sum().item()
        cutoff = min(value, math.sqrt(value) * math.exp(-entropy))
    return abs(log_probs[token].exp().item() - cutoff) / cutoff


# Slow: starts a second Python that imports transformers (about 10 s).
@pytest.mark.slow
@pytest.mark.skipif(not HF_PYTHON.exists(), reason=f"no transformers venv at {HF_PYTHON}")
def test_eta_epsilon_and_top_h_equal_transformers(tmp_path, capsys):
    """The same kept sets and logits as transformers' warpers on random rows, except where a
    token's probability is within float32 rounding (1e-5 relative) of the eta / epsilon
    cutoff: transformers decides those in float32, top_h_filter and the others in float64."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for rows, vocab in PARITY_SHAPES:
        logits = torch.randn(rows, vocab, generator=generator) * torch.rand(rows, 1, generator=generator) * 6
        cases += [(name, value, logits) for name, values in PARITY_SETTINGS.items() for value in values]
    torch.save(cases, tmp_path / "cases.pt")
    subprocess.run([str(HF_PYTHON), "-c", HF_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "hf.pt")],
                   check=True, timeout=300)
    theirs = torch.load(tmp_path / "hf.pt")
    figures = {}
    for (name, value, logits), expected in zip(cases, theirs):
        ours = OURS[name](logits, value)
        both = torch.isfinite(ours) & torch.isfinite(expected)
        difference = (ours[both] - expected[both]).abs().max().item()
        rows_off, tokens_off = (torch.isfinite(ours) != torch.isfinite(expected)).nonzero(as_tuple=True)
        for row, token in zip(rows_off.tolist(), tokens_off.tolist()):
            assert name != "top_h" and distance_to_cutoff(logits[row], token, name, value) < 1e-5, (name, value, row)
        key = f"{name} {logits.shape[0]}x{logits.shape[1]}"
        figure = figures.setdefault(key, {"rows": 0, "rows_with_another_set": 0, "max_abs_difference_kept": 0.0})
        figure["rows"] += logits.shape[0]
        figure["rows_with_another_set"] += len(set(rows_off.tolist()))
        figure["max_abs_difference_kept"] = max(figure["max_abs_difference_kept"], difference)
        assert difference == 0.0  # a kept logit is returned unchanged by both
    with capsys.disabled():
        print("\nparity with transformers:", json.dumps(figures))


def test_top_h_one_keeps_every_candidate():
    logits = torch.randn(50, 130, generator=torch.Generator().manual_seed(2)) * 4
    out = top_h_filter(logits, 1.0)
    assert (torch.isfinite(out).sum(dim=-1) == 100).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(top_h_filter(logits, 1 - 1e-9)) | torch.isfinite(out))


# ----------------------------------------------------------------------------------------
# XTC


def test_xtc_worked_examples():
    logits = logs([0.4, 0.3, 0.15, 0.1, 0.05])
    assert kept(xtc_filter(logits, 0.12)) == {2, 3, 4}  # .4, .3, .15 reach it: all but .15 go
    assert kept(xtc_filter(logits, 0.3)) == {1, 2, 3, 4}  # .4 and .3: the .4 goes
    assert kept(xtc_filter(logits, 0.35)) == {0, 1, 2, 3, 4}  # only one reaches it: nothing goes
    assert kept(xtc_filter(logs([0.3, 0.3, 0.3, 0.1]), 0.2)) == {2, 3}  # ties: the highest id stays
    # filtered-out tokens never count, even at threshold 0: of the finite ones, the least likely stays
    assert kept(xtc_filter(torch.tensor([1.0, 0.0, -INF]), 0.0)) == {1}
    with pytest.raises(UserError, match="xtc_threshold"):
        xtc_filter(logits, 0.6)


def chi_squared_critical(df: int, z: float = 3.719) -> float:
    """The chi-squared quantile of a one-sided normal z (3.719: p = 1e-4), by Wilson and
    Hilferty's cube-root approximation (within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_squared(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs) if p > 0) + (
        math.inf if any(c and not p for c, p in zip(counts, probs)) else 0.0)


def test_xtc_samples_the_exact_mixture_of_its_two_distributions():
    """A step of XTC with probability q draws from q * p_xtc + (1 - q) * p: 6,000 draws
    (60 rows with their own seeds, 100 steps each) against that mixture, and against
    each side alone, which must be rejected (the test can tell them apart)."""
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    q, threshold = 0.4, 0.12
    excluded = [0.0, 0.0, 0.15 / 0.3, 0.1 / 0.3, 0.05 / 0.3]  # .4 and .3 removed, renormalised
    mixture = [q * e + (1 - q) * p for e, p in zip(excluded, probs)]
    spec = DecodingSpec(xtc_probability=q, xtc_threshold=threshold)
    rows = 60
    logits = logs(probs).float().expand(rows, -1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    state = PenaltyState(spec, [[0]] * rows, len(probs))
    counts = [0] * len(probs)
    for _ in range(100):
        processed = state.process(logits, spec, generators)
        for token in choose_tokens(processed, spec, generators).tolist():
            counts[token] += 1
        state.add(torch.zeros(rows, dtype=torch.long))
    critical = chi_squared_critical(len(probs) - 1)
    assert chi_squared(counts, mixture) < critical, counts
    assert chi_squared(counts, probs) > 10 * critical and chi_squared(counts, excluded) > 10 * critical


def test_xtc_coin_comes_from_the_rows_own_generator():
    spec = DecodingSpec(xtc_probability=0.5, xtc_threshold=0.1)
    logits = logs([0.4, 0.3, 0.2, 0.1]).float().expand(3, -1)

    def run(seeds: list[int]) -> list[list[int]]:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        state = PenaltyState(spec, [[0]] * len(seeds), 4)
        return [choose_tokens(state.process(logits[: len(seeds)], spec, generators), spec, generators).tolist()
                for _ in range(40)]

    together = run([1, 2, 3])
    assert together == run([1, 2, 3])  # reproducible by seed
    assert [step[1] for step in together] == [step[0] for step in run([2])]  # a row draws as it would alone
    assert [step[0] for step in together] != [step[1] for step in together]


# ----------------------------------------------------------------------------------------
# Mirostat


def test_mirostat_v2_cut_worked_example():
    # surprises -log2 p: 1, 2, 3, 3 bits
    logits = logs([0.5, 0.25, 0.125, 0.125])
    assert kept(mirostat_filter(logits, 2.5)) == {0, 1}
    assert kept(mirostat_filter(logits, 3.0)) == {0, 1, 2, 3}
    assert kept(mirostat_filter(logits, 0.5)) == {0}  # nothing under mu: the most likely stays
    rows = logits.expand(2, -1)
    assert [kept(r) for r in mirostat_filter(rows, torch.tensor([1.0, 2.0]))] == [{0}, {0, 1}]  # mu per row


def test_mirostat_v1_worked_example():
    # Zipf with s = 1 over N = 4 tokens: p_i = (1 / i) / (25 / 12). Every b_i = log((i + 1) / i) = t_i,
    # so s_hat = 1, e = 0 and k = 2^mu / ln 4: mu = 1 gives 1.44 -> k = 1, mu = 2 gives 2.89 -> 2,
    # mu = 3 gives 5.77 -> all 4.
    logits = logs([1.0, 1 / 2, 1 / 3, 1 / 4])
    assert [len(kept(mirostat_v1_filter(logits, mu))) for mu in (1.0, 2.0, 3.0)] == [1, 2, 4]
    # Zipf with s = 2 over 3 tokens: e = 1, k = (2^mu / (1 - 1/3))^(1/2): mu = 1 -> 1.73 -> 1, mu = 2 -> 2.45 -> 2
    logits = logs([1.0, 1 / 4, 1 / 9])
    assert [len(kept(mirostat_v1_filter(logits, mu))) for mu in (1.0, 2.0)] == [1, 2]
    assert len(kept(mirostat_v1_filter(torch.zeros(10), 0.1))) == 10  # flat: s_hat = 0, nothing to cut
    # a row with no finite logit (every token filtered out before) passes through unchanged, as in v2
    dead = torch.full((2, 3), -INF)
    for cut in (mirostat_v1_filter(dead, 2.0), mirostat_filter(dead, 2.0)):
        assert torch.equal(cut, dead)


@pytest.mark.parametrize("version", [2, 1])
def test_mirostat_observed_surprise_converges_to_tau(version):
    """On a Zipf-like distribution (s = 1.1 over 65 tokens, 4.4 bits of entropy), the mean
    surprise of the sampled tokens, measured by the test under the distribution they were
    drawn from, settles at tau for each of 8 rows, and mu adapts per row."""
    tau, rows, steps = 3.0, 8, 600
    spec = DecodingSpec(mirostat=version, mirostat_tau=tau, mirostat_eta=0.1)
    logits = (-1.1 * torch.arange(1, 66, dtype=torch.float64).log()).float().expand(rows, -1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    state = PenaltyState(spec, [[0]] * rows, 65)
    assert state.mu.tolist() == [2 * tau] * rows
    surprises = []
    for _ in range(steps):
        processed = state.process(logits, spec, generators)
        tokens = choose_tokens(processed, spec, generators)
        probs = torch.softmax(processed.double(), dim=-1)
        surprises.append((-probs[torch.arange(rows), tokens].log2()).tolist())
        state.add(tokens, processed)
    late = torch.tensor(surprises[200:])  # (steps, rows)
    assert (late.mean(dim=0) - tau).abs().max() < 0.25, late.mean(dim=0)
    assert abs(late.mean().item() - tau) < 0.08
    assert len(set(state.mu.tolist())) == rows  # each row has its own mu


def test_mirostat_state_is_reset_per_request_and_rows_do_not_share_it():
    """Two calls with the same seed give the same text (each starts at mu = 2 tau), and a
    row of a batch samples what it samples alone: mu is per row and per request."""
    chars = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=chars.vocab_size, block_size=16)).eval()
    for text in ("mirostat:tau=2,lr=0.3", "mirostat1:tau=2,lr=0.3", "xtc:threshold=0.05,prob=0.5",
                 "dry:mult=2,allowed=1"):
        spec = parse_strategy(text)
        both = generate(model, chars, ["ab", "ca"], spec, max_new_tokens=24, seed=5)
        again = generate(model, chars, ["ab", "ca"], spec, max_new_tokens=24, seed=5)
        alone = generate(model, chars, ["ca"], spec, max_new_tokens=24, seed=6)
        assert [s.tokens for s in both] == [s.tokens for s in again], text
        assert both[1].tokens == alone[0].tokens, text


# ----------------------------------------------------------------------------------------
# DRY


def test_dry_worked_example_from_llama_cpp():
    a, b, c, y = 0, 1, 2, 3
    history = [a, b, c, c, b, c, y, a, b, c]
    assert dry_repeat_lengths(history, 2) == {c: 3, y: 2}  # b (after "c") continues only 1
    assert dry_repeat_lengths(history, 1) == {c: 3, y: 2, b: 1}
    out = apply_dry_penalty(torch.zeros(1, 5), [history], 0.8, base=1.75, allowed_length=2)
    assert out[0].tolist() == pytest.approx([0, 0, -0.8 * 1.75, -0.8, 0])
    # a breaker (y) caps the match at the tokens after it: "a b c" -> at most 3, here fine;
    # with b as a breaker the tail after it is "c" alone, shorter than allowed: nothing
    assert dry_repeat_lengths(history, 2, frozenset({b})) == {}
    # ... and a breaker token itself is never penalised
    assert apply_dry_penalty(torch.zeros(1, 5), [history], 0.8, breaker_ids=frozenset({y}))[0, y] == 0
    assert dry_repeat_lengths(history, 2, last_n=4) == {}  # "y a b c": no repeat inside the window


def reference_dry(history: list[int], allowed: int, breakers: set[int], last_n: int) -> dict[int, int]:
    """The definition, directly: for each position j, how many tokens ending at j equal the
    last tokens of the window (at most those after the last breaker); the token after j
    continues a repetition that long."""
    window = history if last_n == -1 else history[-last_n:]
    size = len(window)
    if size <= allowed:
        return {}
    after_breaker = 0
    for token in reversed(window):
        if token in breakers:
            break
        after_breaker += 1
    if after_breaker < allowed:
        return {}
    lengths: dict[int, int] = {}
    for j in range(size - 1):
        n = 0
        while n <= j and window[j - n] == window[size - 1 - n]:
            n += 1
        n = min(n, after_breaker)
        if n >= allowed:
            lengths[window[j + 1]] = max(lengths.get(window[j + 1], 0), n)
    return lengths


@settings(max_examples=200, deadline=None)
@given(history=st.lists(st.integers(0, 3), max_size=60), allowed=st.integers(0, 4),
       breakers=st.sets(st.integers(0, 5), max_size=2), last_n=st.sampled_from([-1, 1, 3, 8, 25]),
       multiplier=st.floats(0.1, 3.0), base=st.floats(1.0, 3.0))
def test_dry_matches_the_naive_reference_on_random_histories(history, allowed, breakers, last_n, multiplier, base):
    expected = reference_dry(history, allowed, breakers, last_n)
    assert dry_repeat_lengths(history, allowed, frozenset(breakers), last_n) == expected
    out = apply_dry_penalty(torch.zeros(2, 6), [history, []], multiplier, base, allowed, last_n, frozenset(breakers))
    penalty = [0.0] * 6
    for token, n in expected.items():
        if token not in breakers:
            penalty[token] = -multiplier * base ** (n - allowed)
    assert out[0].tolist() == pytest.approx(penalty, rel=1e-6)
    assert out[1].tolist() == [0.0] * 6  # an empty history: nothing repeats


def test_dry_exponent_is_capped_as_in_llama_cpp():
    history = [0] * 300  # token 0 continues a 299-token repetition
    out = apply_dry_penalty(torch.zeros(1, 2, dtype=torch.float64), [history], 1.0, base=1.75, allowed_length=2)
    cap = int(math.log(torch.finfo(torch.float32).max) / math.log(1.75))  # 158
    assert out[0, 0].item() == pytest.approx(-(1.75 ** cap)) and math.isfinite(out[0, 0].item())


def test_sequence_breakers_are_the_tokens_containing_one():
    token_bytes = [b"a", b"\n", b"x:", b"ab", b'"', b"*", b"::"]
    assert sequence_breaker_ids(["\n", ":", '"', "*"], token_bytes) == {1, 2, 4, 5, 6}
    assert sequence_breaker_ids(["ab"], token_bytes) == {3}


def test_dry_in_the_pipeline_and_the_state_follow_the_history():
    spec = parse_strategy("greedy:dry=1,dry-allowed=1")
    state = PenaltyState(spec, [[0, 1, 0]], 3, context_size=4)
    assert state.process(torch.zeros(1, 3), spec)[0].tolist() == [0, -1, 0]  # "0" was followed by 1
    state.add(torch.tensor([1]))
    assert state.histories == [[0, 1, 0, 1]]
    state.add(torch.tensor([2]))
    assert state.histories == [[1, 0, 1, 2]]  # the last context_size tokens
    with pytest.raises(ValueError, match="histories"):
        process_logits(torch.zeros(1, 3), spec)


# ----------------------------------------------------------------------------------------
# The chain order


def test_min_p_keeps_different_sets_under_the_two_orders():
    # probabilities .6, .3, .1 at t = 2 become proportional to their square roots: ratios
    # to the maximum .707 and .408, so min-p .4 keeps all three; before the temperature
    # the ratios are .5 and .167, and min-p .4 keeps two.
    logits = logs([0.6, 0.3, 0.1]).float()[None]
    first = DecodingSpec(min_p=0.4, temperature=2.0)
    last = DecodingSpec(min_p=0.4, temperature=2.0, order="temperature-last")
    assert kept(process_logits(logits, first)[0]) == {0, 1, 2}
    assert kept(process_logits(logits, last)[0]) == {0, 1}
    assert first.chain == ("temperature", "min-p", "sample")
    assert last.chain == ("min-p", "temperature", "sample")
    assert last.label == "min-p:p=0.4,t=2,order=temperature-last"


def test_xtc_keeps_different_sets_under_the_two_orders():
    # .5, .3, .2 at t = 2: .415, .322, .263, all above .25, so XTC keeps only .263's token;
    # before the temperature only .5 and .3 reach .25, and XTC keeps tokens 1 and 2.
    logits = logs([0.5, 0.3, 0.2]).float()[None]
    coin = torch.tensor([True])
    first = DecodingSpec(xtc_probability=1.0, xtc_threshold=0.25, temperature=2.0)
    last = DecodingSpec(xtc_probability=1.0, xtc_threshold=0.25, temperature=2.0, order="temperature-last")
    assert kept(process_logits(logits, first, xtc_coins=coin)[0]) == {2}
    assert kept(process_logits(logits, last, xtc_coins=coin)[0]) == {1, 2}
    assert kept(process_logits(logits, last, xtc_coins=~coin)[0]) == {0, 1, 2}  # the coin did not come up
    assert first.chain == ("temperature", "xtc", "sample") and last.chain == ("xtc", "temperature", "sample")


def test_the_default_chain_order_is_defined_once_and_every_step_runs_in_it():
    """Each filter of the chain, applied by process_logits in the order CHAIN_ORDERS gives,
    equals applying the filter functions one after the other in that order."""
    from model.decoding import _FILTER_FUNCTIONS, apply_temperature, min_p_filter, top_k_filter
    assert CHAIN_ORDERS["temperature-first"][0] == "temperature"
    assert CHAIN_ORDERS["temperature-last"][-1] == "temperature"
    assert sorted(CHAIN_ORDERS["temperature-first"]) == sorted(CHAIN_ORDERS["temperature-last"])
    logits = torch.randn(6, 65, generator=torch.Generator().manual_seed(1)) * 3
    spec = DecodingSpec(temperature=1.7, top_n_sigma=2.5, top_h=0.95, top_k=30, top_p=0.97, min_p=0.02,
                        typical_p=0.99, epsilon_cutoff=0.001, eta_cutoff=0.001)
    by_hand = logits
    for step in CHAIN_ORDERS["temperature-first"]:
        if step == "temperature":
            by_hand = apply_temperature(by_hand, 1.7)
        elif step != "xtc":
            by_hand = _FILTER_FUNCTIONS[step](by_hand, getattr(spec, step))
    assert torch.equal(process_logits(logits, spec), by_hand)
    assert spec.chain == ("temperature", "top-n-sigma", "top-h", "top-k", "top-p", "min-p", "typical", "epsilon",
                          "eta", "sample")
    swapped = min_p_filter(top_k_filter(apply_temperature(logits, 1.7), 30), 0.02)
    assert torch.equal(process_logits(logits, DecodingSpec(temperature=1.7, top_k=30, min_p=0.02)), swapped)


def test_stateful_specs_are_marked_for_the_speculative_decoder():
    assert parse_strategy("mirostat").is_stateful and parse_strategy("mirostat1").is_stateful
    assert parse_strategy("xtc:prob=0.5").is_stateful and parse_strategy("dry:mult=0.8").is_stateful
    assert parse_strategy("greedy:dry=0.8").is_stateful
    for text in ("sample", "greedy", "top-p:p=0.9", "eta:eta=0.01", "top-n-sigma:n=1", "top-h:h=0.4",
                 "min-p:p=0.1,t=2,order=temperature-last", "greedy:rep=1.3"):
        assert not parse_strategy(text).is_stateful, text


# ----------------------------------------------------------------------------------------
# The command line's flags and the server's request fields.


@pytest.mark.parametrize("args, expected", [
    (["--strategy", "eta", "--eta-cutoff", "0.02"], DecodingSpec(eta_cutoff=0.02)),
    (["--strategy", "epsilon"], DecodingSpec(epsilon_cutoff=0.0003)),
    (["--strategy", "top-n-sigma", "--top-n-sigma", "1.5", "--temperature", "1.2"],
     DecodingSpec(top_n_sigma=1.5, temperature=1.2)),
    (["--strategy", "top-h", "--top-h", "0.6"], DecodingSpec(top_h=0.6)),
    (["--strategy", "xtc", "--xtc-threshold", "0.2"], DecodingSpec(xtc_probability=0.5, xtc_threshold=0.2)),
    (["--strategy", "mirostat", "--mirostat-tau", "3"], DecodingSpec(mirostat=2, mirostat_tau=3.0)),
    (["--strategy", "top-p", "--mirostat", "1", "--top-p", "1"], None),  # mirostat ignores top-p: refused
    (["--strategy", "dry", "--dry-allowed-length", "3", "--dry-sequence-breakers", '["\\n"]'],
     DecodingSpec(dry_multiplier=0.8, dry_allowed_length=3, dry_sequence_breakers=("\n",))),
    (["--strategy", "greedy", "--dry-multiplier", "1"], DecodingSpec(temperature=0.0, dry_multiplier=1.0)),
    (["--strategy", "min-p", "--temperature", "1.5", "--order", "temperature-last"],
     DecodingSpec(min_p=0.05, temperature=1.5, order="temperature-last")),
])
def test_generate_flags_set_the_new_samplers(args, expected):
    import sample
    parsed = sample.parse_args(["ckpt.pt", *args])
    if expected is None:
        with pytest.raises(UserError, match="does nothing with mirostat"):
            sample.spec_from_args(parsed)
    else:
        assert sample.spec_from_args(parsed) == expected


def test_explain_prints_the_chain_and_compare_prints_the_orders(tiny_checkpoint, capsys):
    import sample
    assert sample.main([str(tiny_checkpoint), "--prompt", "The", "--max-new-tokens", "2", "--strategy",
                        "min-p:p=0.1,t=1.5,order=temperature-last", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "min-p:p=0.1,t=1.5,order=temperature-last: min-p > temperature > sample (chain order temperature-last: " \
           "penalties > dry > top-n-sigma > top-h > top-k > top-p > min-p > typical > epsilon > eta > xtc > " \
           "temperature > mirostat > sample)" in out
    assert sample.main(["compare", str(tiny_checkpoint), "--prompt", "The", "--max-new-tokens", "3",
                        "--num-samples", "1", "-s", "greedy", "-s", "min-p:p=0.1,t=1.5,order=temperature-last",
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chain order temperature-first: penalties > dry > temperature > top-n-sigma" in out
    assert "chain order temperature-last: penalties > dry > top-n-sigma" in out


@pytest.mark.parametrize("body, expected", [
    ({"eta_cutoff": 0.01, "epsilon_cutoff": 0}, DecodingSpec(eta_cutoff=0.01)),
    ({"top_n_sigma": -1, "top_h": 0.5}, DecodingSpec(top_h=0.5)),  # llama.cpp's off value, -1
    ({"top_n_sigma": 1.0}, DecodingSpec(top_n_sigma=1.0)),
    ({"xtc_probability": 0.5, "xtc_threshold": 0.2}, DecodingSpec(xtc_probability=0.5, xtc_threshold=0.2)),
    ({"mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1}, DecodingSpec()),  # llama.cpp clients send these
    ({"mirostat": 2, "mirostat_tau": 3, "mirostat_eta": 0.2}, DecodingSpec(mirostat=2, mirostat_tau=3, mirostat_eta=0.2)),
    ({"dry_multiplier": 0.8, "dry_base": 2, "dry_allowed_length": 3, "dry_penalty_last_n": 64,
      "dry_sequence_breakers": ["\n", "::"]},
     DecodingSpec(dry_multiplier=0.8, dry_base=2, dry_allowed_length=3, dry_penalty_last_n=64,
                  dry_sequence_breakers=("\n", "::"))),
    ({"dry_multiplier": 0.8, "dry_penalty_last_n": 0}, DecodingSpec()),  # llama.cpp: last_n 0 turns DRY off
    ({"min_p": 0.1, "temperature": 1.5, "temperature_last": True},
     DecodingSpec(min_p=0.1, temperature=1.5, order="temperature-last")),
    ({"min_p": 0.1, "temperature_last": False}, DecodingSpec(min_p=0.1)),
])
def test_request_fields_make_the_spec(body, expected):
    from model.serve import read_spec
    assert read_spec(body) == expected


@pytest.mark.parametrize("body, param, fragment", [
    ({"mirostat": 1.5}, "mirostat", "mirostat=1.5 must be a whole number"),
    ({"dry_multiplier": 1, "dry_allowed_length": 2.5}, "dry_allowed_length", "must be a whole number"),
    ({"dry_multiplier": 1, "dry_sequence_breakers": "\n"}, "dry_sequence_breakers", "must be a list of strings"),
    ({"temperature_last": 1}, "temperature_last", "must be true or false"),
    ({"xtc_probability": 0.5, "xtc_threshold": 0.7}, "xtc_threshold", "xtc_threshold=0.7 is out of range"),
    ({"eta_cutoff": 1.5}, "eta_cutoff", "eta_cutoff=1.5 is out of range"),
    ({"mirostat": 2, "top_k": 40}, "top_k", "top_k=40 does nothing with mirostat"),
])
def test_bad_request_fields_are_one_line_errors(body, param, fragment):
    from model.serve import RequestError, read_spec
    with pytest.raises(RequestError) as error:
        read_spec(body)
    assert fragment in error.value.message and error.value.param == param and "\n" not in error.value.message
