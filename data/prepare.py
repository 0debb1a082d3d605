"""Turn a text corpus into a tokenizer plus train/val token files.

    python data/prepare.py                          # the default corpus (Python's doc topics)
    python data/prepare.py my_texts/ --tokenizer bpe --vocab-size 4096
    python data/prepare.py "books/**/*.txt" --out data/books
    python data/prepare.py --synthetic markov2 --seed 1    # a language whose truth is known

Writes ``<out>/train.bin``, ``<out>/val.bin`` and ``<out>/meta.json`` in the format of
model/data.py (and, for BPE, ``tokenizer.tiktoken`` in tiktoken's rank-file format).
Everything is written to a hidden staging folder beside ``<out>`` first and moved into
place at the end, so a failed run never leaves half a dataset and never destroys the one
already there; a later run removes the staging folders of runs that were killed.
``--synthetic NAME`` draws the corpus from a preset Markov chain of model/synthetic.py
instead (char tokenizer) and saves the chain beside the data as ``oracle.json``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from model.cli import run_cli
from model.corpus import (
    Document, check_not_empty, corpus_name, default_corpus, find_documents, iter_pieces, iter_texts,
)
from model.data import META_FILE, SPLITS, TokenWriter, dataset_meta, split_file, token_dtype, write_meta
from model.errors import UserError
from model.synthetic import ORACLE_FILE, PRESETS, MarkovChain, preset_chain
from model.tokenizer import BPETokenizer, fit_tokenizer

DATA_ROOT = Path(__file__).resolve().parent
DEFAULT_VOCAB_SIZE = 2048
TOKENIZER_FILE = "tokenizer.tiktoken"  # a BPE's ranks, for tiktoken and for the curious
DEFAULT_SYNTHETIC_CHARS = 1_000_000


def prepare(
    inputs: list[str],
    out_dir: Path,
    tokenizer_spec: str = "char",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = 0.1,
    encoding_errors: str = "strict",
    progress: bool = True,
    documents: list[Document] | None = None,
    oracle: MarkovChain | None = None,
) -> dict:
    """Read, fit the tokenizer, encode both splits; returns the meta written.

    ``documents``, when given, are the corpus instead of ``inputs`` (a synthetic one);
    ``oracle``, the chain they were drawn from, is saved beside the data as oracle.json."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    docs = documents if documents is not None else find_documents(inputs) if inputs else default_corpus()
    total_bytes = check_not_empty(docs, inputs)
    _check_replaceable(out_dir)

    def texts(split: str | None = None):
        return _with_progress(iter_texts(docs, val_fraction, encoding_errors, split), "read", progress, total_bytes)

    started = time.perf_counter()
    # A BPE learns from the training text alone; a char vocabulary must cover val too.
    fit_split = "train" if tokenizer_spec == "bpe" else None
    tokenizer = fit_tokenizer(tokenizer_spec, lambda: texts(fit_split), vocab_size, progress=progress)
    fit_seconds = time.perf_counter() - started

    staging = _new_staging(out_dir)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {split: TokenWriter(split_file(staging, split), dtype) for split in SPLITS}
        pieces = iter_pieces(docs, val_fraction, encoding_errors)
        for piece in _with_progress(pieces, "encode", progress, total_bytes, text_of=lambda p: p.text):
            writer = writers[piece.split]
            writer.write(tokenizer.encode(piece.text))
            if piece.ends_document:
                writer.write([tokenizer.eot_id])
        for writer in writers.values():
            writer.close()
        if isinstance(tokenizer, BPETokenizer):
            tokenizer.save(staging / TOKENIZER_FILE)
        if oracle is not None:
            oracle.save(staging / ORACLE_FILE)
        about = ({"synthetic": oracle.name, "seed": oracle.seed} if oracle
                 else {"inputs": inputs or ["pydoc_data.topics"]})
        meta = dataset_meta(
            tokenizer, dtype, {split: writers[split].count for split in SPLITS},
            source={**about, "documents": len(docs), "bytes": total_bytes},
            split={
                "val_fraction": val_fraction,
                "rule": "val is the text after the first line break at or after "
                f"{1 - val_fraction:.0%} of the corpus bytes (from that byte when no text follows such a break)",
            },
            encoding_errors=encoding_errors,
            tokenizer_fit_seconds=round(fit_seconds, 3),
        )
        for split in SPLITS:
            if meta["tokens"][split] == 0:
                raise UserError(f"the {split} split is empty; use a bigger corpus or another --val-fraction")
        write_meta(staging, meta)
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def prepare_synthetic(name: str, out_dir: Path, seed: int = 1, num_chars: int = DEFAULT_SYNTHETIC_CHARS,
                      val_fraction: float = 0.1, progress: bool = True) -> dict:
    """A corpus of at least ``num_chars`` characters (whole documents) drawn from the preset
    chain ``name`` built with ``seed``, prepared with the char tokenizer, the chain saved
    beside it; returns the meta written. The documents are drawn with seed + 1, so the
    chain and the text come from separate random streams."""
    if num_chars < 1:
        raise UserError(f"--num-chars must be >= 1, got {num_chars}")
    chain = preset_chain(name, seed)
    texts = [text.encode("utf-8") for text in chain.documents(num_chars, seed + 1)]
    docs = [Document(f"{name}[{i}]", len(data), lambda data=data: io.BytesIO(data)) for i, data in enumerate(texts)]
    return prepare([], out_dir, "char", val_fraction=val_fraction, progress=progress, documents=docs, oracle=chain)


