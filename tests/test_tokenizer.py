"""Tests for model/tokenizer.py: char, trained BPE and named tiktoken tokenizers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.bpe_trainer import BPE_MIN_VOCAB_SIZE, GPT2_SPLIT_PATTERN, count_pieces, train_bpe
from model.errors import UserError
from model.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, TiktokenTokenizer, fit_tokenizer, tokenizer_from_state

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"

# The pattern exactly as GPT-2 published it (encoder.py of openai/gpt-2).
GPT2_ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text rich in what the pattern treats specially: contractions, spaces before words,
# runs of whitespace, digits, symbols, non-ASCII letters.
gpt2ish_text = st.text(alphabet="ab'sltvedm 1 \n\t.,!é→\u00a0", max_size=60) | st.text(max_size=60)


def merge_left_to_right(parts: list[bytes], token: bytes) -> list[bytes]:
    """Replace every adjacent pair in ``parts`` that spells ``token``, left to right."""
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] + parts[i + 1] == token:
            merged.append(token)
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


def encode_rank_at_a_time(ranks: dict[bytes, int], text: str) -> list[int]:
    """Plain reference BPE: split with GPT-2's original pattern, then for each learned
    token in rank order merge every adjacent pair that spells it."""
    merges = sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__)
    ids: list[int] = []
    for piece in regex.findall(GPT2_ORIGINAL_PATTERN, text):
        piece_bytes = piece.encode("utf-8")
        parts = [bytes([b]) for b in piece_bytes]
        for token in merges:
            if token in piece_bytes:  # (a token that is no substring cannot apply)
                parts = merge_left_to_right(parts, token)
        ids += [ranks[p] for p in parts]
    return ids


def train_from_scratch(text: str, vocab_size: int) -> dict[bytes, int]:
    """Plain reference trainer: recount every pair of every piece before each merge."""
    piece_count = Counter(regex.findall(GPT2_ORIGINAL_PATTERN, text))
    parts = {piece: [bytes([b]) for b in piece.encode("utf-8")] for piece in piece_count}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        pair_count = Counter()
        for piece, tokens in parts.items():
            for a, b in zip(tokens, tokens[1:]):
                pair_count[a + b] += piece_count[piece]
        if not pair_count:
            break
        best = min(pair_count, key=lambda pair: (-pair_count[pair], pair))
        if pair_count[best] < 2:
            break
        ranks[best] = len(ranks)
        parts = {piece: merge_left_to_right(tokens, best) for piece, tokens in parts.items()}
    return ranks


@pytest.fixture(scope="module")
def corpus() -> str:
    """About 40 KB of English and code from the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))[:40_000]


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return BPETokenizer(train_bpe([corpus], 600))


# ---------------------------------------------------------------- pre-tokenising


@given(gpt2ish_text)
def test_split_pattern_splits_like_gpt2s_original(text):
    assert regex.findall(GPT2_SPLIT_PATTERN, text) == regex.findall(GPT2_ORIGINAL_PATTERN, text)


@given(gpt2ish_text, st.lists(st.integers(0, 60), max_size=6))
def test_count_pieces_does_not_depend_on_where_chunks_are_cut(text, cuts):
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert count_pieces(iter(chunks)) == Counter(regex.findall(GPT2_ORIGINAL_PATTERN, text))


# ------------------------------------------------------------------------ char


def test_char_vocabulary_is_the_sorted_distinct_characters_then_eot():
    tok = CharTokenizer.from_corpus(iter(["hel", "lo"]))  # distinct: e h l o
    assert (tok.vocab_size, tok.eot_id) == (5, 4)
    assert tok.encode("hole") == [1, 3, 2, 0]  # h=1 o=3 l=2 e=0
    assert tok.decode([1, 0, 2, 2, 3, 4]) == "hello" + EOT_TEXT
    assert tok.token_bytes(4) == EOT_TEXT.encode()


@given(st.text(min_size=1), st.data())
def test_char_round_trips_text_from_its_alphabet(training_text, data):
    tok = CharTokenizer.from_corpus([training_text])
    text = data.draw(st.text(alphabet=sorted(set(training_text))))
    ids = tok.encode(text)
    assert all(0 <= i < tok.eot_id for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_char_names_the_characters_it_never_saw():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match=r"^text has characters the char tokenizer never saw: 'é', '→'$"):
        tok.encode("abécb→é")
    with pytest.raises(UserError, match=r"^prompt has characters .*: 'x'$"):
        tok.check_encodable("xa", what="prompt")
    many = "".join(chr(0x3B1 + i) for i in range(13))  # 13 Greek letters, none known
    with pytest.raises(UserError, match=r"'α', .* and 3 more \(13 distinct\)$") as error:
        tok.encode("a" + many)
    assert str(error.value).count("'") == 2 * 10  # ten shown, each quoted


