"""Bits per byte and scoring a text in windows, against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

import sample
from model.checkpoint import load_for_generation
from model.gpt import GPT
from model.score import TextScore, bits_per_byte, score_tokens, token_byte_lengths, windows
from model.tokenizer import CharTokenizer, TiktokenTokenizer, fit_tokenizer
from tests.conftest import TINY_TEXT, one_line_error, tiny_config

TEXT = "Sphinx of black quartz, judge my vow! Café, naïve, 東京 — and an emoji 🙂.\n" * 3


def uniform_model(vocab_size: int, block_size: int = 16) -> GPT:
    """A GPT whose logits are all zero (the final norm outputs zeros): every token costs ln V."""
    model = GPT(tiny_config(vocab_size=vocab_size, block_size=block_size, bias=True)).eval()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
    return model


@pytest.mark.parametrize("n, block, stride", [(1, 4, 2), (4, 4, 4), (5, 4, 4), (17, 4, 1), (17, 4, 3), (40, 16, 8)])
def test_windows_score_every_prediction_once_with_enough_context(n, block, stride):
    spans = windows(n, block, stride)
    scored = [i for _, end, first in spans for i in range(first, end)]
    assert scored == list(range(n))
    for index, (start, end, first) in enumerate(spans):
        assert end - start == min(block, n)  # one length, so windows batch together
        assert start <= first
        if index:
            assert first - start >= block - stride  # context of the first new token


def test_windows_refuse_a_stride_outside_the_block():
    for stride in (0, 5):
        with pytest.raises(ValueError, match="stride must be in"):
            windows(10, 4, stride)


def test_bits_per_byte_by_hand():
    assert bits_per_byte(2 * math.log(2), 2) == pytest.approx(1.0)  # 1 bit a byte
    assert TextScore(tokens=3, nats=3 * math.log(4), bytes=6).bits_per_byte == pytest.approx(1.0)
    assert TextScore(tokens=3, nats=3 * math.log(4), bytes=6).perplexity == pytest.approx(4.0)


def test_a_char_model_on_ascii_text_has_bpb_nats_per_token_over_ln2():
    text = "the cat sat on the mat and then the dog sat on the cat.\n"
    tokenizer = CharTokenizer.from_corpus([text])
    model = uniform_model(tokenizer.vocab_size)
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    result = sum(score_tokens(model, ids, token_byte_lengths(tokenizer, tokenizer.vocab_size),
                              block_size=16, stride=8), TextScore())
    # every character is one token and one byte; every token costs ln V
    assert (result.tokens, result.bytes) == (len(text), len(text))
    assert result.nats == pytest.approx(len(text) * math.log(tokenizer.vocab_size))
    assert result.bits_per_byte == pytest.approx(math.log2(tokenizer.vocab_size))
    assert result.bits_per_byte == pytest.approx(result.nats / result.tokens / math.log(2))


def tokenizers_to_compare():
    chosen = [CharTokenizer.from_corpus([TEXT]), fit_tokenizer("bpe", lambda: [TEXT, TINY_TEXT], 300)]
    try:
        chosen.append(TiktokenTokenizer("gpt2"))
    except Exception:  # no network and no cached encoding here: compare char and BPE
        pass
    return chosen


def test_the_same_text_has_the_same_bytes_under_every_tokenizer():
    expected = len(TEXT.encode("utf-8"))  # multi-byte characters included
    counts = {}
    for tokenizer in tokenizers_to_compare():
        lengths = token_byte_lengths(tokenizer, tokenizer.vocab_size + 3)  # with vocabulary padding
        ids = torch.tensor(tokenizer.encode(TEXT) + [tokenizer.eot_id])
        counts[tokenizer.name] = int(lengths[ids].sum())
        assert lengths[tokenizer.vocab_size:].eq(0).all() and lengths[tokenizer.eot_id] == 0
    assert counts == {name: expected for name in counts} and len(counts) >= 2


def test_windowed_scores_match_scoring_each_token_with_its_own_context():
    """stride 1: each token scored with exactly the block_size tokens before it (fewer at
    the start), computed here one token at a time from the model's raw logits."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=37, block_size=8)).eval()
    ids = torch.randint(0, 37, (30,)).tolist()
    lengths = torch.ones(37, dtype=torch.int64)
    expected = 0.0
    for i in range(len(ids) - 1):
        context = torch.tensor(ids[max(0, i + 1 - 8) : i + 1])[None]
        logits, _ = model(context)
        expected -= torch.log_softmax(logits[0, -1].double(), -1)[ids[i + 1]].item()
    result = sum(score_tokens(model, ids, lengths, block_size=8, stride=1, batch_size=5), TextScore())
    assert result.tokens == result.bytes == len(ids) - 1
    assert result.nats == pytest.approx(expected, rel=1e-5)
    # stride = block: fewer windows, less context, a different (here higher) number
    coarse = sum(score_tokens(model, ids, lengths, block_size=8, stride=8), TextScore())
    assert coarse.tokens == result.tokens and coarse.nats != pytest.approx(expected, rel=1e-5)


