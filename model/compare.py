"""Compare decoding strategies side by side (the command is ``python sample.py compare CKPT``).

Every strategy of a grid continues the same prompts with the same seeds, and each gets
one row of the metrics the literature uses (model/metrics.py), next to a "human" row:
the true continuations of the same prompts, taken from the validation split of the
checkpoint's dataset. The human row is the target; the question a table answers is
which strategy writes text that looks most like it.

How the comparison is run, and why:

* Seeds: sample s of prompt p uses seed ``seed + p * num_samples + s`` (generate's own
  rule: every row of a batch has its own random stream), the same in every strategy, so
  all strategies see the same prompts and seeds. Each strategy is one `generate` call,
  all prompts and samples in one batch; beam search runs prompt by prompt (generate's
  beam search takes one prompt at a time).
* Deterministic strategies (greedy, beam) give the same text for every seed, so they
  are generated once per prompt and that text stands for each of the ``num_samples``
  samples. Self-BLEU then shows the truth (the samples are identical: 1.0) and every
  other metric is the same as for the single copy.
* Prompts are drawn from the validation split (seeded; each starts at the beginning of
  a line or document) and go to the model as the split's own token ids: their text
  need not encode back to the same ids (a byte-level BPE prompt can end inside a
  character). The human row is the ``max_new_tokens`` tokens that follow each prompt
  there, cut at end-of-text or a stop string by the same rule as a generated sample.
  Prompts given by the user have no known continuation, so there is no human row then.
* Perplexity is always per model token, from the model's raw (unfiltered)
  distribution: for a generated sample the log-probabilities generate records, for the
  human text a teacher-forced pass through the same token loop (same context window).
* The text metrics count words by default: runs of letters/digits, each punctuation
  mark a word of its own (``\\w+|[^\\w\\s]``). For a character-level model, distinct-n
  over characters mostly measures the alphabet, and a loop is a phrase of words
  repeated; words also read the same for every tokenizer. ``units="tokens"`` counts
  model tokens instead. A sample cut by the length limit may end mid-word, so its
  last word is dropped when the text ends in a letter or digit (a partial word would
  hide a loop from the repetition test and count as a new n-gram).
* Pooling: distinct-n and the Zipf coefficient depend on how much text they see (more
  text, more repeated n-grams), and the human row has one continuation per prompt.
  So they are computed on one sample per prompt, the s-th of each (s = 0 ..
  num_samples-1), and averaged over s: every row is measured on the same amount of
  text. Self-BLEU compares the samples of one prompt with each other, averaged over
  prompts (none for the human row: one continuation per prompt). Repetition,
  perplexity, bits per byte (the same nats over the UTF-8 bytes of the tokens, which
  compare across tokenizers: model/score.py), lengths and the end rate are per sample or per token and pool every
  sample.
* An oracle (a synthetic language's chain, model/synthetic.py) adds exact columns, from
  the symbols of each continuation (its tokens' characters, end-of-text as END) in the
  context of its prompt (`oracle_columns`): its NLL per token under the chain (smoothed,
  see synthetic.SMOOTHING), the chain's own entropy at the same positions (for text of
  the chain itself the two agree in expectation: a strategy below it is sharper than
  the truth, above it more random), support precision (the share of its (order+1)-grams
  the chain can emit, pooled) and coverage (the share of the chain's probable
  (order+1)-grams it holds, per draw like distinct-n; it grows with the amount of text,
  so read it beside the tokens column). n-grams lie inside a continuation.
* A judge (``judge=``, a larger model of the same tokenizer) scores every sample and the
  human text after the same prompt, teacher-forced through the same token loop: its NLL
  per token (``judge_nll``) says how good the text is by a model other than the one that
  wrote it, which finds its own greedy loops most probable.
* Repetition escape (``escape_tokens`` > 0; Hewitt et al. 2022): every strategy also
  continues each prompt followed by its last `LOOP_TOKENS` tokens repeated `LOOP_REPEATS`
  times more, a loop the text can follow or leave. A sample is stuck when it follows the
  loop with confidence: at least `LOOP_FOLLOW` of its ``escape_tokens`` tokens continue
  the loop, and their mean NLL under the generator's raw distribution is below
  `STUCK_NLL` (1 nat, Hewitt et al.'s rule). The NLL alone is not enough at character
  level, where ordinary text costs under 1 nat a token. ``stuck`` is the share of stuck
  samples (none for the human row, which has no continuation of a loop).
* Per-prompt totals (`prompt_totals`) give every quantity of a sweep as per-prompt sums
  and counts, so that model/sweep.py can resample prompts for its intervals.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from itertools import chain
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import metrics
from model.data import open_split, read_meta
from model.decoding import mask_vocab_padding
from model.device import Precision
from model.errors import UserError
from model.generate import Sample, encode_prompt, generate, replay
from model.plot import plot_comparison, plot_frontier
from model.gpt import GPT
from model.strategy import DecodingSpec, parse_strategy_with_defaults
from model.score import bits_per_byte, score_continuations, token_byte_lengths
from model.sweep import SweepSummary, Totals, summarize, sweep_tables
from model.synthetic import PROBABLE, MarkovChain, check_tokenizer, token_symbols
from model.tokenizer import Tokenizer

DEFAULT_GRID = (
    "greedy", "beam:n=4", "sample", "temperature:t=0.7", "top-k:k=40", "top-p:p=0.9", "typical:p=0.95",
    "min-p:p=0.05",
)
UNITS = ("words", "tokens")
HUMAN = "human"
WORD = re.compile(r"\w+|[^\w\s]")

# One row of the table: these keys, in this order, in results.json, .csv and .md.
ROW_FIELDS = (
    "strategy", "perplexity", "bits_per_byte", "distinct_1", "distinct_2", "distinct_3", "repetition",
    "repetition_tokens", "self_bleu", "self_bleu_tokens", "zipf",
    "mean_tokens", "mean_units", "end_rate", "tokens_per_s", "seconds", "samples",
)
# The columns an oracle adds (`oracle_columns`), after those.
ORACLE_FIELDS = ("oracle_nll", "oracle_entropy", "support_precision", "coverage")
# Columns a row has only when the comparison measured them (a judge, the escape prompts, an oracle),
# after ROW_FIELDS in this order; a new optional column is one more name here, one in
# COLUMNS and its value in `_row`.
OPTIONAL_FIELDS = ("judge_nll", "stuck", *ORACLE_FIELDS)
LOOP_TOKENS = 4  # the repeated unit of an escape prompt...
LOOP_REPEATS = 5  # ...appended this many more times after the prompt, which already ends in it
STUCK_NLL = 1.0  # nats per token: below it, a continuation of the loop prompt is stuck
LOOP_FOLLOW = 0.75  # and at least this share of its tokens repeat the loop


# ----------------------------------------------------------------------------- the grid


def parse_grid(specs: Sequence[str]) -> list[DecodingSpec]:
    """The strategies to compare, in the order given: compact specs, or bare names with
    sample.py's defaults (`parse_strategy_with_defaults`: ``top-k`` is ``top-k:k=40``).

    Raises UserError for an empty grid, an invalid spec (say what is wrong with it), or
    the same strategy twice (compared by its canonical label, so ``top-p:p=0.9`` and
    ``top-p:t=1,p=0.9`` are the same).
    """
    if not specs:
        raise UserError("the strategy grid is empty; give at least one --strategy")
    grid: list[DecodingSpec] = []
    for text in specs:
        spec = parse_strategy_with_defaults(text)
        if spec in grid:
            raise UserError(f"strategy '{text}' is in the grid twice (as '{spec.label}'); list each once")
        grid.append(spec)
    return grid


# ----------------------------------------------------------------------------- prompts and the human row


def line_start_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens after which a new line or document begins: end-of-text, and every token whose
    text ends in a line break."""
    ids = {tid for tid in range(tokenizer.vocab_size) if tokenizer.token_bytes(tid).endswith(b"\n")}
    return ids | {tokenizer.eot_id}