def test_char_needs_a_nonempty_corpus():
    with pytest.raises(UserError, match="empty"):
        CharTokenizer.from_corpus(["", ""])


# ------------------------------------------------------------- BPE, by hand


def test_bpe_learns_merges_in_frequency_order_worked_by_hand():
    # Pieces (GPT-2 split keeps the space with the word): " ab" x2, " cd" x2, " abd" x1.
    # Pair counts, each piece's pairs weighted by how often the piece occurs:
    #   " a": 2 + 1 = 3   "ab": 2 + 1 = 3   " c": 2   "cd": 2   "bd": 1
    # Merge 256: tie at 3; the pair whose bytes sort first wins: b" a" (0x20 < 0x61).
    #   Now " ab" = [" a", "b"], " abd" = [" a", "b", "d"]:  " ab": 2 + 1 = 3, "bd": 1
    # Merge 257: " ab" (3).  Now " ab" = [" ab"], " abd" = [" ab", "d"]: " abd": 1
    # Merge 258: tie " c" / "cd" at 2; b" c" sorts first.  " cd" = [" c", "d"]
    # Merge 259: " cd" (2).  Left: " abd" once, so training stops early.
    ranks = train_bpe([" ab ab cd cd abd"], vocab_size=300)
    learned = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert learned == [(256, b" a"), (257, b" ab"), (258, b" c"), (259, b" cd")]
    assert all(ranks[bytes([b])] == b for b in range(256))
    tok = BPETokenizer(ranks)
    assert (tok.eot_id, tok.vocab_size) == (260, 261)

    # vocab_size 259 = 256 bytes + eot + 2 merges.
    assert len(train_bpe([" ab ab cd cd abd"], vocab_size=259)) == 258

    # " abd cab cd" splits into " abd", " cab", " cd":
    #   " abd": " a" then " ab" merge; " abd" is no token    -> [257, ord("d")]
    #   " cab": " c" merges; " ca" and "ab" are no tokens     -> [258, ord("a"), ord("b")]
    #   " cd" : " c" then " cd"                               -> [259]
    assert tok.encode(" abd cab cd") == [257, 100, 258, 97, 98, 259]
    assert tok.encode("cd") == [99, 100]  # only " cd" (with the space) was learned


def test_bpe_merges_overlapping_pairs_left_to_right_worked_by_hand():
    # Pieces "aaa" x1, " aaa" x1.  "aa" occurs twice in each: "aa": 4, " a": 1.
    # Merge 256: "aa"; "aaa" -> ["aa", "a"] (left to right), " aaa" -> [" ", "aa", "a"].
    # Merge 257: "aaa" (2).  Left: " aaa" once -> stop.
    ranks = train_bpe(["aaa aaa"], vocab_size=1000)
    assert sorted((r, t) for t, r in ranks.items() if r >= 256) == [(256, b"aa"), (257, b"aaa")]
    # "aaaaa": "aa" (256) leftmost -> aa|a|a|a; next lowest "aa" at a|a -> aa|aa|a;
    # "aaaa" is no token, "aaa" (257) -> aa|aaa.
    assert BPETokenizer(ranks).encode("aaaaa") == [256, 257]


def test_train_bpe_rejects_a_vocab_too_small_for_one_merge():
    with pytest.raises(UserError, match=f"at least {BPE_MIN_VOCAB_SIZE}.*got 257"):
        train_bpe(["abab"], 257)


# --------------------------------------------------- BPE against a reference


def test_incremental_trainer_matches_recounting_from_scratch(corpus):
    text = corpus[:4000]
    assert train_bpe([text], 330) == train_from_scratch(text, 330)


@settings(max_examples=60)
@given(st.text(alphabet="abc '\né", max_size=150), st.integers(258, 320))
def test_incremental_trainer_matches_recounting_from_scratch_on_small_texts(text, vocab_size):
    assert train_bpe([text], vocab_size) == train_from_scratch(text, vocab_size)


def test_reference_encoder_agrees_with_tiktoken_on_the_training_text(bpe, corpus):
    assert bpe.vocab_size == 600  # the corpus is big enough for every merge
    assert bpe.encode(corpus) == encode_rank_at_a_time(bpe.ranks, corpus)


