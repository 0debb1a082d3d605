"""The strategy comparison (model/compare.py) and its command, `python sample.py compare`."""

from __future__ import annotations

import builtins
import csv
import json
import math
import re
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sample
from model import metrics
from model.compare import (
    DEFAULT_GRID,
    LOOP_REPEATS,
    ROW_FIELDS,
    Run,
    is_stuck,
    loop_prompt,
    prompt_totals,
    draw_prompt_starts,
    parse_grid,
    row_metrics,
    run_comparison,
    text_units,
    val_prompts,
)
from model.data import open_split, read_meta
from model.strategy import parse_strategy
from model.errors import UserError
from model.generate import Sample, generate, replay
from model.score import score_continuations
from model.gpt import GPT
from model.tokenizer import CharTokenizer
from model.compare import format_table
from model.plot import plot_comparison
from tests.conftest import ROOT, one_line_error, run_cli, tiny_config

CHARS = CharTokenizer("abc \n")  # ids: "\n"=0, " "=1, a=2, b=3, c=4, end-of-text=5


# ----------------------------------------------------------------------------- the grid


def test_default_grid_parses_to_distinct_strategies():
    grid = parse_grid(DEFAULT_GRID)
    assert [spec.label for spec in grid] == list(DEFAULT_GRID)


def test_bare_names_take_the_sampling_defaults():
    labels = [spec.label for spec in parse_grid(["top-k", "top-p", "beam", "temperature"])]
    assert labels == ["top-k:k=40", "top-p:p=0.9", "beam:n=4", "temperature:t=0.7"]


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "the strategy grid is empty"),
        (["greedy", "top-p:p=0.9", "top-p:t=1,p=0.9"], "'top-p:t=1,p=0.9' is in the grid twice (as 'top-p:p=0.9')"),
        (["nucleus"], "unknown decoding strategy 'nucleus'"),
        (["top-p:p=1.5"], "top_p=1.5 is out of range"),
        (["beam:n=1"], "beam search needs n >= 2"),
        (["top-k", "top-k:k=40"], "'top-k:k=40' is in the grid twice (as 'top-k:k=40')"),
    ],
)
def test_grid_errors(specs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_grid(specs)


# ----------------------------------------------------------------------------- prompts and the human row


def eligible_line_starts(tokens, prompt_tokens, span, eot):
    """Plainly: starts whose window fits, whose prompt has no end-of-text, at a line or document start."""
    return {
        p for p in range(len(tokens) - span + 1)
        if eot not in tokens[p : p + prompt_tokens] and (p == 0 or tokens[p - 1] in (0, eot))
    }


def test_prompt_starts_are_line_starts_with_room_and_no_end_of_text():
    text = "ab c\nba\ncab\nc a\nbb\naa c\n"
    tokens = CHARS.encode(text)
    tokens[13] = CHARS.eot_id  # the space of "c a" becomes a document boundary
    expected = eligible_line_starts(tokens, 3, 7, CHARS.eot_id)
    # 24 tokens. Line starts: 0, 5, 8, 12 (after "\n"), 14 (after the end-of-text), 16, 19.
    # 19 leaves no room for 3 + 4 tokens; 12's prompt "c", end-of-text, "a" holds end-of-text.
    assert expected == {0, 5, 8, 14, 16}
    starts = draw_prompt_starts(np.array(tokens), CHARS, 5, 3, 4, seed=0)
    assert set(starts) == expected and starts == sorted(starts)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(6)), min_size=10, max_size=60), st.integers(0, 3), st.integers(0, 10**6))
def test_prompt_starts_property(tokens, want, seed):
    prompt_tokens, continuation = 2, 3
    line_starts = eligible_line_starts(tokens, prompt_tokens, prompt_tokens + continuation, CHARS.eot_id)
    any_start = {
        p for p in range(len(tokens) - prompt_tokens - continuation + 1) if CHARS.eot_id not in tokens[p : p + 2]
    }
    if len(any_start) < want:
        with pytest.raises(UserError, match="fewer than the"):
            draw_prompt_starts(np.array(tokens), CHARS, want, prompt_tokens, continuation, seed)
        return
    starts = draw_prompt_starts(np.array(tokens), CHARS, want, prompt_tokens, continuation, seed)
    assert len(set(starts)) == want
    assert set(starts) <= (line_starts if len(line_starts) >= want else any_start)
    assert starts == draw_prompt_starts(np.array(tokens), CHARS, want, prompt_tokens, continuation, seed)


