"""Compare decoding strategies side by side: ``python sample.py compare CKPT``.

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
  a line or document), and the human row is the ``max_new_tokens`` tokens that follow
  each prompt there, cut at end-of-text or a stop string by the same rule as a
  generated sample. Prompts given by the user have no known continuation, so there is
  no human row then.
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
  compares across tokenizers: model/score.py), lengths and the end rate are per sample or per token and pool every
  sample.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import metrics
from model.checkpoint import load_for_generation
from model.data import open_split, read_meta
from model.decoding import DecodingSpec, default_spec
from model.device import resolve_device
from model.errors import UserError, read_user_text, run_cli
from model.generate import WINDOW_MODES, Context, Sample, TextStream, generate
from model.gpt import GPT
from model.score import bits_per_byte, token_byte_lengths
from model.tokenizer import Tokenizer

DEFAULT_GRID = (
    "greedy", "beam:n=4", "sample", "temperature:t=0.7", "top-k:k=40", "top-p:p=0.9", "typical:p=0.95",
    "min-p:p=0.05",
)
UNITS = ("words", "tokens")
DRAW_DEFAULTS = {"num_prompts": 8, "prompt_tokens": 32}  # prompts drawn from the validation split
HUMAN = "human"
WORD = re.compile(r"\w+|[^\w\s]")

# One row of the table: these keys, in this order, in results.json, .csv and .md.
ROW_FIELDS = (
    "strategy", "perplexity", "bits_per_byte", "distinct_1", "distinct_2", "distinct_3", "repetition", "self_bleu", "zipf",
    "mean_tokens", "mean_units", "end_rate", "tokens_per_s", "seconds", "samples",
)


# ----------------------------------------------------------------------------- the grid


def parse_grid(specs: Sequence[str]) -> list[DecodingSpec]:
    """The strategies to compare, in the order given: compact specs, or bare names with
    sample.py's defaults (`default_spec`: ``top-k`` is ``top-k:k=40``).

    Raises UserError for an empty grid, an invalid spec (say what is wrong with it), or
    the same strategy twice (compared by its canonical label, so ``top-p:p=0.9`` and
    ``top-p:t=1,p=0.9`` are the same).
    """
    if not specs:
        raise UserError("the strategy grid is empty; give at least one --strategy")
    grid: list[DecodingSpec] = []
    for text in specs:
        spec = default_spec(text)
        if spec in grid:
            raise UserError(f"strategy '{text}' is in the grid twice (as '{spec.label}'); list each once")
        grid.append(spec)
    return grid


def is_deterministic(spec: DecodingSpec) -> bool:
    """Greedy decoding and beam search ignore the seed: every sample of a prompt is the same."""
    return spec.is_greedy or spec.is_beam


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


def end_continuation(tokens: Sequence[int], tokenizer: Tokenizer, stop: Sequence[str], prompt_index: int) -> Sample:
    """The true continuation as a Sample, ended by generate's rule: at the end-of-text token
    (kept as its last token), at a stop string (text cut before it), or at its last token.
    Log-probabilities are filled in later by `score_continuations`."""
    sample = Sample(prompt_index, 0)
    stream = TextStream(tokenizer, stop)
    for token in tokens:
        sample.tokens.append(int(token))
        if token == tokenizer.eot_id:
            sample.finish = "eot"
            break
        stream.feed(int(token))
        if stream.stopped:
            sample.finish = "stop"
            break
    stream.finish()
    sample.text = stream.text
    return sample


@torch.no_grad()
def score_continuations(
    model: GPT, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
    window: str = "exact", valid_vocab: int | None = None,
) -> list[list[float]]:
    """log p(continuation[t] | prompt, continuation[:t]) under the model's raw distribution,
    for every token of every continuation (teacher forcing).

    The rows run as one batch through generate's own token loop (`Context`), so each token
    is scored with exactly the context a generated token at that place would have had
    (same window mode, same handling of vocabulary padding): the human row's perplexity is
    measured the way the strategies' is. Every prompt needs at least one token.
    """
    steps = max((len(c) for c in continuations), default=0)
    if steps == 0:
        return [[] for _ in continuations]
    context = Context(model, prompts, steps, window, valid_vocab)
    device = context.tokens.device
    scores: list[list[float]] = [[] for _ in continuations]
    for t in range(steps):
        logprobs = F.log_softmax(context.next_logits(), dim=-1)
        # A continuation that already ended is fed token 0: its row is never read again.
        forced = torch.tensor([c[t] if t < len(c) else 0 for c in continuations], device=device)
        chosen = logprobs.gather(1, forced[:, None]).squeeze(1).tolist()
        for row, continuation in enumerate(continuations):
            if t < len(continuation):
                scores[row].append(chosen[row])
        context.append(forced)
    return scores


# ----------------------------------------------------------------------------- units and metrics


def text_units(sample: Sample, units: str, eot_id: int) -> list:
    """What the text metrics count in one sample: words (see the module docstring) or tokens.

    words: `WORD` matches of the sample's text, without a last word that may have been cut
    by the length limit (finish "length" and the text ends in a letter or digit).
    tokens: the generated ids without a final end-of-text token.
    """
    if units == "tokens":
        return sample.tokens[:-1] if sample.tokens and sample.tokens[-1] == eot_id else list(sample.tokens)
    if units != "words":
        raise UserError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    words = WORD.findall(sample.text)
    if sample.finish == "length" and words and re.match(r"\w", sample.text[-1]):
        words.pop()
    return words


def row_metrics(
    units_by_prompt: Sequence[Sequence[Sequence]], samples: Sequence[Sample], byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics of one table row (see the module docstring for the pooling).

    ``units_by_prompt[p][s]`` are the units of sample s of prompt p; every prompt has the
    same number of samples. ``samples`` are the distinct Sample objects behind them (a
    deterministic strategy's one per prompt), which give the token-level numbers.
    ``byte_lengths`` (model.score.token_byte_lengths) gives bits_per_byte (else nan).
    Keys: perplexity, bits_per_byte, distinct_1..3, repetition, self_bleu, zipf, mean_tokens,
    mean_units, end_rate; nan where a metric has nothing to measure.
    """
    per_draw = [[group[s] for group in units_by_prompt] for s in range(len(units_by_prompt[0]))]
    every_sample = [units for group in units_by_prompt for units in group]
    return {
        "perplexity": metrics.perplexity(list(chain.from_iterable(s.logprobs for s in samples))),
        "bits_per_byte": _bits_per_byte(samples, byte_lengths),
        **{f"distinct_{n}": _mean([metrics.distinct_n(draw, n) for draw in per_draw]) for n in (1, 2, 3)},
        "repetition": metrics.repetition_rate(every_sample),
        "self_bleu": _mean([metrics.self_bleu(group) for group in units_by_prompt if len(group) >= 2]),
        "zipf": _mean([metrics.zipf_coefficient(chain.from_iterable(draw)) for draw in per_draw]),
        "mean_tokens": _mean([len(s.tokens) for s in samples]),
        "mean_units": _mean([len(units) for units in every_sample]),
        "end_rate": _mean([float(s.finish != "length") for s in samples]),
    }


