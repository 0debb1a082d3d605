"""train.keep_freed_memory: a large buffer freed and allocated again every step must not
fault its pages in afresh each time (the 50k-vocabulary fine-tune's page faults)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Allocates and frees a 64 MiB tensor 2 + 8 times (touching every page) and prints the
# minor page faults of the last 8 rounds; with "keep", after train.keep_freed_memory().
CHURN = """
import resource, sys, torch
import train
if sys.argv[1] == "keep":
    train.keep_freed_memory()
for _ in range(2):  # the first two place the buffer in the heap (or not) and fault in either case
    torch.ones(1 << 24).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(1 << 24).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096  # of one 64 MiB buffer, at 4 KiB pages


def churn_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.slow  # allocates and frees large buffers for many rounds: 3-7 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = churn_faults("default"), churn_faults("keep")
    # By default each round maps a fresh buffer and faults in each of its pages (fewer
    # faults where transparent huge pages are always on, but still one per page).
    assert default >= 8 * PAGES * 0.9 or open("/sys/kernel/mm/transparent_hugepage/enabled").read().startswith("[always]")
    assert kept < PAGES / 8 and kept * 10 < default  # the freed buffer is reused: its pages are there already
