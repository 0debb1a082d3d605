"""A language whose truth is known: a seeded, random, sparse order-k Markov chain over a
few dozen single characters, whose every probability is exact.

``data/prepare.py --synthetic NAME`` draws a corpus from one (a preset of `PRESETS`) and
saves the chain beside the data as ``oracle.json``; ``sample.py compare --oracle DIR``
then measures each strategy's samples against the truth (model/compare.py): their NLL
under the chain, the chain's entropy where they went, the share of their n-grams the
chain can produce (support precision) and the share of its probable n-grams they reach
(coverage).

The chain. Symbols are single characters, so the char tokenizer gives each its own
token, plus `END`, the end of a document, which is the tokenizers' end-of-text token.
The *context* of a position is the text since the last END, at most ``order``
characters long: the last ``order`` characters, or fewer in the first ``order - 1``
positions of a document ("" at its start). Every context (every string of at most
``order`` characters of the alphabet) has a distribution over the next symbol, and a
document is drawn from "" until END. The token stream ``doc END doc END ...`` is then an
order-k Markov chain: the context is a function of the last k tokens.

The presets build each distribution the same way (`random_chain`): ``branching``
successors drawn without replacement from the letters (the alphabet less the line
break), with weights from a flat Dirichlet; a context that ends a line adds END with
probability ``doc_end``, any other context but "" adds the line break with probability
``line_end``, and the letters share the rest. So a line break, then END, can follow
from every context: every context the chain reaches leads back to the start, and the
chain has one stationary distribution (`stationary`), whose entropy rate is
`entropy_rate`.

All log-probabilities are natural (nats). A symbol the chain cannot emit in its context
has log-probability -inf; `smoothed_logprobs` gives the finite score compare uses.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from model.errors import UserError
from model.tokenizer import EOT_TEXT, Tokenizer

END = EOT_TEXT  # the end of a document: the end-of-text token
ORACLE_FILE = "oracle.json"
ORACLE_FORMAT = "tinygpt-markov-oracle"
ORACLE_VERSION = 1
LINE_BREAK = "\n"
# compare's oracle NLL scores a symbol under (1 - SMOOTHING) p + SMOOTHING / |symbols|:
# an impossible symbol then costs log(|symbols| / SMOOTHING), about 10 nats, instead of
# an infinity that would swamp every sampled row; a possible one costs at most
# -log(1 - SMOOTHING) = 0.001 nats more than its exact -log p.
SMOOTHING = 1e-3
# Coverage's probable n-grams: those whose stationary probability (that a random
# position of the endless stream starts with them) is at least this. Compare's 8 prompts
# x 200 tokens see each of them about 1.6 times or more, in expectation.
PROBABLE = 1e-3


@dataclass(frozen=True)
class Preset:
    """The settings of `random_chain` that a NAME of ``prepare.py --synthetic`` stands for."""

    letters: str  # the symbols the chain draws successors from; the alphabet is these and the line break
    order: int
    branching: int  # successors drawn for every context, besides the line break or END
    line_end: float  # probability of a line break after any non-empty context not ending a line
    doc_end: float  # probability of END after a line break
    about: str  # one line for --help


PRESETS = {
    "tiny": Preset("abcd ", 1, 2, 0.2, 0.5, "order 1 over 5 letters (tests, a first look)"),
    "markov2": Preset("abcdefghijklmnopqrstuvw ", 2, 4, 0.04, 0.25,
                      "order 2 over 24 letters, 4 successors a context (configs/synthetic.toml)"),
    "markov3": Preset("abcdefghijkl ", 3, 3, 0.04, 0.25, "order 3 over 13 letters, 3 successors a context"),
}


@dataclass(frozen=True)
class MarkovChain:
    """An order-``order`` chain over ``alphabet`` (sorted distinct characters) and END.

    ``transitions[context][symbol]`` is P(symbol | context) > 0 for every context (every
    string of at most ``order`` characters of the alphabet) and every symbol it can emit
    (a character or END); absent symbols have probability 0. ``name`` and ``seed`` say
    where the chain came from (a preset and its seed); they change nothing it computes.
    """

    order: int
    alphabet: str
    transitions: dict[str, dict[str, float]]
    name: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        check_chain(self)

    @property
    def symbols(self) -> list[str]:
        """Every symbol the chain has: its characters, then END."""
        return [*self.alphabet, END]

    def next_context(self, context: str, symbol: str) -> str:
        """The context after ``symbol`` follows ``context``: "" after END (a new document),
        else the last ``order`` characters of ``context + symbol``."""
        return "" if symbol == END else (context + symbol)[-self.order :]

    def context_after(self, symbols: Iterable[str], context: str = "") -> str:
        """The context after ``symbols`` follow ``context`` (by default a document's start:
        a prompt shorter than the order is read as the beginning of a document)."""
        for symbol in symbols:
            context = self.next_context(context, symbol)
        return context

    def logprobs(self, symbols: Sequence[str], context: str = "") -> list[float]:
        """log P(symbols[i] | context and symbols[:i]) for each i: -inf for a symbol the
        chain cannot emit there. Their sum is the log-probability of the whole sequence
        given ``context``. A symbol that is not the chain's is a UserError (`check_symbols`)."""
        self.check_symbols(symbols)
        out = []
        for symbol in symbols:
            p = self.transitions[context].get(symbol, 0.0)
            out.append(math.log(p) if p > 0 else -math.inf)
            context = self.next_context(context, symbol)
        return out

    def check_symbols(self, symbols: Iterable[str], what: str = "the text") -> None:
        """Raise UserError when ``symbols`` hold one that is neither a character of the
        alphabet nor END (the chain has no context after it)."""
        unknown = sorted(set(symbols) - {*self.alphabet, END})
        if unknown:
            raise UserError(f"{what} has symbols outside the oracle's language ({', '.join(map(repr, unknown[:5]))}); "
                            "use a model trained on that synthetic language")

    def smoothed_logprobs(self, symbols: Sequence[str], context: str = "", smoothing: float = SMOOTHING) -> list[float]:
        """log q(symbols[i] | ...) under q = (1 - smoothing) p + smoothing / |symbols|, p the
        chain's distribution (`logprobs`): finite for every symbol of the chain."""
        uniform = smoothing / len(self.symbols)
        return [math.log((1 - smoothing) * math.exp(lp) + uniform) for lp in self.logprobs(symbols, context)]

    def entropy(self, context: str) -> float:
        """H(next symbol | context) = -sum_x p(x) log p(x), in nats."""
        return -math.fsum(p * math.log(p) for p in self.transitions[context].values())

    def entropies(self, symbols: Sequence[str], context: str = "") -> list[float]:
        """The entropy of the chain's distribution at each position of ``symbols``: at
        position i, H(. | context and symbols[:i])."""
        self.check_symbols(symbols)
        out = []
        for symbol in symbols:
            out.append(self.entropy(context))
            context = self.next_context(context, symbol)
        return out

    # --------------------------------------------------------------------- drawing

    def documents(self, num_chars: int, seed: int) -> list[str]:
        """Documents drawn from the start context until END (END not included), until they
        hold at least ``num_chars`` characters in all; the same for the same seed. A symbol
        is drawn by inverting the cumulative distribution of its context (symbols in
        the order of ``transitions[context]``) at a uniform number from numpy's
        default generator."""
        uniforms = _uniforms(np.random.default_rng(seed))
        cumulative = {c: (list(d), list(itertools.accumulate(d.values()))) for c, d in self.transitions.items()}
        docs, total = [], 0
        while total < num_chars:
            doc, context = [], ""
            while True:
                u = next(uniforms)
                symbols, cum = cumulative[context]
                # the last cumulative sum can round below 1: a u past it takes the last symbol
                symbol = symbols[min(bisect.bisect_right(cum, u), len(symbols) - 1)]
                if symbol == END:
                    break
                doc.append(symbol)
                context = self.next_context(context, symbol)
            docs.append("".join(doc))
            total += len(doc)
        return docs

    # --------------------------------------------------------------------- the long run

    def reachable_contexts(self) -> list[str]:
        """The contexts the chain can reach from a document's start, "" first, in the order
        a breadth-first search meets them."""
        seen, frontier = {"": None}, [""]  # a dict keeps the order they were met in
        while frontier:
            new = []
            for context in frontier:
                for after in self._successors(context):
                    if after not in seen:
                        seen[after] = None
                        new.append(after)
            frontier = new
        return list(seen)

    def _successors(self, context: str) -> list[str]:
        return [self.next_context(context, symbol) for symbol in self.transitions[context]]

    def stationary(self, tolerance: float = 1e-13, max_steps: int = 1_000_000) -> dict[str, float]:
        """The stationary distribution pi over the reachable contexts: pi = pi P.

        Found by iterating the lazy chain (P + I) / 2, which has the same stationary
        distribution and is aperiodic, from the start context until the L1 change of a
        step is below ``tolerance``. Unique when every reachable context leads back to the
        start (true of every preset; see the module docstring)."""
        states = self.reachable_contexts()
        index = {c: i for i, c in enumerate(states)}
        src, dst, prob = [], [], []
        for c in states:
            for symbol, p in self.transitions[c].items():
                src.append(index[c])
                dst.append(index[self.next_context(c, symbol)])
                prob.append(p)
        src_a, dst_a, prob_a = np.array(src), np.array(dst), np.array(prob)
        pi = np.zeros(len(states))
        pi[0] = 1.0
        for _ in range(max_steps):
            moved = np.bincount(dst_a, weights=pi[src_a] * prob_a, minlength=len(states))
            new = 0.5 * (pi + moved)
            new /= new.sum()
            if np.abs(new - pi).sum() < tolerance:
                pi = new
                break
            pi = new
        return {c: float(p) for c, p in zip(states, pi)}

    def entropy_rate(self) -> float:
        """H = sum_c pi(c) H(. | c), nats per symbol (END included): the lowest loss per
        token any model of the stream can reach, and what the oracle NLL of samples of
        the chain itself tends to."""
        return math.fsum(p * self.entropy(c) for c, p in self.stationary().items())

    # --------------------------------------------------------------------- n-grams

    def producible(self, ngrams: Iterable[Sequence[str]]) -> list[bool]:
        """For each n-gram: can the chain emit it, from some context it reaches? (the
        support of its n-grams; an n-gram may hold END). Sets of possible contexts are
        carried forward symbol by symbol, shared between n-grams with the same prefix."""
        states_after: dict[tuple[str, ...], frozenset[str]] = {(): frozenset(self.reachable_contexts())}

        def after(prefix: tuple[str, ...]) -> frozenset[str]:
            if prefix not in states_after:
                symbol = prefix[-1]
                states_after[prefix] = frozenset(
                    self.next_context(c, symbol) for c in after(prefix[:-1]) if symbol in self.transitions[c]
                )
            return states_after[prefix]

        return [bool(after(tuple(g))) for g in ngrams]

    def probable_ngrams(self, n: int, threshold: float = PROBABLE) -> dict[tuple[str, ...], float]:
        """The n-grams without END before their last symbol (a sample ends at END) whose
        stationary probability P(g) = sum_c pi(c) P(g | c) is at least ``threshold``, with
        that probability. threshold 0 gives every such n-gram the chain can emit."""
        if n < 1:
            raise UserError(f"an n-gram needs n >= 1, got {n}")
        level: dict[tuple[str, ...], dict[str, float]] = {(): self.stationary()}
        for _ in range(n):
            grown: dict[tuple[str, ...], dict[str, float]] = {}
            for prefix, masses in level.items():
                if prefix and prefix[-1] == END:
                    continue
                for context, mass in masses.items():
                    for symbol, p in self.transitions[context].items():
                        after = grown.setdefault(prefix + (symbol,), {})
                        state = self.next_context(context, symbol)
                        after[state] = after.get(state, 0.0) + mass * p
            # A prefix's mass bounds that of every n-gram that extends it: prune early.
            level = {g: m for g, m in grown.items() if math.fsum(m.values()) >= threshold}
        return {g: math.fsum(m.values()) for g, m in level.items()}

    # --------------------------------------------------------------------- files

    def to_json(self) -> dict:
        return {
            "format": ORACLE_FORMAT, "version": ORACLE_VERSION, "kind": "markov", "name": self.name,
            "seed": self.seed, "order": self.order, "alphabet": self.alphabet, "end": END,
            "transitions": self.transitions,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
    """Uniform numbers in [0, 1) without end, drawn from ``rng`` in blocks (one call per
    symbol would cost more than the drawing itself)."""
    while True:
        yield from rng.random(1 << 16).tolist()


def all_contexts(alphabet: str, order: int) -> list[str]:
    """Every string of at most ``order`` characters of ``alphabet``: the contexts a chain
    of that order needs a distribution for, shortest first, then in alphabet order."""
    return ["".join(chars) for length in range(order + 1) for chars in itertools.product(alphabet, repeat=length)]


def check_chain(chain: MarkovChain) -> None:
    """Raise UserError unless ``chain`` is a complete chain: order >= 1, a sorted alphabet
    of distinct single characters without END, a distribution for every context (and
    no other), each over symbols of the chain with positive probabilities that sum to 1
    (within 1e-9)."""
    if not isinstance(chain.order, int) or chain.order < 1:
        raise UserError(f"an oracle's order must be an integer >= 1, got {chain.order!r}")
    if not chain.alphabet or chain.alphabet != "".join(sorted(set(chain.alphabet))):
        raise UserError(f"an oracle's alphabet must be sorted distinct characters, got {chain.alphabet!r}")
    contexts = all_contexts(chain.alphabet, chain.order)
    missing = [c for c in contexts if c not in chain.transitions]
    extra = sorted(set(chain.transitions) - set(contexts))
    if missing or extra:
        which = f"no distribution for context {missing[0]!r}" if missing else f"an unknown context {extra[0]!r}"
        raise UserError(f"the oracle is incomplete: {which} (a chain of order {chain.order} needs one for each of "
                        f"the {len(contexts)} strings of at most {chain.order} of its characters)")
    symbols = {*chain.alphabet, END}
    for context, dist in chain.transitions.items():
        if not dist or set(dist) - symbols or any(not p > 0 for p in dist.values()):
            raise UserError(f"the oracle's distribution after {context!r} must give positive probabilities to "
                            "symbols of its alphabet or END")
        if abs(math.fsum(dist.values()) - 1) > 1e-9:
            raise UserError(f"the oracle's probabilities after {context!r} sum to {math.fsum(dist.values())}, not 1")


def random_chain(preset: Preset, seed: int, name: str = "") -> MarkovChain:
    """The chain of ``preset`` drawn with ``seed`` (see the module docstring for how each
    context's distribution is built); the same seed gives the same chain."""
    rng = np.random.default_rng(seed)
    letters = sorted(preset.letters)
    alphabet = "".join(sorted({*preset.letters, LINE_BREAK}))
    transitions = {}
    for context in all_contexts(alphabet, preset.order):
        chosen = rng.choice(len(letters), size=min(preset.branching, len(letters)), replace=False)
        weights = rng.dirichlet(np.ones(len(chosen)))
        extra, share = {}, 1.0
        if context.endswith(LINE_BREAK):
            extra, share = {END: preset.doc_end}, 1 - preset.doc_end
        elif context:
            extra, share = {LINE_BREAK: preset.line_end}, 1 - preset.line_end
        dist = {letters[i]: float(share * w) for i, w in sorted(zip(chosen.tolist(), weights))}
        transitions[context] = {**dist, **extra}
    return MarkovChain(preset.order, alphabet, transitions, name=name, seed=seed)


def preset_chain(name: str, seed: int) -> MarkovChain:
    """The chain a ``prepare.py --synthetic NAME --seed SEED`` corpus is drawn from."""
    if name not in PRESETS:
        raise UserError(f"unknown synthetic language {name!r}; choose one of {', '.join(PRESETS)}")
    return random_chain(PRESETS[name], seed, name)


def chain_from_json(data: dict, where: str = "the oracle") -> MarkovChain:
    """The chain `MarkovChain.to_json` wrote; UserError naming ``where`` if it is not one."""
    if not isinstance(data, dict) or data.get("format") != ORACLE_FORMAT:
        raise UserError(f"{where} was not written by data/prepare.py --synthetic")
    if data.get("version") != ORACLE_VERSION or data.get("end") != END:
        raise UserError(f"{where} has version {data.get('version')!r}; this code reads version {ORACLE_VERSION}")
    try:
        return MarkovChain(data["order"], data["alphabet"], data["transitions"], data.get("name", ""),
                           data.get("seed"))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where} is damaged ({type(e).__name__}: {e}); prepare it again") from None