def _bits_per_byte(samples: Sequence[Sample], byte_lengths: torch.Tensor | None) -> float:
    tokens = list(chain.from_iterable(s.tokens for s in samples))
    num_bytes = int(byte_lengths[tokens].sum()) if byte_lengths is not None and tokens else 0
    if not num_bytes:
        return math.nan
    return bits_per_byte(-math.fsum(chain.from_iterable(s.logprobs for s in samples)), num_bytes)


def _mean(values: Sequence[float]) -> float:
    """Mean of the values that are not nan; nan when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


# ----------------------------------------------------------------------------- the comparison


@dataclass
class Run:
    """The samples of one table row: a strategy (spec set) or the human reference (spec None)."""

    label: str
    spec: DecodingSpec | None
    samples: list[Sample]  # prompt-major; one per prompt for deterministic strategies and the human row
    seconds: float | None  # wall time of generation (None for the human row)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (as returned, end-of-text included) per second of generation."""
        if not self.seconds:
            return math.nan
        return sum(len(s.tokens) for s in self.samples) / self.seconds


@dataclass
class Comparison:
    """Everything a comparison produced: what `write_results` writes."""

    prompts: list[str]
    runs: list[Run]
    rows: list[dict[str, Any]]  # one per run, keys ROW_FIELDS
    settings: dict[str, Any]