@settings(max_examples=50)
@given(gpt2ish_text)
def test_reference_encoder_agrees_with_tiktoken_on_any_text(bpe, text):
    assert bpe.encode(text) == encode_rank_at_a_time(bpe.ranks, text)


def test_rank_at_a_time_and_tiktoken_can_differ_for_hand_made_ranks():
    # Not trainable: "abcd" is listed as if made from "ab" + "cd", yet "bc" outranks
    # both, so no text ever shows "ab" next to "cd".  For " abcd":
    #   tiktoken: "bc" -> _ a bc d; "bcd" -> _ a bcd; now "a"+"bcd" spells the earlier
    #             "abcd", which tiktoken merges                     -> [32, 259]
    #   rank at a time: 257 ab, 258 cd, 259 abcd find nothing in _ a bc d; 260 bcd
    #             -> _ a bcd, and 259 is past                      -> [32, 97, 260]
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259, b"bcd": 260})
    assert BPETokenizer(ranks).encode(" abcd") == [32, 259]
    assert encode_rank_at_a_time(ranks, " abcd") == [32, 97, 260]


# ------------------------------------------------------------- BPE behaviour


@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert b"".join(bpe.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert bpe.unknown_characters(text) == []


def test_bpe_decodes_a_cut_character_as_replacement(bpe):
    ids = bpe.encode("é")  # two bytes, c3 a9; not merged in an English corpus
    assert ids == [0xC3, 0xA9]
    assert bpe.decode(ids[:1]) == "\ufffd"
    assert bpe.token_bytes(ids[0]) == b"\xc3"


def test_rank_file_loads_with_tiktokens_own_reader(bpe, tmp_path, monkeypatch):
    path = tmp_path / "bpe.tiktoken"
    bpe.save(path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, cache nothing
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == bpe.ranks
    assert BPETokenizer.from_rank_file_text(path.read_text(encoding="ascii")).ranks == bpe.ranks


def test_rank_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("YQ== 97\nnot-base64! 1\n")
    with pytest.raises(UserError, match=r"bad.tiktoken, line 2: expected '<base64 token> <rank>'"):
        BPETokenizer.from_rank_file_text(path.read_text(), source=str(path))
    only_ascii = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(128))
    with pytest.raises(UserError, match="all 256 single bytes.*missing 128"):
        BPETokenizer.from_rank_file_text(only_ascii)
    gap = {bytes([b]): b for b in range(256)} | {b"ab": 257}
    with pytest.raises(UserError, match="ranks must be 0..256"):
        BPETokenizer(gap)


# ----------------------------------------------------------- eot and state


@pytest.fixture(scope="module")
def char(corpus) -> CharTokenizer:
    return CharTokenizer.from_corpus([corpus])


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_eot_is_one_extra_id_that_plain_text_never_produces(name, request):
    tok = request.getfixturevalue(name)
    assert tok.vocab_size == tok.eot_id + 1
    text = "end" + EOT_TEXT + "start"  # "<|endoftext|>" inside text is plain text
    if name == "char":
        text = "end" + "".join(c for c in EOT_TEXT if c in tok.chars) + "start"
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.eot_id]) == EOT_TEXT
    assert tok.token_bytes(tok.eot_id) == EOT_TEXT.encode()
    assert tok.decode(ids + [tok.eot_id] + ids) == text + EOT_TEXT + text


def test_bpe_reads_a_literal_eot_as_ordinary_bytes(bpe):
    ids = bpe.encode(EOT_TEXT)
    assert bpe.eot_id not in ids and len(ids) > 1
    assert bpe.decode(ids) == EOT_TEXT


def fake_encoding(name: str) -> tiktoken.Encoding:
    """A tiny stand-in for a downloaded encoding: bytes, "ab", and eot at 300."""
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256}
    return tiktoken.Encoding(
        name=name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 300}
    )


