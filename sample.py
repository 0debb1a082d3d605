"""Sample text from a checkpoint.

    python sample.py out/default/best.pt --prompt "The for statement" --strategy top-p --top-p 0.9
    python sample.py out/default/best.pt --strategy greedy --explain
    echo "Once upon" | python sample.py CKPT --prompt-file - --num-samples 3 --stop $'\\n\\n'  # (bash)
    python sample.py compare out/default/best.pt --out out/compare   # strategies side by side
    python sample.py score out/default/best.pt notes.txt             # bits per byte and perplexity of a text

The checkpoint carries its tokenizer, so nothing else is needed. Strategies are the
functions of model/decoding.py; ``--strategy`` takes a name (with the settings from the
flags below) or a compact spec such as ``top-p:p=0.9,t=0.8``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from model.checkpoint import load_for_generation
from model.compare import main as compare_main
from model.decoding import DecodingSpec, default_spec
from model.device import resolve_device
from model.errors import UserError, read_user_text, run_cli
from model.generate import WINDOW_MODES, Sample, generate
from model.score import TextScore, score_tokens, token_byte_lengths, windows
from model.tokenizer import Tokenizer

DECODING_FLAGS = (  # the command-line flags that set a DecodingSpec field of the same name
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "num_beams",
)


def spec_from_args(args: argparse.Namespace) -> DecodingSpec:
    """The strategy's defaults (or its compact spec), then every flag the user gave.

    A flag may tune the named strategy, not turn it into another kind (``--strategy
    greedy --temperature 0.7`` would sample, ``--strategy top-p --temperature 0`` would
    be greedy, ``--strategy beam --num-beams 1`` would not search), nor set again what
    the compact spec already sets."""
    base = dataclasses.asdict(default_spec(args.strategy))
    given = {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name) is not None}
    if ":" in args.strategy:
        unset = dataclasses.asdict(DecodingSpec())
        for name in given:
            if base[name] != unset[name]:
                raise UserError(f"--{name.replace('_', '-')} sets what --strategy {args.strategy} already sets; "
                                "give it in one place")
    fields = {**base, **given}
    if _kind(fields) != _kind(base):
        flags = " ".join(f"--{name.replace('_', '-')} {given[name]}" for name in ("temperature", "num_beams")
                         if name in given)
        raise UserError(f"{flags} would turn --strategy {args.strategy} ({_kind(base)}) into {_kind(fields)}; "
                        "name the strategy you want with --strategy")
    return DecodingSpec(**fields)


def _kind(fields: dict) -> str:
    if fields["num_beams"] > 1:
        return "beam search"
    return "greedy decoding" if fields["temperature"] == 0 else "sampling"


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt and --prompt-file (``-`` is stdin), in the order given; none means one empty prompt."""
    prompts = list(args.prompt or []) + [read_user_text(name, "prompt file") for name in args.prompt_file or []]
    return prompts or [""]


class Printer:
    """Streams a lone sample as it comes; prints each of several samples whole as it ends.
    A streamed prompt is printed with the first text that follows it (or when the sample
    ends), so an error before generation begins prints nothing."""

    def __init__(self, prompts: list[str], num_samples: int, out=None):
        self.prompts = prompts
        self.streaming = len(prompts) * num_samples == 1
        self.out = out or sys.stdout
        self.prompt_printed = False

    def on_text(self, row: int, text: str) -> None:
        if self.streaming:
            self._stream(text)

    def on_done(self, sample: Sample) -> None:
        if self.streaming:
            self._stream("\n")
            return
        header = f"--- prompt {sample.prompt_index + 1}, sample {sample.sample_index + 1} ({sample.finish}) ---\n"
        self._write(header + self.prompts[sample.prompt_index] + sample.text + "\n")

    def _stream(self, text: str) -> None:
        if not self.prompt_printed:
            self.prompt_printed = True
            text = self.prompts[0] + text
        self._write(text)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def print_explanation(sample: Sample, tokenizer: Tokenizer, out=None) -> None:
    """The next-token table of every step: the top candidates with their probability
    under the model and after the strategy's filtering, and the token chosen."""
    out = out or sys.stdout
    for step, detail in enumerate(sample.details, start=1):
        out.write(f"step {step}: chose {_show(tokenizer, detail.token)}  "
                  f"(p={math.exp(detail.logprob):.3f}, after filtering {math.exp(detail.filtered_logprob):.3f})\n")
        out.write(f"    {'token':<16} {'p':>7} {'filtered':>9}\n")
        for token, raw, filtered in detail.top:
            mark = "  <- chosen" if token == detail.token else ""
            out.write(f"    {_show(tokenizer, token):<16} {math.exp(raw):>7.3f} {math.exp(filtered):>9.3f}{mark}\n")