def run_comparison(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    grid: Sequence[DecodingSpec],
    *,
    human: Sequence[Sequence[int]] | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 200,
    seed: int = 1337,
    stop: Sequence[str] = (),
    window: str = "exact",
    units: str = "words",
    progress: bool = True,
) -> Comparison:
    """Continue every prompt with every strategy of ``grid`` and measure each (one row each).

    ``human[p]``, if given, are the true next tokens after prompt p (at most
    ``max_new_tokens`` of them are used); they make the first row. Sample s of prompt p
    uses seed ``seed + p * num_samples + s`` in every stochastic strategy, so all
    strategies see the same prompts and seeds. See the module docstring for what is
    measured how.
    """
    if units not in UNITS:
        raise UserError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    if num_samples < 1 or max_new_tokens < 1:
        raise UserError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}")
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
            runs.append(Run(spec.label, spec, samples, time.perf_counter() - started))
            bar.update()
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    rows = [_row(run, len(prompts), num_samples, units, tokenizer.eot_id, byte_lengths) for run in runs]
    settings = {
        "num_samples": num_samples, "max_new_tokens": max_new_tokens, "seed": seed, "stop": list(stop),
        "window": window, "units": units, "human_row": human is not None,
    }
    return Comparison(list(prompts), runs, rows, settings)


def _generate(model, tokenizer, prompts, spec, num_samples, max_new_tokens, seed, stop, window) -> list[Sample]:
    """The samples of one strategy in one batch, prompt-major; one per prompt when it is deterministic."""
    runs = 1 if is_deterministic(spec) else num_samples
    return generate(model, tokenizer, prompts, spec, num_samples=runs, seed=seed, max_new_tokens=max_new_tokens,
                    stop=stop, window=window)


def _human_run(model, tokenizer, prompts, human, max_new_tokens, stop, window) -> Run:
    samples = [end_continuation(list(h)[:max_new_tokens], tokenizer, stop, p) for p, h in enumerate(human)]
    encoded = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]  # what generate feeds the model
    scores = score_continuations(model, encoded, [s.tokens for s in samples], window=window,
                                 valid_vocab=tokenizer.vocab_size)
    for sample, logprobs in zip(samples, scores):
        sample.logprobs = logprobs
    return Run(HUMAN, None, samples, None)


def _row(
    run: Run, num_prompts: int, num_samples: int, units: str, eot_id: int, byte_lengths: torch.Tensor
) -> dict[str, Any]:
    """One table row. A deterministic strategy's one sample per prompt stands for the
    num_samples identical samples every seed would give; the human row has one per prompt."""
    per_prompt = len(run.samples) // num_prompts
    copies = num_samples if run.spec is not None and is_deterministic(run.spec) else 1
    units_by_prompt = [
        [text_units(sample, units, eot_id) for sample in run.samples[p * per_prompt : (p + 1) * per_prompt]] * copies
        for p in range(num_prompts)
    ]
    row = {"strategy": run.label, **row_metrics(units_by_prompt, run.samples, byte_lengths)}
    row["tokens_per_s"] = run.tokens_per_s
    row["seconds"] = math.nan if run.seconds is None else run.seconds
    row["samples"] = len(run.samples)
    return {key: row[key] for key in ROW_FIELDS}


# ----------------------------------------------------------------------------- output

