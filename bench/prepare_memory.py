"""Peak memory of data/prepare.py on a big corpus: streaming keeps it far below the corpus size.

    python bench/prepare_memory.py [--size-mb 200] [--tokenizer char bpe] [--out bench/results/prepare_memory.json]

Builds a corpus of about --size-mb megabytes by repeating tinyshakespeare (or, when
that file is absent, the default corpus) with a counter on every copy, runs the real
CLI on it in a subprocess per tokenizer, and reports the child's peak resident memory
next to the corpus size and the peak of a process that only imports the project
(Python, torch, numpy: the floor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def seed_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def write_corpus(path: Path, size_mb: int) -> int:
    text = seed_text()
    written = copy = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_mb * 1_000_000:
            part = f"== copy {copy} ==\n{text}"
            f.write(part)
            written += len(part.encode("utf-8"))
            copy += 1
    return written


PEAK_OF_CHILD = (  # runs argv[1:] and prints that child's own peak resident set (kB on Linux)
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run a command in a fresh process; its peak resident set (MB) and wall time (s)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="corpus size in megabytes")
    parser.add_argument("--tokenizer", nargs="+", default=["char", "bpe"], help="tokenizers to prepare with")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prepare_memory.json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "big.txt"
        size = write_corpus(corpus, args.size_mb)
        floor, _ = peak_rss_mb([sys.executable, "-c", "import torch, numpy, tiktoken, model.tokenizer"])
        print(f"corpus: {size / 1e6:.0f} MB; a process that only imports the project peaks at {floor:.0f} MB")
        for name in args.tokenizer:
            peak, seconds = peak_rss_mb([sys.executable, "data/prepare.py", str(corpus), "--tokenizer", name,
                                         "--out", str(Path(tmp) / name), "--no-progress"])
            results[name] = {"peak_rss_mb": round(peak), "seconds": round(seconds, 1)}
            print(f"{name:>5}: peak {peak:.0f} MB, {peak - floor:.0f} MB above the import floor, {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"corpus_mb": round(size / 1e6), "import_floor_mb": round(floor),
                                    "runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