def write_logprobs(samples: list[Sample], tokenizer: Tokenizer, out: TextIO) -> None:
    """One JSON line per generated token: its log-probability and the top alternatives."""
    for sample in samples:
        for step, detail in enumerate(sample.details):
            record = {
                "prompt": sample.prompt_index, "sample": sample.sample_index, "step": step,
                "token": detail.token, "text": _text(tokenizer, detail.token), "logprob": detail.logprob,
                "top": [{"token": t, "text": _text(tokenizer, t), "logprob": lp} for t, lp, _ in detail.top],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def _show(tokenizer: Tokenizer, token: int) -> str:
    return repr(_text(tokenizer, token))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate text from a checkpoint with a decoding strategy of your choice. To compare "
        "strategies side by side instead: python sample.py compare CKPT (see python sample.py compare --help); "
        "for bits per byte of a text: python sample.py score CKPT FILE (see python sample.py score --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py (e.g. out/default/best.pt)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable: several prompts run as one "
                        "batch); an empty prompt starts a new document")
    parser.add_argument("--prompt-file", action="append", help="read a prompt from a file, '-' for stdin (repeatable)")
    parser.add_argument("--strategy", default="top-p", help="greedy | sample | temperature | top-k | top-p | "
                        "min-p | typical | beam, or a compact spec such as top-p:p=0.9,t=0.8")
    parser.add_argument("--temperature", type=float, help="divide logits by this; 0 means greedy "
                        "(default: 0.7 with --strategy temperature, else 1)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 40 with --strategy top-k)")
    parser.add_argument("--top-p", type=float, help="keep the smallest set of tokens whose probability reaches p, "
                        "in (0, 1] (default 0.9 with --strategy top-p)")
    parser.add_argument("--min-p", type=float, help="keep tokens with p >= min_p * p_max (default 0.05 with "
                        "--strategy min-p)")
    parser.add_argument("--typical-p", type=float, help="locally typical sampling mass (default 0.95 with "
                        "--strategy typical)")
    parser.add_argument("--repetition-penalty", type=float, help="CTRL penalty (> 1 discourages tokens already "
                        "seen, prompt included; default 1, off)")
    parser.add_argument("--frequency-penalty", type=float, help="subtract count * this from each generated "
                        "token's logit (default 0)")
    parser.add_argument("--presence-penalty", type=float, help="subtract this from every generated token's logit "
                        "(default 0)")
    parser.add_argument("--num-beams", type=int, help="beams for beam search (default 4 with --strategy beam)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at most this many tokens per sample")
    parser.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i: same seed, same text")
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
    return parser


def run(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    for name in ("num_samples", "top"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples > 1 and (spec.is_greedy or spec.is_beam):
        raise UserError(f"{'beam search' if spec.is_beam else 'greedy decoding'} ignores the seed: "
                        f"--num-samples {args.num_samples} would print one text {args.num_samples} times")
    wants_details = args.explain or args.logprobs is not None
    if wants_details and spec.is_beam:
        raise UserError("--explain and --logprobs follow one token at a time; they do not work with beam search")
    prompts = read_prompts(args)
    model, tokenizer, _ = load_for_generation(args.checkpoint, resolve_device(args.device))
    for prompt in prompts:
        tokenizer.check_encodable(prompt, "prompt")
    if args.explain and args.num_samples * len(prompts) > 1:
        raise UserError("--explain shows one sample: use one prompt and --num-samples 1")
    with contextlib.ExitStack() as files:
        # opened before generating, so a bad path is found before the work, not after it
        logprobs = files.enter_context(args.logprobs.open("w", encoding="utf-8")) if args.logprobs else None
        printer = Printer(prompts, args.num_samples)
        samples = generate(
            model, tokenizer, prompts, spec, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
            seed=args.seed, stop=args.stop, window=args.window, top=args.top if wants_details else 0,
            on_text=printer.on_text, on_done=printer.on_done,
        )
        if args.explain:
            print_explanation(samples[0], tokenizer)
        if logprobs is not None:
            write_logprobs(samples, tokenizer, logprobs)


def build_score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py score", description="Bits per byte and perplexity of text files under a checkpoint, "
        "scored in windows of the model's context (see model/score.py).")
    parser.add_argument("checkpoint", type=Path, help="a .pt file written by train.py")
    parser.add_argument("files", nargs="+", help="UTF-8 text files to score (- reads standard input)")
    parser.add_argument("--stride", type=int, default=None, help="tokens each window moves on and scores; "
                        "past the first window every token has at least block_size - stride tokens of context "
                        "(default: block_size / 2; block_size = no overlap, fastest)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    return parser


def score(args: argparse.Namespace) -> None:
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
    tokens = {}
    for name, text in texts.items():
        tokenizer.check_encodable(text, name)
        tokens[name] = [tokenizer.eot_id, *tokenizer.encode(text)]
        if len(tokens[name]) < 2:
            raise UserError(f"{name} is empty: there is nothing to score")
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


def _score_line(name: str, result: TextScore) -> str:
    bpb = f"{result.bits_per_byte:.4f}" if result.bytes else "-"
    return (f"{name}: {result.tokens:,} tokens, {result.bytes:,} bytes, bits per byte {bpb}, "
            f"perplexity {result.perplexity:.3f} (per token)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # a checkpoint file named "compare" still works as ./compare
        return compare_main(argv[1:])
    if argv[:1] == ["score"]:
        score_args = build_score_parser().parse_args(argv[1:])
        return run_cli(lambda: score(score_args))
    args = build_parser().parse_args(argv)

    def action() -> None:
        with torch.inference_mode():
            run(args)

    return run_cli(action, end_output_line=True)  # Ctrl-C keeps what was printed


if __name__ == "__main__":
    sys.exit(main())