# Column title, row key, format: perplexity to 2 decimals, shares as percentages.
COLUMNS = (
    ("strategy", "strategy", "{}"),
    ("ppl", "perplexity", "{:.2f}"),
    ("bpb", "bits_per_byte", "{:.3f}"),
    ("dist-1", "distinct_1", "{:.3f}"),
    ("dist-2", "distinct_2", "{:.3f}"),
    ("dist-3", "distinct_3", "{:.3f}"),
    ("rep %", "repetition", "{:.1%}"),
    ("self-BLEU", "self_bleu", "{:.3f}"),
    ("Zipf", "zipf", "{:.2f}"),
    ("tokens", "mean_tokens", "{:.1f}"),
    ("ended %", "end_rate", "{:.1%}"),
    ("tok/s", "tokens_per_s", "{:.0f}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row[key]
        missing = isinstance(value, float) and math.isnan(value)
        cells.append("-" if missing else fmt.format(value).replace("%", ""))
    return cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table (strategy left-aligned, numbers right); nan is '-'."""
    table = [[title for title, _, _ in COLUMNS]] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in table
    ]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table (the same cells as `format_table`)."""
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    body = ["| " + " | ".join(_cells(row)) + " |" for row in rows]
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
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows({key: "" if _plain(v) is None else v for key, v in row.items()} for row in rows)
    paths[2].write_text(markdown_table(rows) + "\n", encoding="utf-8")
    with paths[3].open("w", encoding="utf-8") as f:
        for run in comparison.runs:
            for sample in run.samples:
                f.write(json.dumps(_sample_record(run, sample, comparison), ensure_ascii=False) + "\n")
    chart = out_dir / "chart.png"
    if plot_chart(rows, chart, title):
        paths.append(chart)
    return paths


def _sample_record(run: Run, sample: Sample, comparison: Comparison) -> dict[str, Any]:
    deterministic = run.spec is not None and is_deterministic(run.spec)
    settings = comparison.settings
    seed = (
        None if run.spec is None or deterministic
        else settings["seed"] + sample.prompt_index * settings["num_samples"] + sample.sample_index
    )
    return {
        "strategy": run.label, "prompt_index": sample.prompt_index, "sample_index": sample.sample_index,
        "seed": seed, "same_for_every_seed": deterministic, "finish": sample.finish,
        "prompt": comparison.prompts[sample.prompt_index], "text": sample.text,
        "tokens": sample.tokens, "logprobs": sample.logprobs,
    }


def plot_chart(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Distinct-2 against perplexity, one point per row, told apart by colour and marker in
    a legend (labels next to points collide when strategies are close); the human row is a
    black star with guide lines through it. Returns False (and writes nothing) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, ScalarFormatter
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^vP<>Xhp"
    strategies = [row for row in rows if row["strategy"] != HUMAN]
    for i, row in enumerate(strategies):
        ax.scatter([row["perplexity"]], [row["distinct_2"]], s=55, marker=markers[i % len(markers)],
                   color=plt.cm.tab10(i % 10), label=row["strategy"], zorder=2)
    for row in rows:
        if row["strategy"] == HUMAN:
            x, y = row["perplexity"], row["distinct_2"]
            ax.scatter([x], [y], marker="*", s=280, color="black", label="human (validation text)", zorder=3)
            ax.axvline(x, color="black", linestyle=":", linewidth=1)
            ax.axhline(y, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("perplexity of the text under the model (log scale)")
    ax.set_ylabel("distinct-2 (higher = more diverse)")
    ax.set_title(title or "decoding strategies: diversity against perplexity", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command line


def read_prompts_file(name: str) -> list[str]:
    """One prompt per line ('-' is stdin); blank lines are skipped. Line breaks are not part of a prompt."""
    text = read_user_text(name, "prompts file")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {name} has no prompt (one per line; blank lines are skipped)")
    return prompts


def val_prompts(
    data_dir: str, tokenizer_state: dict, tokenizer: Tokenizer, num_prompts: int, prompt_tokens: int,
    max_new_tokens: int, seed: int,
) -> tuple[list[str], list[list[int]], list[int]]:
    """Prompts drawn from the validation split of ``data_dir``, their true continuations
    (``max_new_tokens`` tokens each) and their start positions in the split."""
    meta = read_meta(data_dir)
    if meta.get("tokenizer") != tokenizer_state:
        raise UserError(
            f"the dataset in {data_dir} has another tokenizer than the checkpoint; pass --data-dir with the "
            "dataset the model was trained on, or give prompts with --prompt"
        )
    tokens = open_split(data_dir, "val", meta)
    starts = draw_prompt_starts(tokens, tokenizer, num_prompts, prompt_tokens, max_new_tokens, seed)
    prompts = [tokenizer.decode([int(t) for t in tokens[p : p + prompt_tokens]]) for p in starts]
    human = [[int(t) for t in tokens[p + prompt_tokens : p + prompt_tokens + max_new_tokens]] for p in starts]
    return prompts, human, starts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py compare",
        description="Compare decoding strategies side by side: every strategy continues the same prompts with "
        "the same seeds, and each gets a row of metrics next to a 'human' row, the true continuations from the "
        "validation split.",
        epilog="Metrics: ppl = perplexity of the text under the model (per token, raw distribution); "
        "bpb = the same in bits per UTF-8 byte of text (compares across tokenizers); "
        "dist-n = distinct n-grams / all n-grams over one sample per prompt, averaged over samples; "
        "rep = share of samples ending in a loop (a phrase of >= 3 units repeated at the end); "
        "self-BLEU = BLEU-4 of each sample against the others of its prompt (lower = more diverse); "
        "Zipf = fitted exponent of unit frequencies; tokens = mean generated tokens; ended = share that "
        "ended on end-of-text or a stop string; tok/s = generated tokens per second. "
        "Example: python sample.py compare out/default/best.pt -s greedy -s top-p:p=0.9 --out out/compare",
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py (e.g. out/default/best.pt)")
    parser.add_argument("-s", "--strategy", action="append", help="a strategy spec (repeatable), e.g. greedy, "
                        "beam:n=4, temperature:t=0.7, top-k:k=40, top-p:p=0.9,t=0.8, min-p:p=0.05, typical:p=0.95, "
                        "or a bare name with sample.py's defaults (top-k is top-k:k=40) "
                        f"(default grid: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); given prompts have no known "
                        "continuation, so there is no human row")
    parser.add_argument("--prompts-file", help="read prompts from a file, one per line ('-' for stdin)")
    parser.add_argument("--num-prompts", type=int, help=f"prompts to draw from the validation split (default: "
                        f"{DRAW_DEFAULTS['num_prompts']})")
    parser.add_argument("--prompt-tokens", type=int, help="length of each drawn prompt, in tokens (default: "
                        f"{DRAW_DEFAULTS['prompt_tokens']})")
    parser.add_argument("--data-dir", help="the prepared dataset to draw prompts from (default: the one the "
                        "checkpoint was trained on)")
    parser.add_argument("--num-samples", type=int, default=4, help="samples per prompt for the sampling "
                        "strategies; greedy and beam give the same text for every seed and run once "
                        "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at most this many tokens per sample "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, help="draws the prompts; sample s of prompt p uses "
                        "seed + p * num_samples + s (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], help="end a sample (and the human text) at this "
                        "string (repeatable)")
    parser.add_argument("--units", choices=UNITS, default="words", help="what distinct-n, repetition, self-BLEU "
                        "and Zipf count: words (\\w+ runs and punctuation marks) or model tokens "
                        "(default: %(default)s)")
    parser.add_argument("--window", choices=WINDOW_MODES, default="exact", help="past block_size tokens: see "
                        "python sample.py --help (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write results.json, results.csv, results.md, samples.jsonl "
                        "and chart.png (with matplotlib) into this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(args: argparse.Namespace, prompts_given: bool) -> None:
    """Reject values out of range, and the options for drawing prompts when prompts are given
    (they would silently do nothing); then fill in the drawing defaults."""
    for name in DRAW_DEFAULTS | {"data_dir": None}:
        if prompts_given and getattr(args, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} is for prompts drawn from the validation split; it does "
                            "nothing with --prompt or --prompts-file")
    for name, default in DRAW_DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    for name in ("num_prompts", "prompt_tokens", "num_samples", "max_new_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(s == "" for s in args.stop):
        raise UserError("a stop string must not be empty")


def run(args: argparse.Namespace, out=None) -> Comparison:
    out = out or sys.stdout
    _check_args(args, prompts_given=bool(args.prompt or args.prompts_file))
    grid = parse_grid(args.strategy or DEFAULT_GRID)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the whole grid
    given = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    model, tokenizer, payload = load_for_generation(args.checkpoint, resolve_device(args.device))
    human = None
    if given:
        for prompt in given:
            tokenizer.check_encodable(prompt, "prompt")
        prompts = given
    else:
        data_dir = args.data_dir or payload["config"]["train"]["data_dir"]
        if not Path(data_dir).is_dir():
            whose = "--data-dir" if args.data_dir else "the checkpoint's dataset"
            raise UserError(f"{whose} {data_dir} is not a folder; pass --data-dir with the dataset the model was "
                            "trained on, or give prompts with --prompt (then there is no human row)")
        prompts, human, _ = val_prompts(data_dir, payload["tokenizer"], tokenizer, args.num_prompts,
                                        args.prompt_tokens, args.max_new_tokens, args.seed)
    started = time.perf_counter()
    comparison = run_comparison(
        model, tokenizer, prompts, grid, human=human, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, window=args.window, units=args.units,
        progress=not args.no_progress,
    )
    comparison.settings["wall_seconds"] = time.perf_counter() - started
    comparison.settings["checkpoint"] = str(args.checkpoint)
    once = " (greedy and beam: 1, the same for every seed)" if any(map(is_deterministic, grid)) else ""
    out.write(f"{len(prompts)} prompts x {args.num_samples} samples{once} x {args.max_new_tokens} tokens, "
              f"text metrics in {args.units}, {comparison.settings['wall_seconds']:.1f} s\n")
    out.write(format_table(comparison.rows) + "\n")
    if human is None:
        out.write("no human row: given prompts have no known continuation\n")
    if args.out is not None:
        title = f"{Path(args.checkpoint)}: {len(prompts)} prompts, {args.max_new_tokens} tokens, {args.units}"
        paths = write_results(comparison, args.out, title)
        out.write(f"wrote {', '.join(str(p) for p in paths)}\n")
        if not any(p.suffix == ".png" for p in paths):
            out.write("no chart.png: matplotlib is not installed (pip install 'tinygpt[plot]')\n")
    return comparison


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> None:
        with torch.inference_mode():
            run(args)

    return run_cli(action)