def draw_prompt_starts(
    tokens: np.ndarray, tokenizer: Tokenizer, num_prompts: int, prompt_tokens: int, continuation_tokens: int,
    seed: int,
) -> list[int]:
    """Where the prompts begin in ``tokens`` (a split), drawn without replacement; ascending.

    A start p is eligible when the window tokens[p : p + prompt_tokens + continuation_tokens]
    lies inside the split and its first ``prompt_tokens`` (the prompt) hold no end-of-text
    token. Among those, the starts of a line or document (p = 0, or tokens[p - 1] in
    `line_start_ids`) are preferred so that prompts read like the beginning of something;
    when there are fewer of them than ``num_prompts``, any eligible start may be drawn.
    The draw depends only on the split, the sizes and ``seed``. Raises UserError when
    there are fewer than ``num_prompts`` eligible starts.
    """
    last_start = len(tokens) - (prompt_tokens + continuation_tokens)
    ids = np.asarray(tokens[: max(last_start, 0) + prompt_tokens], dtype=np.int64)
    starts = np.arange(last_start + 1)
    eots_before = np.concatenate([[0], np.cumsum(ids == tokenizer.eot_id)])
    eligible = starts[eots_before[starts + prompt_tokens] == eots_before[starts]]
    after_line_break = np.isin(ids[np.maximum(eligible - 1, 0)], list(line_start_ids(tokenizer)))
    at_line_start = eligible[(eligible == 0) | after_line_break]
    pool = at_line_start if len(at_line_start) >= num_prompts else eligible
    if len(pool) < num_prompts:
        raise UserError(
            f"the validation split ({len(tokens)} tokens) has {len(pool)} places for a {prompt_tokens}-token prompt "
            f"followed by {continuation_tokens} tokens, fewer than the {num_prompts} prompts asked for; ask for fewer "
            "or shorter prompts (--num-prompts, --prompt-tokens, --max-new-tokens) or give them with --prompt"
        )
    drawn = np.random.default_rng(seed).choice(pool, size=num_prompts, replace=False)
    return sorted(int(p) for p in drawn)


