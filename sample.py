"""Sample text from a checkpoint, or compare decoding strategies on it.

    python sample.py out/default/best.pt --prompt "The for statement" --strategy top-p --top-p 0.9
    python sample.py out/default/best.pt --strategy greedy --explain
    echo "Once upon" | python sample.py CKPT --prompt-file - --num-samples 3 --stop $'\\n\\n'  # (bash)
    python sample.py compare out/default/best.pt --out out/compare   # strategies side by side
    python sample.py score out/default/best.pt notes.txt             # bits per byte and perplexity of a text
    python sample.py serve out/default/best.pt    # the explorer page and an OpenAI-compatible API
    python sample.py export out/finetune_gpt2/best.pt --out models/mine   # a Hugging Face GPT-2 folder

Each command is a subcommand (``generate``, ``compare``, ``score``, ``serve``, ``info``,
``export``); ``generate`` is the default, so ``sample.py CKPT ...`` means ``sample.py
generate CKPT ...``. A command is one ``add_<name>_command(commands)`` function that adds
its parser and the function it runs (see `add_command`); `COMMANDS` lists them.

The checkpoint carries its tokenizer, so nothing else is needed. Strategies are the
functions of model/decoding.py, described by the specs of model/strategy.py;
``--strategy`` takes a name (with the settings from the flags below) or a compact spec
such as ``top-p:p=0.9,t=0.8``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch
from tqdm import tqdm

from model.checkpoint import load_for_generation, read_checkpoint
from model.cli import read_user_text, run_cli
from model.compare import (
    DEFAULT_GRID, UNITS, Comparison, format_table, parse_grid, run_comparison, sample_lines, summarize_sweep,
    val_prompts, write_results, write_sweep,
)
from model.device import resolve_device
from model.errors import UserError
from model.export import export_gpt2_folder
from model.generate import (
    WINDOW_MODES, Event, Sample, SpeculationCounts, encode_prompt, generate_events, long_prompt_note, new_samples,
)
from model.speculative import DEFAULT_GAMMA, Speculation, check_p_min, check_same_tokenizer
from model.score import TextScore, score_tokens, token_byte_lengths, windows
from model.strategy import (
    CHAIN_ORDERS, DEFAULT_ORDER, DecodingSpec, chain_order_text, parse_strategy_with_defaults, strategy_kind,
)
from model.synthetic import load_oracle
from model.sweep import DEFAULT_SWEEP, flatten, parse_sweep, parse_sweep_toml, sweep_tables
from model.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- shared by the commands

class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help, except where there is no default to show (None,
    an empty list) or the help already says what it is (as the strategy flags do)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


DECODING_FLAGS = (  # the command-line flags that set a DecodingSpec field of the same name
    "temperature", "top_k", "top_p", "min_p", "typical_p", "top_n_sigma", "top_h", "epsilon_cutoff", "eta_cutoff",
    "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta", "repetition_penalty",
    "frequency_penalty", "presence_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_penalty_last_n", "dry_sequence_breakers", "order", "num_beams",
)


def breakers_flag(text: str) -> tuple[str, ...]:
    """--dry-sequence-breakers: a JSON list of strings, as llama.cpp's server takes it."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings, e.g. '[\"\\n\", \":\"]'")
    return tuple(value)


def spec_from_args(args: argparse.Namespace) -> DecodingSpec:
    """The strategy's defaults (or its compact spec), then every flag the user gave.

    A flag may tune the named strategy, not turn it into another kind (``--strategy
    greedy --temperature 0.7`` would sample, ``--strategy top-p --temperature 0`` would
    be greedy, ``--strategy beam --num-beams 1`` would not search), nor set again what
    the compact spec already sets."""
    base = dataclasses.asdict(parse_strategy_with_defaults(args.strategy))
    given = {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name) is not None}
    if ":" in args.strategy:
        unset = dataclasses.asdict(DecodingSpec())
        for name in given:
            if base[name] != unset[name]:
                raise UserError(f"--{name.replace('_', '-')} sets what --strategy {args.strategy} already sets; "
                                "give it in one place")
    fields = {**base, **given}
    asked = strategy_kind(base["temperature"], base["num_beams"])
    kind = strategy_kind(fields["temperature"], fields["num_beams"])
    if kind != asked:
        flags = " ".join(f"--{name.replace('_', '-')} {given[name]}" for name in ("temperature", "num_beams")
                         if name in given)
        raise UserError(f"{flags} would turn --strategy {args.strategy} ({asked}) into {kind}; "
                        "name the strategy you want with --strategy")
    return DecodingSpec(**fields)


def check_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Refuse a flag below its minimum (``{"num_samples": 1}``: --num-samples >= 1) and an
    empty --stop string, before any work starts."""
    for name, minimum in minimums.items():
        if getattr(args, name) < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    if any(s == "" for s in args.stop):
        raise UserError("a stop string must not be empty")


# ----------------------------------------------------------------------------- generate


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt and --prompt-file (``-`` is stdin; the whole file is one prompt), in the order
    given; none means one empty prompt."""
    prompts = list(args.prompt or []) + [read_user_text(name, "prompt file") for name in args.prompt_file or []]
    return prompts or [""]


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], block_size: int) -> list[list[int]]:
    """Each prompt's token ids (`encode_prompt`'s rules); a prompt longer than the context
    gets `long_prompt_note`'s line on stderr."""
    encoded = []
    for index, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {index + 1}"
        encoded.append(encode_prompt(tokenizer, prompt, name))
        note = long_prompt_note(encoded[-1], block_size, name)
        if note:
            print(f"note: {note}", file=sys.stderr)
    return encoded


