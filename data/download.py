"""Download a file and check its SHA-256 before writing it (used by `make shakespeare`).

    python data/download.py URL SHA256 OUT

Standard library only, so it runs before the venv exists. Any failure (no network, a
wrong checksum, a path that cannot be written) is one line on stderr and exit status 2;
nothing is written unless the checksum matches.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path


def download(url: str, sha256: str, out: Path, timeout: float = 60) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError and socket timeouts are OSErrors; ValueError: a bad URL
        raise SystemExit(f"error: could not download {url} ({getattr(e, 'reason', e)}); "
                         f"pass a local copy instead: make shakespeare SHAKESPEARE=path/to/{out.name}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"error: {url} has SHA-256 {digest}, expected {sha256}; nothing was written")
    partial = out.with_name(out.name + ".part")
    try:
        partial.write_bytes(data)
        partial.replace(out)  # atomic: an interrupted download never leaves a half file under the real name
    except OSError as e:
        raise SystemExit(f"error: cannot write {out}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download URL to OUT if its SHA-256 is SHA256.")
    parser.add_argument("url", help="what to download")
    parser.add_argument("sha256", help="the SHA-256 the file must have (hex)")
    parser.add_argument("out", type=Path, help="where to write it")
    args = parser.parse_args(argv)
    try:
        download(args.url, args.sha256.lower(), args.out)
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
