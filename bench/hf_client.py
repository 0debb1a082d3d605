"""Our end of bench/hf_side.py: starts it under the Python of the venv that has
transformers and asks it for timed generate() runs (see hf_side.py for the protocol)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

HF_SIDE = Path(__file__).resolve().parent / "hf_side.py"
# The Python with transformers that the comparisons use unless --hf-python names one:
# $HF_PYTHON, else the checkout's .venv-hf (made by `make venv-hf`).
DEFAULT_HF_PYTHON = os.environ.get("HF_PYTHON") or str(HF_SIDE.parents[1] / ".venv-hf" / "bin" / "python")


class HuggingFaceSide:
    """bench/hf_side.py running in its own process, holding a GPT2LMHeadModel built from
    ``source``: a weights file written by bench/sample_speed.py, or a Hugging Face folder,
    on ``device`` (a torch device name), with generate() under ``autocast`` (a torch dtype
    name, "bfloat16" or "float16") when given. ``info`` is its ready line: transformers'
    version, the device, weights dtype and autocast it runs with, the peak memory its load
    added and, for a weights file, the largest difference of its logits from ours."""

    def __init__(self, python: str, source: Path, threads: int, device: str = "cpu", autocast: str | None = None):
        self.threads = threads
        command = [python, str(HF_SIDE), str(source), "--device", device]
        command += ["--autocast", autocast] if autocast else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        ready = self.process.stdout.readline()
        if not ready.startswith("{"):
            self.process.kill()
            raise SystemExit(f"bench/hf_side.py did not start under {python}")
        self.info = json.loads(ready)

    def tokens_per_second(self, new_tokens: int, seed: int) -> float:
        """tokens/s of one generate() call of ``new_tokens`` tokens sampled with ``seed``."""
        self.process.stdin.write(f"{new_tokens} {seed} {self.threads}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, epilog="A module, not a command: bench/sample_speed.py and "
                            "bench/gpt2_speed.py import it.").parse_args()
    raise SystemExit("bench/hf_client.py is a module: run bench/sample_speed.py or bench/gpt2_speed.py")