def _new_staging(out_dir: Path) -> Path:
    """A new hidden folder beside ``out_dir``, named .NAME.PID.RANDOM after this process,
    once the staging folders of dead runs are gone."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", dir=out_dir.parent))


def _remove_stale_staging(out_dir: Path) -> None:
    """A killed run (kill -9, a closed laptop lid that never wakes the process) runs no
    cleanup, and its staging folder can hold hundreds of megabytes: remove the staging
    (and retired .old) folders whose process is gone. A live run's folder stays, so two
    runs may prepare the same --out at once."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d{{1,9}})\.[^.]+(\.old)?")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # Windows' os.kill ends the process instead of probing it: keep the folder
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _with_progress(items, desc: str, enabled: bool, total_bytes: int, text_of=lambda text: text):
    """Pass items through, advancing a bar by the bytes of text each carries."""
    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False) as bar:
        for item in items:
            bar.update(len(text_of(item).encode("utf-8", errors="replace")))
            yield item


def _check_replaceable(out_dir: Path) -> None:
    """Only an earlier prepared dataset (or nothing) may be replaced, and only when the
    folder holds nothing else: the whole folder is swapped for the new one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / META_FILE).is_file():
        raise UserError(f"{out_dir} exists and is not a prepared dataset; choose another --out")
    dataset_files = {META_FILE, TOKENIZER_FILE, ORACLE_FILE, *(split_file(out_dir, split).name for split in SPLITS)}
    others = sorted(path.name for path in out_dir.iterdir() if path.name not in dataset_files)
    if others:
        raise UserError(
            f"{out_dir} holds files that are not part of its dataset ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); move them or choose another --out"
        )


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Move the finished dataset in; the old one is removed only after the new one is there."""
    if out_dir.exists():
        retired = staging.with_name(staging.name + ".old")
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired)
    else:
        staging.rename(out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Prepare a corpus for training: fit a tokenizer and write train/val token files.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="text files, directories (read recursively) or glob patterns; "
                        "default: Python's documentation topics (pydoc_data.topics)")
    parser.add_argument("--tokenizer", default="char",
                        help="char (one token per character), bpe (byte-level BPE trained here), "
                        "gpt2:FOLDER (GPT-2's tokenizer from a Hugging Face folder's vocab.json and merges.txt, "
                        "to fine-tune that model) or tiktoken:NAME (a named tiktoken encoding such as "
                        "tiktoken:gpt2); default: char")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"target vocabulary for --tokenizer bpe, end-of-text token included "
                        f"(default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: data/<corpus name>, e.g. data/pydoc)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the corpus, taken from its end, held out for validation (default 0.1)")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                        help="strict: stop at the first byte that is not UTF-8, naming file and offset; "
                        "replace: turn such bytes into U+FFFD and go on")
    presets = "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
    parser.add_argument("--synthetic", metavar="NAME",
                        help="instead of INPUTs, draw the corpus from a random sparse Markov chain whose "
                        f"probabilities are exact, saved beside the data as {ORACLE_FILE} (for sample.py compare "
                        f"--oracle); char tokenizer; --out defaults to data/NAME. Presets: {presets}")
    parser.add_argument("--seed", type=int, default=1, help="with --synthetic: builds the chain; the text "
                        "is drawn with seed + 1 (default 1)")
    parser.add_argument("--num-chars", type=int, default=DEFAULT_SYNTHETIC_CHARS,
                        help=f"with --synthetic: draw whole documents until they hold at least this many "
                        f"characters (default {DEFAULT_SYNTHETIC_CHARS:,})")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # inputs on both sides of a flag
    out_dir = args.out or DATA_ROOT / (args.synthetic or corpus_name(args.inputs))

    def action() -> None:
        check_synthetic_args(parser, args)
        if args.synthetic:
            meta = prepare_synthetic(args.synthetic, out_dir, args.seed, args.num_chars, args.val_fraction,
                                     progress=not args.no_progress)
        else:
            meta = prepare(args.inputs, out_dir, args.tokenizer, args.vocab_size, args.val_fraction,
                           args.encoding_errors, progress=not args.no_progress)
        tokens = meta["tokens"]
        print(
            f"{meta['source']['documents']} documents, {meta['source']['bytes']:,} bytes -> "
            f"{tokens['train']:,} train + {tokens['val']:,} val tokens ({meta['tokenizer_name']}, "
            f"vocab {meta['vocab_size']}, {meta['dtype']}) in {out_dir}"
        )

    return run_cli(action, interrupted="interrupted; nothing was written")


def check_synthetic_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--synthetic makes its own text with the char tokenizer: refuse INPUTs and the options
    it would ignore; --seed and --num-chars do nothing without it. (A flag given with its
    default value changes nothing, so it passes.)"""
    def changed(*names: str) -> list[str]:
        return ["--" + name.replace("_", "-") for name in names if getattr(args, name) != parser.get_default(name)]

    if args.synthetic:
        ignored = changed("tokenizer", "vocab_size", "encoding_errors")
        if args.inputs or ignored:
            raise UserError(f"--synthetic draws its own corpus with the char tokenizer; drop "
                            f"{', '.join(ignored) if ignored else 'the INPUTs'}")
    elif changed("seed", "num_chars"):
        raise UserError(f"{', '.join(changed('seed', 'num_chars'))}: only with --synthetic NAME")


if __name__ == "__main__":
    sys.exit(main())