def test_human_rows_are_the_validation_text_after_each_prompt(tiny_dataset):
    meta = read_meta(tiny_dataset)
    tokenizer = CharTokenizer(meta["tokenizer"]["chars"])
    val = [int(t) for t in open_split(tiny_dataset, "val", meta)]
    prompts, human, starts = val_prompts(str(tiny_dataset), meta["tokenizer"], tokenizer, 5, 12, 30, seed=3)
    assert len(prompts) == len(human) == len(starts) == 5
    for prompt, continuation, start in zip(prompts, human, starts):
        assert start == 0 or tokenizer.decode([val[start - 1]]) == "\n"
        assert prompt == val[start : start + 12]  # token ids, as the split has them
        assert continuation == val[start + 12 : start + 42]
    assert val_prompts(str(tiny_dataset), meta["tokenizer"], tokenizer, 5, 12, 30, seed=3)[2] == starts
    with pytest.raises(UserError, match="another tokenizer than the checkpoint"):
        val_prompts(str(tiny_dataset), CHARS.state(), CHARS, 5, 12, 30, seed=3)


def test_a_continuation_ends_like_a_generated_sample():
    ids = CHARS.encode("ab c\nba")
    at_eot = replay(CHARS, ids[:3] + [CHARS.eot_id] + ids[3:])
    assert (at_eot.tokens, at_eot.text, at_eot.finish) == (ids[:3] + [CHARS.eot_id], "ab ", "eot")
    at_stop = replay(CHARS, ids, ["c\n"], prompt_index=2)
    # The token that completes the stop string is kept, its text is not (as in generate).
    assert (at_stop.tokens, at_stop.text, at_stop.finish, at_stop.prompt_index) == (ids[:5], "ab ", "stop", 2)
    whole = replay(CHARS, ids, ["x"])
    assert (whole.tokens, whole.text, whole.finish) == (ids, "ab c\nba", "length")


def test_scores_equal_a_plain_forward_pass():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=CHARS.vocab_size, block_size=16)).eval()
    prompts = [[2, 3, 1], [4]]
    continuations = [[4, 0, 2, 2], [3, 5]]  # different lengths; the second ends on end-of-text
    scores = score_continuations(model, prompts, continuations)
    for prompt, continuation, got in zip(prompts, continuations, scores):
        full = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logprobs = F.log_softmax(model(full)[0][0], dim=-1)
        # Token t of the continuation is predicted at position len(prompt) - 1 + t.
        expected = [logprobs[len(prompt) - 1 + t, token].item() for t, token in enumerate(continuation)]
        assert got == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- units and metrics


def test_words_and_tokens():
    text = "Hark, the king's men!\nGo on"
    cut = Sample(0, 0, tokens=[1, 2, 5], text=text, finish="length")
    # "on" may have been cut mid-word by the length limit: dropped.
    assert text_units(cut, "words") == ["Hark", ",", "the", "king", "'", "s", "men", "!", "Go"]
    ended = Sample(0, 0, tokens=[1, 2, 5], text=text, finish="eot")
    assert text_units(ended, "words")[-1] == "on"
    assert text_units(Sample(0, 0, text="Go on.", finish="length"), "words") == ["Go", "on", "."]
    assert text_units(ended, "tokens") == [1, 2]  # the final end-of-text is not text
    assert text_units(cut, "tokens") == [1, 2, 5]


