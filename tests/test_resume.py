"""Resume exactly; stop cleanly on SIGINT/SIGTERM; survive kill -9 at any moment, even mid-save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from model.checkpoint import load_checkpoint
from tests.conftest import ROOT, one_line_error, records, run_args, without_timing

def test_n_steps_plus_resume_for_n_more_equals_2n_steps(tiny_dataset, tmp_path):
    # Dropout on, so the random state of every step matters too. The schedule must not
    # depend on where the first run stops: lr_decay_iters pins it to 12 steps.
    common = ["dropout=0.1", "lr_decay_iters=12", "eval_interval=1"]
    assert train.main(run_args(tiny_dataset, tmp_path / "straight", *common, "max_iters=12")) == 0
    assert train.main(run_args(tiny_dataset, tmp_path / "split", *common, "max_iters=6")) == 0
    # Only out_dir and the new length on the command line: everything else from the checkpoint.
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path / 'split'}", "max_iters=12"]) == 0

    straight, split = records(tmp_path / "straight"), records(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(13))
    assert without_timing(split) == without_timing(straight)  # every loss, norm and rate, bit for bit
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def start_training(tiny_dataset, out, *more: str, prelude: str = "") -> subprocess.Popen:
    """train.py in a real child process, its output unbuffered so we can follow it."""
    code = prelude + "import sys, train; sys.exit(train.main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *run_args(tiny_dataset, out, *more)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(process: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Read the child's stdout until a line contains ``text``; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    raise AssertionError(f"no {text!r} in the output: {''.join(lines)}{process.stderr.read()}")


@pytest.mark.slow  # real training processes signalled and killed: the slow suite (.ci/run runs it)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_exits_cleanly_then_resume_finishes(sig, tiny_dataset, tmp_path):
    process = start_training(tiny_dataset, tmp_path, "max_iters=1000000", "eval_interval=20")
    wait_for(process, "step     20:")  # a checkpoint exists and training is under way
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    message = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert len(message) == 1 and f"stopped by {sig.name} after step" in message[0] and "--resume" in message[0]
    stopped_at = int(message[0].split("after step ")[1].split(":")[0])
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == stopped_at >= 20 and saved["extra"]["evaluated"] is False

    finish = stopped_at + 3
    resumed = subprocess.run([sys.executable, "train.py", "--no-progress", "--resume", f"out_dir={tmp_path}",
                              f"max_iters={finish}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at}" in resumed.stdout
    steps = [r["step"] for r in records(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-1] == finish  # no step logged twice
    assert load_checkpoint(tmp_path / "last.pt")["step"] == finish


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tiny_dataset, tmp_path):
    # The child's torch.save writes half a file and hangs from its second call on (the
    # first is the step-5 evaluation's last.pt; best.pt is a copy made without torch.save):
    # we kill it right there, in the middle of saving step 10.
    prelude = (
        "import time, torch\n"
        "real_save, calls = torch.save, []\n"
        "def hanging_save(obj, f, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) <= 1:\n"
        "        return real_save(obj, f, *args, **kwargs)\n"
        "    f.write(b'half a checkpoint'); f.flush(); print('MID-SAVE', flush=True); time.sleep(600)\n"
        "torch.save = hanging_save\n"
    )
    process = start_training(tiny_dataset, tmp_path, "max_iters=1000", "eval_interval=5", prelude=prelude)
    wait_for(process, "MID-SAVE")
    process.kill()  # SIGKILL: no handler, no cleanup
    process.communicate(timeout=30)
    assert list(tmp_path.glob(".*.pt.*.tmp")), "the save was not caught in the middle"
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / name)["step"] == 5

    resumed = subprocess.run([sys.executable, "train.py", "--no-progress", "--resume", f"out_dir={tmp_path}",
                              "max_iters=8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    assert not list(tmp_path.glob(".*.pt.*.tmp"))  # the dead save's leftover was cleared


@pytest.mark.slow  # many real processes killed at random moments
def test_kill_9_at_random_moments_always_leaves_a_loadable_checkpoint(tiny_dataset, tmp_path):
    # Saving after every step makes a save in progress a likely place for the kill to land.
    delays = random.Random(0).sample([0.05, 0.2, 0.4, 0.7, 1.0, 1.5], 2)
    for attempt, delay in enumerate(delays):
        more = ["max_iters=1000000", "eval_interval=1"]
        process = start_training(tiny_dataset, tmp_path, *more, *(["--resume"] if attempt else []))
        wait_for(process, "step      2:" if not attempt else "resumed from step")
        time.sleep(delay)
        process.kill()
        process.communicate(timeout=30)
        last = load_checkpoint(tmp_path / "last.pt")
        best = load_checkpoint(tmp_path / "best.pt")
        # last.pt is written first and best.pt (when val improved) is then made a copy of
        # it, so a kill between the two leaves best.pt one evaluation behind, never ahead.
        assert last["step"] >= 2 and best["step"] <= last["step"]


def test_resume_overrides_apply_to_the_checkpoints_config(tiny_dataset, tmp_path):
    """The issue's reproduction: overrides that are valid against the run's own config
    (batch 32, lr 1e-4, min_lr 1e-5) but not against the defaults (batch 16, min_lr 1e-4)."""
    run = ["batch_size=32", "micro_batch_size=16", "learning_rate=1e-4", "min_lr=1e-5", "eval_interval=2"]
    assert train.main(run_args(tiny_dataset, tmp_path, *run, "max_iters=2")) == 0
    resume = ["--no-progress", "--resume", f"out_dir={tmp_path}"]
    assert train.main([*resume, "micro_batch_size=32", "max_iters=4"]) == 0
    assert train.main([*resume, "learning_rate=5e-5", "max_iters=6"]) == 0
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 6
    settings = saved["config"]["train"]
    assert (settings["batch_size"], settings["micro_batch_size"]) == (32, 32)  # the second override stays
    assert (settings["learning_rate"], settings["min_lr"]) == (5e-5, 1e-5)
    assert saved["config"]["model"]["n_embd"] == 16  # from the checkpoint, not the default 128
    assert records(tmp_path)[-1]["lr"] == pytest.approx(train.learning_rate_at(6, train.TrainConfig(**settings)))


def test_a_full_disk_during_a_save_is_one_line_and_the_checkpoints_still_load(tiny_dataset, tmp_path, capsys):
    """out_dir on a 2 MB tmpfs, filled up after the first save: the next save fails."""
    import shutil


    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = run_args(tiny_dataset, disk, "eval_interval=2")
        assert train.main([*args, "max_iters=2"]) == 0
        capsys.readouterr()
        room = shutil.disk_usage(disk).free - (disk / "last.pt").stat().st_size // 2
        (disk / "filler").write_bytes(b"\0" * room)
        assert train.main(["--resume", *args, "max_iters=4"]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"error: could not save {disk / 'last.pt'} (" in line and "the previous last.pt is kept" in line
        for name in ("last.pt", "best.pt"):
            assert load_checkpoint(disk / name)["step"] == 2
        assert not list(disk.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_resume_on_data_of_another_tokenizer_of_the_same_size_is_refused(tiny_corpus, tiny_dataset, tmp_path,
                                                                           capsys):
    """'z' -> 'Z': as many characters, other ids. The checkpoint must keep its tokenizer."""
    sys.path.insert(0, str(ROOT / "data"))
    from prepare import prepare

    other_text = tmp_path / "other.txt"
    other_text.write_text(tiny_corpus.read_text().replace("z", "Z"))
    other = tmp_path / "other"
    prepare([str(other_text)], other, "char", progress=False)
    meta, other_meta = (json.loads((d / "meta.json").read_text()) for d in (tiny_dataset, other))
    assert meta["vocab_size"] == other_meta["vocab_size"] and meta["tokenizer"] != other_meta["tokenizer"]
    out = tmp_path / "run"
    assert train.main(run_args(tiny_dataset, out, "max_iters=2", "eval_interval=2")) == 0
    capsys.readouterr()
    assert train.main(["--no-progress", "--resume", f"out_dir={out}", f"data_dir={other}", "max_iters=4"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"cannot resume: {other} was prepared with another tokenizer than the checkpoint's" in line
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 2 and saved["tokenizer"] == meta["tokenizer"]


def test_resuming_a_spent_time_budget_with_more_iters_says_why_it_cannot(tiny_dataset, tmp_path, capsys):
    budget = ["max_iters=1000000", "eval_interval=1000000", "max_seconds=0.2"]
    assert train.main(run_args(tiny_dataset, tmp_path, *budget)) == 0
    capsys.readouterr()
    resume = ["--no-progress", "--resume", f"out_dir={tmp_path}"]
    assert train.main([*resume, "max_iters=2000000"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "cannot resume: the run's time budget is spent (" in line and "of train.max_seconds = 0.2, at step" in line
    assert line.endswith("so a larger max_iters trains nothing; raise train.max_seconds to go on")
    assert train.main([*resume, "max_seconds=0.4"]) == 0  # the way out it names
    assert records(tmp_path)[-1]["train_seconds"] >= 0.4


def test_resuming_a_finished_run_says_it_is_finished(tiny_dataset, tmp_path, capsys):
    assert train.main(run_args(tiny_dataset, tmp_path, "max_iters=2", "eval_interval=2")) == 0
    capsys.readouterr()
    assert train.main(["--no-progress", "--resume", f"out_dir={tmp_path}"]) == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        "the run already ended at step 2 (train.max_iters = 2); raise train.max_iters to go on")


def stale_best_run(tiny_dataset, out) -> None:
    """A run whose best.pt is behind last.pt, as a kill -9 between saving an improved
    last.pt (step 4) and copying it to best.pt leaves it: best.pt is the step-2 one."""
    args = run_args(tiny_dataset, out, "eval_interval=2")
    assert train.main([*args, "max_iters=2"]) == 0
    stale = out / "stale.pt"
    stale.write_bytes((out / "best.pt").read_bytes())
    assert train.main(["--resume", *args, "max_iters=4"]) == 0
    val = [r["val_loss"] for r in records(out)]
    assert val[2] < val[1] and load_checkpoint(out / "best.pt")["step"] == 4  # step 4 improved: best.pt was due
    os.replace(stale, out / "best.pt")


def resume_for_one_step(out, monkeypatch) -> None:
    """Resume, and stop by Ctrl-C after the first step: last.pt is saved, best.pt is not touched."""
    real_step = train.train_step

    def ctrl_c_during_the_step(*step_args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(*step_args, **kwargs)

    monkeypatch.setattr(train, "train_step", ctrl_c_during_the_step)
    assert train.main(["--no-progress", "--resume", f"out_dir={out}", "max_iters=8"]) == 0


def test_resume_repairs_a_best_checkpoint_left_behind_by_a_kill(tiny_dataset, tmp_path, monkeypatch, capsys):
    stale_best_run(tiny_dataset, tmp_path)
    capsys.readouterr()
    resume_for_one_step(tmp_path, monkeypatch)
    assert f"{tmp_path / 'best.pt'} was behind last.pt (a save was cut short): made it a copy of last.pt, " \
           "step 4, val loss" in capsys.readouterr().out
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["step"] == 4 and last["step"] == 5
    assert best["best_val_loss"] == last["best_val_loss"] == records(tmp_path)[2]["val_loss"]


def test_resume_says_when_the_best_weights_are_lost(tiny_dataset, tmp_path, monkeypatch, capsys):
    """best.pt behind, and last.pt is not the evaluation that found the best loss (here: its
    metrics line says otherwise), so nothing can be repaired: the log must say it."""
    stale_best_run(tiny_dataset, tmp_path)
    lines = records(tmp_path)
    lines[2]["val_loss"] += 1.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    resume_for_one_step(tmp_path, monkeypatch)
    assert f"warning: {tmp_path / 'best.pt'} is behind last.pt and the weights of the best val loss " \
           in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2


def test_a_run_stopped_after_its_last_step_resumes_for_its_final_evaluation(tiny_dataset, tmp_path, monkeypatch):
    """Ctrl-C in the last step saves last.pt before the final evaluation: that resume has work left."""
    real_step, calls = train.train_step, []

    def ctrl_c_in_the_third_step(*step_args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*step_args, **kwargs)

    monkeypatch.setattr(train, "train_step", ctrl_c_in_the_third_step)
    args = run_args(tiny_dataset, tmp_path, "max_iters=3", "eval_interval=10")
    assert train.main(args) == 0
    assert load_checkpoint(tmp_path / "last.pt")["extra"]["evaluated"] is False
    assert train.main(["--resume", *args]) == 0
    assert [r["step"] for r in records(tmp_path)] == [0, 3]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 3
