"""The command-line tools as a user runs them: the whole path, and every bad input."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sample
import train
from model.checkpoint import load_for_generation, read_checkpoint
from tests.conftest import ROOT, one_line_error, run_cli


@pytest.mark.slow  # the whole path in fresh processes; the default suite covers each step on its own
def test_prepare_train_sample_end_to_end(tmp_path, tiny_corpus):
    data, out = tmp_path / "data", tmp_path / "out"
    prepared = run_cli("data/prepare.py", str(tiny_corpus), "--out", str(data))
    assert prepared.returncode == 0, prepared.stderr
    assert "train" in prepared.stdout and (data / "meta.json").is_file()

    trained = run_cli(
        "train.py", f"data_dir={data}", f"out_dir={out}", "max_iters=20", "eval_interval=10", "eval_iters=2",
        "batch_size=4", "block_size=32", "n_layer=1", "n_embd=32", "n_head=2", "--device", "cpu",
    )
    assert trained.returncode == 0, trained.stderr
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[-1]["val_loss"] < records[0]["val_loss"]

    sampled = run_cli("sample.py", str(out / "best.pt"), "--prompt", "The quick", "--max-new-tokens", "30",
                      "--seed", "5")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("The quick") and len(sampled.stdout) > len("The quick")
    again = run_cli("sample.py", str(out / "best.pt"), "--prompt", "The quick", "--max-new-tokens", "30",
                    "--seed", "5")
    assert again.stdout == sampled.stdout  # same seed, same text

    from_stdin = run_cli("sample.py", str(out / "best.pt"), "--prompt-file", "-", "--num-samples", "2",
                         "--max-new-tokens", "10", "--strategy", "top-k", stdin="lazy")
    assert from_stdin.returncode == 0 and from_stdin.stdout.count("--- prompt 1, sample") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["n_layers=2"], "did you mean 'n_layer'?"),
        (["n_embd=30", "n_head=4"], "must be divisible by model.n_head"),
        (["block_size=100000"], "fewer than block_size + 1"),
        (["data_dir=/nonexistent"], "no prepared dataset in /nonexistent"),
        (["--device", "cuda"], "no usable CUDA GPU"),
        (["model.vocab_size=5"], "leave model.vocab_size at 0"),
        (["train.lerning_rate=2"], "unknown key train.lerning_rate; did you mean 'learning_rate'?"),
        (["model.learning_rate=2"], "learning_rate belongs in [train]"),
        (["learning_rate=inf"], "train.learning_rate must be a finite number"),
        (["--resume", "--overwrite"], "choose one"),
    ],
)
def test_train_bad_input(args, message, tiny_dataset, tmp_path, capsys):
    code = train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "max_iters=1", *args])
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_a_new_run_never_replaces_an_earlier_one(tiny_dataset, tmp_path, capsys):
    run = [f"data_dir={tiny_dataset}", f"out_dir={tmp_path}", "block_size=16", "n_layer=1", "n_head=1",
           "n_embd=8", "batch_size=2", "eval_iters=1", "eval_interval=2", "max_iters=2", "--no-progress"]
    assert train.main(run) == 0
    saved = {name: (tmp_path / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train.main(run) == 2
    assert "holds an earlier run (last.pt, best.pt); continue it with --resume" in one_line_error(capsys.readouterr().err)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    assert train.main([*run, "--overwrite", "seed=2"]) == 0
    assert (tmp_path / "last.pt").read_bytes() != saved["last.pt"]


def test_file_system_errors_are_one_line(tiny_dataset, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert train.main([f"data_dir={tiny_dataset}", f"out_dir={tmp_path / 'afile' / 'run'}", "max_iters=1"]) == 2
    assert "Not a directory" in one_line_error(capsys.readouterr().err)
    assert train.main(["--config", str(tmp_path)]) == 2  # a folder, not a TOML file
    assert "Is a directory" in one_line_error(capsys.readouterr().err)
    (tmp_path / "latin1.toml").write_bytes("[train]\nout_dir = 'caf\xe9'\n".encode("latin-1"))
    assert train.main(["--config", str(tmp_path / "latin1.toml")]) == 2
    assert "latin1.toml: not valid TOML" in one_line_error(capsys.readouterr().err)


def test_train_bad_input_through_the_real_cli(tmp_path):
    result = run_cli("train.py", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "config file not found" in one_line_error(result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "top-p", "--top-p", "1.5"], "top_p"),
        (["--strategy", "top-p", "--top-p", "0"], "top_p"),
        (["--strategy", "top-k", "--top-k", "0"], "top_k"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0"),
        (["--strategy", "greedy", "--top-k", "5"], "does nothing with greedy"),
        (["--strategy", "beam", "--temperature", "0.5"], "does nothing with beam search"),
        (["--stop", ""], "stop string must not be empty"),
        (["--strategy", "greedy", "--temperature", "0.7"],
         "--temperature 0.7 would turn --strategy greedy (greedy decoding) into sampling"),
        (["--strategy", "top-p", "--temperature", "0"],
         "--temperature 0.0 would turn --strategy top-p (sampling) into greedy decoding"),
        (["--strategy", "beam", "--num-beams", "1"], "--num-beams 1 would turn --strategy beam (beam search) into"),
        (["--strategy", "greedy", "--num-beams", "3"], "--num-beams 3 would turn --strategy greedy"),
        (["--strategy", "greedy", "--num-samples", "2"], "greedy decoding ignores the seed: --num-samples 2"),
        (["--strategy", "beam", "--num-samples", "3"], "beam search ignores the seed"),
        (["--seed", "-1"], "the seed must be in [0, 9223372036854775807]"),
        (["--seed", str(2**63 - 2), "--prompt", "a", "--prompt", "b", "--num-samples", "2"],
         "the seed must be in [0, 9223372036854775804]"),
        (["--logprobs", "/nonexistent/dir/x.jsonl"], "No such file or directory"),
        (["--strategy", "top-p:p=0.9", "--top-p", "0.5"], "--top-p sets what --strategy top-p:p=0.9 already sets"),
        (["--prompt", "ünïcödé→"], "prompt has characters the char tokenizer never saw: 'ü', 'ï'"),
        (["--strategy", "nucleus"], "unknown decoding strategy 'nucleus'"),
        (["--explain", "--num-samples", "2"], "--explain shows one sample"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found"),
    ],
)
def test_sample_bad_input(args, message, tiny_checkpoint, capsys):
    code = sample.main([str(tiny_checkpoint), "--max-new-tokens", "3", *args])
    assert code == 2
    captured = capsys.readouterr()
    assert message in one_line_error(captured.err)
    assert captured.out == ""  # refused before anything was printed


@pytest.mark.parametrize("args, expected", [
    (["--strategy", "top-k", "--top-k", "20", "--temperature", "0.8"], {"top_k": 20, "temperature": 0.8}),
    (["--strategy", "top-p:p=0.95", "--temperature", "0.7"], {"top_p": 0.95, "temperature": 0.7}),
    (["--strategy", "greedy", "--repetition-penalty", "1.3"], {"temperature": 0.0, "repetition_penalty": 1.3}),
    (["--strategy", "beam", "--num-beams", "8"], {"num_beams": 8, "temperature": 1.0}),
    (["--strategy", "top-p", "--top-k", "40"], {"top_p": 0.9, "top_k": 40}),
])
def test_flags_tune_the_strategy_named(args, expected):
    spec = sample.spec_from_args(sample.parse_args(["ckpt.pt", *args]))
    assert {name: getattr(spec, name) for name in expected} == expected


def test_sample_bad_checkpoints(tmp_path, tiny_checkpoint, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not a checkpoint at all")
    for path, message in [
        (tmp_path / "missing.pt", "checkpoint not found"),
        (truncated, "truncated or corrupt"),
        (foreign, str(foreign)),
    ]:
        assert sample.main([str(path)]) == 2
        assert message in one_line_error(capsys.readouterr().err)


def test_sample_bad_checkpoint_through_the_real_cli(tmp_path):
    result = run_cli("sample.py", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "checkpoint not found" in one_line_error(result)


def test_empty_prompt_is_allowed(tiny_checkpoint, capsys):
    assert sample.main([str(tiny_checkpoint), "--prompt", "", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out) > 0


def test_explain_and_logprobs(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "lp.jsonl"
    code = sample.main([str(tiny_checkpoint), "--prompt", "The", "--max-new-tokens", "4", "--strategy",
                        "top-k", "--top-k", "3", "--explain", "--top", "4", "--logprobs", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("step ") == 4 and "filtered" in out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    # Each step's numbers against a plain forward pass over the prompt and the tokens so far.
    model, tokenizer, _ = load_for_generation(tiny_checkpoint, torch.device("cpu"))
    ids = tokenizer.encode("The")
    for record in records:
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([ids]))[0][0, -1], dim=-1)
        top = logprobs.topk(4)
        assert [t["token"] for t in record["top"]] == top.indices.tolist()
        assert [t["logprob"] for t in record["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert record["logprob"] == pytest.approx(logprobs[record["token"]].item(), abs=1e-5)
        assert record["token"] in top.indices[:3].tolist()  # top-k 3 chose it
        assert record["text"] == tokenizer.decode([record["token"]])
        ids.append(record["token"])


def test_tiktoken_encoding_offline_gives_a_clear_message(tmp_path, tiny_corpus):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "data/prepare.py", str(tiny_corpus), "--tokenizer", "tiktoken:gpt2", "--out",
         str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    line = one_line_error(result)
    assert "could not download https://" in line  # names the file to fetch elsewhere...
    assert str(tmp_path / "empty-cache") in line  # ...and exactly where to put it


def sigint_as_from_a_terminal() -> None:
    """Run in the child before exec: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt as it does under a terminal, even where the tests themselves run with
    SIGINT ignored (a background job), which the child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a subprocess of its own: kept out of the 2-minute default suite