@pytest.mark.parametrize("name", ["char", "bpe", "tiktoken"])
def test_state_rebuilds_the_same_tokenizer_through_json_and_torch(name, request, monkeypatch, corpus):
    if name == "tiktoken":
        monkeypatch.setattr(tiktoken, "get_encoding", fake_encoding)
        tok = TiktokenTokenizer("gpt2")
    else:
        tok = request.getfixturevalue(name)
    state = tok.state()
    via_json = json.loads(json.dumps(state))
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    via_torch = torch.load(buffer, weights_only=True)["tokenizer"]
    sample = corpus[1000:3000]
    for saved in (state, via_json, via_torch):
        rebuilt = tokenizer_from_state(saved)
        assert (rebuilt.name, rebuilt.vocab_size, rebuilt.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
        assert rebuilt.encode(sample) == tok.encode(sample)


def test_state_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown kind 'sentencepiece'"):
        tokenizer_from_state({"kind": "sentencepiece"})
    with pytest.raises(UserError, match="lacks 'chars'"):
        tokenizer_from_state({"kind": "char"})


# ------------------------------------------------------------------ tiktoken


def test_tiktoken_wrapper_uses_the_encodings_eot_and_size(monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", fake_encoding)
    tok = TiktokenTokenizer("gpt2")
    assert (tok.name, tok.eot_id, tok.vocab_size) == ("tiktoken:gpt2", 300, 301)
    assert tok.encode("abc" + EOT_TEXT) == [256, 99, *(tok.encode(EOT_TEXT))]
    assert 300 not in tok.encode(EOT_TEXT)
    assert tok.decode([256, 300]) == "ab" + EOT_TEXT


def test_tiktoken_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown tiktoken encoding 'gtp2'; known: .*\bgpt2\b.*cl100k_base"):
        TiktokenTokenizer("gtp2")


@pytest.mark.parametrize("cache", ["folder", "off"])
def test_tiktoken_offline_error_says_where_to_put_the_file(cache, tmp_path, monkeypatch):
    if "gpt2" in tiktoken.registry.ENCODINGS:
        pytest.skip("gpt2 was already loaded in this process; nothing would be fetched")
    # Make the download fail for real, network or not: every HTTPS request goes through
    # a "proxy" on a local port that nothing listens on, so the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    for variable in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{closed_port}")
    for variable in ("NO_PROXY", "no_proxy", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    cache_dir = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir) if cache == "folder" else "")

    with pytest.raises(UserError) as error:
        TiktokenTokenizer("gpt2")
    message = str(error.value)
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
    sha1 = hashlib.sha1(url.encode()).hexdigest()
    assert "\n" not in message
    assert f"could not download {url} for encoding 'gpt2'" in message
    if cache == "folder":
        assert f"save it as {cache_dir / sha1}," in message
    else:
        assert f"set TIKTOKEN_CACHE_DIR to a folder and save it there as {sha1}," in message


# ---------------------------------------------------------------- fit_tokenizer


def test_fit_tokenizer_builds_each_kind(corpus, monkeypatch):
    calls = []

    def chunks():
        calls.append(1)
        return iter([corpus[:5000], corpus[5000:10000]])

    char = fit_tokenizer("char", chunks, vocab_size=None)
    assert isinstance(char, CharTokenizer) and char.chars == "".join(sorted(set(corpus[:10000])))
    bpe = fit_tokenizer("bpe", chunks, vocab_size=300)
    assert isinstance(bpe, BPETokenizer) and bpe.ranks == train_bpe([corpus[:10000]], 300)
    assert len(calls) == 2  # one pass each

    monkeypatch.setattr(tiktoken, "get_encoding", fake_encoding)
    named = fit_tokenizer("tiktoken:gpt2", chunks, vocab_size=None)
    assert named.name == "tiktoken:gpt2" and len(calls) == 2  # the corpus is not read


def test_fit_tokenizer_errors():
    valid_forms = (r"use 'char', 'bpe', 'gpt2:<folder with vocab.json and merges.txt>' or 'tiktoken:<name>' "
                   r"with <name> one of .*gpt2")
    with pytest.raises(UserError, match=rf"unknown tokenizer 'word'; {valid_forms}"):
        fit_tokenizer("word", lambda: ["x"], None)
    with pytest.raises(UserError, match="bpe tokenizer needs a vocab_size"):
        fit_tokenizer("bpe", lambda: ["x"], None)
    with pytest.raises(UserError, match="at least 258"):
        fit_tokenizer("bpe", lambda: ["x"], 100)
    with pytest.raises(UserError, match="unknown tiktoken encoding ''"):
        fit_tokenizer("tiktoken:", lambda: ["x"], None)


def test_train_bpe_progress_bar_does_not_change_the_result(corpus, capsys):
    assert train_bpe([corpus[:5000]], 300, progress=True) == train_bpe([corpus[:5000]], 300)
    assert "training BPE" in capsys.readouterr().err


# ------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_bpe_trained_on_tinyshakespeare_round_trips_it():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is not here")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = BPETokenizer(train_bpe([text], 2048))
    assert tok.vocab_size == 2048
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # it compresses
    assert tok.decode(ids) == text
