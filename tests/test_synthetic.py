"""A language with a known truth (model/synthetic.py), prepare.py --synthetic, and the
oracle's columns of sample.py compare --oracle."""

from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sample
from model.compare import Run, oracle_columns
from model.data import open_split, read_meta
from model.errors import UserError
from model.generate import Sample
from model.synthetic import (
    END, ORACLE_FILE, SMOOTHING, MarkovChain, Preset, chain_from_json, load_oracle, preset_chain, random_chain,
    token_symbols,
)
from model.tokenizer import CharTokenizer, tokenizer_from_state
from tests.conftest import ROOT, one_line_error, run_cli, tiny_run

sys.path.insert(0, str(ROOT / "data"))
from prepare import main as prepare_main  # noqa: E402

# A 3-state chain worked by hand. Order 1 over a, b, c; every document starts with a.
#   ""  -> a 1
#   a   -> b 1/2, c 1/2
#   b   -> c 1
#   c   -> a 1/2, b 1/4, END 1/4   (END: back to "")
# Stationary pi = pi P: pi("") = pi_c / 4, pi_a = pi("") + pi_c / 2, pi_b = pi_a / 2 + pi_c / 4,
# pi_c = pi_a / 2 + pi_b; with pi_c = x: pi("") = x/4, pi_a = 3x/4, pi_b = 5x/8, and the sum
# 21x/8 = 1 gives x = 8/21: pi = (2, 6, 5, 8) / 21.
# Entropy rate: pi_a ln 2 + pi_c H(1/2, 1/4, 1/4) = (6/21) ln 2 + (8/21)(3/2) ln 2 = (6/7) ln 2.
HAND = MarkovChain(1, "abc", {
    "": {"a": 1.0}, "a": {"b": 0.5, "c": 0.5}, "b": {"c": 1.0}, "c": {"a": 0.5, "b": 0.25, END: 0.25},
})
HAND_CHARS = CharTokenizer("abc")  # ids a=0, b=1, c=2, end-of-text=3


def test_hand_built_chain_nll_entropy_and_stationary_by_hand():
    # after the prompt "b": c (1), a (1/2), c (1/2), END (1/4): log p = -4 ln 2 in all
    assert HAND.logprobs(["c", "a", "c", END], HAND.context_after("b")) == pytest.approx(
        [0.0, -math.log(2), -math.log(2), -math.log(4)])
    assert HAND.logprobs(["a"], "b") == [-math.inf]  # b is always followed by c
    # smoothed: q = (1 - e) p + e / 4 over the 4 symbols a, b, c, END; a after b (p = 0),
    # then b after a (p = 1/2)
    assert HAND.smoothed_logprobs(["a", "b"], "b") == pytest.approx(
        [math.log(SMOOTHING / 4), math.log((1 - SMOOTHING) * 0.5 + SMOOTHING / 4)])
    assert HAND.entropies(["b", "c"], "c") == pytest.approx([1.5 * math.log(2), 0.0])  # H at c, then at b
    pi = HAND.stationary()
    assert pi == pytest.approx({"": 2 / 21, "a": 6 / 21, "b": 5 / 21, "c": 8 / 21}, abs=1e-12)
    assert HAND.entropy_rate() == pytest.approx(6 / 7 * math.log(2), abs=1e-12)


def test_a_periodic_chain_has_its_stationary_distribution():
    # a, b, a, b, ... for ever: period 2, so the plain iteration pi P^t never settles (it
    # alternates between a and b); the long-run share of each is 1/2, and nothing is uncertain
    periodic = MarkovChain(1, "ab", {"": {"a": 1.0}, "a": {"b": 1.0}, "b": {"a": 1.0}})
    assert periodic.stationary() == pytest.approx({"": 0.0, "a": 0.5, "b": 0.5}, abs=1e-12)
    assert periodic.entropy_rate() == 0.0