def load_oracle(data_dir: str | Path) -> MarkovChain:
    """The chain saved beside a synthetic dataset (``DIR/oracle.json``)."""
    path = Path(data_dir) / ORACLE_FILE
    if not path.is_file():
        raise UserError(f"no oracle in {data_dir} ({ORACLE_FILE} is missing): prepare a synthetic language with "
                        "data/prepare.py --synthetic NAME --out DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); prepare it again") from None
    return chain_from_json(data, str(path))


def token_symbols(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The chain's symbols that token ids stand for: each end-of-text token is END, the
    other tokens are the characters of their text (one each for the char tokenizer)."""
    symbols: list[str] = []
    start = 0
    for i, token in enumerate([*ids, tokenizer.eot_id]):
        if token == tokenizer.eot_id:
            symbols.extend(tokenizer.decode(ids[start:i]))
            if i < len(ids):
                symbols.append(END)
            start = i + 1
    return symbols


def check_tokenizer(tokenizer: Tokenizer, chain: MarkovChain) -> None:
    """Raise UserError unless every token but end-of-text writes characters of the chain's
    alphabet only: the oracle must be able to read anything the model writes."""
    alphabet = set(chain.alphabet)
    outside = sorted({c for t in range(tokenizer.vocab_size) if t != tokenizer.eot_id
                      for c in tokenizer.decode([t]) if c not in alphabet})
    if outside:
        raise UserError(f"the model's tokenizer writes characters the oracle's language lacks "
                        f"({', '.join(map(repr, outside[:5]))}); --oracle needs a model trained on that language")