def test_ctrl_c_stops_sampling_cleanly_and_keeps_the_text(tiny_checkpoint):
    process = subprocess.Popen(
        [sys.executable, "sample.py", str(tiny_checkpoint), "--prompt", "The", "--max-new-tokens", "1000000",
         "--window", "shift"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    shown = process.stdout.read(40)  # wait until text is streaming
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (shown + rest).startswith("The") and "Traceback" not in stderr and "interrupted" in stderr


@pytest.mark.slow  # a subprocess of its own: kept out of the 2-minute default suite
def test_a_reader_that_stops_reading_ends_the_output_quietly(tiny_checkpoint):
    # `sample.py ... | head -c 5`: once head exits, the next write fails with a broken pipe
    # (2000 steps of --explain tables are far more than a pipe buffer holds)
    command = (f"{sys.executable} sample.py {tiny_checkpoint} --max-new-tokens 2000 --explain --strategy top-k "
               "| head -c 5; echo \" ${PIPESTATUS[0]}\"")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stderr == ""  # no "error: [Errno 32] Broken pipe", no traceback
    assert result.stdout.endswith(" 141\n")  # the status of a process stopped by SIGPIPE


def test_generate_is_the_default_command(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    flags = ["--prompt", "The", "--max-new-tokens", "8", "--seed", "3"]
    assert sample.main([str(tiny_checkpoint), *flags]) == 0
    default = capsys.readouterr().out
    assert sample.main(["generate", str(tiny_checkpoint), *flags]) == 0
    assert capsys.readouterr().out == default and default.startswith("The")
    # A checkpoint file named like a command is reached by its path.
    named = tmp_path / "compare"
    named.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert sample.main(["./compare", *flags]) == 0
    assert capsys.readouterr().out == default


def test_a_command_is_one_function(monkeypatch, capsys):
    def add_echo_command(commands):
        parser = sample.add_command(commands, "echo", lambda args: print(args.word), help="print a word")
        parser.add_argument("word")

    monkeypatch.setattr(sample, "COMMANDS", (*sample.COMMANDS, add_echo_command))
    assert sample.main(["echo", "hello"]) == 0
    assert capsys.readouterr().out == "hello\n"
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("generate", "compare", "echo"))


def test_explain_shows_small_probabilities_in_scientific_form():
    # with a 50k vocabulary most candidates are below 0.001: three decimals would print 0.000
    assert sample.probability(math.log(0.25)) == "0.250"
    assert sample.probability(math.log(0.001)) == "0.001"
    assert sample.probability(math.log(3.14e-5)) == "3.1e-05"
    assert sample.probability(-math.inf) == "0.000"


def test_help_shows_each_default_once_and_never_none():
    parser = sample.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            shown = command._get_formatter()._expand_help(action) if action.help else ""
            assert "(default: None)" not in shown and "(default: [])" not in shown, (name, action.dest)
            assert shown.count("(default") <= 1, (name, action.dest, shown)


def test_info_shows_what_a_checkpoint_holds(tiny_checkpoint, capsys):
    assert sample.main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    checkpoint = read_checkpoint(tiny_checkpoint)
    assert out.splitlines()[0] == str(tiny_checkpoint)
    assert "model: 0.03M parameters, 2 layers, 2 heads, width 32, context 32, vocab 35, learned positions" in out
    assert "tokenizer: char, 35 tokens (end-of-text is id 34)" in out
    assert f"trained: step {checkpoint.step}, best val loss {checkpoint.best_val_loss:.4f}" in out
    assert f"data: {checkpoint.config.train.data_dir}" in out