def test_row_metrics_by_hand():
    units = [[["a", "b"], ["a", "b"]], [["c", "d"], ["a", "b"]]]  # 2 prompts x 2 samples
    samples = [
        Sample(0, 0, tokens=[1, 2], logprobs=[math.log(0.5), math.log(0.5)], finish="length"),
        Sample(0, 1, tokens=[1, 9], logprobs=[math.log(0.25), math.log(1.0)], finish="eot"),
    ]
    row = row_metrics(units, samples)
    # distinct-1 per draw: s=0 pools "a b" + "c d" -> 4/4; s=1 pools "a b" + "a b" -> 2/4; mean 0.75.
    assert row["distinct_1"] == pytest.approx(0.75)
    # bigrams: s=0 ab, cd -> 2/2; s=1 ab, ab -> 1/2; mean 0.75. No sample has a trigram: nan.
    assert row["distinct_2"] == pytest.approx(0.75) and math.isnan(row["distinct_3"])
    # mean log p = (ln .5 + ln .5 + ln .25 + 0) / 4 = -ln 2, so perplexity 2.
    assert row["perplexity"] == pytest.approx(2.0)
    assert row["end_rate"] == 0.5 and row["mean_tokens"] == 2 and row["mean_units"] == 2
    # Zipf per draw: s=0 counts 1,1,1,1 (flat: 0); s=1 counts 2,2 (flat: 0).
    assert row["zipf"] == pytest.approx(0.0)
    assert math.isnan(row["bits_per_byte"])  # no byte lengths given
    # tokens 1 and 2 stand for 1 and 3 bytes, 9 (end-of-text) for none: 1 + 3 + 1 + 0 = 5 bytes
    lengths = torch.zeros(10, dtype=torch.int64)
    lengths[1], lengths[2] = 1, 3
    with_bytes = row_metrics(units, samples, lengths)
    # total nats 4 ln 2 (= -(ln .5 + ln .5 + ln .25 + 0)) over 5 bytes: 4/5 bit a byte
    assert with_bytes["bits_per_byte"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------- the whole comparison


def plain_words(text: str, finish: str) -> list[str]:
    words = re.findall(r"\w+|[^\w\s]", text)
    if finish == "length" and text and (text[-1].isalnum() or text[-1] == "_"):
        words = words[:-1]
    return words


@pytest.fixture(scope="module")
def compared(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", str(tiny_checkpoint), "-s", "greedy", "-s", "beam:n=2", "-s", "top-p:p=0.9,t=1.5",
            "--num-prompts", "3", "--prompt-tokens", "8", "--num-samples", "3", "--max-new-tokens", "25",
            "--seed", "7", "--out", str(out), "--no-progress"]
    assert sample.main(argv) == 0
    return out


def test_numbers_equal_the_metrics_of_the_samples_written(compared):
    results = json.loads((compared / "results.json").read_text())
    records = [json.loads(line) for line in (compared / "samples.jsonl").read_text().splitlines()]
    assert [row["strategy"] for row in results["rows"]] == ["human", "greedy", "beam:n=2", "top-p:p=0.9,t=1.5"]
    for row in results["rows"]:
        mine = [r for r in records if r["strategy"] == row["strategy"]]
        deterministic = row["strategy"] in ("greedy", "beam:n=2")
        per_prompt = 1 if row["strategy"] == "human" else 3
        assert len(mine) == 3 * (1 if deterministic else per_prompt)
        assert all(r["same_for_every_seed"] == deterministic for r in mine)
        groups = [[plain_words(r["text"], r["finish"]) for r in mine if r["prompt_index"] == p] for p in range(3)]
        if deterministic:
            groups = [group * 3 for group in groups]  # the one text stands for every seed's sample
        draws = [[group[s] for group in groups] for s in range(per_prompt)]
        token_groups = [[r["tokens"][:-1] if r["finish"] == "eot" else r["tokens"] for r in mine
                         if r["prompt_index"] == p] * (3 if deterministic else 1) for p in range(3)]
        logprobs = [lp for r in mine for lp in r["logprobs"]]
        expected = {
            "perplexity": metrics.perplexity(logprobs),
            "distinct_2": np.mean([metrics.distinct_n(draw, 2) for draw in draws]),
            "repetition": metrics.repetition_rate([units for group in groups for units in group]),
            "self_bleu": (
                None if per_prompt == 1 else np.mean([metrics.self_bleu(group) for group in groups])
            ),
            "self_bleu_tokens": (
                None if per_prompt == 1 else np.mean([metrics.self_bleu(group) for group in token_groups])
            ),
            "mean_tokens": np.mean([len(r["tokens"]) for r in mine]),
            "end_rate": np.mean([r["finish"] != "length" for r in mine]),
        }
        for key, value in expected.items():
            assert row[key] == (None if value is None else pytest.approx(value)), (row["strategy"], key)
        for r in mine:
            assert len(r["tokens"]) == len(r["logprobs"]) <= 25
    human = [r for r in records if r["strategy"] == "human"]
    assert [r["seed"] for r in human] == [None] * 3
    sampled = [r for r in records if r["strategy"] == "top-p:p=0.9,t=1.5"]
    # seed + prompt * num_samples + sample: 7, 8, 9 | 10, 11, 12 | 13, 14, 15, never shared between prompts
    assert [r["seed"] for r in sampled] == list(range(7, 16))
    greedy = [r for r in results["rows"] if r["strategy"] == "greedy"][0]
    greedy_words = [plain_words(r["text"], r["finish"]) for r in records if r["strategy"] == "greedy"]
    assert all(len(words) >= 4 for words in greedy_words)  # long enough to have 4-grams to match...
    assert greedy["self_bleu"] == 1.0  # ...so the identical samples of a prompt score exactly 1


def test_output_files(compared):
    with (compared / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ROW_FIELDS and len(rows) == 4
    markdown = (compared / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| strategy | ppl |") and len(markdown) == 2 + 4
    assert (compared / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings_written = json.loads((compared / "results.json").read_text())["settings"]
    assert settings_written["num_samples"] == 3 and settings_written["human_row"] is True


def test_given_prompts_have_no_human_row(tiny_checkpoint, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The quick\n\nA small\n")
    argv = ["compare", str(tiny_checkpoint), "-s", "greedy", "-s", "sample", "--prompt", "Sphinx",
            "--prompt-lines", str(prompts_file), "--num-samples", "2", "--max-new-tokens", "5", "--no-progress"]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 prompts x 2 samples (greedy and beam: 1" in out and "no human row" in out
    assert re.search(r"^greedy ", out, re.M) and not re.search(r"^human ", out, re.M)
    # under the table, prompt 1 and each row's first sample: the text the numbers describe
    comparison_text = out.split("the first sample of each row")[1].splitlines()[1:4]
    assert comparison_text[0].split() == ["prompt", "1", "Sphinx"]
    assert [line.split()[0] for line in comparison_text[1:]] == ["greedy", "sample"]


def test_table_shows_missing_values_as_a_dash():
    row = dict.fromkeys(ROW_FIELDS, math.nan) | {"strategy": "human", "perplexity": 12.345, "repetition": 0.25}
    header, line = format_table([row]).splitlines()
    assert header.split()[:4] == ["strategy", "ppl", "bpb", "dist-1"]
    assert line.split()[:4] == ["human", "12.35", "-", "-"] and "25.0" in line.split()


def test_chart_without_matplotlib_is_skipped(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):  # as if it were not installed, even if imported before
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_comparison([], tmp_path / "chart.png") is False
    assert not (tmp_path / "chart.png").exists()


def test_run_comparison_seeds_match_plain_generation(tiny_checkpoint):
    from model.checkpoint import load_checkpoint, model_from_checkpoint
    from model.generate import generate
    from model.tokenizer import tokenizer_from_state

    payload = load_checkpoint(tiny_checkpoint)
    model, tokenizer = model_from_checkpoint(payload).eval(), tokenizer_from_state(payload["tokenizer"])
    spec = parse_strategy("top-k:k=5")
    comparison = run_comparison(model, tokenizer, ["The", "A"], [spec], num_samples=2, max_new_tokens=6,
                                seed=11, progress=False)
    # Prompt 1's samples have seeds 11 + 1 * 2 + s, as a plain generate call with base seed 13 gives them.
    alone = generate(model, tokenizer, ["A"], spec, max_new_tokens=6, num_samples=2, seed=13)
    assert [s.tokens for s in comparison.runs[0].samples[2:]] == [s.tokens for s in alone]
    assert [(s.prompt_index, s.sample_index) for s in comparison.runs[0].samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]


# ----------------------------------------------------------------------------- command-line errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "nucleus"], "unknown decoding strategy 'nucleus'"),
        (["-s", "greedy", "-s", "greedy"], "is in the grid twice"),
        (["-s", "top-k:k=0"], "top_k=0 is invalid"),
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--stop", ""], "stop string must not be empty"),
        (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data is not a folder"),
        (["--num-prompts", "100000"], "fewer than the 100000 prompts asked for"),
        (["--prompt-lines", "/nonexistent/prompts.txt"], "prompts file not found"),
        (["--prompt", "ünïcödé"], "prompt has characters the char tokenizer never saw"),
        (["--prompt", "The", "--prompt-tokens", "8"], "--prompt-tokens is for prompts drawn from the validation"),
    ],
)
def test_compare_bad_input(args, message, tiny_checkpoint, capsys):
    code = sample.main(["compare", str(tiny_checkpoint), "--max-new-tokens", "3", "--no-progress", *args])
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_compare_bad_out_fails_before_the_grid_runs(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = sample.main(["compare", str(tiny_checkpoint), "--max-new-tokens", "3", "--no-progress",
                        "--out", str(tmp_path / "afile")])
    captured = capsys.readouterr()
    assert code == 2 and "File exists" in one_line_error(captured.err)
    assert captured.out == ""  # no table: nothing was generated


def test_compare_bad_input_through_the_real_cli(tmp_path):
    result = run_cli("sample.py", "compare", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "checkpoint not found" in one_line_error(result)


# ----------------------------------------------------------------------------- byte-level BPE prompts


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory):
    """A random tiny model with a byte-level BPE over lines that all begin with '€' (3 bytes),
    so a 1-token prompt drawn from a line start ends inside that character."""
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig, load_config

    sys.path.insert(0, str(ROOT / "data"))
    from prepare import prepare

    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "euros.txt"
    corpus.write_text("".join(f"€ {'ab' * 20}\n" for i in range(300)), encoding="utf-8")  # merges go to 'ab'
    meta = prepare([str(corpus)], root / "data", "bpe", vocab_size=260, progress=False)
    config = load_config(None, [f"data_dir={root / 'data'}", "n_layer=1", "n_head=2", "n_embd=16",
                                "block_size=16"]).to_dict()
    config["model"]["vocab_size"] = meta["vocab_size"]
    torch.manual_seed(0)
    model = GPT(ModelConfig(**config["model"])).eval()
    save_checkpoint(root / "model.pt", model=model, config=config, tokenizer=meta["tokenizer"])
    return root / "model.pt", model


def test_drawn_prompts_reach_the_model_as_the_splits_token_ids(bpe_checkpoint, tmp_path):
    from model.tokenizer import tokenizer_from_state

    path, model = bpe_checkpoint
    payload = torch.load(path, weights_only=True)
    tokenizer = tokenizer_from_state(payload["tokenizer"])
    prompt = tokenizer.encode("€")[:1]  # every line starts with this token: the start of '€', not all of it
    assert len(tokenizer.encode("€")) > 1 and tokenizer.encode(tokenizer.decode(prompt)) != prompt
    argv = ["compare", str(path), "-s", "greedy", "--num-prompts", "2", "--prompt-tokens", "1", "--num-samples",
            "1", "--max-new-tokens", "6", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    assert sample.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    greedy = [r for r in records if r["strategy"] == "greedy"]
    # By hand: greedy decoding with plain forward passes from the prompt's own token id.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert len(greedy) == 2 and all(r["tokens"] == ids[1:] for r in greedy)
    # The human text is scored after the same prompt ids.
    for record in (r for r in records if r["strategy"] == "human"):
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([prompt + record["tokens"]]))[0][0], dim=-1)
        expected = [logprobs[t, token].item() for t, token in enumerate(record["tokens"])]
        assert record["logprobs"] == pytest.approx(expected, abs=1e-5)


def test_compare_speed_bench_runs(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """bench/compare_speed.py end to end (in-process) with tiny settings, so the bench cannot silently break."""
    out = tmp_path / "compare_speed.json"
    monkeypatch.setattr(sys, "argv", ["compare_speed.py", str(tiny_checkpoint), "--num-prompts", "2",
                                      "--max-new-tokens", "4", "--out", str(out)])
    runpy.run_path(str(ROOT / "bench" / "compare_speed.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "wall time" in printed and re.search(r"^top-p:p=0\.9 ", printed, re.M)
    record = json.loads(out.read_text())
    assert list(record["rows"]) == list(DEFAULT_GRID[:6])
    assert all(row["seconds"] > 0 and row["tokens_per_s"] > 0 for row in record["rows"].values())


def test_loops_of_spaces_and_of_word_pieces_show_in_the_token_repetition():
    # Token ids stand for BPE pieces here: 7 = " ", 8 = "ab", 9 = "cd", 10 = "ef".
    spaces = Sample(0, 0, tokens=[3, 4, 5] + [7] * 12, text="the dog ran" + " " * 12, finish="length")
    pieces = Sample(0, 1, tokens=[3] + [8, 9, 10] * 4, text="the " + "abcdef" * 4, finish="length")
    plain = Sample(0, 2, tokens=[3, 4, 5, 6, 9], text="the dog ran off home", finish="eot")
    samples = [spaces, pieces, plain]
    words = [[text_units(s, "words") for s in samples]]
    row = row_metrics(words, samples)
    assert row["repetition"] == 0.0  # no words in the spaces, one long word in the pieces: words miss both
    assert row["repetition_tokens"] == pytest.approx(2 / 3)
    looped = Sample(0, 0, tokens=[8, 9, 10, 8, 9, 10, 99], text="abcdefabcdef", finish="eot")
    assert row_metrics([[["x"]]], [looped])["repetition_tokens"] == 1.0  # the end-of-text token is not in the loop


# ----------------------------------------------------------------------------- judge, escape, per-prompt totals


def test_loop_prompt_and_stuck_by_hand():
    assert loop_prompt([9, 1, 2, 3, 4]) == [9, 1, 2, 3, 4] + [1, 2, 3, 4] * LOOP_REPEATS
    assert loop_prompt([7, 8]) == [7, 8] + [7, 8] * LOOP_REPEATS  # shorter than the loop: all of it repeats
    unit = [1, 2, 3, 4]
    # the loop continued, mean NLL (0.5 + 1.3) / 2 = 0.9 < 1 nat: stuck; (0.5 + 1.6) / 2 = 1.05: not
    assert is_stuck(Sample(0, 0, tokens=[1, 2], logprobs=[-0.5, -1.3]), unit)
    assert not is_stuck(Sample(0, 0, tokens=[1, 2], logprobs=[-0.5, -1.6]), unit)
    # confident but leaving the loop: 3 of 5 tokens (60% < 75%) continue it, so not stuck
    assert not is_stuck(Sample(0, 0, tokens=[1, 2, 3, 9, 9], logprobs=[-0.1] * 5), unit)
    assert is_stuck(Sample(0, 0, tokens=[1, 2, 3, 4, 9], logprobs=[-0.1] * 5), unit)  # 4 of 5: 80%
    assert not is_stuck(Sample(0, 0, tokens=[2, 3, 4, 1], logprobs=[-0.1] * 4), unit)  # out of step with it
    assert not is_stuck(Sample(0, 0), unit)  # no tokens: nothing followed the loop


def test_prompt_totals_by_hand():
    samples = [
        Sample(0, 0, tokens=[1, 2, 3], text="a b a b", logprobs=[-1.0, -2.0, -3.0], finish="eot"),
        Sample(1, 0, tokens=[4, 5], text="c c c", logprobs=[-0.5, -0.5], finish="eot"),
    ]
    escapes = [Sample(0, 0, tokens=[1], logprobs=[-0.1]), Sample(1, 0, tokens=[1], logprobs=[-3.0])]
    run = Run("x", parse_strategy("sample"), samples, 1.0, judge_logprobs=[[-2.0, -2.0, -2.0], [-1.0, -3.0]],
              escapes=escapes, loop_units=[[1, 2, 3, 4], [1, 2, 3, 4]])
    totals = prompt_totals(run, 2, "words").values
    assert totals["nll"] == ([6.0, 1.0], [3.0, 2.0])
    assert totals["judge_nll"] == ([6.0, 4.0], [3.0, 2.0])
    # bigrams of "a b a b": ab, ba, ab -> 2/3; of "c c c": cc, cc -> 1/2
    assert totals["distinct_2"][0] == pytest.approx([2 / 3, 1 / 2]) and totals["distinct_2"][1] == [1.0, 1.0]
    assert totals["stuck"] == ([1.0, 0.0], [1.0, 1.0])
    assert set(prompt_totals(Run("h", None, samples, None), 2, "words").values) == {"nll", "distinct_2"}


@pytest.fixture(scope="module")
def two_models():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=CHARS.vocab_size, block_size=32)).eval()
    judge = GPT(tiny_config(vocab_size=CHARS.vocab_size, block_size=32, n_embd=32)).eval()
    return model, judge


def test_the_judge_scores_every_sample_like_a_plain_forward_pass(two_models):
    model, judge = two_models
    prompts = [[2, 3, 1], [4, 4]]
    comparison = run_comparison(model, CHARS, prompts, [parse_strategy("sample")],
                                human=[[2, 2, 3, 1], [0, 1, 2, 3]], num_samples=2, max_new_tokens=6, seed=5,
                                judge=judge, progress=False)
    for run, row in zip(comparison.runs, comparison.rows):
        everything = []
        for sample, got in zip(run.samples, run.judge_logprobs):
            ids = torch.tensor([prompts[sample.prompt_index] + sample.tokens])
            with torch.no_grad():
                logprobs = F.log_softmax(judge(ids)[0][0], dim=-1)
            start = len(prompts[sample.prompt_index]) - 1
            expected = [logprobs[start + t, token].item() for t, token in enumerate(sample.tokens)]
            assert got == pytest.approx(expected, abs=1e-5)
            everything += expected
        assert row["judge_nll"] == pytest.approx(-np.mean(everything), abs=1e-5)
    assert "judge NLL" in format_table(comparison.rows) and "stuck" not in format_table(comparison.rows)


def test_the_judge_reads_a_sample_longer_than_its_context_through_the_window(two_models):
    from model.compare import judge_scores

    _, judge = two_models  # the judge's context is 32 tokens
    prompts = [[2, 3, 1], [4]]
    rng = np.random.default_rng(0)
    samples = [Sample(p, 0, tokens=rng.integers(0, 5, n).tolist()) for p, n in ((0, 40), (1, 25))]
    assert len(prompts[0]) + len(samples[0].tokens) > 32  # past the judge's context: through the window
    expected = score_continuations(judge, prompts, [s.tokens for s in samples], valid_vocab=CHARS.vocab_size)
    assert judge_scores(judge, CHARS, prompts, samples, "exact") == expected
    # rows that fit: the one-pass path and the token loop's teacher forcing agree
    short = [Sample(p, 0, tokens=s.tokens[:20]) for p, s in enumerate(samples)]
    looped = score_continuations(judge, prompts, [s.tokens for s in short], valid_vocab=CHARS.vocab_size)
    for got, want in zip(judge_scores(judge, CHARS, prompts, short, "exact", batch_size=1), looped):
        assert got == pytest.approx(want, abs=1e-5)


def test_escape_prompts_continue_the_loop_with_the_same_seeds(two_models):
    model, _ = two_models
    prompts, spec = [[2, 3, 1, 4, 0], [4, 4, 2, 3, 1]], parse_strategy("top-k:k=3,t=0.5")
    comparison = run_comparison(model, CHARS, prompts, [spec], human=[[1] * 4, [2] * 4], num_samples=2,
                                max_new_tokens=4, seed=3, escape_tokens=7, progress=False)
    run = comparison.runs[1]
    alone = generate(model, CHARS, [loop_prompt(p) for p in prompts], spec, num_samples=2, seed=3,
                     max_new_tokens=7)
    assert [s.tokens for s in run.escapes] == [s.tokens for s in alone]
    stuck = np.mean([-np.mean(s.logprobs) < 1.0 for s in alone])
    assert comparison.rows[1]["stuck"] == pytest.approx(stuck)
    assert math.isnan(comparison.rows[0]["stuck"])  # the human row has no loop to escape
    header = format_table(comparison.rows).splitlines()[0]
    assert header.split()[-2:] == ["stuck", "%"]


@pytest.fixture(scope="module")
def swept(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    argv = ["compare", str(tiny_checkpoint), "--sweep", "temperature:t=0.6|1.4;top-k:k=3|12", "--judge",
            str(tiny_checkpoint), "--num-prompts", "4", "--prompt-tokens", "8", "--num-samples", "2",
            "--max-new-tokens", "16", "--escape-tokens", "6", "--bootstrap", "40", "--seed", "3", "--units", "words",
            "--out", str(out), "--no-progress"]
    assert sample.main(argv) == 0
    return out


def test_a_sweep_counts_tokens_unless_told(tiny_checkpoint, tmp_path):
    # one sample's distinct-2 of words is near 1 at every setting, which would flatten the frontier
    argv = ["compare", str(tiny_checkpoint), "--sweep", "temperature:t=0.7|1", "--num-prompts", "2", "--prompt-tokens",
            "8", "--num-samples", "1", "--max-new-tokens", "8", "--bootstrap", "5", "--out", str(tmp_path),
            "--no-progress"]
    assert sample.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["units"] == "tokens"


def test_sweep_numbers_equal_the_samples_written(swept):
    summary = json.loads((swept / "sweep.json").read_text())
    records = [json.loads(line) for line in (swept / "samples.jsonl").read_text().splitlines()]
    assert [f["family"] for f in summary["families"]] == ["temperature", "top-k"]
    labels = ["human", "temperature:t=0.6", "temperature:t=1.4", "top-k:k=3", "top-k:k=12"]
    assert [r["strategy"] for r in json.loads((swept / "results.json").read_text())["rows"]] == labels

    def statistics(label):
        mine = [r for r in records if r["strategy"] == label]
        judged = [lp for r in mine for lp in r["judge_logprobs"]]
        # the judge is the generator itself here: it gives each token the logprob generate recorded
        assert judged == pytest.approx([lp for r in mine for lp in r["logprobs"]], abs=1e-4)
        words = [plain_words(r["text"], r["finish"]) for r in mine]
        distinct = [metrics.distinct_n([w], 2) for w in words if len(w) >= 2]
        return -np.mean(judged), np.mean(distinct)

    human_nll, human_diversity = statistics("human")
    assert summary["human"]["nll"] == pytest.approx(human_nll, abs=1e-4)
    assert summary["human"]["diversity"] == pytest.approx(human_diversity)
    for setting in summary["settings"]:
        nll, diversity = statistics(setting["label"])
        assert setting["quality"] == pytest.approx(nll, abs=1e-4)
        assert setting["diversity"] == pytest.approx(diversity)
        assert setting["quality_ci"][0] <= setting["quality"] <= setting["quality_ci"][1]
        assert 0 <= setting["stuck"] <= 1
    for family in summary["families"]:
        assert len(family["best_of_n"]) == 2 and family["best_of_n"][1] <= family["best_of_n"][0]
    assert (swept / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "matched quality" in (swept / "sweep.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "top-k", "-s", "greedy"], "--sweep and --strategy both choose the strategies"),
        (["--sweep", "--prompt", "The"], "--sweep needs the human text as its target"),
        (["--bootstrap", "10"], "--bootstrap sets the intervals of --sweep"),
        (["--sweep", "top-k:k=0"], "top_k=0 is invalid"),
        (["--sweep", "/nonexistent/grid.toml"], "sweep file not found: /nonexistent/grid.toml"),
        (["--sweep", "top-k", "--bootstrap", "0"], "--bootstrap must be >= 1"),
        (["--sweep", "top-k", "--judge", "j.pt", "--oracle", "o"], "--judge and --oracle would both be --sweep's"),
        (["--escape-tokens", "-1"], "--escape-tokens must be >= 0"),
    ],
)
def test_sweep_bad_input(args, message, tiny_checkpoint, capsys):
    code = sample.main(["compare", str(tiny_checkpoint), "--max-new-tokens", "3", "--no-progress", *args])
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_a_judge_with_another_tokenizer_is_refused(tiny_checkpoint, bpe_checkpoint, capsys):
    code = sample.main(["compare", str(tiny_checkpoint), "--judge", str(bpe_checkpoint[0]), "--max-new-tokens", "3",
                        "--no-progress"])
    assert code == 2 and "has another tokenizer than" in one_line_error(capsys.readouterr().err)


def test_sweep_speed_bench_runs(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """bench/sweep_speed.py end to end (in-process) with tiny settings, so the bench cannot silently break."""
    out = tmp_path / "sweep_speed.json"
    monkeypatch.setattr(sys, "argv", ["sweep_speed.py", str(tiny_checkpoint), "--sweep", "temperature:t=0.7|1",
                                      "--num-prompts", "2", "--num-samples", "1", "--max-new-tokens", "4",
                                      "--bootstrap", "5", "--out", str(out)])
    runpy.run_path(str(ROOT / "bench" / "sweep_speed.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "wall time" in printed and "best-of-N" in printed
    record = json.loads(out.read_text())
    assert record["settings"] == 2 and record["wall_seconds"] > record["generation_seconds"] > 0