def test_hand_built_chain_ngrams_by_hand():
    # P(g) = sum_c pi(c) P(g | c): P(ab) = pi("") 1/2 + pi_c 1/2 1/2 = 3/21, P(bc) = pi_a 1/2 +
    # pi_c 1/4 = 5/21, P(ca) = (pi_a 1/2 + pi_b) 1/2 = 4/21, ...; bigrams that start with END
    # (2/21 in all) run past a document's end, which a sample never does
    every = {("a", "b"): 3, ("a", "c"): 3, ("b", "c"): 5, ("c", "a"): 4, ("c", "b"): 2, ("c", END): 2}
    assert HAND.probable_ngrams(2, 0.0) == pytest.approx({g: k / 21 for g, k in every.items()})
    assert set(HAND.probable_ngrams(2, 0.15)) == {("b", "c"), ("c", "a")}  # 4/21 and 5/21 >= 0.15 > 3/21
    assert HAND.producible([("a", "b"), ("b", "b"), ("c", END), (END, "a"), (END, "b"), ("b", "a")]) == [
        True, False, True, True, False, False]


def test_oracle_columns_of_hand_built_samples():
    # prompt "b"; sample 1: c a c END (all possible); sample 2: c b b (b after b is impossible)
    good = Sample(0, 0, tokens=[2, 0, 2, 3], finish="eot")
    bad = Sample(0, 1, tokens=[2, 1, 1], finish="length")
    run = Run("x", None, [good, bad], None)
    row = oracle_columns(run, [[1]], HAND_CHARS, HAND, n=2, probable={("b", "c"): 5 / 21, ("c", "a"): 4 / 21})
    p = [1, 1 / 2, 1 / 2, 1 / 4, 1, 1 / 4, 0]  # c a c END | c b b, each in its context
    q = [(1 - SMOOTHING) * x + SMOOTHING / 4 for x in p]
    assert row["oracle_nll"] == pytest.approx(-sum(map(math.log, q)) / 7)
    h = [0, 1.5, 1, 1.5, 0, 1.5, 0]  # in bits: H at b, c, a, c | b, c, b
    assert row["oracle_entropy"] == pytest.approx(sum(h) * math.log(2) / 7)
    # bigrams ca, ac, c-END | cb, bb: 4 of 5 can be emitted
    assert row["support_precision"] == pytest.approx(4 / 5)
    # draw 0 reaches ca, draw 1 neither of the two probable bigrams
    assert row["coverage"] == pytest.approx((1 / 2 + 0) / 2)


def test_token_symbols_read_end_of_text_as_end():
    assert token_symbols(HAND_CHARS, [2, 0, 3, 1]) == ["c", "a", END, "b"]
    assert token_symbols(HAND_CHARS, []) == []


def brute_force_ngrams(chain: MarkovChain, n: int) -> set[tuple[str, ...]]:
    """Every n-gram of every path of n symbols from every reachable context (independent of
    `producible`'s shared sets: plain enumeration)."""
    found = set()

    def walk(context: str, path: tuple[str, ...]) -> None:
        if len(path) == n:
            found.add(path)
            return
        for symbol in chain.transitions[context]:
            walk(chain.next_context(context, symbol), path + (symbol,))

    for context in chain.reachable_contexts():
        walk(context, ())
    return found


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), order=st.integers(1, 2), branching=st.integers(1, 3), n=st.integers(1, 3))
def test_support_and_probable_ngrams_equal_brute_force(seed, order, branching, n):
    chain = random_chain(Preset("abc", order, branching, 0.3, 0.4, ""), seed)
    truth = brute_force_ngrams(chain, n)
    every = list(itertools.product(chain.symbols, repeat=n))
    assert chain.producible(every) == [g in truth for g in every]
    probable = chain.probable_ngrams(n, 0.0)
    assert set(probable) == {g for g in truth if END not in g[:-1]}
    # the n-grams starting anywhere sum to 1; those cut here are the ones with END inside
    assert 0 < sum(probable.values()) <= 1 + 1e-12


def corrupted(symbols: list[str], every: int, seed: int, alphabet: str) -> list[str]:
    """A broken sampler: every ``every``-th symbol replaced by a uniformly drawn character."""
    rng = np.random.default_rng(seed)
    return [alphabet[rng.integers(len(alphabet))] if i % every == every - 1 else s for i, s in enumerate(symbols)]


def oracle_run(chain: MarkovChain, tokenizer: CharTokenizer, texts: list[str]) -> Run:
    """One prompt's samples: the texts as char tokens, each ended by end-of-text."""
    samples = [Sample(0, s, tokens=tokenizer.encode(t) + [tokenizer.eot_id], finish="eot") for s, t in enumerate(texts)]
    return Run("oracle", None, samples, None)