class Printer:
    """Streams a lone sample as it comes; prints each of several samples whole as it ends.
    A streamed prompt is printed with the first text that follows it (or when the sample
    ends), so an error before generation begins prints nothing."""

    def __init__(self, prompts: list[str], num_samples: int, out=None):
        self.prompts = prompts
        self.streaming = len(prompts) * num_samples == 1
        self.out = out or sys.stdout
        self.prompt_printed = False

    def show(self, event: Event, sample: Sample) -> None:
        """One event of the stream; ``sample`` is its row with the event already added."""
        if self.streaming:
            self._stream(event.text + ("\n" if event.finish else ""))
        elif event.finish:
            header = f"--- prompt {sample.prompt_index + 1}, sample {sample.sample_index + 1} ({sample.finish}) ---\n"
            self._write(header + self.prompts[sample.prompt_index] + sample.text + "\n")

    def _stream(self, text: str) -> None:
        if not text:
            return
        if not self.prompt_printed:
            self.prompt_printed = True
            text = self.prompts[0] + text
        self._write(text)

    def _write(self, text: str) -> None:
        write_text(self.out, text)
        self.out.flush()


def write_text(out: TextIO, text: str) -> None:
    """out.write(text), with a one-line error when out's encoding cannot show the text."""
    try:
        out.write(text)
    except UnicodeEncodeError as e:
        unshown = ascii(e.object[e.start : e.end])  # ascii(): the message goes to a stream like this one
        raise UserError(f"the output's encoding ({e.encoding}) cannot show {unshown}; print to a UTF-8 terminal "
                        "or set PYTHONIOENCODING=utf-8") from None


def probability(logprob: float) -> str:
    """A probability for the explain table: three decimals, or two significant digits in
    scientific form below 0.001 (with a 50k vocabulary most candidates are far below it)."""
    p = math.exp(logprob)
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def print_explanation(sample: Sample, tokenizer: Tokenizer, out=None) -> None:
    """The next-token table of every step: the top candidates with their probability
    under the model and after the strategy's filtering, and the token chosen."""
    out = out or sys.stdout
    for step, detail in enumerate(sample.details, start=1):
        write_text(out, f"step {step}: chose {tokenizer.display(detail.token)}  "
                   f"(p={probability(detail.logprob)}, after filtering {probability(detail.filtered_logprob)})\n")
        write_text(out, f"    {'token':<16} {'p':>9} {'filtered':>9}\n")
        for token, raw, filtered in detail.top:
            mark = "  <- chosen" if token == detail.token else ""
            write_text(out, f"    {tokenizer.display(token):<16} {probability(raw):>9} "
                       f"{probability(filtered):>9}{mark}\n")


