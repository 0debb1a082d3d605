"""One token loop: the CLI, the comparison and the server read the same event stream,
so for the same prompts, seed and strategy they give the same texts, and each ends the
same way (end-of-text, stop string, length)."""

from __future__ import annotations

import re

import pytest

import sample
from model.compare import run_comparison
from model.generate import Event, RowEnd, generate, generate_events, replay
from model.serve import ServeSettings, create_app
from model.strategy import parse_strategy
from model.tokenizer import CharTokenizer
from tests.live_server import LiveServer

# The second prompt is longer than the tiny checkpoint's context (32 tokens): every
# reader must treat it alike (read through the window).
PROMPTS = ["The quick", "A small model learns the shape of the text it reads, one"]
SEED, N, TOKENS, STOP = 5, 3, 40, "ck"
SPEC = "top-k:k=8,t=1.2"  # high temperature: the stop string and the length limit both occur


def cli_texts(capsys, checkpoint) -> list[tuple[str, str]]:
    """(text, finish) of each sample `python sample.py` prints (as each ends), in row order."""
    capsys.readouterr()
    argv = [str(checkpoint), "--device", "cpu", "--strategy", SPEC, "--seed", str(SEED), "--num-samples", str(N),
            "--max-new-tokens", str(TOKENS), "--stop", STOP]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert sample.main(argv) == 0
    captured = capsys.readouterr()
    assert "prompt 2 is 56 tokens, longer than this model's context: it sees the last 32" in captured.err
    parts = re.split(r"--- prompt (\d+), sample (\d+) \((\w+)\) ---\n", captured.out)[1:]
    texts = {}
    for p, s, finish, body in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
        prompt = PROMPTS[int(p) - 1]
        assert body.startswith(prompt) and body.endswith("\n")
        texts[(int(p) - 1) * N + int(s) - 1] = (body[len(prompt) : -1], finish)
    return [texts[row] for row in sorted(texts)]


def test_cli_compare_and_server_give_the_same_texts(loaded, tiny_checkpoint, capsys):
    model, tokenizer = loaded
    cli = cli_texts(capsys, tiny_checkpoint)
    comparison = run_comparison(model, tokenizer, PROMPTS, [parse_strategy(SPEC)], num_samples=N,
                                max_new_tokens=TOKENS, seed=SEED, stop=[STOP], progress=False)
    compared = [(s.text, s.finish) for s in comparison.runs[0].samples]
    settings = ServeSettings("tiny", max_tokens=64, max_rows=16)
    request = dict(model="tiny", prompt=PROMPTS, n=N, seed=SEED, max_tokens=TOKENS, stop=[STOP], temperature=1.2,
                   extra_body={"top_k": 8})
    with LiveServer(create_app(model, tokenizer, settings)) as live:
        whole = live.client().completions.create(**request)
        chunks = list(live.client().completions.create(**request, stream=True))
    served = [(c.text, c.finish_reason) for c in sorted(whole.choices, key=lambda c: c.index)]
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == row)
                for row in range(len(PROMPTS) * N)]

    assert len(cli) == len(compared) == len(served) == len(PROMPTS) * N
    assert [text for text, _ in cli] == [text for text, _ in compared] == [text for text, _ in served] == streamed
    assert [finish for _, finish in cli] == [finish for _, finish in compared]
    # the API names both the end-of-text token and a stop string "stop"
    assert [f for _, f in served] == ["length" if f == "length" else "stop" for _, f in cli]
    assert {"stop", "length"} <= {finish for _, finish in cli}  # the test sees both endings
    assert len({text for text, _ in cli}) > 1  # and different samples


# ----------------------------------------------------------------------------- the event stream

CHARS = CharTokenizer("abc \n")


def test_the_end_rule_cuts_at_end_of_text_stop_string_or_length():
    ids = CHARS.encode("ab c\nba")
    at_eot = replay(CHARS, ids[:3] + [CHARS.eot_id] + ids[3:])
    assert (at_eot.tokens, at_eot.text, at_eot.finish) == (ids[:3] + [CHARS.eot_id], "ab ", "eot")
    at_stop = replay(CHARS, ids, ["c\n"])
    assert (at_stop.tokens, at_stop.text, at_stop.finish) == (ids[:5], "ab ", "stop")
    assert (replay(CHARS, ids).text, replay(CHARS, ids).finish) == ("ab c\nba", "length")
    empty = replay(CHARS, [])
    assert (empty.tokens, empty.text, empty.finish) == ([], "", "length")


def test_held_back_text_comes_with_the_event_that_ends_the_row():
    # "ab" could be the start of the stop string "abc": held back until the row ends.
    end = RowEnd(0, CHARS, ["abc"], max_tokens=3)
    events = [end.take(t) for t in CHARS.encode(" ab")]
    assert [e.text for e in events] == [" ", "", "ab"]
    assert [e.finish for e in events] == [None, None, "length"]
    assert [e.offset for e in events] == [0, 1, 2]
    with pytest.raises(ValueError, match="has ended"):
        end.take(0)


def test_every_row_ends_exactly_once_and_rows_have_one_event_per_token(tiny_model):
    tokenizer = CharTokenizer("".join(chr(97 + i) for i in range(36)))  # 36 chars + end-of-text = vocab 37
    steps = list(generate_events(tiny_model, tokenizer, ["ab", "c"], parse_strategy("sample"), max_new_tokens=12,
                                 num_samples=2, seed=1, stop=["q"]))
    events: list[Event] = [e for step in steps for e in step]
    for row in range(4):
        mine = [e for e in events if e.row == row]
        assert [e.finish is not None for e in mine] == [False] * (len(mine) - 1) + [True]
        assert all(e.token is not None for e in mine)
    samples = generate(tiny_model, tokenizer, ["ab", "c"], parse_strategy("sample"), max_new_tokens=12,
                       num_samples=2, seed=1, stop=["q"])
    for row, sample in enumerate(samples):
        assert sample.tokens == [e.token for e in events if e.row == row]
        assert sample.text == "".join(e.text for e in events if e.row == row)


def test_no_tokens_asked_is_one_end_per_row(tiny_model):
    tokenizer = CharTokenizer("".join(chr(97 + i) for i in range(36)))
    steps = list(generate_events(tiny_model, tokenizer, ["ab"], parse_strategy("greedy"), max_new_tokens=0))
    assert steps == [[Event(0, None, "", None, 0, None, "length")]]


def test_the_offset_of_the_token_that_completes_a_stop_string_is_inside_the_text():
    tokenizer = CharTokenizer("xab")
    end = RowEnd(0, tokenizer, ["ab"], max_tokens=5)
    events = [end.take(t) for t in tokenizer.encode("xab")]
    assert "".join(e.text for e in events) == "x" and events[-1].finish == "stop"
    assert [e.offset for e in events] == [0, 1, 1]  # "b" would start at 2, past the cut text


def test_echoed_logprobs_are_each_choices_own(loaded):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64, max_rows=16))) as live:
        result = live.client().completions.create(model="tiny", prompt="The quick", n=2, seed=3, max_tokens=5,
                                                  echo=True, logprobs=1)
    for choice in result.choices:
        assert len(choice.logprobs.tokens) == len("The quick") + 5  # its prompt and its own 5 tokens
        assert "".join(choice.logprobs.tokens) == choice.text