def test_precision_is_one_for_the_oracle_and_below_one_for_a_corrupted_sampler():
    chain = preset_chain("markov2", 3)
    tokenizer = CharTokenizer(chain.alphabet)
    docs = chain.documents(20_000, 4)
    n, probable = 3, chain.probable_ngrams(3)
    truth = oracle_columns(oracle_run(chain, tokenizer, docs), [[]], tokenizer, chain, n, probable)
    assert truth["support_precision"] == 1.0
    # text of the chain itself: its NLL is the chain's entropy where it went (law of large
    # numbers, 20,000 symbols) and both are near the entropy rate
    assert truth["oracle_nll"] == pytest.approx(truth["oracle_entropy"], abs=0.03)
    assert truth["oracle_entropy"] == pytest.approx(chain.entropy_rate(), abs=0.05)
    broken = ["".join(corrupted(list(d), 10, 5, chain.alphabet.replace("\n", ""))) for d in docs]
    worse = oracle_columns(oracle_run(chain, tokenizer, broken), [[]], tokenizer, chain, n, probable)
    assert 0.5 < worse["support_precision"] < 0.95
    assert worse["oracle_nll"] > truth["oracle_nll"] + 0.3


def test_coverage_grows_with_samples_and_reaches_every_probable_ngram():
    chain = preset_chain("markov2", 3)
    probable = chain.probable_ngrams(3)
    stream = list(END.join(chain.documents(200_000, 9)))  # a char list; END only joins
    reached = [len(probable.keys() & set(zip(stream[:k], stream[1:k], stream[2:k]))) / len(probable)
               for k in (300, 3_000, 30_000, len(stream))]
    assert reached == sorted(reached) and reached[0] < 0.5 and reached[-1] == 1.0


def test_save_and_load_give_the_same_chain(tmp_path):
    chain = preset_chain("markov3", 11)
    chain.save(tmp_path / ORACLE_FILE)
    again = load_oracle(tmp_path)
    assert again == chain and (again.name, again.seed) == ("markov3", 11)
    symbols = list(chain.documents(500, 1)[0])
    assert again.logprobs(symbols) == chain.logprobs(symbols)
    assert preset_chain("markov3", 11) == chain and preset_chain("markov3", 12) != chain


@pytest.mark.parametrize("change, message", [
    (lambda d: d["transitions"].pop("ab"), "no distribution for context 'ab'"),
    (lambda d: d["transitions"]["a"].update(b=2.0), "sum to"),
    (lambda d: d.update(format="x"), "not written by data/prepare.py --synthetic"),
    (lambda d: d["transitions"]["a"].update(z=0.0), "positive probabilities"),
])
def test_damaged_oracles_are_one_line_errors(change, message):
    data = json.loads(json.dumps(preset_chain("markov2", 1).to_json()))
    change(data)
    with pytest.raises(UserError, match=message):
        chain_from_json(data)