def write_logprobs(samples: list[Sample], tokenizer: Tokenizer, out: TextIO) -> None:
    """One JSON line per generated token: its log-probability and the top alternatives.
    A token's text is `Tokenizer.token_text` (as in the API's logprobs)."""
    for sample in samples:
        for step, detail in enumerate(sample.details):
            record = {
                "prompt": sample.prompt_index, "sample": sample.sample_index, "step": step,
                "token": detail.token, "text": tokenizer.token_text(detail.token), "logprob": detail.logprob,
                "top": [{"token": t, "text": tokenizer.token_text(t), "logprob": lp} for t, lp, _ in detail.top],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def add_generate_command(commands) -> None:
    parser = add_command(
        commands, "generate", run_generate, streams_text=True, prog="sample.py [generate]",
        help="generate text with a decoding strategy of your choice (the default command)",
        description="Generate text from a checkpoint with a decoding strategy of your choice. To compare "
        "strategies side by side instead: python sample.py compare CKPT (see python sample.py compare --help); "
        "for bits per byte of a text: python sample.py score CKPT FILE (see python sample.py score --help).",
        formatter_class=DefaultsHelp,
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py (e.g. out/default/best.pt), or a "
                        "Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json, merges.txt)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable: several prompts run as one "
                        "batch); an empty prompt starts a new document")
    parser.add_argument("--prompt-file", action="append", help="read a prompt from a file, '-' for stdin; the whole "
                        "file is one prompt (repeatable)")
    parser.add_argument("--strategy", default="top-p", help="greedy | sample | temperature | top-k | top-p | "
                        "min-p | typical | top-n-sigma | top-h | epsilon | eta | xtc | mirostat | mirostat1 | dry | "
                        "beam, or a compact spec such as top-p:p=0.9,t=0.8")
    parser.add_argument("--temperature", type=float, help="divide logits by this; 0 means greedy "
                        "(default: 0.7 with --strategy temperature, else 1)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 40 with --strategy top-k)")
    parser.add_argument("--top-p", type=float, help="keep the smallest set of tokens whose probability reaches p, "
                        "in (0, 1] (default 0.9 with --strategy top-p)")
    parser.add_argument("--min-p", type=float, help="keep tokens with p >= min_p * p_max (default 0.05 with "
                        "--strategy min-p)")
    parser.add_argument("--typical-p", type=float, help="locally typical sampling mass (default 0.95 with "
                        "--strategy typical)")
    parser.add_argument("--top-n-sigma", type=float, help="keep logits >= max - n * their standard deviation, n > 0 "
                        "(default 1 with --strategy top-n-sigma)")
    parser.add_argument("--top-h", type=float, help="keep the most likely tokens while their entropy stays within "
                        "this share of the whole, in (0, 1] (default 0.4 with --strategy top-h)")
    parser.add_argument("--epsilon-cutoff", type=float, help="drop tokens with p < this, in (0, 1) (default 0.0003, "
                        "tuned for 50k tokens, with --strategy epsilon; scale by 50257 / vocabulary size)")
    parser.add_argument("--eta-cutoff", type=float, help="drop tokens with p < min(eta, sqrt(eta) * exp(-entropy)), "
                        "in (0, 1) (default 0.0009 with --strategy eta; scale as --epsilon-cutoff)")
    parser.add_argument("--xtc-probability", type=float, help="chance per step that XTC removes the top choices, "
                        "in [0, 1] (default 0.5 with --strategy xtc, else 0: off)")
    parser.add_argument("--xtc-threshold", type=float, help="XTC removes all tokens with p >= this but the least "
                        "likely of them, in [0, 0.5] (default 0.1)")
    parser.add_argument("--mirostat", type=int, choices=(0, 1, 2), help="mirostat version, 0 off (default 2 with "
                        "--strategy mirostat, 1 with mirostat1)")
    parser.add_argument("--mirostat-tau", type=float, help="mirostat's target surprise in bits (default 5)")
    parser.add_argument("--mirostat-eta", type=float, help="mirostat's learning rate (default 0.1)")
    parser.add_argument("--repetition-penalty", type=float, help="CTRL penalty (> 1 discourages tokens already "
                        "seen, prompt included; default 1, off)")
    parser.add_argument("--frequency-penalty", type=float, help="subtract count * this from each generated "
                        "token's logit (default 0)")
    parser.add_argument("--presence-penalty", type=float, help="subtract this from every generated token's logit "
                        "(default 0)")
    parser.add_argument("--dry-multiplier", type=float, help="DRY penalty: a token that would continue a repeat of "
                        "n tokens loses multiplier * base ** (n - allowed length) (default 0.8 with --strategy "
                        "dry, else 0: off)")
    parser.add_argument("--dry-base", type=float, help="DRY's base, >= 1 (default 1.75)")
    parser.add_argument("--dry-allowed-length", type=int, help="a token that would continue a repeat shorter "
                        "than this is not penalised (default 2)")
    parser.add_argument("--dry-penalty-last-n", type=int, help="DRY looks at this many last tokens, -1 the "
                        "model's context (default -1)")
    parser.add_argument("--dry-sequence-breakers", type=breakers_flag, help="JSON list of strings that a repeat "
                        'never crosses (default ["\\n", ":", "\\"", "*"])')
    parser.add_argument("--order", choices=tuple(CHAIN_ORDERS), help="where temperature runs in the sampling "
                        f"chain: first (transformers) or last (llama.cpp) (default {DEFAULT_ORDER})")
    parser.add_argument("--num-beams", type=int, help="beams for beam search (default 4 with --strategy beam)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at most this many tokens per sample")
    parser.add_argument("--seed", type=int, default=1337, help="sample s of prompt p uses seed + p * num_samples + "
                        "s: same seed, same text")
    parser.add_argument("--stop", action="append", default=[], help="end a sample at this string, which is not "
                        "printed (repeatable; taken literally: in bash, $'\\n\\n' is a blank line)")
    parser.add_argument("--window", choices=WINDOW_MODES, default="exact", help="past block_size tokens: exact "
                        "recomputes the window each step, shift restarts from the last half window (fast), "
                        "none never caches (the reference)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--explain", action="store_true", help="after the text, print each step's top candidates "
                        "with their probabilities before and after the strategy's filtering")
    parser.add_argument("--top", type=int, default=5, help="candidates per step for --explain and --logprobs")
    parser.add_argument("--logprobs", type=Path, help="write per-token log-probabilities and the top "
                        "alternatives to this file as JSON lines")
    add_speculation_flags(parser)


def add_speculation_flags(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    what = "each request's tokens" if serving else "the tokens"
    parser.add_argument("--draft", help=f"speculative decoding: a smaller checkpoint with the same tokenizer "
                        f"proposes {what}, the model checks them in one pass (the same distribution, faster)")
    parser.add_argument("--prompt-lookup", type=int, metavar="N", help="speculative decoding without a draft: "
                        "propose what followed the latest earlier occurrence of the last N tokens")
    parser.add_argument("--speculate", type=int, metavar="GAMMA", help="tokens proposed per step with --draft or "
                        f"--prompt-lookup (default {DEFAULT_GAMMA})")
    parser.add_argument("--draft-p-min", type=float, metavar="P", help="with --draft: stop a step's proposal "
                        "where the draft's most likely next token has probability below P (with greedy decoding: "
                        "its probability at temperature 1; 0 <= P < 1; the default 0 always proposes GAMMA tokens); "
                        "the output distribution stays the model's")


def speculation_from_args(args: argparse.Namespace, tokenizer: Tokenizer, device: torch.device) -> Speculation | None:
    """The Speculation of --draft / --prompt-lookup / --speculate / --draft-p-min (None
    without them); the draft is loaded here and must have the model's tokenizer."""
    if args.draft_p_min is not None:
        if args.draft is None:
            raise UserError("--draft-p-min needs --draft (prompt lookup's proposals are deterministic: "
                            "there is no draft confidence to measure)")
        check_p_min(args.draft_p_min, "--draft-p-min")  # before the draft is loaded
    if args.draft is None and args.prompt_lookup is None:
        if args.speculate is not None:
            raise UserError("--speculate needs --draft or --prompt-lookup (what proposes the tokens)")
        return None
    if args.draft is not None and args.prompt_lookup is not None:
        raise UserError("give either --draft or --prompt-lookup, not both")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise UserError(f"--prompt-lookup must be >= 1, got {args.prompt_lookup}")
    gamma = DEFAULT_GAMMA if args.speculate is None else args.speculate
    if gamma < 1:
        raise UserError(f"--speculate must be >= 1, got {gamma}")
    if args.prompt_lookup is not None:
        return Speculation(lookup=args.prompt_lookup, gamma=gamma)
    draft, draft_tokenizer, _ = load_for_generation(args.draft, device)
    check_same_tokenizer(tokenizer, draft_tokenizer, args.draft)
    return Speculation(draft=draft, gamma=gamma, p_min=args.draft_p_min or 0.0)


@torch.inference_mode()
def run_generate(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    check_at_least(args, {"num_samples": 1, "top": 1, "max_new_tokens": 0})
    if args.num_samples > 1 and spec.is_deterministic:
        raise UserError(f"{spec.kind} ignores the seed: "
                        f"--num-samples {args.num_samples} would print one text {args.num_samples} times")
    wants_details = args.explain or args.logprobs is not None
    if wants_details and spec.is_beam:
        raise UserError("--explain and --logprobs follow one token at a time; they do not work with beam search")
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_generation(args.checkpoint, device)
    speculation = speculation_from_args(args, tokenizer, device)
    if args.explain and args.num_samples * len(prompts) > 1:
        raise UserError("--explain shows one sample: use one prompt and --num-samples 1")
    with contextlib.ExitStack() as files:
        # opened before generating, so a bad path is found before the work, not after it
        logprobs = files.enter_context(args.logprobs.open("w", encoding="utf-8")) if args.logprobs else None
        encoded = encode_prompts(tokenizer, prompts, model.config.block_size)
        printer = Printer(prompts, args.num_samples)
        events = generate_events(
            model, tokenizer, encoded, spec, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
            seed=args.seed, stop=args.stop, window=args.window, top=args.top if wants_details else 0,
            speculate=speculation,
        )
        samples = new_samples(len(prompts), args.num_samples)
        # A batch prints each sample whole when it ends: until then, a bar on a terminal says how far it is.
        with tqdm(total=args.max_new_tokens, desc=f"{len(samples)} samples", unit="token", leave=False,
                  disable=printer.streaming or not sys.stderr.isatty()) as bar:
            for step in events:
                for event in step:
                    samples[event.row].add(event)
                    printer.show(event, samples[event.row])
                # a speculative step releases several tokens for a row: the bar follows the furthest row
                bar.update(max(collections.Counter(event.row for event in step).values(), default=0)
                           if speculation is not None else 1)
        if speculation is not None:  # how the proposals went, on stderr beside the text
            counts = sum((sample.speculation for sample in samples if sample.speculation), SpeculationCounts())
            print(counts.summary(), file=sys.stderr)
        if args.explain:
            write_text(sys.stdout, f"{spec.label}: {' > '.join(spec.chain)} ({chain_order_text(spec.order)})\n")
            print_explanation(samples[0], tokenizer)
        if logprobs is not None:
            write_logprobs(samples, tokenizer, logprobs)


# ----------------------------------------------------------------------------- compare

DRAW_DEFAULTS = {"num_prompts": 8, "prompt_tokens": 32}  # prompts drawn from the validation split


def read_prompt_lines(name: str) -> list[str]:
    """One prompt per line ('-' is stdin); blank lines are skipped. Line breaks are not part of a prompt."""
    text = read_user_text(name, "prompts file")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {name} has no prompt (one per line; blank lines are skipped)")
    return prompts


def add_compare_command(commands) -> None:
    parser = add_command(
        commands, "compare", run_compare, prog="sample.py compare",
        help="compare decoding strategies side by side, next to the human text",
        description="Compare decoding strategies side by side: every strategy continues the same prompts with "
        "the same seeds, and each gets a row of metrics next to a 'human' row, the true continuations from the "
        "validation split.",
        epilog="Metrics: ppl = perplexity of the text under the model (per token, raw distribution); "
        "bpb = the same in bits per UTF-8 byte of text (compares across tokenizers); "
        "dist-n = distinct n-grams / all n-grams over one sample per prompt, averaged over samples; "
        "rep = share of samples ending in a loop (a phrase of >= 3 units repeated at the end); "
        "self-BLEU = BLEU-4 of each sample against the others of its prompt (lower = more diverse); "
        "rep tok and self-BLEU tok = the same on model tokens (they see loops of spaces and of word pieces "
        "without spaces, which have few words); "
        "Zipf = fitted exponent of unit frequencies; tokens = mean generated tokens; ended = share that "
        "ended on end-of-text or a stop string; tok/s = generated tokens per second. "
        "Example: python sample.py compare out/default/best.pt -s greedy -s top-p:p=0.9 --out out/compare",
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py (e.g. out/default/best.pt), or a "
                        "Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json, merges.txt)")
    parser.add_argument("-s", "--strategy", action="append", help="a strategy spec (repeatable), e.g. greedy, "
                        "beam:n=4, temperature:t=0.7, top-k:k=40, top-p:p=0.9,t=0.8, min-p:p=0.05, typical:p=0.95, "
                        "or a bare name with sample.py's defaults (top-k is top-k:k=40) "
                        f"(default grid: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); given prompts have no known "
                        "continuation, so there is no human row")
    parser.add_argument("--prompt-lines", metavar="FILE", help="read prompts from a file, one prompt per line "
                        "('-' for stdin)")
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
    parser.add_argument("--units", choices=UNITS, help="what distinct-n, repetition, self-BLEU and Zipf count: "
                        "words (\\w+ runs and punctuation marks) or model tokens (default: words; with --sweep "
                        "tokens, since one sample's distinct-2 of words is near 1 for every setting)")
    parser.add_argument("--window", choices=WINDOW_MODES, default="exact", help="past block_size tokens: see "
                        "python sample.py generate --help (default: %(default)s)")
    parser.add_argument("--oracle", metavar="DIR", help="a synthetic language prepared with data/prepare.py "
                        "--synthetic (DIR/oracle.json): add its exact columns, orc NLL = nats per token of the "
                        "continuation under the true chain, orc H = the chain's entropy at the same positions "
                        "(equal, in expectation, for text of the chain itself), sup prec = share of its "
                        "(order+1)-grams the chain can emit, cov = share of the chain's probable (order+1)-grams "
                        "it reaches (more text reaches more: compare it beside the tokens column)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    parser.add_argument("--sweep", nargs="?", const="default", metavar="FILE.toml|FAMILIES", help="instead of "
                        "-s, sweep each family's knob x temperature and compare families by their quality-diversity "
                        "frontiers, at the human text's diversity, and by best-of-N, with bootstrap intervals over "
                        "prompts: a TOML file (one [family] table of knob lists), or a compact list such as "
                        "'temperature;top-p:p=0.8|0.95,t=0.7|1' (a bare name takes its default grid); alone, "
                        f"the default grid of {', '.join(DEFAULT_SWEEP)} (6 settings each)")
    parser.add_argument("--judge", metavar="CKPT", help="a larger checkpoint (or GPT-2 folder) with the same "
                        "tokenizer that scores every sample: the judge NLL column, and the quality axis of --sweep "
                        "(without it, the generator's own NLL as its distance to the human text's)")
    parser.add_argument("--bootstrap", type=int, metavar="N", help="paired bootstrap draws of the prompts for "
                        "--sweep's 95%% intervals (default: 1000)")
    parser.add_argument("--escape-tokens", type=int, metavar="N", help="also continue each prompt ending in a "
                        "repeated 4-token loop for N tokens; a sample whose mean NLL is below 1 nat is stuck "
                        "(the stuck column) (default: 32 with --sweep, else off)")
    parser.add_argument("--out", type=Path, help="write results.json, results.csv, results.md, samples.jsonl "
                        "and chart.png (with matplotlib) into this folder; with --sweep also sweep.json, sweep.md "
                        "and frontier.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_sweep(text: str) -> dict[str, list[DecodingSpec]]:
    """--sweep's grid: a .toml file's tables, else the compact list (`parse_sweep`)."""
    if text.endswith(".toml"):
        return parse_sweep_toml(read_user_text(text, "sweep file"), text)
    return parse_sweep(text)


def check_compare_args(args: argparse.Namespace, prompts_given: bool) -> None:
    """Reject values out of range, and the options for drawing prompts when prompts are given
    (they would silently do nothing); then fill in the drawing defaults."""
    for name in DRAW_DEFAULTS | {"data_dir": None}:
        if prompts_given and getattr(args, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} is for prompts drawn from the validation split; it does "
                            "nothing with --prompt or --prompt-lines")
    for name, default in DRAW_DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.sweep is not None and args.strategy:
        raise UserError("--sweep and --strategy both choose the strategies; give one of them")
    if args.sweep is not None and prompts_given:
        raise UserError("--sweep needs the human text as its target: leave out --prompt and --prompt-lines so that "
                        "prompts are drawn from the validation split")
    if args.sweep is not None and args.judge is not None and args.oracle is not None:
        raise UserError("--judge and --oracle would both be --sweep's quality axis; give one of them (the oracle's "
                        "exact NLL, where there is one)")
    if args.sweep is None and args.bootstrap is not None:
        raise UserError("--bootstrap sets the intervals of --sweep; it does nothing without it")
    args.bootstrap = 1000 if args.bootstrap is None else args.bootstrap
    args.escape_tokens = (32 if args.sweep is not None else 0) if args.escape_tokens is None else args.escape_tokens
    check_at_least(args, {"num_prompts": 1, "prompt_tokens": 1, "num_samples": 1, "max_new_tokens": 1,
                          "bootstrap": 1, "escape_tokens": 0})


@torch.inference_mode()
def run_compare(args: argparse.Namespace, out=None) -> Comparison:
    out = out or sys.stdout
    check_compare_args(args, prompts_given=bool(args.prompt or args.prompt_lines))
    sweep = read_sweep(args.sweep) if args.sweep is not None else None
    units = args.units or ("tokens" if sweep is not None else "words")
    grid = flatten(sweep) if sweep is not None else parse_grid(args.strategy or DEFAULT_GRID)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the whole grid
    given = list(args.prompt or []) + (read_prompt_lines(args.prompt_lines) if args.prompt_lines else [])
    oracle = load_oracle(args.oracle) if args.oracle else None
    device = resolve_device(args.device)
    model, tokenizer, checkpoint = load_for_generation(args.checkpoint, device)
    judge = None
    if args.judge is not None:
        judge, judge_tokenizer, _ = load_for_generation(args.judge, device)
        if judge_tokenizer.state() != tokenizer.state():
            raise UserError(f"the judge {args.judge} has another tokenizer than {args.checkpoint}; a judge scores "
                            "the same tokens, so give one trained with the same tokenizer")
    human = None
    if given:
        prompts = given
    else:
        data_dir = args.data_dir or (checkpoint.config.train.data_dir if checkpoint else None)
        if data_dir is None:  # a GPT-2 folder
            raise UserError(f"{args.checkpoint} is a model folder without a dataset of its own: pass --data-dir with "
                            "a corpus prepared with --tokenizer gpt2:FOLDER (or give prompts with --prompt)")
        if not Path(data_dir).is_dir():
            whose = "--data-dir" if args.data_dir else "the checkpoint's dataset"
            raise UserError(f"{whose} {data_dir} is not a folder; pass --data-dir with the dataset the model was "
                            "trained on, or give prompts with --prompt (then there is no human row)")
        prompts, human, _ = val_prompts(data_dir, tokenizer.state(), tokenizer, args.num_prompts,
                                        args.prompt_tokens, args.max_new_tokens, args.seed)
    started = time.perf_counter()
    comparison = run_comparison(
        model, tokenizer, prompts, grid, human=human, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, window=args.window, units=units,
        judge=judge, escape_tokens=args.escape_tokens, progress=not args.no_progress, oracle=oracle,
    )
    summary = None if sweep is None else summarize_sweep(comparison, sweep, draws=args.bootstrap, seed=args.seed)
    comparison.settings["wall_seconds"] = time.perf_counter() - started
    comparison.settings["checkpoint"] = str(args.checkpoint)
    comparison.settings["judge"] = None if args.judge is None else str(args.judge)
    once = " (greedy and beam: 1, the same for every seed)" if any(spec.is_deterministic for spec in grid) else ""
    out.write(f"{len(prompts)} prompts x {args.num_samples} samples{once} x {args.max_new_tokens} tokens, "
              f"text metrics in {units}, {comparison.settings['wall_seconds']:.1f} s\n")
    if oracle is not None:
        about = comparison.settings["oracle"]
        out.write(f"oracle {args.oracle}: order {about['order']}, entropy rate {about['entropy_rate']:.4f} nats/token; "
                  f"{about['ngram']}-grams, {about['probable_ngrams']} probable (stationary probability >= "
                  f"{about['probable_threshold']:g})\n")
    out.write(format_table(comparison.rows) + "\n")
    out.write("\n" + "".join(f"{chain_order_text(order)}\n" for order in CHAIN_ORDERS
                             if order == DEFAULT_ORDER or any(spec.order == order for spec in grid)))
    out.write(f"\nthe first sample of each row (all of them: --out, samples.jsonl)\n{sample_lines(comparison)}\n")
    if human is None:
        out.write("no human row: given prompts have no known continuation\n")
    if summary is not None:
        out.write("\n" + sweep_tables(summary) + "\n")
    if args.out is not None:
        title = f"{Path(args.checkpoint)}: {len(prompts)} prompts, {args.max_new_tokens} tokens, {units}"
        paths = write_results(comparison, args.out, title)
        if summary is not None:
            paths += write_sweep(summary, args.out, title)
        out.write(f"wrote {', '.join(str(p) for p in paths)}\n")
        if not any(p.suffix == ".png" for p in paths):
            out.write("no chart.png: matplotlib is not installed (pip install 'tinygpt[plot]')\n")
    return comparison


# ----------------------------------------------------------------------------- score

def add_score_command(commands) -> None:
    parser = add_command(
        commands, "score", run_score, prog="sample.py score",
        help="bits per byte and perplexity of text files under a checkpoint",
        description="Bits per byte and perplexity of text files under a checkpoint, scored in windows of the "
        "model's context (see model/score.py).",
    )
    parser.add_argument("checkpoint", type=Path, help="a .pt file written by train.py")
    parser.add_argument("files", nargs="+", help="UTF-8 text files to score (- reads standard input)")
    parser.add_argument("--stride", type=int, default=None, help="tokens each window moves on and scores; "
                        "past the first window every token has at least block_size - stride tokens of context "
                        "(default: block_size / 2; block_size = no overlap, fastest)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")


def run_score(args: argparse.Namespace) -> None:
    """One line per file (and a total for several): tokens, bytes, bits per byte, perplexity."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_generation(args.checkpoint, device)
    block_size = model.config.block_size
    stride = args.stride if args.stride is not None else max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be in [1, block_size={block_size}], got {stride}")
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    texts = {name: read_user_text(name, "text file") for name in args.files}  # every file found before the work
    tokens, unscorable = {}, []
    for name, text in texts.items():
        try:
            tokens[name] = score_ids(tokenizer, text, name)
        except UserError as error:  # the other files are still scored; this one is named at the end
            unscorable.append(str(error))
    total = TextScore()
    for name, ids in tokens.items():
        result = TextScore()
        with tqdm(total=len(windows(len(ids) - 1, block_size, stride)), desc=name, unit="window",
                  leave=False) as bar:
            for part in score_tokens(model, ids, byte_lengths, block_size=block_size, stride=stride,
                                     batch_size=args.batch_size, device=device):
                result += part
                bar.update(min(args.batch_size, bar.total - bar.n))
                bar.set_postfix(bpb=f"{result.bits_per_byte:.4f}" if result.bytes else "-", refresh=False)
        total += result
        print(_score_line(name, result))
    if len(tokens) > 1:
        print(_score_line("total", total))
    if unscorable:
        scored = f" (the other {len(tokens)} scored above)" if tokens else ""
        raise UserError(f"{len(unscorable)} of {len(texts)} files not scored{scored}: {'; '.join(unscorable)}")


def score_ids(tokenizer: Tokenizer, text: str, name: str) -> list[int]:
    """The ids `score_tokens` reads for a text (end-of-text first, as its context); a
    UserError naming the file when the tokenizer cannot encode it or it is empty."""
    tokenizer.check_encodable(text, name)
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    if len(ids) < 2:
        raise UserError(f"{name} is empty: there is nothing to score")
    return ids


def _score_line(name: str, result: TextScore) -> str:
    bpb = f"{result.bits_per_byte:.4f}" if result.bytes else "-"
    return (f"{name}: {result.tokens:,} tokens, {result.bytes:,} bytes, bits per byte {bpb}, "
            f"perplexity {result.perplexity:.3f} (per token)")


# ----------------------------------------------------------------------------- the command line

# ----------------------------------------------------------------------------- serve

def add_serve_command(commands) -> None:
    parser = add_command(
        commands, "serve", run_serve, prog="sample.py serve", formatter_class=DefaultsHelp,
        help="serve the explorer page and an OpenAI-compatible API (needs the serve extra)",
        description="Serve a checkpoint on a local web server: the explorer page at / and an "
        "OpenAI-compatible API at /v1 (completions, models) plus /v1/distribution. Needs the serve extra.",
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py (e.g. out/default/best.pt), or a "
                        "Hugging Face GPT-2 folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens the server "
                        "to the network, without any authentication")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="a host name requests "
                        "may be addressed to (the Host header), besides localhost, 127.0.0.1, ::1 and --host; "
                        "repeatable; '*': any (the check keeps web pages of other sites out, by DNS rebinding)")
    parser.add_argument("--max-concurrent", type=int, default=4, help="requests that use the model at once")
    parser.add_argument("--max-waiting", type=int, default=16, help="requests that may wait for a turn; "
                        "beyond them the answer is 503 with Retry-After")
    parser.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    parser.add_argument("--window", choices=WINDOW_MODES, default="exact", help="past the context length, as in "
                        "sample.py --window")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each model step; concurrent requests "
                        "already run side by side, and small models step fastest on one thread")
    parser.add_argument("--access-log", action="store_true", help="print one line per request")
    add_speculation_flags(parser, serving=True)


def run_serve(args: argparse.Namespace) -> None:
    try:
        from model.serve import LOOPBACK_HOSTS, ServeSettings, create_app, listen, serve_forever
    except ImportError as e:
        raise UserError(f"serving needs the serve extra (pip install -e '.[serve]'): {e}") from None
    settings = ServeSettings(Path(args.checkpoint).parent.name + "/" + Path(args.checkpoint).stem,
                             max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                             max_waiting=args.max_waiting, window=args.window,
                             allowed_hosts=(*LOOPBACK_HOSTS, args.host, *args.allow_host))
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_generation(args.checkpoint, device)
    speculation = speculation_from_args(args, tokenizer, device)
    sock = listen(args.host, args.port)
    if args.host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the server; "
              "there is no authentication (requests must name the host as --host or an --allow-host)",
              file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.checkpoint} as '{settings.model_name}' at http://{host}:{port}/ "
          f"(API: http://{host}:{port}/v1); Ctrl-C stops", flush=True)
    try:
        serve_forever(create_app(model, tokenizer, settings, speculation), sock, access_log=args.access_log)
    except KeyboardInterrupt:  # uvicorn has already shut down cleanly, then passes Ctrl-C on
        pass
    print("stopped", file=sys.stderr)


# ----------------------------------------------------------------------------- info

def add_info_command(commands) -> None:
    parser = add_command(commands, "info", run_info, prog="sample.py info",
                         help="what a checkpoint or GPT-2 folder holds: model, tokenizer, training, data",
                         description="Show what a checkpoint holds (the model's shape, its tokenizer, the step and "
                         "best validation loss, the dataset and the training settings) without generating.")
    parser.add_argument("checkpoint", help="a .pt file written by train.py, or a Hugging Face GPT-2 folder")


def run_info(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    model, tokenizer, checkpoint = load_for_generation(args.checkpoint, torch.device("cpu"))
    lines = [f"model: {model.summary()}",
             f"tokenizer: {tokenizer.name}, {tokenizer.vocab_size:,} tokens (end-of-text is id {tokenizer.eot_id})"]
    if checkpoint is None:
        lines.append("a Hugging Face GPT-2 folder: not trained here (no step, losses or dataset)")
    else:
        best = f"{checkpoint.best_val_loss:.4f}" if math.isfinite(checkpoint.best_val_loss) else "none yet"
        train = checkpoint.config.train
        lines += [f"trained: step {checkpoint.step:,}, best val loss {best}; the optimizer state is "
                  f"{'saved (resumable)' if checkpoint.optimizer is not None else 'not saved'}",
                  f"data: {train.data_dir}",
                  "train: " + ", ".join(f"{key}={value}" for key, value in dataclasses.asdict(train).items())]
    out.write(f"{args.checkpoint}\n" + "".join(f"  {line}\n" for line in lines))


# ----------------------------------------------------------------------------- export

def add_export_command(commands) -> None:
    parser = add_command(
        commands, "export", run_export, prog="sample.py export",
        help="write a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer)",
        description="Write a checkpoint as a Hugging Face GPT-2 folder that transformers' "
        "GPT2LMHeadModel.from_pretrained and this project's commands read: config.json, model.safetensors and, "
        "for a byte-level BPE tokenizer (GPT-2's or one trained by data/prepare.py), vocab.json and merges.txt. "
        "A model GPT-2 cannot represent (rotary positions, RMSNorm) is refused.",
        epilog="Example: python sample.py export out/finetune_gpt2/best.pt --out models/my_gpt2",
    )
    parser.add_argument("checkpoint", type=Path, help="a .pt file written by train.py")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (missing or empty, unless "
                        "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds files (the old "
                        "folder is deleted once the new one is complete)")


def run_export(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    if args.checkpoint.is_dir():
        raise UserError(f"{args.checkpoint} is a folder; export reads a .pt checkpoint written by train.py")
    written = export_gpt2_folder(read_checkpoint(args.checkpoint), args.out, overwrite=args.overwrite)
    out.write(f"wrote {written.folder}: {', '.join(written.files)}\n")
    if written.tokenizer_note:
        out.write(f"note: {written.tokenizer_note}\n")


# ----------------------------------------------------------------------------- the commands

def add_command(commands, name: str, run: Callable[[argparse.Namespace], Any], *, streams_text: bool = False,
                **parser_options: Any) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` (``parser_options`` as for add_parser: help, description,
    ...) that runs ``run(args)``; return its parser for the flags. ``streams_text``: the
    command streams text to stdout, so Ctrl-C ends the open line before saying so."""
    parser = commands.add_parser(name, **parser_options)
    parser.set_defaults(run=run, streams_text=streams_text)
    return parser


COMMANDS = (add_generate_command, add_compare_command, add_score_command, add_serve_command, add_info_command,
            add_export_command)
DEFAULT_COMMAND = "generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py", usage="sample.py [generate] CKPT [flags]  |  sample.py COMMAND CKPT [flags]",
        description="Sample text from a checkpoint. Without a command, generate (python sample.py generate "
        "--help shows its flags).",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    parser.set_defaults(command_names=tuple(commands.choices))
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as a Namespace whose ``run`` is the command to run. A first word that
    names no command (a checkpoint, a flag) belongs to the default command, so
    ``sample.py CKPT ...`` is ``sample.py generate CKPT ...``; ``-h`` alone lists the commands."""
    parser = build_parser()
    argv = list(argv)
    if not argv or argv[0] not in (*parser.get_default("command_names"), "-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]  # a checkpoint file named like a command still works as ./compare
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # after streamed text, Ctrl-C ends the line and keeps what was printed
    return run_cli(lambda: args.run(args), end_output_line=args.streams_text)


if __name__ == "__main__":
    sys.exit(main())
