"""The benches' clock: time.perf_counter read after the device has finished its work.

CUDA (and Apple's MPS) run kernels asynchronously, so a clock read right after a call
measures when the work was queued, not when it was done. ``timer(device)`` waits for the
device (torch.cuda.synchronize, torch.mps.synchronize) before each reading; on the CPU it
is time.perf_counter itself.
Only the standard library at import (torch when a CUDA timer is asked for), so that
bench/hf_side.py can use it in the transformers venv as well as our side does.
"""

from __future__ import annotations

import time
from typing import Callable


def timer(device) -> Callable[[], float]:
    """time.perf_counter, after ``device`` (a torch.device) has finished its queued work."""
    if device.type not in ("cuda", "mps"):
        return time.perf_counter
    import torch

    def synchronized() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        else:
            torch.mps.synchronize()
        return time.perf_counter()
    return synchronized


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, epilog="A module, not a command: the benches import it.").parse_args()
    raise SystemExit("bench/clock.py is a module: the benches import it")