def test_prepare_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny"
    argv = ["--synthetic", "tiny", "--num-chars", "3000", "--seed", "5", "--out", str(out), "--no-progress"]
    assert prepare_main(argv) == 0
    assert f"in {out}" in capsys.readouterr().out
    meta = read_meta(out)
    chain = load_oracle(out)
    assert chain == preset_chain("tiny", 5) and meta["source"]["synthetic"] == "tiny"
    tokenizer = tokenizer_from_state(meta["tokenizer"])
    assert set(tokenizer.chars) <= set(chain.alphabet)
    stream = np.concatenate([open_split(out, split, meta) for split in ("train", "val")]).tolist()
    symbols = token_symbols(tokenizer, stream)
    # the files are the chain's own stream: every step possible, END between documents
    assert all(math.isfinite(lp) for lp in chain.logprobs(symbols))
    assert symbols.count(END) == meta["source"]["documents"] and symbols[-1] == END
    assert 3000 <= len(symbols) - symbols.count(END) < 3100
    assert "".join(symbols).replace(END, "") == "".join(chain.documents(3000, 6))  # drawn with seed + 1
    files = ("train.bin", "val.bin", ORACLE_FILE)
    first = [(out / name).read_bytes() for name in files]
    assert prepare_main(argv) == 0  # the same seed again: the same files (the folder is replaced)
    assert [(out / name).read_bytes() for name in files] == first


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "nope"], "unknown synthetic language 'nope'; choose one of tiny, markov2, markov3"),
    (["--synthetic", "tiny", "x.txt"], "drop the INPUTs"),
    (["--synthetic", "tiny", "--tokenizer", "bpe"], "drop --tokenizer"),
    (["--synthetic", "tiny", "--num-chars", "0"], "--num-chars must be >= 1"),
    (["x.txt", "--num-chars", "10"], "--num-chars: only with --synthetic NAME"),
])
def test_prepare_synthetic_bad_input(argv, message, tmp_path, capsys):
    assert prepare_main([*argv, "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A tiny model trained for a few steps on a small tiny-preset corpus."""
    from train import train

    data = tmp_path_factory.mktemp("synthetic") / "tiny"
    assert prepare_main(["--synthetic", "tiny", "--num-chars", "20000", "--out", str(data), "--no-progress"]) == 0
    out = tmp_path_factory.mktemp("run")
    train(tiny_run(data, out, "max_iters=30", "eval_interval=30"), progress=False)
    return data, out / "best.pt"


def test_compare_with_the_oracle(synthetic_checkpoint, tmp_path, capsys):
    data, checkpoint = synthetic_checkpoint
    argv = ["compare", str(checkpoint), "-s", "greedy", "-s", "sample", "--num-prompts", "3", "--prompt-tokens", "8",
            "--num-samples", "2", "--max-new-tokens", "40", "--oracle", str(data), "--out", str(tmp_path),
            "--no-progress"]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    rate = preset_chain("tiny", 1).entropy_rate()
    assert f"entropy rate {rate:.4f} nats/token; 2-grams" in out
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    assert all(title in header for title in ("orc NLL", "orc H", "sup prec", "cov"))
    rows = {row["strategy"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    # the human row is the chain's own text: everything in it can be emitted
    assert rows["human"]["support_precision"] == 1.0
    assert all(0 <= row["coverage"] <= 1 and row["oracle_nll"] > 0 for row in rows.values())
    assert "oracle_nll" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_compare_oracle_errors(synthetic_checkpoint, tiny_checkpoint, tiny_dataset, capsys):
    data, checkpoint = synthetic_checkpoint
    base = ["-s", "greedy", "--num-prompts", "1", "--max-new-tokens", "4", "--no-progress"]
    assert sample.main(["compare", str(checkpoint), "--oracle", str(tiny_dataset), *base]) == 2
    assert "no oracle in" in one_line_error(capsys.readouterr().err)
    # a model of another text writes characters the chain does not have
    assert sample.main(["compare", str(tiny_checkpoint), "--oracle", str(data), *base]) == 2
    assert "characters the oracle's language lacks" in one_line_error(capsys.readouterr().err)


@pytest.mark.slow  # a fresh interpreter imports torch: a few seconds
def test_prepare_synthetic_through_the_real_cli(tmp_path):
    result = run_cli("data/prepare.py", "--synthetic", "markov9", "--out", str(tmp_path / "d"))
    assert "unknown synthetic language 'markov9'" in one_line_error(result)


def test_a_sweep_with_the_oracle_judges_by_the_true_chain(synthetic_checkpoint, tmp_path):
    data, checkpoint = synthetic_checkpoint
    argv = ["compare", str(checkpoint), "--sweep", "temperature:t=0.7|1.3", "--num-prompts", "3", "--prompt-tokens",
            "8", "--num-samples", "2", "--max-new-tokens", "30", "--escape-tokens", "4", "--bootstrap", "20",
            "--oracle", str(data), "--out", str(tmp_path), "--no-progress"]
    assert sample.main(argv) == 0
    rows = {row["strategy"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["quality_name"].startswith("oracle NLL")
    # the sweep's quality axis is the oracle column of the same samples (pooled over their symbols)
    assert summary["human"]["quality"] == pytest.approx(rows["human"]["oracle_nll"])
    for setting in summary["settings"]:
        assert setting["quality"] == pytest.approx(rows[setting["label"]]["oracle_nll"])