def val_prompts(
    data_dir: str, tokenizer_state: dict, tokenizer: Tokenizer, num_prompts: int, prompt_tokens: int,
    max_new_tokens: int, seed: int,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Prompts drawn from the validation split of ``data_dir`` (as token ids), their true
    continuations (``max_new_tokens`` tokens each) and their start positions in the split."""
    meta = read_meta(data_dir)
    if meta.get("tokenizer") != tokenizer_state:
        raise UserError(
            f"the dataset in {data_dir} has another tokenizer than the checkpoint; pass --data-dir with the "
            "dataset the model was trained on, or give prompts with --prompt"
        )
    tokens = open_split(data_dir, "val", meta)
    starts = draw_prompt_starts(tokens, tokenizer, num_prompts, prompt_tokens, max_new_tokens, seed)
    prompts = [[int(t) for t in tokens[p : p + prompt_tokens]] for p in starts]
    human = [[int(t) for t in tokens[p + prompt_tokens : p + prompt_tokens + max_new_tokens]] for p in starts]
    return prompts, human, starts


# ----------------------------------------------------------------------------- units and metrics


def text_units(sample: Sample, units: str) -> list:
    """What the text metrics count in one sample: words (see the module docstring) or tokens.

    words: `WORD` matches of the sample's text, without a last word that may have been cut
    by the length limit (finish "length" and the text ends in a letter or digit).
    tokens: the generated ids without a final end-of-text token.
    """
    if units == "tokens":
        return generated_tokens(sample)
    if units != "words":
        raise UserError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    words = WORD.findall(sample.text)
    if sample.finish == "length" and words and re.match(r"\w", sample.text[-1]):
        words.pop()
    return words


def generated_tokens(sample: Sample) -> list[int]:
    """A sample's tokens without the end-of-text token that ended it."""
    return sample.tokens[:-1] if sample.finish == "eot" else list(sample.tokens)


def row_metrics(
    units_by_prompt: Sequence[Sequence[Sequence]], samples: Sequence[Sample], byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics of one table row (see the module docstring for the pooling).

    ``units_by_prompt[p][s]`` are the units of sample s of prompt p; every prompt has the
    same number of samples. ``samples`` are the distinct Sample objects behind them (a
    deterministic strategy's one per prompt), which give the token-level numbers.
    ``byte_lengths`` (model.score.token_byte_lengths) gives bits_per_byte (else nan).
    Keys: perplexity, bits_per_byte, distinct_1..3, repetition, repetition_tokens, self_bleu,
    self_bleu_tokens, zipf, mean_tokens, mean_units, end_rate; nan where a metric has
    nothing to measure. ``repetition`` and ``self_bleu`` count the units,
    ``repetition_tokens`` and ``self_bleu_tokens`` the model tokens: a loop of spaces has
    no words, and a loop of word pieces without spaces is one long word, so only the
    tokens show those (identical looping samples of fewer than 4 words score a self-BLEU
    well below 1 on words).
    """
    per_draw = [[group[s] for group in units_by_prompt] for s in range(len(units_by_prompt[0]))]
    every_sample = [units for group in units_by_prompt for units in group]
    tokens_by_prompt = _tokens_by_prompt(samples, [len(group) for group in units_by_prompt])
    return {
        "perplexity": metrics.perplexity(list(chain.from_iterable(s.logprobs for s in samples))),
        "bits_per_byte": _bits_per_byte(samples, byte_lengths),
        **{f"distinct_{n}": metrics.mean((metrics.distinct_n(draw, n) for draw in per_draw), skip_nan=True)
           for n in (1, 2, 3)},
        "repetition": metrics.repetition_rate(every_sample),
        "repetition_tokens": metrics.repetition_rate(generated_tokens(s) for s in samples),
        "self_bleu": metrics.mean((metrics.self_bleu(group) for group in units_by_prompt if len(group) >= 2),
                                  skip_nan=True),
        "self_bleu_tokens": metrics.mean((metrics.self_bleu(group) for group in tokens_by_prompt if len(group) >= 2),
                                         skip_nan=True),
        "zipf": metrics.mean((metrics.zipf_coefficient(chain.from_iterable(draw)) for draw in per_draw),
                             skip_nan=True),
        "mean_tokens": metrics.mean(len(s.tokens) for s in samples),
        "mean_units": metrics.mean(len(units) for units in every_sample),
        "end_rate": metrics.mean(float(s.finish != "length") for s in samples),
    }


def _tokens_by_prompt(samples: Sequence[Sample], group_sizes: Sequence[int]) -> list[list[list[int]]]:
    """The generated tokens of each prompt's samples, as many per prompt as ``group_sizes``
    says: a deterministic strategy's one sample per prompt stands for every copy of it."""
    groups: list[list[list[int]]] = [[] for _ in group_sizes]
    for sample in samples:
        groups[sample.prompt_index].append(generated_tokens(sample))
    return [group * (size // len(group)) if group else [] for group, size in zip(groups, group_sizes)]


def _bits_per_byte(samples: Sequence[Sample], byte_lengths: torch.Tensor | None) -> float:
    tokens = list(chain.from_iterable(s.tokens for s in samples))
    num_bytes = int(byte_lengths[tokens].sum()) if byte_lengths is not None and tokens else 0
    if not num_bytes:
        return math.nan
    return bits_per_byte(-math.fsum(chain.from_iterable(s.logprobs for s in samples)), num_bytes)


# ----------------------------------------------------------------------------- the comparison


@dataclass
class Run:
    """The samples of one table row: a strategy (spec set) or the human reference (spec None)."""

    label: str
    spec: DecodingSpec | None
    samples: list[Sample]  # prompt-major; one per prompt for deterministic strategies and the human row
    seconds: float | None  # wall time of generation (None for the human row)
    judge_logprobs: list[list[float]] | None = None  # the judge's log p of each sample's tokens
    escapes: list[Sample] | None = None  # continuations of the loop prompts, in the order of samples
    loop_units: list[list[int]] | None = None  # the unit each prompt's loop prompt repeats (`loop_unit`)
    oracle_nats: list[tuple[float, int]] | None = None  # each sample's (nats, symbols) under an oracle

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (as returned, end-of-text included) per second of generation."""
        if not self.seconds:
            return math.nan
        return sum(len(s.tokens) for s in self.samples) / self.seconds


@dataclass
class Comparison:
    """Everything a comparison produced (what ``sample.py compare --out`` writes)."""

    prompts: list[str]  # the text of each prompt
    runs: list[Run]
    rows: list[dict[str, Any]]  # one per run, keys `row_fields` (ROW_FIELDS and the optional ones measured)
    settings: dict[str, Any]

    def seed_of(self, run: Run, sample: Sample) -> int | None:
        """The seed a sample was generated with; None for the human text and for greedy and
        beam search, whose text is the same for every seed."""
        if run.spec is None or run.spec.is_deterministic:
            return None
        num_samples = self.settings["num_samples"]
        return self.settings["seed"] + sample.prompt_index * num_samples + sample.sample_index


def run_comparison(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    grid: Sequence[DecodingSpec],
    *,
    human: Sequence[Sequence[int]] | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 200,
    seed: int = 1337,
    stop: Sequence[str] = (),
    window: str = "exact",
    units: str = "words",
    judge: GPT | None = None,
    escape_tokens: int = 0,
    progress: bool = True,
    oracle: MarkovChain | None = None,
) -> Comparison:
    """Continue every prompt with every strategy of ``grid`` and measure each (one row each).

    A prompt is a text or token ids (see `encode_prompt`). ``human[p]``, if given, are the
    true next tokens after prompt p (at most ``max_new_tokens`` of them are used); they
    make the first row. Sample s of prompt p uses seed ``seed + p * num_samples + s`` in
    every stochastic strategy, so all strategies see the same prompts and seeds.
    ``judge`` (a model of the same tokenizer) scores every sample: the judge_nll column.
    ``escape_tokens`` > 0 also continues each loop prompt (`loop_prompt`) that many
    tokens with every strategy, with the same seeds: the stuck column.
    ``oracle``, the chain of a synthetic language the model learnt, adds its columns
    (`oracle_columns`) to every row. See the module docstring for what is measured how.
    """
    if oracle is not None:
        check_tokenizer(tokenizer, oracle)
    if units not in UNITS:
        raise UserError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    if max_new_tokens < 1:  # generate itself allows 0 tokens; a comparison of them measures nothing
        raise UserError(f"a comparison needs max_new_tokens >= 1, got {max_new_tokens}")
    if escape_tokens < 0:
        raise UserError(f"escape_tokens must be >= 0 (0: no escape prompts), got {escape_tokens}")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    loops = [loop_prompt(ids) for ids in encoded] if escape_tokens else None
    runs: list[Run] = []
    with tqdm(total=len(grid) + (human is not None), desc="compare", unit="strategy", disable=not progress) as bar:
        if human is not None:
            bar.set_postfix_str(HUMAN)
            runs.append(_human_run(model, tokenizer, prompts, human, max_new_tokens, stop, window))
            bar.update()
        for spec in grid:
            bar.set_postfix_str(spec.label)
            started = time.perf_counter()
            samples = _generate(model, tokenizer, prompts, spec, num_samples, max_new_tokens, seed, stop, window)
            seconds = time.perf_counter() - started
            escapes = None if loops is None else _generate(model, tokenizer, loops, spec, num_samples,
                                                           escape_tokens, seed, stop, window)
            runs.append(Run(spec.label, spec, samples, seconds, escapes=escapes,
                            loop_units=None if loops is None else [loop_unit(ids) for ids in encoded]))
            bar.update()
        if judge is not None:
            bar.set_postfix_str("judge")
            for run in runs:
                run.judge_logprobs = judge_scores(judge, tokenizer, encoded, run.samples, window)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    rows = [_row(run, len(prompts), num_samples, units, byte_lengths) for run in runs]
    rows = [{key: row.get(key, math.nan) for key in row_fields(rows)} for row in rows]  # the human row has no stuck
    settings = {
        "num_samples": num_samples, "max_new_tokens": max_new_tokens, "seed": seed, "stop": list(stop),
        "window": window, "units": units, "human_row": human is not None, "judged": judge is not None,
        "escape_tokens": escape_tokens,
    }
    if oracle is not None:
        for run in runs:
            run.oracle_nats = [oracle_nats(sample, encoded[sample.prompt_index], tokenizer, oracle)
                               for sample in run.samples]
        n, probable = oracle.order + 1, oracle.probable_ngrams(oracle.order + 1, PROBABLE)
        rows = [row | oracle_columns(run, encoded, tokenizer, oracle, n, probable)
                for run, row in zip(runs, rows)]
        settings["oracle"] = {"name": oracle.name, "seed": oracle.seed, "order": oracle.order,
                              "entropy_rate": oracle.entropy_rate(), "ngram": n, "probable_threshold": PROBABLE,
                              "probable_ngrams": len(probable)}
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    return Comparison(texts, runs, rows, settings)


def _generate(model, tokenizer, prompts, spec, num_samples, max_new_tokens, seed, stop, window) -> list[Sample]:
    """The samples of one strategy in one batch, prompt-major; one per prompt when it is deterministic."""
    runs = 1 if spec.is_deterministic else num_samples
    return generate(model, tokenizer, prompts, spec, num_samples=runs, seed=seed, max_new_tokens=max_new_tokens,
                    stop=stop, window=window)


def loop_prompt(ids: Sequence[int]) -> list[int]:
    """A repetition-escape prompt: ``ids`` followed by its last `LOOP_TOKENS` tokens
    `LOOP_REPEATS` more times (a prompt shorter than that repeats all of itself)."""
    return list(ids) + loop_unit(ids) * LOOP_REPEATS


def loop_unit(ids: Sequence[int]) -> list[int]:
    """The tokens that `loop_prompt` repeats: the prompt's last `LOOP_TOKENS`."""
    return list(ids[-LOOP_TOKENS:])


def is_stuck(sample: Sample, unit: Sequence[int]) -> bool:
    """Whether a continuation of a loop prompt follows the loop ``unit`` with confidence: at
    least `LOOP_FOLLOW` of its tokens are the unit's, continued in order from its first,
    and their mean NLL (the generator's raw distribution) is below `STUCK_NLL`."""
    if not sample.tokens or not sample.logprobs:
        return False
    follows = sum(token == unit[i % len(unit)] for i, token in enumerate(sample.tokens))
    nll = -math.fsum(sample.logprobs) / len(sample.logprobs)
    return follows >= LOOP_FOLLOW * len(sample.tokens) and nll < STUCK_NLL


def judge_scores(judge: GPT, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], samples: Sequence[Sample],
                 window: str, batch_size: int = 16) -> list[list[float]]:
    """The judge's log p of every token of every sample after the sample's prompt, under its
    raw distribution (vocabulary padding masked, as in the token loop).

    When every prompt + sample fits the judge's context, each batch of ``batch_size``
    samples is one forward pass: rows right-padded, which causal attention never reads
    back, and the logits at positions len(prompt) - 1 ... score the sample's tokens;
    that is the token loop's teacher forcing (`score_continuations`) without its 200
    sequential steps. Longer ones go through `score_continuations`, which reads them
    through the window like a generated token."""
    rows = [list(prompts[s.prompt_index]) + list(s.tokens) for s in samples]
    if not rows or max(len(r) for r in rows) > judge.config.block_size:
        return score_continuations(judge, [prompts[s.prompt_index] for s in samples], [s.tokens for s in samples],
                                   window=window, valid_vocab=tokenizer.vocab_size)
    device = next(judge.parameters()).device
    precision = Precision.for_device(device)
    scores: list[list[float]] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch], device=device)
        with precision.autocast():
            logits, _ = judge(ids)
        logprobs = F.log_softmax(mask_vocab_padding(logits.float(), tokenizer.vocab_size), dim=-1)
        for row, sample in enumerate(samples[first : first + batch_size]):
            start = len(prompts[sample.prompt_index]) - 1
            targets = torch.tensor(sample.tokens, device=device, dtype=torch.long)
            scores.append(logprobs[row, start : start + len(targets)].gather(1, targets[:, None])[:, 0].tolist())
    return scores


def prompt_totals(run: Run, num_prompts: int, units: str) -> Totals:
    """A row's quantities as per-prompt sums and counts (model/sweep.py resamples prompts):
    "nll" (the generator's nats, tokens), "judge_nll" (the judge's, when it scored),
    "distinct_2" (the sum of the distinct-2 of each sample on its own, the samples that
    have a bigram), "stuck" (stuck loop-prompt samples, loop-prompt samples; when there
    were escape prompts) and "oracle_nll" (nats and symbols under a synthetic language's
    chain, when there was one). A deterministic strategy's one sample per prompt stands
    for every seed's: per prompt, copies change no ratio."""
    def per_prompt(samples: Sequence[Sample], value, count) -> tuple[list[float], list[float]]:
        sums, counts = [0.0] * num_prompts, [0.0] * num_prompts
        for sample in samples:
            sums[sample.prompt_index] += value(sample)
            counts[sample.prompt_index] += count(sample)
        return sums, counts

    def distinct_2(sample: Sample) -> float:
        value = metrics.distinct_n([text_units(sample, units)], 2)
        return 0.0 if math.isnan(value) else value

    def has_bigram(sample: Sample) -> float:
        return float(len(text_units(sample, units)) >= 2)

    values = {
        "nll": per_prompt(run.samples, lambda s: -math.fsum(s.logprobs), lambda s: len(s.logprobs)),
        "distinct_2": per_prompt(run.samples, distinct_2, has_bigram),
    }
    if run.judge_logprobs is not None:
        nats = {id(s): -math.fsum(lp) for s, lp in zip(run.samples, run.judge_logprobs)}
        values["judge_nll"] = per_prompt(run.samples, lambda s: nats[id(s)], lambda s: len(s.tokens))
    if run.escapes is not None:
        values["stuck"] = per_prompt(run.escapes, lambda s: float(is_stuck(s, run.loop_units[s.prompt_index])),
                                     lambda s: 1.0)
    if run.oracle_nats is not None:
        oracle = {id(s): nats for s, nats in zip(run.samples, run.oracle_nats)}
        values["oracle_nll"] = per_prompt(run.samples, lambda s: oracle[id(s)][0], lambda s: oracle[id(s)][1])
    return Totals(values)


def _human_run(model, tokenizer, prompts, human, max_new_tokens, stop, window) -> Run:
    samples = [replay(tokenizer, list(h)[:max_new_tokens], stop, prompt_index=p) for p, h in enumerate(human)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    scores = score_continuations(model, encoded, [s.tokens for s in samples], window=window,
                                 valid_vocab=tokenizer.vocab_size)
    for sample, logprobs in zip(samples, scores):
        sample.logprobs = logprobs
    return Run(HUMAN, None, samples, None)


def _row(
    run: Run, num_prompts: int, num_samples: int, units: str, byte_lengths: torch.Tensor
) -> dict[str, Any]:
    """One table row. A deterministic strategy's one sample per prompt stands for the
    num_samples identical samples every seed would give; the human row has one per prompt."""
    per_prompt = len(run.samples) // num_prompts
    copies = num_samples if run.spec is not None and run.spec.is_deterministic else 1
    units_by_prompt = [
        [text_units(sample, units) for sample in run.samples[p * per_prompt : (p + 1) * per_prompt]] * copies
        for p in range(num_prompts)
    ]
    row = {"strategy": run.label, **row_metrics(units_by_prompt, run.samples, byte_lengths)}
    row["tokens_per_s"] = run.tokens_per_s
    row["seconds"] = math.nan if run.seconds is None else run.seconds
    row["samples"] = len(run.samples)
    if run.judge_logprobs is not None:
        judged = list(chain.from_iterable(run.judge_logprobs))
        row["judge_nll"] = -math.fsum(judged) / len(judged) if judged else math.nan
    if run.escapes is not None:
        row["stuck"] = metrics.mean(float(is_stuck(s, run.loop_units[s.prompt_index])) for s in run.escapes)
    return {key: row[key] for key in (*ROW_FIELDS, *OPTIONAL_FIELDS) if key in row}


def row_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The keys of a table's rows: ROW_FIELDS, then the optional ones any row has."""
    return [*ROW_FIELDS, *(key for key in OPTIONAL_FIELDS if any(key in row for row in rows))]


def oracle_columns(
    run: Run, prompts: Sequence[Sequence[int]], tokenizer: Tokenizer, oracle: MarkovChain, n: int,
    probable: dict[tuple[str, ...], float],
) -> dict[str, float]:
    """The oracle's columns of one row (see the module docstring; nan where there is
    nothing to measure).

    ``prompts[p]`` are the token ids of prompt p (its symbols give the chain's context:
    `MarkovChain.context_after`); ``probable`` are the chain's probable n-grams
    (`MarkovChain.probable_ngrams`). oracle_nll: mean over all continuation symbols (its
    tokens, for the char tokenizer) of -log q (`MarkovChain.smoothed_logprobs`; from
    ``run.oracle_nats`` when the comparison has already scored them);
    oracle_entropy: mean of the chain's entropy at the same positions;
    support_precision: producible / all n-grams, pooled over the samples; coverage: |probable n-grams in the s-th sample of every prompt| /
    |probable|, averaged over s (a deterministic strategy's one sample per prompt is
    every draw).
    """
    nats = run.oracle_nats or [oracle_nats(s, prompts[s.prompt_index], tokenizer, oracle) for s in run.samples]
    symbols_scored = sum(count for _, count in nats)
    entropies, ngrams_by_sample = [], []
    for sample in run.samples:
        symbols, context = oracle_view(sample, prompts[sample.prompt_index], tokenizer, oracle)
        entropies += oracle.entropies(symbols, context)
        ngrams_by_sample.append(metrics._ngrams(symbols, n))
    pooled = list(chain.from_iterable(ngrams_by_sample))
    per_prompt = len(run.samples) // len(prompts)
    draws = [[ngrams_by_sample[p * per_prompt + s] for p in range(len(prompts))] for s in range(per_prompt)]
    reached = [len(probable.keys() & set(chain.from_iterable(draw))) for draw in draws]
    return {
        "oracle_nll": math.fsum(n for n, _ in nats) / symbols_scored if symbols_scored else math.nan,
        "oracle_entropy": metrics.mean(entropies),
        "support_precision": metrics.mean(map(float, oracle.producible(pooled))),
        "coverage": metrics.mean(r / len(probable) for r in reached) if probable else math.nan,
    }


def oracle_nats(sample: Sample, prompt: Sequence[int], tokenizer: Tokenizer,
                oracle: MarkovChain) -> tuple[float, int]:
    """A sample's NLL under the oracle (smoothed, `oracle_view`): (nats, symbols)."""
    symbols, context = oracle_view(sample, prompt, tokenizer, oracle)
    return -math.fsum(oracle.smoothed_logprobs(symbols, context)), len(symbols)


def oracle_view(
    sample: Sample, prompt: Sequence[int], tokenizer: Tokenizer, oracle: MarkovChain
) -> tuple[list[str], str]:
    """A sample as the oracle reads it: the symbols of its tokens (`token_symbols`) and the
    chain's context after its prompt's (token ids). The sample's oracle NLL in nats is
    ``-sum(oracle.smoothed_logprobs(symbols, context))``, over ``len(symbols)`` symbols."""
    return token_symbols(tokenizer, sample.tokens), oracle.context_after(token_symbols(tokenizer, prompt))


# ----------------------------------------------------------------------------- tables and files


# Column title, row key, format: perplexity to 2 decimals, shares as percentages.
COLUMNS = (
    ("strategy", "strategy", "{}"),
    ("ppl", "perplexity", "{:.2f}"),
    ("bpb", "bits_per_byte", "{:.3f}"),
    ("dist-1", "distinct_1", "{:.3f}"),
    ("dist-2", "distinct_2", "{:.3f}"),
    ("dist-3", "distinct_3", "{:.3f}"),
    ("rep %", "repetition", "{:.1%}"),
    ("rep tok %", "repetition_tokens", "{:.1%}"),
    ("self-BLEU", "self_bleu", "{:.3f}"),
    ("self-BLEU tok", "self_bleu_tokens", "{:.3f}"),
    ("Zipf", "zipf", "{:.2f}"),
    ("tokens", "mean_tokens", "{:.1f}"),
    ("ended %", "end_rate", "{:.1%}"),
    ("tok/s", "tokens_per_s", "{:.0f}"),
    ("judge NLL", "judge_nll", "{:.3f}"),  # optional columns: shown when the rows have them
    ("stuck %", "stuck", "{:.1%}"),
)
ORACLE_COLUMNS = (  # shown when the rows have them: nats per token, shares as percentages
    ("orc NLL", "oracle_nll", "{:.3f}"),
    ("orc H", "oracle_entropy", "{:.3f}"),
    ("sup prec %", "support_precision", "{:.1%}"),
    ("cov %", "coverage", "{:.1%}"),
)


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The COLUMNS whose key the rows have (an optional column only when measured)."""
    return [column for column in (*COLUMNS, *ORACLE_COLUMNS)
            if column[1] in ROW_FIELDS or any(column[1] in row for row in rows)]


def _cells(row: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    cells = []
    for _, key, fmt in columns:
        value = row[key]
        missing = isinstance(value, float) and math.isnan(value)
        cells.append("-" if missing else fmt.format(value).replace("%", ""))
    return cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table (strategy left-aligned, numbers right); nan is '-'."""
    columns = _columns(rows)
    table = [[title for title, _, _ in columns]] + [_cells(row, columns) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in table
    ]
    return "\n".join(lines)


def sample_lines(comparison: Comparison, width: int = 100) -> str:
    """Prompt 1, then the first sample of each row after its label, one line each (line
    breaks shown as ↵, cut at ``width`` characters): what the numbers describe."""
    label_width = max(len(run.label) for run in comparison.runs)
    lines = [f"{'prompt 1':<{label_width}}  {_one_line(comparison.prompts[0], width, keep='end')}"]
    lines += [f"{run.label:<{label_width}}  {_one_line(run.samples[0].text, width)}" for run in comparison.runs]
    return "\n".join(lines)


def _one_line(text: str, width: int, keep: str = "start") -> str:
    text = text.replace("\n", "\u21b5")
    if len(text) <= width:
        return text
    return text[: width - 1] + "\u2026" if keep == "start" else "\u2026" + text[1 - width :]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table (the same cells as `format_table`)."""
    columns = _columns(rows)
    header = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"
    body = ["| " + " | ".join(_cells(row, columns)) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _plain(value: Any) -> Any:
    """JSON has no nan: write null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(comparison: Comparison, out_dir: Path, title: str = "") -> list[Path]:
    """Write results.json, results.csv, results.md, samples.jsonl and (with matplotlib)
    chart.png into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison.rows
    paths = [out_dir / name for name in ("results.json", "results.csv", "results.md", "samples.jsonl")]
    results = {
        "title": title, "settings": comparison.settings, "prompts": comparison.prompts,
        "rows": [{key: _plain(value) for key, value in row.items()} for row in rows],
    }
    paths[0].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=row_fields(rows))
        writer.writeheader()
        writer.writerows({key: "" if _plain(v) is None else v for key, v in row.items()} for row in rows)
    paths[2].write_text(markdown_table(rows) + "\n", encoding="utf-8")
    with paths[3].open("w", encoding="utf-8") as f:
        for run in comparison.runs:
            for index, sample in enumerate(run.samples):
                f.write(json.dumps(_sample_record(run, index, comparison), ensure_ascii=False) + "\n")
    chart = out_dir / "chart.png"
    if plot_comparison(rows, chart, title, HUMAN):
        paths.append(chart)
    return paths


def _sample_record(run: Run, index: int, comparison: Comparison) -> dict[str, Any]:
    sample = run.samples[index]
    record = {
        "strategy": run.label, "prompt_index": sample.prompt_index, "sample_index": sample.sample_index,
        "seed": comparison.seed_of(run, sample),
        "same_for_every_seed": run.spec is not None and run.spec.is_deterministic, "finish": sample.finish,
        "prompt": comparison.prompts[sample.prompt_index], "text": sample.text,
        "tokens": sample.tokens, "logprobs": sample.logprobs,
    }
    if run.judge_logprobs is not None:
        record["judge_logprobs"] = run.judge_logprobs[index]
    return record


# ----------------------------------------------------------------------------- sweeps


def summarize_sweep(comparison: Comparison, sweep: dict[str, list[DecodingSpec]], *, draws: int,
                    seed: int) -> SweepSummary:
    """The sweep's frontiers and intervals (model/sweep.py `summarize`) from a comparison of
    its settings that has a human row; quality is the oracle's NLL when there is one (the
    truth of a synthetic language), else the judge's when a judge scored."""
    if not comparison.settings["human_row"]:
        raise UserError("a sweep needs the human text as its target: draw the prompts from the validation split "
                        "(no --prompt or --prompt-lines)")
    num_prompts = len(comparison.prompts)
    totals = {run.label: prompt_totals(run, num_prompts, comparison.settings["units"]) for run in comparison.runs}
    judge = "oracle_nll" if "oracle" in comparison.settings else "judge_nll" if comparison.settings["judged"] else None
    return summarize(sweep, totals, totals[HUMAN], judge=judge, draws=draws, seed=seed)


def write_sweep(summary: SweepSummary, out_dir: Path, title: str = "") -> list[Path]:
    """Write sweep.json, sweep.md and (with matplotlib) frontier.png into ``out_dir``;
    return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "sweep.md"]
    record = {"title": title, **dataclasses.asdict(summary)}
    paths[0].write_text(json.dumps(_plain_tree(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(sweep_tables(summary, markdown=True) + "\n", encoding="utf-8")
    if plot_frontier(summary, out_dir / "frontier.png", title):
        paths.append(out_dir / "frontier.png")
    return paths


def _plain_tree(value: Any) -> Any:
    """`_plain` all the way down (tuples become lists)."""
    if isinstance(value, dict):
        return {key: _plain_tree(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    return _plain(value)
