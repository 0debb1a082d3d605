"""Corpus reading, the train/val split, the token files, and prepare's error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import corpus
from model.corpus import Document, find_documents, iter_pieces
from model.data import open_split, read_meta, read_windows, sample_starts, token_dtype
from model.errors import UserError
from tests.conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "data"))
from prepare import main as prepare_main  # noqa: E402
from prepare import prepare  # noqa: E402


def bytes_doc(name: str, data: bytes) -> Document:
    import io

    return Document(name, len(data), lambda: io.BytesIO(data))


def split_texts(docs, val_fraction=0.1):
    texts = {"train": "", "val": ""}
    for piece in iter_pieces(docs, val_fraction):
        texts[piece.split] += piece.text
    return texts


def test_split_is_the_text_after_the_first_line_break_past_ninety_percent():
    lines = [f"line {i:03d}\n" for i in range(20)]  # 20 lines x 10 bytes = 200 bytes
    text = "".join(lines)
    texts = split_texts([bytes_doc("d", text.encode())])
    # 90% of 200 = byte 180 = start of line 18; its line break is byte 189 -> val = line 19
    assert texts["train"] == "".join(lines[:19])
    assert texts["val"] == lines[19]


def test_one_line_file_splits_at_the_byte_itself():
    # "é" is 2 bytes: 50 of them and a line break = 101 bytes; 90% = byte int(90.9) = 90,
    # the start of the 46th "é". The only line break after it ends the file, so val
    # starts at byte 90 itself: 5 characters and the line break.
    texts = split_texts([bytes_doc("d", ("é" * 50 + "\n").encode())])
    assert texts == {"train": "é" * 45, "val": "é" * 5 + "\n"}
    # a split point inside a character moves back to its first byte: 92 bytes, 90% = byte 82,
    # the second byte of the 41st "é" (bytes 81-82), so val starts at byte 81
    texts = split_texts([bytes_doc("d", ("a" + "é" * 45 + "\n").encode())])
    assert texts == {"train": "a" + "é" * 40, "val": "é" * 5 + "\n"}


@settings(max_examples=50, deadline=None)
@given(
    docs=st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=5),
    chunk=st.integers(min_value=4, max_value=64),
    fraction=st.floats(min_value=0.05, max_value=0.95),
)
def test_pieces_rebuild_the_corpus_whatever_the_chunk_size(docs, chunk, fraction):
    """Chunking never loses, duplicates or reorders text, and one end per document."""
    original = corpus.CHUNK_BYTES
    corpus.CHUNK_BYTES = chunk
    try:
        documents = [bytes_doc(f"d{i}", d.encode()) for i, d in enumerate(docs)]
        pieces = list(iter_pieces(documents, fraction))
    finally:
        corpus.CHUNK_BYTES = original
    assert "".join(p.text for p in pieces) == "".join(docs)
    assert sum(p.ends_document for p in pieces) == sum(1 for d in docs if d)
    splits = [p.split for p in pieces]
    assert splits == sorted(splits, key=lambda s: s == "val")  # all train, then all val


def test_non_utf8_names_file_and_offset(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello\n" * 30 + b"abc\xffdef\n")  # the bad byte is at 6*30 + 3 = 183
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 16)  # the offset must survive chunking
    with pytest.raises(UserError) as info:
        list(iter_pieces(find_documents([str(path)]), 0.5))
    message = str(info.value)
    assert str(path) in message and "byte offset 183" in message and "--encoding-errors replace" in message


def test_an_empty_corpus_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(UserError, match=f"the corpus is empty: {path} holds no text"):
        corpus.check_not_empty(find_documents([str(path)]), [str(path)])


def test_encoding_errors_replace_goes_on(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\xffcd\n" * 20)
    text = "".join(p.text for p in iter_pieces(find_documents([str(path)]), 0.1, errors="replace"))
    assert text == "ab\ufffdcd\n" * 20


def test_directory_is_read_recursively_in_order_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / ".hidden").write_text("secret")
    names = [d.name for d in find_documents([str(tmp_path)])]
    assert names == [str(tmp_path / "1.txt"), str(tmp_path / "b" / "2.txt")]
    assert [d.name for d in find_documents([str(tmp_path / "**" / "*.txt")])] == names


def _corpus_with_a_subfolder(tmp_path):
    (tmp_path / "corpus" / "locked").mkdir(parents=True)
    (tmp_path / "corpus" / "1.txt").write_text("one\n" * 50)
    (tmp_path / "corpus" / "locked" / "2.txt").write_text("two\n" * 50)
    return tmp_path / "corpus"


def test_a_subfolder_that_cannot_be_read_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    # The tests run as root, whom chmod does not lock out: listing the folder fails instead.
    corpus = _corpus_with_a_subfolder(tmp_path)
    locked, scandir = corpus / "locked", os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    assert prepare_main([str(corpus), "--out", str(tmp_path / "ds"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot read folder {locked} (Permission denied); make it readable or leave it out\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_a_subfolder_without_read_permission_is_an_error(tmp_path):
    corpus = _corpus_with_a_subfolder(tmp_path)
    (corpus / "locked").chmod(0)
    try:
        with pytest.raises(UserError, match=r"cannot read folder .*locked \(Permission denied\)"):
            find_documents([str(corpus)])
    finally:
        (corpus / "locked").chmod(0o755)


def test_missing_inputs_are_errors(tmp_path):
    with pytest.raises(UserError, match="corpus not found"):
        find_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="no files match"):
        find_documents([str(tmp_path / "*.md")])
    with pytest.raises(UserError, match="has no files"):
        find_documents([str(tmp_path)])


def test_token_dtype_is_the_narrowest_that_fits():
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535
    assert token_dtype(65537) == np.dtype("<u4")


def test_prepare_writes_splits_meta_and_end_of_text(tmp_path, tiny_corpus):
    out = tmp_path / "ds"
    meta = prepare([str(tiny_corpus)], out, "char", progress=False)
    assert read_meta(out) == meta
    text = tiny_corpus.read_text()
    assert meta["vocab_size"] == len(set(text)) + 1  # characters + end-of-text
    train, val = open_split(out, "train", meta), open_split(out, "val", meta)
    assert train.dtype == np.uint16
    assert len(train) + len(val) == len(text) + 1  # one token per character, one end-of-text
    assert val[-1] == meta["eot_id"] and meta["eot_id"] not in train
    assert meta["tokens"] == {"train": len(train), "val": len(val)}


def test_prepare_bpe_saves_a_tiktoken_rank_file(tmp_path, tiny_corpus):
    from tiktoken.load import load_tiktoken_bpe

    out = tmp_path / "ds"
    meta = prepare([str(tiny_corpus)], out, "bpe", vocab_size=300, progress=False)
    ranks = load_tiktoken_bpe(str(out / "tokenizer.tiktoken"))
    assert len(ranks) + 1 == meta["vocab_size"] <= 300


def test_failed_prepare_keeps_the_previous_dataset(tmp_path, tiny_corpus):
    out = tmp_path / "ds"
    prepare([str(tiny_corpus)], out, "char", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" * 100 + b"\xfe")
    with pytest.raises(UserError):
        prepare([str(bad)], out, "char", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "ds"]  # no staging left behind


STAGING_RUN = """
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/data"]
from prepare import _new_staging
staging = _new_staging(Path(sys.argv[2]))
(staging / "train.bin").write_bytes(bytes(1000))
print(staging, flush=True)
time.sleep(300)
"""


def _run_staging(out) -> tuple[subprocess.Popen, Path]:
    """A prepare stopped after it made its staging folder; the folder's path."""
    run = subprocess.Popen([sys.executable, "-c", STAGING_RUN, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    return run, Path(run.stdout.readline().strip())


def test_a_later_prepare_removes_the_staging_of_a_killed_one_only(tmp_path, tiny_corpus):
    out = tmp_path / "ds"
    killed, killed_staging = _run_staging(out)
    live, live_staging = _run_staging(out)
    try:
        killed.kill()  # SIGKILL: no cleanup runs
        killed.wait()
        assert killed_staging.is_dir()
        prepare([str(tiny_corpus)], out, "char", progress=False)
        assert not killed_staging.exists()
        assert live_staging.is_dir()  # a run still at work keeps its folder
    finally:
        live.kill()
        live.wait()
        for run in (killed, live):
            run.stdout.close()


def test_prepare_refuses_to_overwrite_a_foreign_folder(tmp_path, tiny_corpus):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepared dataset"):
        prepare([str(tiny_corpus)], tmp_path, "char", progress=False)


def test_prepare_keeps_files_it_did_not_write(tmp_path, tiny_corpus):
    out = tmp_path / "ds"
    prepare([str(tiny_corpus)], out, "char", progress=False)
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(UserError, match=r"not part of its dataset \(NOTES.md\)"):
        prepare([str(tiny_corpus)], out, "char", progress=False)
    assert (out / "NOTES.md").read_text() == "mine"


def test_prepare_out_that_is_a_file_is_an_error(tmp_path, tiny_corpus):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare([str(tiny_corpus)], tmp_path / "afile", "char", progress=False)


def test_damaged_dataset_files_are_named(tiny_dataset, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dataset, damaged)
    meta = read_meta(damaged)
    with (damaged / "train.bin").open("ab") as f:
        f.write(b"\0")  # half a uint16 token
    with pytest.raises(UserError, match="train.bin is damaged"):
        open_split(damaged, "train", meta)
    del meta["dtype"]
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json lacks dtype"):
        read_meta(damaged)
    (damaged / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="not written by data/prepare.py"):
        read_meta(damaged)


def test_windows_targets_are_inputs_shifted_by_one():
    import torch

    tokens = np.arange(100, dtype=np.uint16)
    starts = sample_starts(len(tokens), 8, 4, torch.Generator().manual_seed(0))
    x, y = read_windows(tokens, starts, 8)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: each target is the next token
    assert int(y.max()) <= 99


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: str(d / "missing.txt"), "corpus not found"),
        # the same messages are checked in-process above; through the real CLI once in the default suite
        pytest.param(lambda d: (d / "empty.txt").write_text("") and str(d / "empty.txt") or str(d / "empty.txt"),
                     "the corpus is empty", marks=pytest.mark.slow),
        pytest.param(lambda d: (d / "latin1.txt").write_bytes("café\n".encode("latin-1")) and str(d / "latin1.txt"),
                     "not UTF-8 at byte offset 3", marks=pytest.mark.slow),
    ],
)
def test_prepare_cli_bad_input(tmp_path, make_input, message):
    result = run_cli("data/prepare.py", make_input(tmp_path), "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_prepare_cli_unknown_tokenizer(tmp_path, tiny_corpus):
    result = run_cli("data/prepare.py", str(tiny_corpus), "--tokenizer", "wordpiece", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "char" in result.stderr and "bpe" in result.stderr


def test_meta_json_is_plain_json(tiny_dataset):
    """A reader without this project can use meta.json: plain JSON that says what the token
    files hold (ids, their type, how many) and how to decode them."""
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["tokenizer_name"]) == ("tinygpt-tokens", 1, "char")
    chars = meta["tokenizer"]["chars"]
    assert meta["tokenizer"]["kind"] == "char" and chars == "".join(sorted(set(chars)))
    assert meta["vocab_size"] == len(chars) + 1 and meta["eot_id"] == len(chars)
    for split in ("train", "val"):
        ids = np.fromfile(tiny_dataset / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
        assert meta["tokens"][split] == len(ids) and int(ids.max()) < meta["vocab_size"]
    assert meta["dtype"] == "<u2" and meta["source"]["documents"] == 1


@pytest.mark.slow
def test_prepare_streams_a_big_corpus_in_bounded_memory(tmp_path):
    """A 100 MB corpus adds well under 100 MB to the peak of a process that only imports
    the project: prepare holds a chunk, not the corpus (bench/prepare_memory.py prints more)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from prepare_memory import peak_rss_mb, write_corpus

    corpus = tmp_path / "big.txt"
    size_mb = write_corpus(corpus, 100) / 1e6
    floor, _ = peak_rss_mb([sys.executable, "-c", "import torch, numpy, tiktoken, model.tokenizer"])
    for tokenizer in ("char", "bpe"):
        peak, _ = peak_rss_mb([sys.executable, "data/prepare.py", str(corpus), "--tokenizer", tokenizer,
                               "--out", str(tmp_path / tokenizer), "--no-progress"])
        assert peak - floor < size_mb / 2, (tokenizer, peak, floor)


def test_a_glob_across_symlink_loops_ends(tmp_path):
    """Two folders that link back up the tree: a recursive glob that followed them would
    never end. Each real file is found once."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "t.txt").write_text("text")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "root").symlink_to(tmp_path)
    code = ("import sys; from model.corpus import find_documents; "
            "print('\\n'.join(d.name for d in find_documents(sys.argv[1:])))")
    for pattern in (str(tmp_path / "**" / "*.txt"), str(tmp_path)):
        result = run_cli("-c", code, pattern, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [str(tmp_path / "a" / "b" / "t.txt"), str(tmp_path / "top.txt")]


def test_prepare_cli_unknown_flag_is_an_error(tmp_path, tiny_corpus):
    result = run_cli("data/prepare.py", str(tiny_corpus), "--out", str(tmp_path / "o"), "--some-unknown-flag")
    assert result.returncode == 2 and "unrecognized arguments: --some-unknown-flag" in result.stderr
    assert not (tmp_path / "o").exists()