def test_score_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        next(score_tokens(GPT(tiny_config()), [0, 1, 2], torch.ones(37, dtype=torch.int64), block_size=16, stride=8))


def test_score_command_prints_bpb_and_perplexity(tiny_checkpoint, tmp_path, capsys):
    text = TINY_TEXT[:500]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text)
    b.write_text(text[:100])
    assert sample.main(["score", str(tiny_checkpoint), str(a), str(b), "--stride", "16", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(a), str(b), "total"]
    assert lines[0].startswith(f"{a}: 500 tokens, 500 bytes, bits per byte ")
    # by hand, from the same library call
    model, tokenizer, _ = load_for_generation(tiny_checkpoint, torch.device("cpu"))
    result = sum(score_tokens(model, [tokenizer.eot_id, *tokenizer.encode(text)],
                              token_byte_lengths(tokenizer, model.config.vocab_size),
                              block_size=model.config.block_size, stride=16), TextScore())
    assert f"bits per byte {result.bits_per_byte:.4f}, perplexity {result.perplexity:.3f}" in lines[0]
    assert result.bits_per_byte == pytest.approx(math.log2(result.perplexity))  # char, ASCII


@pytest.mark.parametrize("args, message", [
    (["--stride", "0"], "--stride must be in [1, block_size=32], got 0"),
    (["--stride", "33"], "--stride must be in [1, block_size=32], got 33"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_score_command_bad_input(args, message, tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox")
    assert sample.main(["score", str(tiny_checkpoint), str(text), *args]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_score_command_names_a_missing_file_and_an_unknown_character(tiny_checkpoint, tmp_path, capsys):
    assert sample.main(["score", str(tiny_checkpoint), str(tmp_path / "nope.txt")]) == 2
    assert "text file not found" in one_line_error(capsys.readouterr().err)
    odd = tmp_path / "odd.txt"
    odd.write_text("The quick brown 🦊")
    assert sample.main(["score", str(tiny_checkpoint), str(odd)]) == 2
    assert "🦊" in one_line_error(capsys.readouterr().err)


def test_score_command_scores_the_files_it_can_and_names_the_others(tiny_checkpoint, tmp_path, capsys):
    good, odd, empty = tmp_path / "good.txt", tmp_path / "odd.txt", tmp_path / "empty.txt"
    good.write_text(TINY_TEXT[:200])
    odd.write_text("The quick brown 🦊")
    empty.write_text("")
    assert sample.main(["score", str(tiny_checkpoint), str(odd), str(good), str(empty), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [str(good)]
    assert "Traceback" not in captured.err
    line = captured.err.split("\r")[-1].strip()  # after the progress bar, which clears its line
    assert "\n" not in line
    assert line.startswith("error: 2 of 3 files not scored (the other 1 scored above): ")
    assert f"{odd} has characters" in line and "🦊" in line and f"{empty} is empty" in line

